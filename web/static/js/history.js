// Conversations kept on the server (GET /api/history says enabled). The page keeps its
// localStorage Store as a cache: it opens instantly from it, then takes the server's
// version. Writes go to the server (a message and its answer through POST .../messages,
// settings through PATCH), and the owner's change feed (GET /api/changes) brings what
// other devices do. Without history on the server this is today's localStorage Store.

import { ChangeFeed } from "./changes.js";
import * as api from "./historyapi.js";
import { newId } from "./ids.js";
import { exportDocument } from "./migrate.js";
import { INDEX_KEY, PREFIX, Store, conversationKey, read, titleOf } from "./store.js";
import { allMessages, byId, childrenOf, defaultLeaf, linkPath, newestLeaf, showBranch } from "./tree.js";

// {owner, uploaded: {owner: ms}}: the cache's owner, and who got this browser's own
// conversations (uploaded once; afterwards localStorage holds only the server's copies).
const MARKER_KEY = `${PREFIX}server`;
const FETCH_DELAY_MS = 60; // a burst of changes to one conversation becomes one GET
const OWNED_RETRY_MS = 1500; // a conversation this tab is answering into is fetched once it ends
const PATCH_DELAY_MS = 400; // typing in the system prompt: one PATCH when it pauses
const PREFETCH = 30; // conversations loaded at start (titles, answers streaming); others when opened
// What only this page knows about a message: kept when the server's version replaces it.
const LOCAL_FIELDS = ["stats", "modelLabel", "demo", "request", "connection", "unsaved"];

export class HistoryStore extends Store {
  constructor() {
    super();
    const marker = read(MARKER_KEY, null);
    // Last time a server kept the history: localStorage is its cache, and sending goes to it.
    this.remote = Boolean(marker?.owner);
    this.owner = marker?.owner ?? null;
    this.runs = null; // set by Runs: whether this tab writes a conversation
    this.feed = null;
    this.fetchTimers = new Map(); // conversation id -> timer
    this.patches = new Map(); // conversation id -> {changes, timer}: settings not yet on the server
    window.addEventListener("pagehide", () => this.flushPatches());
  }

  /**
   * Asks the server whether it keeps history; if so, uploads this browser's own
   * conversations the first time, and from then on mirrors the server. Throws when the
   * server cannot be reached (the page carries on from the cache and asks again later).
   */
  async connect() {
    const info = await api.historyInfo();
    if (!info.enabled) {
      // localStorage is the only copy again: the next server to keep history gets it all.
      this.remote = false;
      this.feed?.close();
      this.feed = null;
      localStorage.removeItem(MARKER_KEY);
      return false;
    }
    const marker = read(MARKER_KEY, null);
    const uploaded = { ...(marker?.uploaded ?? {}) };
    if (!marker) {
      await this._upload(); // throws: nothing is marked, the page stays local and tries next time
      uploaded[info.owner] = Date.now();
    } else if (marker.owner !== info.owner) {
      this._clearCache(); // another owner's copies: never shown to, nor uploaded for, this one
    }
    this._write(MARKER_KEY, { owner: info.owner, uploaded });
    this.remote = true;
    this.owner = info.owner;
    if (!this.feed) {
      this.feed = new ChangeFeed({
        onEvent: (name, data) => this._onChange(name, data),
        onResync: () => this.refreshAll().catch(() => {}),
      });
      this.feed.open();
    }
    await this.refreshAll();
    return true;
  }

  /** Forgets the cache (signing out): the next person at this browser sees none of it. */
  clearCache() {
    if (!this.remote) return;
    this._clearCache();
    localStorage.removeItem(MARKER_KEY);
  }

  _clearCache() {
    const ids = this.index.map((entry) => entry.id);
    for (const key of Object.keys(localStorage)) {
      if (key.startsWith(conversationKey(""))) localStorage.removeItem(key);
    }
    this.index = [];
    this.cache.clear();
    this._writeIndex();
    if (ids.length) this.dispatchEvent(new CustomEvent("removed", { detail: { ids } }));
    this.dispatchEvent(new CustomEvent("change"));
  }

