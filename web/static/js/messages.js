// The message list of the open conversation. Structure changes (switching conversation,
// a new or removed message) rebuild the list; a streaming answer only updates its own
// element, and its Markdown through MarkdownView.

import { describeError } from "./errors.js";
import { t, translatePage } from "./i18n.js";
import { branchPosition } from "./branches.js";
import { MarkdownView } from "./markdown.js";

const STICK_THRESHOLD_PX = 48;

export class MessageList {
  /** autoRetryIn(messageId): seconds until that failed answer is retried by itself, or null. */
  constructor(container, jumpButton, { autoRetryIn = () => null } = {}) {
    this.container = container;
    this.jumpButton = jumpButton;
    this.autoRetryIn = autoRetryIn;
    this.localRun = false; // this Rill has no access tokens: the reader is the one who runs it
    this.empty = container.querySelector("#empty-chat");
    this.template = document.getElementById("message-template");
    this.elements = new Map(); // message id -> {element, view}
    this.conversation = null;
    // Stored conversations branch: any question can be edited and any answer regenerated
    // (the old versions stay, behind `‹ 1 / 2 ›`). Without them only the last ones can.
    this.branching = false;
    this.running = false;
    this.stick = true;
    this.dirty = new Set(); // messages to redraw at the next animation frame
    this.frame = 0;
    container.addEventListener("scroll", () => {
      this.stick = this._atBottom();
      this.jumpButton.hidden = this.stick;
    });
    jumpButton.addEventListener("click", () => this.scrollToEnd(true));
  }

  /** Shows conversation (or none) from scratch; keepScroll: stay where the reader is. */
  show(conversation, running, { keepScroll = false } = {}) {
    const scrollTop = this.container.scrollTop;
    const stick = this.stick;
    const focused = this._focusedControl();
    this.dirty.clear();
    this.conversation = conversation;
    this.running = running;
    for (const { element } of this.elements.values()) element.remove();
    this.elements.clear();
    for (const message of conversation?.messages ?? []) this._add(message);
    this.empty.hidden = (conversation?.messages.length ?? 0) > 0;
    this.refreshActions();
    this._restoreFocus(focused);
    if (keepScroll && !stick) {
      this.container.scrollTop = scrollTop;
    } else {
      this.stick = true;
      this.scrollToEnd(true);
    }
  }

  /** The message button the keyboard is on (a rebuild would drop it to the page's start). */
  _focusedControl() {
    const active = document.activeElement;
    if (!active || !this.container.contains(active) || !active.dataset?.action) return null;
    return { id: this.messageIdOf(active), action: active.dataset.action };
  }

  _restoreFocus(focused) {
    const element = focused && this.elements.get(focused.id)?.element;
    if (!element) return;
    const usable = (button) => button && !button.disabled && !button.closest("[hidden]");
    let target = element.querySelector(`[data-action="${focused.action}"]`);
    // ‹ at the first version (or › at the last) is disabled: the other one of the pair.
    if (!usable(target) && focused.action.startsWith("branch-")) target = element.querySelector(".branch-nav button:not(:disabled)");
    if (usable(target)) target.focus({ preventScroll: true });
  }

  /**
   * Redraws message at the next animation frame. Events arrive in bursts (many per
   * network read); drawing and scrolling once per frame keeps long answers smooth.
   */
  update(message) {
    if (!this.elements.has(message.id)) return;
    this.dirty.add(message);
    if (!this.frame) this.frame = requestAnimationFrame(() => this._redraw());
  }

  _redraw() {
    this.frame = 0;
    for (const message of this.dirty) {
      const entry = this.elements.get(message.id);
      if (entry) this._fill(entry, message);
    }
    this.dirty.clear();
    if (this.stick) this.scrollToEnd(false);
  }

  setRunning(running) {
    this.running = running;
    this.refreshActions();
  }

  /** Whether the reader runs this Rill (GET /api/session: no access tokens); redraws errors. */
  setLocalRun(local) {
    this.localRun = local;
    for (const message of this.conversation?.messages ?? []) if (message.error) this.update(message);
  }

  /** The action buttons depend on position and on whether an answer is streaming. */
  refreshActions() {
    for (const message of this.conversation?.messages ?? []) {
      const entry = this.elements.get(message.id);
      if (entry) this._fillActions(entry, message);
    }
  }

