// The owner's change feed (GET /api/changes): what other devices (and tabs) add, rename,
// delete and answer, as it happens. EventSource resends Last-Event-ID by itself when it
// reconnects; when the browser gives up (a refused or non-stream answer), a new feed is
// opened after a pause and the page refetches the list, since what came meanwhile is unknown.

const EVENT_NAMES = ["conversation", "deleted", "message", "saved", "reset"];
const REOPEN_MS = [1000, 3000, 10000, 30000];

export class ChangeFeed {
  /** handlers: onEvent(name, data), onResync() (events may have been missed: refetch everything) */
  constructor(handlers) {
    this.handlers = handlers;
    this.source = null;
    this.closed = false;
    this.failures = 0;
    this.timer = 0;
  }

  open() {
    if (this.closed) return;
    const source = new EventSource("/api/changes");
    const fresh = this.source !== null; // not the first feed: changes may have been missed in between
    this.source = source;
    for (const name of EVENT_NAMES) {
      source.addEventListener(name, (event) => {
        if (source !== this.source) return;
        let data;
        try {
          data = JSON.parse(event.data);
        } catch {
          return;
        }
        if (data && typeof data === "object") this.handlers.onEvent(name, data);
      });
    }
    source.addEventListener("open", () => {
      if (source !== this.source) return;
      this.failures = 0;
      if (fresh) this.handlers.onResync();
    });
    source.addEventListener("error", () => {
      if (source !== this.source || source.readyState !== EventSource.CLOSED || this.closed) return;
      const delay = REOPEN_MS[Math.min(this.failures++, REOPEN_MS.length - 1)];
      clearTimeout(this.timer);
      this.timer = setTimeout(() => this.open(), delay);
    });
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    this.source?.close();
  }
}