  async _upload() {
    const conversations = read(INDEX_KEY, [])
      .map((entry) => entry && read(conversationKey(entry.id), null))
      .filter((conversation) => conversation?.messages?.length);
    if (!conversations.length) return;
    await api.importDocument(exportDocument(conversations));
    // An answer that was streaming went up as interrupted (the server that streamed it has
    // restarted since): do not follow its generation here either.
    for (const conversation of conversations) {
      const cut = conversation.messages.filter((message) => message.pending);
      if (!cut.length) continue;
      for (const message of cut) {
        delete message.pending;
        message.status = "interrupted";
      }
      this._write(conversationKey(conversation.id), conversation);
      this.reload(conversation.id);
    }
  }

  /** The server's list replaces the cached one; stale or missing conversations are loaded. */
  async refreshAll() {
    if (!this.remote) return;
    const summaries = await api.listConversations();
    const listed = new Set(summaries.map((summary) => summary.id));
    const gone = this.index.filter((entry) => !listed.has(entry.id) && this._onServer(entry.id));
    for (const { id } of gone) this._removeLocal(id);
    const unsent = this.index.filter((entry) => !listed.has(entry.id));
    this.index = [...summaries.filter((s) => !this.deleted.has(s.id)).map((s) => this._entry(s)), ...unsent];
    this._writeIndex();
    this.dispatchEvent(new CustomEvent("change"));
    const current = this.settings().current;
    const stale = summaries.filter((summary, position) => {
      const cached = read(conversationKey(summary.id), null);
      const changed = !cached || cached.updated !== summary.updated || cached.active !== summary.active;
      return summary.id === current || summary.streaming || (position < PREFETCH && changed);
    });
    for (const summary of stale) this._scheduleFetch(summary.id);
  }

  /** Whether the server has (had) conversation id: a new chat not yet sent is kept. */
  _onServer(id) {
    const conversation = this.cache.get(id) ?? read(conversationKey(id), null);
    return conversation?.stored !== false;
  }

  _entry(summary) {
    const cached = this.cache.get(summary.id) ?? read(conversationKey(summary.id), null);
    const unsent = this.patches.get(summary.id)?.changes ?? {};
    const given = "title" in unsent ? unsent.title : summary.title;
    const title = given || (cached ? titleOf({ ...cached, titled: false }) : "");
    // streaming: an answer arriving, maybe on another device (the sidebar marks it).
    return { id: summary.id, title, updated: summary.updated, streaming: Boolean(summary.streaming) };
  }

  // The change feed

  _onChange(name, data) {
    if (!this.remote) return;
    if (name === "reset") this.refreshAll().catch(() => {});
    else if (name === "deleted") this._removeLocal(data.id);
    else if (name === "conversation") {
      if (this.deleted.has(data.id) || this._stale(data)) return;
      const position = this.index.findIndex((entry) => entry.id === data.id);
      const entry = this._entry(data);
      if (position < 0) this.index.push(entry);
      else this.index[position] = entry;
      this._writeIndex();
      this.dispatchEvent(new CustomEvent("change"));
      this._scheduleFetch(data.id);
    } else if (name === "message") this._scheduleFetch(data.conversation);
    else if (name === "saved") this._onSaved(data);
  }

  /** Whether the server could store an answer's latest text: the page says "not saved yet" if not. */
  _onSaved({ conversation: id, message: messageId, saved }) {
    const conversation = this.cache.get(id);
    const message = conversation && allMessages(conversation).find((item) => item.id === messageId);
    if (!message || message.unsaved === !saved) return;
    message.unsaved = !saved;
    if (!this.runs?.owns(id)) super.save(conversation, { touch: false });
    this.dispatchEvent(new CustomEvent("message", { detail: { conversation, message } }));
  }

  /** Whether server (a summary or conversation) is older than the version this page has merged:
   * a reply or an event that was overtaken on the way must not undo a later change. */
  _stale(server) {
    const cached = this.cache.get(server.id) ?? read(conversationKey(server.id), null);
    return typeof cached?.serverUpdated === "number" && server.updated < cached.serverUpdated;
  }

  /** Whether this tab writes conversation id right now (an answer streaming or about to be retried). */
  _busy(id) {
    if (!this.runs) return false;
    return this.runs.owns(id) || [...this.runs.countdowns.values()].some((c) => c.conversation.id === id);
  }

  _removeLocal(id) {
    const listed = this.index.some((entry) => entry.id === id) || this.cache.has(id);
    this._forget(id);
    localStorage.removeItem(conversationKey(id));
    this._writeIndex();
    if (listed) {
      this.dispatchEvent(new CustomEvent("removed", { detail: { ids: [id] } }));
      this.dispatchEvent(new CustomEvent("change"));
    }
  }

