// Conversations and settings in localStorage: an index of conversations plus one key per
// conversation, so saving the one being streamed does not rewrite all the others.

import { startChat } from "./api.js";
import { newId } from "./ids.js";

export const PREFIX = "rill.v1.";
export const INDEX_KEY = `${PREFIX}conversations`;
const SETTINGS_KEY = `${PREFIX}settings`;
export const conversationKey = (id) => `${PREFIX}conversation.${id}`;

export const TITLE_MAX_CHARS = 60;

const readIndex = () => read(INDEX_KEY, []).filter((entry) => entry && typeof entry.id === "string");

export function read(key, fallback) {
  try {
    const raw = localStorage.getItem(key);
    return raw === null ? fallback : JSON.parse(raw);
  } catch {
    return fallback; // unreadable or corrupt: start clean rather than break the page
  }
}

export class Store extends EventTarget {
  constructor() {
    super();
    this.index = readIndex();
    this.cache = new Map();
    this.deleted = new Set(); // never written again, even by an answer still arriving
    // Another tab changed something: take its version, so neither tab overwrites the other.
    window.addEventListener("storage", (event) => {
      if (event.storageArea !== localStorage || event.key === null) return;
      if (event.key === INDEX_KEY) {
        this.index = readIndex();
        this.dispatchEvent(new CustomEvent("change"));
      } else if (event.key.startsWith(conversationKey(""))) {
        const id = event.key.slice(conversationKey("").length);
        if (event.newValue === null) {
          this._forget(id);
          this.dispatchEvent(new CustomEvent("removed", { detail: { ids: [id] } }));
        } else {
          this.dispatchEvent(new CustomEvent("external", { detail: { id } }));
        }
      }
    });
  }

  /** Takes the settings another tab changed (title, system prompt, model), keeping the messages. */
  mergeSettings(id) {
    const cached = this.cache.get(id);
    const fresh = read(conversationKey(id), null);
    if (!cached || !fresh) return;
    for (const field of ["title", "titled", "system", "model"]) if (field in fresh) cached[field] = fresh[field];
  }

  /**
   * Takes the stored version of a conversation (another tab wrote it). The object is
   * updated in place, so every holder of it (the open view, the app) sees the new one.
   */
  reload(id) {
    const cached = this.cache.get(id);
    const fresh = read(conversationKey(id), null);
    if (!cached) return;
    if (!fresh || !Array.isArray(fresh.messages)) this.cache.delete(id);
    else Object.assign(cached, fresh);
  }

  /** Conversation summaries, most recently updated first. */
  list() {
    return [...this.index].sort((a, b) => b.updated - a.updated);
  }

  get(id) {
    if (!this.cache.has(id)) {
      const conversation = read(conversationKey(id), null);
      if (!conversation || !Array.isArray(conversation.messages)) return null;
      this.cache.set(id, conversation);
    }
    return this.cache.get(id);
  }

  create({ model = null, system = "" } = {}) {
    const now = Date.now();
    const conversation = { id: newId(), title: "", titled: false, created: now, updated: now, model, system, messages: [] };
    this.cache.set(conversation.id, conversation);
    this.save(conversation);
    return conversation;
  }

  rename(id, title) {
    const conversation = this.get(id);
    if (!conversation) return;
    conversation.title = title.trim().slice(0, TITLE_MAX_CHARS);
    conversation.titled = conversation.title !== "";
    this.save(conversation, { touch: false });
  }

  delete(id) {
    this._forget(id);
    localStorage.removeItem(conversationKey(id));
    this._writeIndex();
    this.dispatchEvent(new CustomEvent("change"));
  }

  _forget(id) {
    this.deleted.add(id);
    this.cache.delete(id);
    this.index = this.index.filter((entry) => entry.id !== id);
  }

  /** Writes a conversation and its index entry; touch moves it to the top of the list. */
  save(conversation, { touch = true } = {}) {
    if (this.deleted.has(conversation.id)) return false;
    const listed = this.index.some((entry) => entry.id === conversation.id);
    if (listed && localStorage.getItem(conversationKey(conversation.id)) === null) {
      // Deleted by another tab a moment ago (its storage event is still on the way).
      this._forget(conversation.id);
      this.dispatchEvent(new CustomEvent("removed", { detail: { ids: [conversation.id] } }));
      return false;
    }
    if (touch) conversation.updated = Date.now();
    if (!conversation.titled) conversation.title = autoTitle(conversation);
    const ok = this._write(conversationKey(conversation.id), conversation);
    const entry = { id: conversation.id, title: conversation.title, updated: conversation.updated };
    const position = this.index.findIndex((item) => item.id === conversation.id);
    const changed =
      position < 0 || this.index[position].title !== entry.title || this.index[position].updated !== entry.updated;
    if (position < 0) this.index.push(entry);
    else this.index[position] = entry;
    if (changed) {
      this._writeIndex();
      this.dispatchEvent(new CustomEvent("change"));
    }
    return ok;
  }

  /** Starts the answer a Run follows: {id} of its generation (history.js stores it on the server instead). */
  startGeneration(conversation, body) {
    return startChat(body);
  }

  settings() {
    return read(SETTINGS_KEY, {});
  }

  updateSettings(changes) {
    this._write(SETTINGS_KEY, { ...this.settings(), ...changes });
  }

  _writeIndex() {
    this._write(INDEX_KEY, this.index);
  }

  _write(key, value) {
    try {
      localStorage.setItem(key, JSON.stringify(value));
      return true;
    } catch (error) {
      // QuotaExceededError: keep working in memory and tell the user once per failure.
      this.dispatchEvent(new CustomEvent("quota", { detail: error }));
      return false;
    }
  }
}

/** A conversation's title: the one given, or its first question's first line. */
export function titleOf(conversation) {
  return conversation.titled ? conversation.title : autoTitle(conversation);
}

function autoTitle(conversation) {
  const first = conversation.messages.find((message) => message.role === "user");
  if (!first) return "";
  const line = first.content.trim().split("\n")[0].replace(/\s+/g, " ");
  return line.length > TITLE_MAX_CHARS ? `${line.slice(0, TITLE_MAX_CHARS - 1)}…` : line;
}