  /**
   * One clear way on after a failure: Retry when the same request may work (or the
   * countdown's Cancel while it is retried by itself), Regenerate when it will not as it
   * is (after changing the model, say). Continue, when text was kept, is a different thing.
   */
  _fillActions(entry, message) {
    const messages = this.conversation?.messages ?? [];
    const idle = !this.running;
    const isLast = message === messages.at(-1);
    const lastUser = messages.findLast((item) => item.role === "user");
    const assistant = message.role === "assistant";
    const failed = message.status === "error" && Boolean(message.error);
    const counting = failed && this.autoRetryIn(message.id) !== null;
    const retry = idle && isLast && failed && message.error.retryable;
    const buttons = entry.element.querySelector(".message-actions");
    const editable = message.role === "user" && (this.branching || message === lastUser);
    buttons.querySelector('[data-action="edit"]').hidden = !(idle && editable);
    const renewable = assistant && (this.branching || isLast);
    buttons.querySelector('[data-action="regenerate"]').hidden = !(idle && renewable && !(isLast && retry));
    // interrupted: the server stopped (a restart) while the answer was being written; its text was kept.
    const cut = message.status === "interrupted" || message.status === "abandoned";
    const resumable = message.status === "length" || ((failed || cut) && message.content);
    buttons.querySelector('[data-action="continue"]').hidden = !(idle && assistant && isLast && resumable && !counting);
    buttons.querySelector('[data-action="copy"]').hidden = !message.content;
    this._fillBranches(entry, message, idle);
    const error = entry.element.querySelector(".message-error");
    error.querySelector('[data-action="retry"]').hidden = !(retry && !counting);
    error.querySelector('[data-action="cancel-retry"]').hidden = !(retry && counting);
  }

  /** `‹ 2 / 3 ›` on a message that has other versions (edited questions, regenerated answers). */
  _fillBranches(entry, message, idle) {
    const nav = entry.element.querySelector(".branch-nav");
    const { index, count } = this.branching ? branchPosition(this.conversation, message) : { index: 0, count: 0 };
    nav.hidden = count < 2 || index < 1;
    if (nav.hidden) return;
    nav.setAttribute("aria-label", t("branch.label", { index, count }));
    nav.querySelector(".branch-count").textContent = t("branch.position", { index, count });
    // Not while an answer streams: the branch it writes into must stay on screen.
    nav.querySelector('[data-action="branch-prev"]').disabled = !idle || index <= 1;
    nav.querySelector('[data-action="branch-next"]').disabled = !idle || index >= count;
  }

  messageIdOf(node) {
    return node.closest(".message")?.dataset.messageId ?? null;
  }

  scrollToEnd(force) {
    if (!force && !this.stick) return;
    this.container.scrollTop = this.container.scrollHeight;
    this.stick = true;
    this.jumpButton.hidden = true;
  }

  /** Turns a user message into an editor; returns its textarea. */
  startEdit(message) {
    const entry = this.elements.get(message.id);
    const box = document.getElementById("edit-template").content.firstElementChild.cloneNode(true);
    translatePage(box);
    const area = box.querySelector("textarea");
    area.value = message.content;
    const body = entry.element.querySelector(".message-body");
    body.hidden = true;
    body.after(box);
    entry.element.classList.add("editing");
    area.focus();
    return area;
  }

  endEdit(message) {
    const entry = this.elements.get(message.id);
    if (!entry) return;
    entry.element.querySelector(".edit-box")?.remove();
    entry.element.querySelector(".message-body").hidden = false;
    entry.element.classList.remove("editing");
  }

  /** Updates every timing line (elapsed time while waiting for tokens). */
  tick() {
    for (const message of this.conversation?.messages ?? []) {
      if (message.status === "streaming") this.update(message);
    }
  }

  _atBottom() {
    const c = this.container;
    return c.scrollHeight - c.scrollTop - c.clientHeight <= STICK_THRESHOLD_PX;
  }

  _add(message) {
    const element = this.template.content.firstElementChild.cloneNode(true);
    translatePage(element);
    element.dataset.messageId = message.id;
    element.classList.add(message.role);
    element.querySelector(".message-role").textContent = message.role === "user" ? t("msg.you") : t("msg.assistant");
    const body = element.querySelector(".message-body");
    const entry = { element, view: null, reasoningOpened: false };
    if (message.role === "assistant") {
      body.classList.add("markdown");
      entry.view = new MarkdownView(body);
    } else {
      body.classList.add("plain");
    }
    this.elements.set(message.id, entry);
    this.container.append(element);
    this._fill(entry, message);
  }

