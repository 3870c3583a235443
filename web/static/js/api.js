// The Rill JSON API. Every failure becomes an ApiError carrying the server's stable code
// and its human message, or code "network" when the server could not be reached.
// (errors.js turns the code into the page's own words.)

import { t } from "./i18n.js";

export class ApiError extends Error {
  constructor(code, message, { status = 0, retryable = false, retryAfter = null, fromServer = false } = {}) {
    super(message);
    this.code = code;
    this.status = status;
    this.retryable = retryable;
    this.retryAfter = retryAfter; // seconds, from a 429's Retry-After or an error event's retry_after
    this.fromServer = fromServer; // message is the server's own (English) words
  }
}

/** Whether sending the same request again may work: a limit, a server fault, a session to renew. */
function retryableStatus(status, code) {
  return status === 408 || status === 429 || status >= 500 || code === "auth_required";
}

/** A Retry-After in seconds (the only form Rill sends), or null. */
function retryAfterOf(response) {
  const seconds = Number.parseInt(response.headers.get("Retry-After") ?? "", 10);
  return Number.isFinite(seconds) && seconds >= 0 ? seconds : null;
}

/** The ApiError for a refused request's JSON error body. */
function serverError(response, error) {
  noteAuthRequired(error.code);
  const signedOut = error.code === "auth_required"; // the server's words are for API clients
  return new ApiError(error.code, signedOut ? t("error.auth_required") : error.message, {
    status: response.status,
    retryable: retryableStatus(response.status, error.code),
    retryAfter: retryAfterOf(response),
    fromServer: !signedOut,
  });
}

/** Fired on window when the server wants a (new) sign-in: the session ended or was never made. */
export const AUTH_REQUIRED_EVENT = "rill:auth-required";

function noteAuthRequired(code) {
  if (code === "auth_required") window.dispatchEvent(new Event(AUTH_REQUIRED_EVENT));
}

const POST_ATTEMPTS = 3;
const POST_RETRY_DELAY_MS = 700;

/**
 * keepalive: the request completes even if the page is closed or reloaded meanwhile;
 * signal: an AbortSignal (a search the user typed past, say).
 */
export async function request(method, url, body, { keepalive = false, signal } = {}) {
  let response;
  try {
    response = await fetch(url, {
      method,
      headers: body === undefined ? {} : { "Content-Type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
      signal,
      keepalive,
    });
  } catch {
    throw new ApiError("network", t("error.network"), { retryable: true });
  }
  let payload = null;
  try {
    payload = await response.json();
  } catch {
    // A proxy's HTML error page, or an empty body: described below by status.
  }
  if (!response.ok) {
    const error = payload?.error;
    if (error && typeof error.code === "string" && typeof error.message === "string") {
      throw serverError(response, error);
    }
    throw new ApiError("http_error", t("err.unexpected", { detail: `HTTP ${response.status}` }), {
      status: response.status,
      retryable: retryableStatus(response.status, ""),
    });
  }
  if (payload === null || typeof payload !== "object") {
    throw new ApiError("bad_response", t("error.bad_response"), { status: response.status });
  }
  return payload;
}

export function listModels() {
  return request("GET", "/api/models");
}

/**
 * Starts a generation. A POST that fails in the network is sent again with the same
 * client_id, so the server recognises it and never asks the model twice.
 */
export async function startChat(body) {
  for (let attempt = 1; ; attempt++) {
    try {
      return await request("POST", "/api/chat", body);
    } catch (error) {
      if (error.code !== "network" || attempt >= POST_ATTEMPTS) throw error;
      await new Promise((resolve) => setTimeout(resolve, POST_RETRY_DELAY_MS * attempt));
    }
  }
}

export function stopChat(generationId) {
  return request("DELETE", `/api/chat/${encodeURIComponent(generationId)}`);
}

/** Why a stream cannot be reopened: the server's JSON error, or null if it can be. */
export async function probeEvents(generationId, lastEventId) {
  const controller = new AbortController();
  try {
    const response = await fetch(eventsUrl(generationId, lastEventId), { signal: controller.signal, cache: "no-store" });
    if (response.status === 204) return new ApiError("delivered", "", { status: 204 });
    if (response.ok) {
      // A captive portal or a misconfigured proxy answers 200 with a page of its own.
      const type = response.headers.get("Content-Type") ?? "";
      if (type.startsWith("text/event-stream")) return null;
      // (retryable: once signed in to the Wi-Fi, the same request works)
      return new ApiError("bad_response", t("error.bad_response"), { retryable: true });
    }
    const payload = await response.json().catch(() => null);
    const error = payload?.error;
    if (error?.code === "generation_not_found") {
      return new ApiError(error.code, t("error.generation_not_found"), { status: 404 });
    }
    if (error && typeof error.code === "string" && typeof error.message === "string") {
      return serverError(response, error);
    }
    return new ApiError("http_error", t("err.unexpected", { detail: `HTTP ${response.status}` }), {
      status: response.status,
      retryable: retryableStatus(response.status, ""),
    });
  } catch {
    return new ApiError("network", t("error.network"), { retryable: true });
  } finally {
    controller.abort(); // only the status was wanted; do not hold a stream open
  }
}

export function eventsUrl(generationId, lastEventId) {
  const base = `/api/chat/${encodeURIComponent(generationId)}/events`;
  return lastEventId > 0 ? `${base}?last_event_id=${lastEventId}` : base;
}
