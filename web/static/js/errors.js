// What the page says about a failed answer or request. The server's message is English;
// the page words each known error code itself, in the page's language, and keeps the
// server's exact message (limits, the model API's own words) under "Details". Unknown
// codes (a newer server) show the server's message as it is.

import { hasText, t } from "./i18n.js";

/** Errors retried once by themselves after the wait the server gave (Retry-After or retry_after). */
const TIMED_CODES = new Set(["rate_limited", "too_many_generations", "server_busy", "too_many_streams", "upstream_rate_limited"]);
/** A longer wait is left to the user: a countdown of minutes helps nobody. */
export const MAX_AUTO_RETRY_S = 60;

/**
 * { text, detail } for error ({code, message, fromServer}); local: this Rill has no access
 * tokens (a single-user run), so the person reading is the one who runs it.
 */
export function describeError(error, { local = false } = {}) {
  // Advice about the server's key is for whoever runs it, not for every visitor: with
  // access tokens, neither the page's text nor the server's (under Details) shows it.
  const auth = error.code === "upstream_auth";
  const key = auth && local ? "error.upstream_auth.local" : `error.${error.code}`;
  const known = hasText(key);
  const text = known ? t(key) : error.message || t("err.unexpected", { detail: error.code });
  const detail = known && error.fromServer && error.message !== text && (local || !auth) ? error.message : "";
  return { text, detail };
}

/** Seconds to wait before the one automatic retry of error, or null: the user retries by hand. */
export function autoRetryDelay(error) {
  if (!error?.retryable || !TIMED_CODES.has(error.code)) return null;
  const seconds = error.retryAfter;
  if (typeof seconds !== "number" || !Number.isFinite(seconds) || seconds < 0 || seconds > MAX_AUTO_RETRY_S) return null;
  return Math.max(seconds, 1); // a moment at least: the countdown is seen, and a 0 is not a hammer
}
