// The message list of the open conversation. Structure changes (switching conversation,
// a new or removed message) rebuild the list; a streaming answer only updates its own
// element, and its Markdown through MarkdownView.

import { t, translatePage } from "./i18n.js";
import { MarkdownView } from "./markdown.js";

const STICK_THRESHOLD_PX = 48;

export class MessageList {
  constructor(container, jumpButton) {
    this.container = container;
    this.jumpButton = jumpButton;
    this.empty = container.querySelector("#empty-chat");
    this.template = document.getElementById("message-template");
    this.elements = new Map(); // message id -> {element, view}
    this.conversation = null;
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
    this.dirty.clear();
    this.conversation = conversation;
    this.running = running;
    for (const { element } of this.elements.values()) element.remove();
    this.elements.clear();
    for (const message of conversation?.messages ?? []) this._add(message);
    this.empty.hidden = (conversation?.messages.length ?? 0) > 0;
    this.refreshActions();
    if (keepScroll && !stick) {
      this.container.scrollTop = scrollTop;
    } else {
      this.stick = true;
      this.scrollToEnd(true);
    }
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

  /** The action buttons depend on position and on whether an answer is streaming. */
  refreshActions() {
    const messages = this.conversation?.messages ?? [];
    const last = messages.at(-1);
    const lastUser = messages.findLast((message) => message.role === "user");
    for (const message of messages) {
      const entry = this.elements.get(message.id);
      if (!entry) continue;
      const idle = !this.running;
      const isLast = message === last;
      const buttons = entry.element.querySelector(".message-actions");
      buttons.querySelector('[data-action="edit"]').hidden = !(idle && message === lastUser);
      const assistant = message.role === "assistant";
      buttons.querySelector('[data-action="regenerate"]').hidden = !(idle && assistant && isLast);
      const resumable = message.status === "length" || (message.status === "error" && message.content);
      buttons.querySelector('[data-action="continue"]').hidden = !(idle && assistant && isLast && resumable);
      buttons.querySelector('[data-action="copy"]').hidden = !message.content;
      entry.element.querySelector('.message-error [data-action="retry"]').hidden = !(idle && isLast);
    }
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
    const error = element.querySelector(".message-error");
    error.hidden = !message.error;
    if (message.error) error.querySelector(".error-text").textContent = message.error.message;
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
    status.textContent = text;
    status.hidden = !text;
  }
}

/** "42.0 tokens/s · 3.1 s · 12 in · 130 out" (or an estimate when usage is unknown). */
function statsLine(message) {
  const stats = message.stats;
  if (!stats?.started) return "";
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