  _scheduleFetch(id, delay = FETCH_DELAY_MS) {
    if (this.fetchTimers.has(id)) return;
    this.fetchTimers.set(
      id,
      setTimeout(() => {
        this.fetchTimers.delete(id);
        this._fetch(id);
      }, delay),
    );
  }

  async _fetch(id) {
    if (this.deleted.has(id) || !this._onServer(id)) return; // a new chat is created with its first message
    let server;
    try {
      server = await api.getConversation(id);
    } catch (error) {
      if (error.code === "conversation_not_found" && this._onServer(id)) this._removeLocal(id);
      return; // unreachable for now: the feed's next change (or reset) brings it again
    }
    if (this._stale(server)) return;
    if (this._busy(id)) {
      // This tab is answering into it: its copy is the newer one. Settings now, the rest later.
      this._mergeSettings(id, server);
      this._scheduleFetch(id, OWNED_RETRY_MS);
      return;
    }
    this._merge(server);
  }

  _mergeSettings(id, server) {
    const conversation = this.cache.get(id);
    if (!conversation) return;
    const settings = this._settings(server);
    if (!settings.titled) settings.title = titleOf({ ...conversation, titled: false });
    const changed = ["title", "titled", "system", "model"].some((key) => conversation[key] !== settings[key]);
    Object.assign(conversation, settings);
    if (!changed) return;
    super.save(conversation, { touch: false });
    this.dispatchEvent(new CustomEvent("external", { detail: { id } }));
  }

  /** Writes the server's version (plus what only this page knows) into the cache, and tells the page. */
  _merge(server) {
    const id = server.id;
    if (this.deleted.has(id)) return;
    const local = read(conversationKey(id), null) ?? this.cache.get(id) ?? null; // another tab's may be newer
    const localMessages = local ? allMessages(local) : [];
    const localById = byId(localMessages);
    const messages = server.messages.map((message) => mergeMessage(message, localById.get(message.id)));
    const serverIds = new Set(messages.map((message) => message.id));
    // A message and answer this page is sending right now are not on the server yet: keep them.
    const tail = [];
    for (const message of [...(local?.messages ?? [])].reverse()) {
      if (serverIds.has(message.id)) break;
      tail.unshift(message);
    }
    const sending = tail.some((message) => message.request && !message.request.acknowledged);
    const conversation = {
      id,
      created: server.created,
      updated: server.updated,
      serverUpdated: server.updated,
      ...this._settings(server),
      stored: true,
      messages: [...messages, ...(sending ? tail : [])],
      branches: [],
    };
    const leaf = sending ? tail.at(-1).id : (server.active ?? defaultLeaf(messages));
    showBranch(conversation, leaf);
    conversation.title = titleOf(conversation); // untitled on the server: its first question, as before
    // Nothing the page shows changed (the echo of this page's own change): leave the page alone.
    if (local && fingerprint(local) === fingerprint(conversation)) {
      if (local.serverUpdated !== server.updated) {
        local.serverUpdated = server.updated;
        const cached = this.cache.get(id);
        if (cached) cached.serverUpdated = server.updated;
        this._write(conversationKey(id), cached ?? local);
      }
      return;
    }
    if (!this._write(conversationKey(id), conversation)) return;
    const position = this.index.findIndex((entry) => entry.id === id);
    const streaming = allMessages(conversation).some((message) => message.status === "streaming");
    const entry = { id, title: titleOf(conversation), updated: conversation.updated, streaming };
    if (position < 0) this.index.push(entry);
    else this.index[position] = entry;
    this._writeIndex();
    const cached = this.cache.get(id);
    if (cached?.placeholder) delete cached.placeholder;
    this.dispatchEvent(new CustomEvent("change"));
    this.dispatchEvent(new CustomEvent("external", { detail: { id } }));
  }

  // The Store interface, for the page

  get(id) {
    const conversation = super.get(id);
    if (conversation || !this.remote || !this.index.some((entry) => entry.id === id)) return conversation;
    // Listed, not loaded yet: an empty stand-in, filled in place when the server's version comes.
    const entry = this.index.find((item) => item.id === id);
    const placeholder = { ...entry, titled: Boolean(entry.title), stored: true, placeholder: true, messages: [], branches: [] };
    this.cache.set(id, placeholder);
    return placeholder;
  }

  create(options) {
    const conversation = super.create(options);
    if (this.remote) {
      conversation.stored = false; // created on the server with its first message
      conversation.branches = [];
      super.save(conversation, { touch: false });
    }
    return conversation;
  }

