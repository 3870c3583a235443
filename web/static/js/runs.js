// Generations in progress. A Run owns one assistant message while its answer streams:
// it POSTs (with the message's client_id), follows the events, and writes the text and
// the last event id into the conversation together, so a reload resumes exactly where
// the stored text ends, from the same generation, without a second upstream request.

import { ApiError, stopChat } from "./api.js";
import { autoRetryDelay } from "./errors.js";
import { uuid4 } from "./ids.js";
import { EventFollower } from "./stream.js";

const SAVE_INTERVAL_MS = 1000;
const STOP_FALLBACK_MS = 2000; // if the stream does not bring "done" after DELETE, finish from its answer
const STOP_PATIENCE_MS = 20_000; // how long a reconnecting stream may take to bring "done" after Stop
const STOP_ATTEMPTS = 4; // a DELETE lost in the network is sent again, 1 s, 2 s, 3 s later
const COUNTDOWN_TICK_MS = 250;
const AUTO_RETRIES = 1; // per request the user made: a second failure waits for the user

const FINISH_STATUS = { stop: "done", length: "length", content_filter: "filtered", cancelled: "stopped" };

/** The message status for a finish reason; the upstream names it, so `constructor` or
 * `__proto__` must not reach the object's prototype. */
function finishStatus(reason, otherwise) {
  return typeof reason === "string" && Object.hasOwn(FINISH_STATUS, reason) ? FINISH_STATUS[reason] : otherwise;
}

