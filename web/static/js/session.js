// Signing in with an access token. The server keeps the session in an HttpOnly cookie
// that page scripts never see; this module only asks for the token and posts it once.

import { ApiError, request } from "./api.js";
import { describeError } from "./errors.js";
import { t } from "./i18n.js";

export function sessionState() {
  return request("GET", "/api/session");
}

export function signOut() {
  return request("DELETE", "/api/session");
}

/** The sign-in dialog: `ask()` resolves once the server has accepted a token. */
export class SignInDialog {
  constructor(dialog) {
    this.dialog = dialog;
    this.form = dialog.querySelector("form");
    this.input = dialog.querySelector("input[type=password]");
    this.error = dialog.querySelector(".signin-error");
    this.button = dialog.querySelector("button[type=submit]");
    this.pending = null; // the promise of the current ask()
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this._submit();
    });
    // Nothing works without a session: Esc must not leave an unusable page behind.
    dialog.addEventListener("cancel", (event) => event.preventDefault());
    dialog.addEventListener("close", () => {
      if (this.pending) dialog.showModal();
    });
  }

  get open() {
    return this.pending !== null;
  }

  ask() {
    if (this.pending) return this.pending.promise;
    let resolve;
    const promise = new Promise((done) => (resolve = done));
    this.pending = { promise, resolve };
    this._showError("");
    this.input.value = "";
    this.dialog.showModal();
    this.input.focus();
    return promise;
  }

  async _submit() {
    const token = this.input.value.trim();
    if (!token || !this.pending) return;
    this.button.disabled = true;
    try {
      await request("POST", "/api/session", { token });
    } catch (error) {
      this._showError(this._explain(error));
      this.input.select();
      return;
    } finally {
      this.button.disabled = false;
    }
    const { resolve } = this.pending;
    this.pending = null;
    this.input.value = "";
    this.dialog.close();
    resolve();
  }

  _explain(error) {
    if (!(error instanceof ApiError)) return t("auth.failed");
    if (error.code === "too_many_attempts" && error.retryAfter !== null) {
      return t("auth.tooMany", { seconds: error.retryAfter });
    }
    return describeError(error).text;
  }

  _showError(text) {
    this.error.textContent = text;
    this.error.hidden = !text;
  }
}