  rename(id, title) {
    super.rename(id, title);
    const conversation = this.get(id);
    if (this.remote && conversation?.stored) {
      this._patch(id, { title: conversation.titled ? conversation.title : "" }, { now: true });
    }
  }

  delete(id) {
    super.delete(id);
    if (this.remote) api.deleteConversation(id).catch((error) => this._failed(error));
  }

  save(conversation, options) {
    if (conversation.placeholder) return false; // nothing to write until the server's version is in
    const ok = super.save(conversation, options);
    if (this.remote && conversation.stored) this._syncSettings(conversation);
    return ok;
  }

  updateSettings(changes) {
    super.updateSettings(changes);
    // Opening a conversation: take the server's latest (another device may have moved on).
    // (Not a new chat: the server has it only once its first message is on the way.)
    if (this.remote && changes.current && this._onServer(changes.current)) this._scheduleFetch(changes.current);
  }

  /** Posts the message and its answer; the server builds the context and starts the generation. */
  async startGeneration(conversation, body) {
    if (!this.remote || Array.isArray(body.messages)) return super.startGeneration(conversation, body);
    const creating = !conversation.stored;
    if (creating) {
      // Made on the server with its first message, in one request.
      const fields = { system: conversation.system ?? "" };
      if (conversation.model) fields.model = conversation.model;
      if (conversation.titled) fields.title = conversation.title;
      body = { ...body, conversation: fields };
    }
    const created = await api.postMessage(conversation.id, body);
    if (creating) {
      conversation.stored = true;
      conversation.synced = { system: body.conversation.system, model: conversation.model ?? null };
    }
    for (const message of [created.message, created.answer]) {
      const mine = message && allMessages(conversation).find((item) => item.id === message.id);
      if (mine) {
        mine.stored = true;
        mine.created = message.created;
      }
    }
    return { id: created.generation.id };
  }

  /**
   * A request whose answer failed after the server took it: the failed answer stays on
   * the server as a version of its own; the retry answers again into a new one. The
   * message object keeps its place in the page (and in the run) under the new id.
   */
  retryBody(conversation, message, body) {
    if (body.continue) return body; // continues from whatever text the server kept
    const old = { ...message };
    delete old.request;
    conversation.branches = [...(conversation.branches ?? []), old];
    message.id = newId();
    message.stored = false;
    const retry = { regenerate: old.id, answer_id: message.id };
    if (body.model) retry.model = body.model;
    if (body.options) retry.options = body.options;
    linkPath(conversation);
    return retry;
  }

  /** Moves the shown messages from index on into the other branches (an edit starts a new one). */
  branchFrom(conversation, index) {
    const moved = conversation.messages.splice(index);
    conversation.branches = [...(conversation.branches ?? []), ...moved.filter((message) => message.stored)];
    return moved;
  }

  /** The versions of message: its siblings (itself included), oldest first. */
  versionsOf(conversation, message) {
    return childrenOf(allMessages(conversation), message.parent ?? null);
  }

  /** Shows the branch through messageId (its newest continuation) and makes it the one sent. */
  switchTo(conversation, messageId) {
    showBranch(conversation, newestLeaf(allMessages(conversation), messageId));
    super.save(conversation, { touch: false });
    if (this.remote && conversation.stored && conversation.active) {
      this._patch(conversation.id, { active: conversation.active }, { now: true });
    }
  }

  _syncSettings(conversation) {
    const synced = conversation.synced ?? {};
    const system = conversation.system ?? "";
    const model = conversation.model ?? null;
    if (system === (synced.system ?? "") && model === (synced.model ?? null)) return;
    conversation.synced = { system, model };
    const changes = { system };
    if (model) changes.model = model;
    this._patch(conversation.id, changes);
  }

  /**
   * One PATCH per conversation once the changes pause, with everything changed meanwhile.
   * Until the server has them, they win over the server's version (a fetch in between
   * must not put the old title back).
   */
  _patch(id, changes, { now = false } = {}) {
    const pending = this.patches.get(id);
    clearTimeout(pending?.timer);
    const entry = { changes: { ...(pending?.changes ?? {}), ...changes }, timer: 0 };
    const send = () => {
      entry.timer = 0;
      api
        .patchConversation(id, entry.changes)
        .catch((error) => this._failed(error))
        .finally(() => {
          if (this.patches.get(id) === entry) this.patches.delete(id);
        });
    };
    this.patches.set(id, entry);
    if (now) send();
    else entry.timer = setTimeout(send, PATCH_DELAY_MS);
  }