  _fill(entry, message) {
    const { element, view } = entry;
    const streaming = message.status === "streaming";
    element.classList.toggle("streaming", streaming);
    element.setAttribute("aria-busy", String(streaming)); // screen readers read it once, when done
    element.dataset.status = message.status ?? "done";
    if (view) view.render(message.content, streaming);
    else element.querySelector(".message-body").textContent = message.content;

    if (message.role === "assistant") {
      element.querySelector(".message-model").textContent = message.modelLabel || message.model || "";
      element.querySelector(".demo-badge").hidden = !message.demo;
      this._fillReasoning(entry, message);
      this._fillStatus(element, message);
      element.querySelector(".message-stats").textContent = statsLine(message);
    }
    this._fillError(entry, message);
    this._fillActions(entry, message);
  }

  _fillError(entry, message) {
    const box = entry.element.querySelector(".message-error");
    box.hidden = !message.error;
    if (!message.error) return;
    const { text, detail } = describeError(message.error, { local: this.localRun });
    box.querySelector(".error-text").textContent = text;
    const details = box.querySelector(".error-details");
    details.hidden = !detail;
    details.querySelector(".error-detail-text").textContent = detail;
    const seconds = message.status === "error" ? this.autoRetryIn(message.id) : null;
    const countdown = box.querySelector(".error-countdown");
    countdown.hidden = seconds === null;
    countdown.textContent = seconds === null ? "" : t("msg.autoRetry", { seconds });
  }

  _fillReasoning(entry, message) {
    const details = entry.element.querySelector(".reasoning");
    const reasoning = message.reasoning ?? "";
    details.hidden = !reasoning;
    if (!reasoning) return;
    details.querySelector(".reasoning-text").textContent = reasoning;
    const answering = Boolean(message.content) || message.status !== "streaming";
    const label = details.querySelector(".reasoning-label");
    const { firstToken, answerStarted } = message.stats ?? {};
    const thoughtUntil = answerStarted ?? message.stats?.ended;
    label.textContent =
      answering && firstToken && thoughtUntil
        ? t("msg.thoughtFor", { seconds: ((thoughtUntil - firstToken) / 1000).toFixed(1) })
        : t("msg.thinking");
    // Open while thinking; closed once the answer starts (the user can reopen it).
    if (!answering && !entry.reasoningOpened) {
      details.open = true;
      entry.reasoningOpened = true;
    } else if (answering && entry.reasoningOpened) {
      details.open = false;
      entry.reasoningOpened = false;
    }
  }

  _fillStatus(element, message) {
    const status = element.querySelector(".message-status");
    let text = "";
    if (message.status === "streaming") {
      if (message.pending?.stopRequested) text = t("msg.stopping");
      else if (message.connection === "reconnecting") text = t("msg.reconnecting");
      else if (!message.content && !message.reasoning) text = t("msg.waiting");
    } else if (message.status === "stopped") text = t("msg.stopped");
    else if (message.status === "length") text = t("msg.truncated");
    else if (message.status === "filtered") text = t("msg.filtered");
    else if (message.status === "interrupted" || message.status === "abandoned") text = t("msg.interrupted");
    // The server could not write the latest text to its database (yet): it keeps trying.
    if (message.unsaved) text = text ? `${text} · ${t("msg.notSaved")}` : t("msg.notSaved");
    status.classList.toggle("unsaved", Boolean(message.unsaved));
    status.textContent = text;
    status.hidden = !text;
  }
}

/** "42.0 tokens/s · 3.1 s · 12 in · 130 out" (or an estimate when usage is unknown). */
function statsLine(message) {
  const stats = message.stats;
  if (!stats?.started) return "";
  // Failed before a first token: a time and no tokens would say nothing the error does not.
  if (message.status === "error" && !stats.firstToken) return "";
  const end = stats.ended ?? Date.now();
  const parts = [];
  const usage = message.usage;
  const completion = usage?.completion_tokens ?? stats.deltas;
  if (stats.firstToken && completion > 0) {
    const seconds = (end - stats.firstToken) / 1000;
    if (seconds > 0.05) parts.push(t("msg.stats.tokensPerSecond", { rate: (completion / seconds).toFixed(1) }));
  }
  parts.push(t("msg.stats.elapsed", { seconds: ((end - stats.started) / 1000).toFixed(1) }));
  if (usage && Number.isFinite(usage.prompt_tokens) && Number.isFinite(usage.completion_tokens)) {
    parts.push(t("msg.stats.usage", { prompt: usage.prompt_tokens, completion: usage.completion_tokens }));
  } else if (stats.deltas > 0) {
    parts.push(t("msg.stats.estimated", { count: stats.deltas }));
  }
  return parts.join(" · ");
}
