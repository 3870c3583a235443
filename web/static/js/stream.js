// Following one generation's events with the browser's EventSource. EventSource resends
// Last-Event-ID by itself on reconnect; after a reload we pass the last id in the URL.
// When the browser gives up (the stream is gone, or the answer was not an event stream),
// the server is asked why, so the user sees its message rather than a silent stop.

import { ApiError, eventsUrl, probeEvents } from "./api.js";
import { t } from "./i18n.js";

const EVENT_NAMES = ["meta", "reasoning", "delta", "usage", "done"];
const OFFLINE_RETRY_MS = 3000;
const MAX_REOPENS = 6; // in a row without an event: the server keeps answering with something else

export class EventFollower {
  /**
   * handlers: onEvent(name, data, id), onOpen(), onReconnecting(), onLost(apiError)
   */
  constructor(generationId, lastEventId, handlers) {
    this.generationId = generationId;
    this.lastEventId = lastEventId;
    this.handlers = handlers;
    this.source = null;
    this.closed = false;
    this.reopens = 0;
    this._onOnline = () => this.reopen();
  }

  open() {
    if (this.closed) return;
    const source = new EventSource(eventsUrl(this.generationId, this.lastEventId));
    this.source = source;
    for (const name of EVENT_NAMES) source.addEventListener(name, (event) => this._dispatch(name, event));
    // "error" is both the server's terminal event (a MessageEvent with data) and the
    // browser's connection error (a plain Event): tell them apart by data.
    source.addEventListener("error", (event) => {
      if (event instanceof MessageEvent && typeof event.data === "string") this._dispatch("error", event);
      else this._connectionError(source);
    });
    source.addEventListener("open", () => {
      if (source === this.source && !this.closed) this.handlers.onOpen();
    });
    window.addEventListener("online", this._onOnline);
  }

  get connected() {
    return this.source?.readyState === EventSource.OPEN;
  }

  /** Drops the current connection and opens a new one from the last event seen. */
  reopen() {
    if (this.closed) return;
    clearTimeout(this._retryTimer);
    this.source?.close();
    window.removeEventListener("online", this._onOnline);
    this.open();
  }

  close() {
    this.closed = true;
    clearTimeout(this._retryTimer);
    this.source?.close();
    window.removeEventListener("online", this._onOnline);
  }

  _dispatch(name, event) {
    if (this.closed) return;
    const id = Number(event.lastEventId);
    this.reopens = 0;
    if (Number.isInteger(id) && id > 0) {
      if (id <= this.lastEventId) return; // already applied (never expected; cheap to guard)
      this.lastEventId = id;
    }
    let data;
    try {
      data = JSON.parse(event.data);
    } catch {
      return;
    }
    this.handlers.onEvent(name, data, this.lastEventId);
    if (name === "done" || name === "error") this.close();
  }

  async _connectionError(source) {
    if (this.closed || source !== this.source) return;
    if (source.readyState === EventSource.CONNECTING) {
      this.handlers.onReconnecting();
      return; // the browser retries by itself, sending Last-Event-ID
    }
    // CLOSED: the browser will not retry. Ask the server why.
    const problem = await probeEvents(this.generationId, this.lastEventId);
    if (this.closed || source !== this.source) return;
    if (problem === null) {
      // A transient failure: the stream is there again. Back off in case it fails at once.
      if (++this.reopens > MAX_REOPENS) {
        this.close();
        this.handlers.onLost(new ApiError("lost", t("error.lost"), { retryable: true }));
        return;
      }
      clearTimeout(this._retryTimer);
      this._retryTimer = setTimeout(() => this.reopen(), 250 * 2 ** (this.reopens - 1));
    } else if (problem.code === "network") {
      this.handlers.onReconnecting(); // unreachable: try again later, or as soon as "online" fires
      clearTimeout(this._retryTimer);
      this._retryTimer = setTimeout(() => this.reopen(), OFFLINE_RETRY_MS);
    } else {
      this.close();
      this.handlers.onLost(problem);
    }
  }
}