export class Runs extends EventTarget {
  constructor(store) {
    super();
    this.store = store;
    store.runs = this; // the history store leaves alone what this tab is writing
    this.active = new Map(); // message id -> Run
    this.starting = new Set(); // conversation ids with a new answer waiting for its lock
    this.waiting = new Set(); // message ids another tab follows, that this tab would take over
    // Failed answers waiting for their automatic retry (this tab's, in memory: after a
    // reload the user retries by hand). message id -> {conversation, message, error, at, timers}
    this.countdowns = new Map();
    // Stop pressed in a tab that does not follow the answer reaches the one that does.
    this.channel = typeof BroadcastChannel === "function" ? new BroadcastChannel("rill.runs") : null;
    if (this.channel) this.channel.onmessage = (event) => this.active.get(event.data?.stop)?.stop();
    this._flushAll = () => {
      for (const run of this.active.values()) run.save(true);
    };
    // The last chance to write the latest text before a reload or a closed tab.
    window.addEventListener("pagehide", this._flushAll);
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "hidden") this._flushAll();
    });
  }

  /**
   * Starts a generation for message (already in conversation), appending to its text.
   * clientId is new for each send; a retry of a POST whose answer never arrived passes
   * the same one, so the server returns the generation it may already have started.
   */
  start(conversation, message, body, { clientId = uuid4(), autoRetries = 0 } = {}) {
    this.cancelAutoRetries(conversation.id);
    const request = { body: { ...body, client_id: clientId }, prefix: message.content, reasoning: message.reasoning ?? "" };
    for (const other of conversation.messages) delete other.request; // only the last answer can be retried
    message.request = { ...request, acknowledged: false, autoRetries };
    message.status = "streaming";
    message.error = null;
    message.usage = null;
    message.pending = { body: request.body, generation: null, lastEventId: 0, stopRequested: false };
    message.stats = { started: Date.now(), firstToken: null, ended: null, deltas: 0 };
    this._launch(conversation, message, { fresh: true });
  }

  /**
   * Sends the last request of message again, into the same message (the Retry button, or
   * automatic: the countdown after a limit that said how long to wait).
   */
  retry(conversation, message, { automatic = false } = {}) {
    const request = message.request;
    const autoRetries = automatic ? (request.autoRetries ?? 0) + 1 : 0;
    if (message.error?.resume) {
      this._resume(conversation, message, message.error.resume, autoRetries);
      return;
    }
    // A conversation stored on the server (no `messages` in the body): a request it took
    // is asked again as a new version of the answer, or continues from the text it kept.
    const stored = !Array.isArray(request.body.messages) && request.acknowledged;
    if (!(stored && request.body.continue)) {
      message.content = request.prefix;
      message.reasoning = request.reasoning;
    }
    const body = stored ? this.store.retryBody(conversation, message, request.body) : request.body;
    // Same client_id only if the server never confirmed the first POST: then it may exist.
    const clientId = request.acknowledged ? uuid4() : request.body.client_id;
    this.start(conversation, message, body, { clientId, autoRetries });
  }

  /**
   * Follows again a generation the server still runs, from the last event applied: its
   * stream was refused (too many open), not the answer. Asking again would pay twice.
   */
  _resume(conversation, message, { generation, lastEventId }, autoRetries) {
    this.cancelAutoRetries(conversation.id);
    message.request.autoRetries = autoRetries;
    message.status = "streaming";
    message.error = null;
    message.pending = { body: message.request.body, generation, lastEventId, stopRequested: false };
    message.stats = { ...message.stats, ended: null };
    this._launch(conversation, message, { fresh: true });
  }

  /** Seconds until message is retried by itself, or null. */
  autoRetryIn(messageId) {
    const countdown = this.countdowns.get(messageId);
    return countdown ? Math.max(0, Math.ceil((countdown.at - Date.now()) / 1000)) : null;
  }

  /** Cancel (or anything new in the conversation): the retry is the user's again. */
  cancelAutoRetry(messageId) {
    const countdown = this.countdowns.get(messageId);
    if (!countdown) return;
    clearTimeout(countdown.timer);
    clearInterval(countdown.ticker);
    this.countdowns.delete(messageId);
    this._changed(countdown);
  }

  cancelAutoRetries(conversationId) {
    for (const countdown of [...this.countdowns.values()]) {
      if (countdown.conversation.id === conversationId) this.cancelAutoRetry(countdown.message.id);
    }
  }

  /** After a failure with a wait attached (Retry-After, retry_after): retry once, visibly. */
  _scheduleAutoRetry(conversation, message) {
    if (message.status !== "error" || (message.request?.autoRetries ?? 0) >= AUTO_RETRIES) return;
    const seconds = autoRetryDelay(message.error);
    if (seconds === null) return;
    const countdown = { conversation, message, error: message.error, at: Date.now() + seconds * 1000 };
    countdown.timer = setTimeout(() => this._autoRetry(countdown), seconds * 1000);
    countdown.ticker = setInterval(() => this._changed(countdown), COUNTDOWN_TICK_MS);
    this.countdowns.set(message.id, countdown);
  }

  _autoRetry(countdown) {
    const { conversation, message, error } = countdown;
    this.cancelAutoRetry(message.id);
    // Only if nothing changed meanwhile: still the last answer, still this failure, and
    // the conversation neither deleted nor replaced by another tab's version.
    if (this.store.get(conversation.id) !== conversation || conversation.messages.at(-1) !== message) return;
    if (message.error !== error || conversation.messages.some((item) => item.pending)) return;
    this.retry(conversation, message, { automatic: true });
  }

  /** Picks up every answer that was streaming when the page was last closed. */
  resumeAll() {
    for (const { id } of this.store.list()) this.watch(this.store.get(id));
  }

  /**
   * Makes sure someone follows each answer streaming in conversation (this tab or
   * another one): called at load and whenever another tab saves the conversation.
   */
  watch(conversation) {
    for (const message of conversation?.messages ?? []) {
      if (message.pending && !this.active.has(message.id) && !this.waiting.has(message.id)) {
        this._launch(conversation, message, { fresh: false });
      }
    }
  }

  /** The run following an answer of conversation in this tab, if any. */
  forConversation(conversationId) {
    for (const run of this.active.values()) if (run.conversation.id === conversationId) return run;
    return null;
  }

  /** Whether this tab writes conversation (so it must not take another tab's copy of it). */
  owns(conversationId) {
    return this.starting.has(conversationId) || Boolean(this.forConversation(conversationId));
  }

  /** Stop, from any tab: the one that follows the answer stops it. */
  requestStop(message) {
    const run = this.active.get(message.id);
    if (run) {
      run.stop();
      return;
    }
    // Not followed here (yet): an answer of this tab still waiting for its lock stops as
    // soon as it starts; one that another tab follows is stopped there.
    message.pending.stopRequested = true;
    this.channel?.postMessage({ stop: message.id });
  }

  /**
   * Follows the answer unless another tab of this browser already does: browsers allow
   * six connections per server, and tabs all following the same answers would use
   * them up. A waiting tab shows the follower's progress through localStorage, and
   * takes over if that tab closes first. (Web Locks need a secure context: over plain
   * http every tab follows.) fresh: a new answer from this tab, not yet saved.
   */
  _launch(conversation, message, { fresh }) {
    const conversationId = conversation.id;
    const messageId = message.id;
    if (!navigator.locks) {
      if (fresh) this.store.save(conversation);
      this._follow(conversation, message);
      return;
    }
    const name = `rill.answer.${messageId}`;
    if (fresh) this.starting.add(conversationId);
    else this.waiting.add(messageId);
    navigator.locks.request(name, { ifAvailable: true }, (lock) => {
      if (fresh) {
        // Saved only now that this tab holds the lock: no other tab can see it earlier.
        this.starting.delete(conversationId);
        if (this.store.deleted.has(conversationId)) return undefined; // deleted meanwhile
        this.store.save(conversation);
        return this._follow(conversation, message).ended;
      }
      if (lock) return this._takeOver(conversationId, messageId);
      navigator.locks.request(name, () => this._takeOver(conversationId, messageId));
      return undefined;
    });
  }

  /** Follows an answer another tab started, if it still runs, from the latest stored state. */
  _takeOver(conversationId, messageId) {
    this.waiting.delete(messageId);
    if (this.active.has(messageId)) return undefined;
    this.store.reload(conversationId); // the other tab's latest text and event id
    const conversation = this.store.get(conversationId);
    const message = conversation?.messages.find((item) => item.id === messageId);
    if (!message?.pending) return undefined;
    return this._follow(conversation, message).ended;
  }

  _follow(conversation, message) {
    const run = new Run(this, conversation, message);
    this.active.set(message.id, run);
    this._changed(run);
    run.begin();
    return run;
  }

  _changed(run) {
    this.dispatchEvent(new CustomEvent("update", { detail: { run } }));
  }

  _finished(run) {
    this.active.delete(run.message.id);
    this._scheduleAutoRetry(run.conversation, run.message);
    this._changed(run);
  }
}