  /** Sends every change still waiting for its pause (the page is going away). */
  flushPatches() {
    for (const [id, entry] of this.patches) if (entry.timer) this._patch(id, {}, { now: true });
  }

  /** The server's settings of a conversation, with the changes this page has not sent yet. */
  _settings(server) {
    const settings = settingsOf(server);
    const unsent = this.patches.get(server.id)?.changes ?? {};
    if ("title" in unsent) Object.assign(settings, { title: unsent.title, titled: Boolean(unsent.title) });
    if ("system" in unsent) settings.system = unsent.system;
    if ("model" in unsent) settings.model = unsent.model;
    return settings;
  }

  _failed(error) {
    if (error.code === "conversation_not_found") return;
    this.dispatchEvent(new CustomEvent("failed", { detail: error }));
  }
}

/** The body of POST .../messages for answer, the last shown message (after a user message). */
export function answerBody(conversation, answer, { model, continued = false } = {}) {
  linkPath(conversation);
  const body = {};
  if (model) body.model = model;
  if (continued) return { ...body, continue: answer.id };
  const user = conversation.messages[conversation.messages.indexOf(answer) - 1];
  body.answer_id = answer.id;
  const earlier = childrenOf(allMessages(conversation), user.id).find((item) => item !== answer && item.stored);
  if (user.stored && earlier) return { ...body, regenerate: earlier.id };
  if (user.stored) {
    // No answer of it on the server to regenerate from (an old upload): ask it again as a new message.
    user.id = newId();
    user.stored = false;
    answer.parent = user.id;
  }
  return { ...body, parent: storedParent(conversation, user), content: user.content, id: user.id };
}

/** The answer a new question follows on the server: the nearest earlier one it has (a failed
 * exchange that never reached it is not part of the stored branch). */
function storedParent(conversation, user) {
  const before = conversation.messages.slice(0, conversation.messages.indexOf(user));
  return before.findLast((message) => message.stored && message.role === "assistant")?.id ?? null;
}

/** What the page shows of a conversation, to tell a change from an echo. */
function fingerprint(conversation) {
  const messages = allMessages(conversation).map((m) => [
    m.id,
    m.parent ?? null,
    m.status ?? "done",
    m.content?.length ?? 0,
    m.reasoning?.length ?? 0,
    m.error?.code ?? null,
    Boolean(m.unsaved),
    Boolean(m.pending),
    Boolean(m.stored),
  ]);
  messages.sort((a, b) => (a[0] < b[0] ? -1 : 1));
  const { title, titled, system, model, active } = conversation;
  return JSON.stringify([title, titled, system ?? "", model ?? null, active ?? null, messages]);
}

function settingsOf(server) {
  return {
    title: server.title ?? "",
    titled: Boolean(server.title),
    title_source: server.title_source ?? null,
    system: server.system ?? "",
    model: server.model ?? null,
    synced: { system: server.system ?? "", model: server.model ?? null },
  };
}

/** The server's message, with what only this page knows (and its progress, if it follows further). */
function mergeMessage(server, local) {
  const message = { ...server, stored: true };
  if (message.error) message.error = { ...message.error, fromServer: true };
  if (local) for (const field of LOCAL_FIELDS) if (field in local) message[field] = local[field];
  if (server.status !== "streaming") {
    delete message.connection;
    delete message.unsaved; // its end is in the database: all of it is saved
    if (message.stats && !message.stats.ended) message.stats = { ...message.stats, ended: server.updated };
    return message;
  }
  if (!server.generation) return message;
  if (local && local.status !== "streaming" && !local.pending && local.generation === server.generation) {
    // This page saw that answer end; the server writes its end a moment later.
    for (const field of ["content", "reasoning", "status", "error", "usage", "model"]) message[field] = local[field];
    return message;
  }
  const ahead = local?.pending?.generation === server.generation && local.pending.lastEventId >= server.last_event_id;
  if (ahead) {
    message.content = local.content;
    message.reasoning = local.reasoning;
    message.pending = local.pending;
  } else {
    // Another device's answer: follow its generation from the text saved here (exact, the model asked once).
    message.pending = { body: null, generation: server.generation, lastEventId: server.last_event_id, stopRequested: false };
  }
  message.stats ??= { started: server.created, firstToken: null, ended: null, deltas: 0 };
  return message;
}
