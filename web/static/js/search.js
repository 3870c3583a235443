// Searching every stored conversation from the sidebar: GET /api/search as the user
// types (debounced; a newer query aborts the request of the one before), results in
// place of the conversation list. Snippets are user and model text: they go in as text
// nodes, the highlights as <mark> elements around slices of that text, never as HTML.

import { request } from "./api.js";
import { describeError } from "./errors.js";
import { t, translatePage } from "./i18n.js";

const DEBOUNCE_MS = 200;

/** GET /api/search?q=: {"results": [{conversation, title, message, role, snippet, highlights, updated}]} */
export function searchConversations(query, signal) {
  return request("GET", `/api/search?q=${encodeURIComponent(query)}`, undefined, { signal });
}

/**
 * The snippet as nodes: text, and <mark> around each highlight. Highlights are UTF-16
 * offsets (a JS string's own units); overlapping, unordered or out-of-range ones are
 * clipped rather than trusted.
 */
export function highlightedNodes(snippet, highlights) {
  const text = String(snippet ?? "");
  const ranges = (Array.isArray(highlights) ? highlights : [])
    .filter((range) => Array.isArray(range) && Number.isInteger(range[0]) && Number.isInteger(range[1]))
    .map(([start, end]) => [Math.max(0, start), Math.min(text.length, end)])
    .filter(([start, end]) => start < end)
    .sort((a, b) => a[0] - b[0]);
  const nodes = [];
  let at = 0;
  for (const [start, end] of ranges) {
    if (end <= at) continue;
    const from = Math.max(start, at);
    if (from > at) nodes.push(document.createTextNode(text.slice(at, from)));
    const mark = document.createElement("mark");
    mark.textContent = text.slice(from, end);
    nodes.push(mark);
    at = end;
  }
  if (at < text.length) nodes.push(document.createTextNode(text.slice(at)));
  return nodes;
}

export class SearchBox {
  /** elements: {box, input, clear, results, list, status, conversations}; onOpen(conversationId, messageId|null) */
  constructor(elements, { onOpen }) {
    this.el = elements;
    this.onOpen = onOpen;
    this.template = document.getElementById("search-result-template");
    this.timer = 0;
    this.controller = null;
    this.query = "";
    elements.input.addEventListener("input", () => this._schedule());
    elements.input.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && elements.input.value) {
        event.stopPropagation();
        event.preventDefault();
        this.clear();
      } else if (event.key === "Enter" && !event.isComposing && event.keyCode !== 229) {
        clearTimeout(this.timer);
        this._run();
      }
    });
    elements.clear.addEventListener("click", () => {
      this.clear();
      elements.input.focus();
    });
    elements.list.addEventListener("click", (event) => {
      const button = event.target.closest(".search-open");
      if (!button) return;
      this.onOpen(button.dataset.conversation, button.dataset.message || null);
    });
  }

  /** Search needs stored conversations: shown only when the server keeps them. */
  setEnabled(enabled) {
    this.el.box.hidden = !enabled;
    if (!enabled) this.clear();
  }

  clear() {
    this.el.input.value = "";
    this._schedule(0);
  }

  /** Runs the query again (after the conversations changed, say), if one is shown. */
  refresh() {
    if (this.query) this._schedule(0);
  }

  _schedule(delay = DEBOUNCE_MS) {
    clearTimeout(this.timer);
    const query = this.el.input.value.trim();
    this.el.clear.hidden = !this.el.input.value;
    if (!query) {
      this.controller?.abort();
      this.controller = null;
      this.query = "";
      this._showList(true);
      return;
    }
    this.timer = setTimeout(() => this._run(), delay);
  }

  async _run() {
    const query = this.el.input.value.trim();
    if (!query) return;
    this.controller?.abort(); // only the newest query's answer may be shown
    const controller = new AbortController();
    this.controller = controller;
    this.query = query;
    this._showList(false);
    this._status(t("search.searching"));
    let payload;
    try {
      payload = await searchConversations(query, controller.signal);
    } catch (error) {
      if (controller.signal.aborted) return;
      this.el.list.replaceChildren();
      this._status(describeError(error).text);
      return;
    }
    if (controller.signal.aborted || this.controller !== controller) return;
    this.controller = null;
    const results = Array.isArray(payload.results) ? payload.results : [];
    this.el.list.replaceChildren(...results.map((result) => this._item(result)));
    this._status(results.length ? "" : t("search.none"));
  }

  _item(result) {
    const item = this.template.content.firstElementChild.cloneNode(true);
    translatePage(item);
    const button = item.querySelector(".search-open");
    button.dataset.conversation = String(result.conversation ?? "");
    if (typeof result.message === "string") button.dataset.message = result.message;
    const title = item.querySelector(".result-title");
    const snippet = item.querySelector(".result-snippet");
    if (typeof result.message === "string") {
      title.textContent = result.title || t("app.untitled");
      snippet.replaceChildren(...highlightedNodes(result.snippet, result.highlights));
    } else {
      // A title hit: its snippet is the title itself, highlighted in place.
      title.replaceChildren(...highlightedNodes(result.snippet || result.title, result.highlights));
      snippet.hidden = true;
    }
    return item;
  }

  /** The conversation list (no query) or the results (a query). */
  _showList(list) {
    this.el.results.hidden = list;
    this.el.conversations.hidden = !list;
    if (list) {
      this.el.list.replaceChildren();
      this._status("");
    }
  }

  _status(text) {
    this.el.status.textContent = text;
    this.el.status.hidden = !text;
  }
}