class Run {
  constructor(runs, conversation, message) {
    this.runs = runs;
    this.conversation = conversation;
    this.message = message;
    this.follower = null;
    this.saveTimer = 0;
    this.stopTimer = 0;
    this.finished = false;
    this.ended = new Promise((resolve) => {
      this._ended = resolve;
    });
  }

  get pending() {
    return this.message.pending;
  }

  async begin() {
    if (!this.pending.generation) {
      let created;
      try {
        // Same client_id on every attempt, including after a reload mid-POST.
        created = await this.runs.store.startGeneration(this.conversation, this.pending.body);
      } catch (error) {
        if (this.pending.stopRequested) this._finish("stopped");
        else this._fail(error);
        return;
      }
      if (this.finished) {
        // Discarded (its conversation deleted) while the POST was on its way.
        stopChat(created.id).catch(() => {});
        return;
      }
      this.pending.generation = created.id;
      this.message.generation = created.id; // the history store tells its end from the server's lag by it
      if (this.message.request) this.message.request.acknowledged = true;
      this.save(true);
    }
    this.follower = new EventFollower(this.pending.generation, this.pending.lastEventId, {
      onEvent: (name, data, id) => this._onEvent(name, data, id),
      onOpen: () => this._setConnection(null),
      onReconnecting: () => this._setConnection("reconnecting"),
      onLost: (error) => this._onLost(error),
    });
    this.follower.open();
    if (this.pending.stopRequested) this._sendStop(1);
  }

  /** Stop button or Esc: ends the upstream request; the stream then brings "done". */
  stop() {
    if (this.finished || this.pending.stopRequested) return;
    this.pending.stopRequested = true;
    this.save(true);
    this.runs._changed(this);
    if (this.pending.generation) this._sendStop(1); // else begin() sends it once the POST answers
  }

  _sendStop(attempt) {
    stopChat(this.pending.generation).then(
      (answer) => {
        if (this.finished) return;
        // The upstream request is closed. A stream that is reconnecting would only come
        // back after the retry delay: reopen it now, so the last text and "done" arrive.
        if (!this.follower.connected) this.follower.reopen();
        clearTimeout(this.stopTimer);
        this.stopTimer = setTimeout(() => this._finishFromStopAnswer(answer), STOP_FALLBACK_MS);
      },
      (error) => {
        if (this.finished) return;
        if (error.code === "generation_not_found") this._finish("stopped");
        else if (error.code === "network" && attempt < STOP_ATTEMPTS) {
          this.stopTimer = setTimeout(() => this._sendStop(attempt + 1), 1000 * attempt);
        } else this._fail(error);
      },
    );
  }

