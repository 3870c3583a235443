// The list of conversations: open, rename in place, delete with a second click to
// confirm (no window.confirm: dialogs block the page and the stream).

import { t, translatePage } from "./i18n.js";
import { TITLE_MAX_CHARS } from "./store.js";

const CONFIRM_MS = 3000;

export class Sidebar {
  /** handlers: onOpen(id), onRename(id, title), onDelete(id) */
  constructor(list, emptyNote, handlers) {
    this.list = list;
    this.emptyNote = emptyNote;
    this.handlers = handlers;
    this.template = document.getElementById("conversation-template");
    this.currentId = null;
    this.confirming = null; // id whose delete button waits for its second click
    this.confirmTimer = 0;
    this.signature = "";
    // While a pointer is down on the list, a rebuild would replace the button under it, and
    // the browser then fires no click (an answer ending, another device's rename...): the
    // rebuild waits until the button is released and its click has been handled.
    this.pressed = false;
    this.held = null; // the arguments of the last render() that waited
    list.addEventListener("click", (event) => this._onClick(event));
    list.addEventListener("pointerdown", () => {
      this.pressed = true;
    });
    const release = () => {
      if (!this.pressed) return;
      this.pressed = false;
      setTimeout(() => this._renderHeld(), 0); // after the click this release makes
    };
    window.addEventListener("pointerup", release, true);
    window.addEventListener("pointercancel", release, true);
    window.addEventListener("blur", release); // a release elsewhere, while the page was not looking
  }

  render(summaries, currentId, streamingIds) {
    if (this.pressed) {
      this.held = [summaries, currentId, streamingIds];
      return;
    }
    this.held = null; // this one is newer
    this.currentId = currentId;
    if (this.list.querySelector(".rename-input")) return; // do not destroy an edit in progress
    // Rebuild only when something visible changed, so a click is never lost to a rebuild.
    const signature = JSON.stringify([summaries, currentId, [...streamingIds], this.confirming, t("app.untitled")]);
    if (signature === this.signature) return;
    this.signature = signature;
    this.list.replaceChildren(
      ...summaries.map((summary) => {
        const item = this.template.content.firstElementChild.cloneNode(true);
        translatePage(item);
        item.dataset.id = summary.id;
        const open = item.querySelector(".conversation-open");
        open.textContent = summary.title || t("app.untitled");
        open.title = summary.title || t("app.untitled");
        if (summary.id === currentId) {
          item.classList.add("current");
          open.setAttribute("aria-current", "page");
        }
        item.classList.toggle("streaming", streamingIds.has(summary.id));
        if (summary.id === this.confirming) {
          showArmed(item.querySelector('[data-action="delete"]'), true);
        }
        return item;
      }),
    );
    this.emptyNote.hidden = summaries.length > 0;
  }

  _renderHeld() {
    const held = this.held;
    if (held) this.render(...held);
  }

  _onClick(event) {
    const button = event.target.closest("button");
    const item = button?.closest(".conversation");
    if (!item) return;
    const id = item.dataset.id;
    if (button.classList.contains("conversation-open")) this.handlers.onOpen(id);
    else if (button.dataset.action === "rename") this._rename(item, id);
    else if (button.dataset.action === "delete") this._delete(button, id);
  }

  _rename(item, id) {
    const open = item.querySelector(".conversation-open");
    const input = document.createElement("input");
    input.className = "rename-input";
    input.maxLength = TITLE_MAX_CHARS;
    input.value = open.textContent;
    input.setAttribute("aria-label", t("app.rename"));
    open.replaceWith(input);
    input.focus();
    input.select();
    let done = false;
    const finish = (save) => {
      if (done) return;
      done = true;
      input.remove(); // lets render() rebuild the list again...
      this.signature = ""; // ...even if nothing changed, to put the title button back
      if (save && input.value.trim()) this.handlers.onRename(id, input.value);
      else this.handlers.onRename(id, null);
    };
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.isComposing && event.keyCode !== 229) finish(true);
      else if (event.key === "Escape") {
        event.stopPropagation();
        finish(false);
      }
    });
    input.addEventListener("blur", () => finish(true));
  }

  _delete(button, id) {
    if (this.confirming === id) {
      this._disarm();
      this.handlers.onDelete(id);
      return;
    }
    this._disarm();
    this.confirming = id;
    showArmed(button, true);
    this.confirmTimer = setTimeout(() => this._disarm(), CONFIRM_MS);
  }

  /** Puts the armed delete button (if any) back to its normal state. */
  _disarm() {
    clearTimeout(this.confirmTimer);
    const id = this.confirming;
    this.confirming = null;
    if (id === null) return;
    const button = this.list.querySelector(`.conversation[data-id="${CSS.escape(id)}"] [data-action="delete"]`);
    if (button) showArmed(button, false);
  }
}

/** A delete button waiting for its confirming second click, or back to normal. */
function showArmed(button, armed) {
  button.classList.toggle("confirm", armed);
  button.textContent = armed ? t("app.confirmDelete") : "×";
}