  _finishFromStopAnswer(answer, waited = STOP_FALLBACK_MS) {
    if (this.finished) return;
    if (!this.follower.connected && waited < STOP_PATIENCE_MS) {
      // Still reconnecting: the text the model wrote before Stop is on its way.
      this.stopTimer = setTimeout(() => this._finishFromStopAnswer(answer, waited + STOP_FALLBACK_MS), STOP_FALLBACK_MS);
      return;
    }
    if (answer.usage && !this.message.usage) this.message.usage = answer.usage;
    if (answer.ended === "error") {
      // No retry_after: after Stop, nothing starts again by itself.
      const { code, message, retryable } = answer.result;
      this._fail(new ApiError(code, message, { retryable: Boolean(retryable), fromServer: true }));
    } else this._finish(finishStatus(answer.result?.finish_reason, "stopped"));
  }

  /** Drops the run without a trace (its conversation is being deleted): stops the upstream too. */
  discard() {
    if (this.pending?.generation && !this.finished) stopChat(this.pending.generation).catch(() => {});
    this.finished = true;
    this._close();
    this.runs._finished(this);
  }

  _onEvent(name, data, id) {
    if (this.finished) return;
    const message = this.message;
    this.pending.lastEventId = id;
    message.connection = null;
    switch (name) {
      case "meta":
        message.model = data.model;
        message.modelLabel = data.label;
        message.demo = Boolean(data.demo);
        break;
      case "reasoning":
        message.stats.firstToken ??= Date.now();
        message.reasoning = (message.reasoning ?? "") + data.text;
        break;
      case "delta":
        message.stats.firstToken ??= Date.now();
        message.stats.answerStarted ??= Date.now();
        message.stats.deltas++;
        message.content += data.text;
        break;
      case "usage":
        message.usage = data;
        break;
      case "done":
        this._finish(finishStatus(data.finish_reason, "done"));
        return;
      case "error":
        this._fail(
          new ApiError(data.code, data.message, {
            retryable: Boolean(data.retryable),
            retryAfter: typeof data.retry_after === "number" ? data.retry_after : null,
            fromServer: true,
          }),
        );
        return;
    }
    this.save(false);
    this.runs._changed(this);
  }

  _setConnection(state) {
    this.message.connection = state;
    this.runs._changed(this);
  }

  _onLost(error) {
    // "delivered": the server says the end was already sent; nothing is missing.
    if (error.code === "delivered") this._finish("done");
    else this._fail(error);
  }

  _fail(error) {
    const stored = { code: error.code, message: error.message, retryable: Boolean(error.retryable) };
    if (error.fromServer) stored.fromServer = true;
    if (error.retryAfter !== null && error.retryAfter !== undefined) stored.retryAfter = error.retryAfter;
    // Its stream was refused, not the answer: a retry follows the same generation again.
    if (error.code === "too_many_streams" && this.pending?.generation) {
      stored.resume = { generation: this.pending.generation, lastEventId: this.pending.lastEventId };
    }
    this.message.error = stored;
    this._finish("error");
  }

  _finish(status) {
    if (this.finished) return;
    this.finished = true;
    const message = this.message;
    message.status = status;
    message.connection = null;
    message.stats.ended = Date.now();
    delete message.pending;
    this._close();
    this.save(true);
    this.runs._finished(this);
  }

  _close() {
    this._ended();
    this.follower?.close();
    clearTimeout(this.saveTimer);
    clearTimeout(this.stopTimer);
  }

  /**
   * Writes the conversation now, or within SAVE_INTERVAL_MS (text and event id together).
   * Saves while streaming do not move the conversation in the list (only its start and
   * end do): re-sorting the sidebar every second would pull buttons from under the pointer.
   */
  save(now) {
    if (this.runs.store.get(this.conversation.id) !== this.conversation) return; // deleted meanwhile
    if (now) {
      clearTimeout(this.saveTimer);
      this.saveTimer = 0;
      this.runs.store.save(this.conversation, { touch: this.finished });
    } else if (!this.saveTimer) {
      this.saveTimer = setTimeout(() => this.save(true), SAVE_INTERVAL_MS);
    }
  }
}
