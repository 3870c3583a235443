// The chat page: wires the store, the running generations and the views together.

import { listModels } from "./api.js";
import { copyText, downloadText } from "./clipboard.js";
import { conversationMarkdown, exportFilename } from "./export.js";
import { detectLanguage, setLanguage, t, translatePage } from "./i18n.js";
import { newId } from "./ids.js";
import { MessageList } from "./messages.js";
import { Runs } from "./runs.js";
import { Sidebar } from "./sidebar.js";
import { Store } from "./store.js";
import { applyTheme, nextTheme, themeLabel } from "./theme.js";

const TICK_MS = 250;
const COPIED_MS = 1500;

const $ = (id) => document.getElementById(id);

class ChatApp {
  constructor() {
    this.store = new Store();
    this.runs = new Runs(this.store);
    this.models = { default: null, models: [] };
    this.current = null; // the open conversation; null for a new chat not yet sent
    this.draftSystem = "";
    this.editing = null;
    this.tickTimer = 0;
    this.copiedTimers = new WeakMap(); // button -> timer putting its label back

    const settings = this.store.settings();
    this.theme = settings.theme ?? "system";
    setLanguage(detectLanguage(settings.language, navigator.languages ?? [navigator.language]));
    applyTheme(this.theme);
    translatePage();
    $("language").value = settings.language ?? "auto";
    $("theme-toggle").textContent = themeLabel(this.theme);

    this.list = new MessageList($("messages"), $("jump"));
    this.sidebar = new Sidebar($("conversations"), $("no-conversations"), {
      onOpen: (id) => this.open(id),
      onRename: (id, title) => this.rename(id, title),
      onDelete: (id) => this.remove(id),
    });
    this._bind();

    const last = settings.current && this.store.get(settings.current);
    this.open(last ? last.id : null);
    this.runs.resumeAll();
    this.loadModels();
    $("prompt").focus();
  }

  _bind() {
    $("composer").addEventListener("submit", (event) => {
      event.preventDefault();
      this.send();
    });
    $("prompt").addEventListener("keydown", (event) => {
      // isComposing: Enter that confirms an IME candidate (Chinese, Japanese...) must not send.
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
        event.preventDefault();
        this.send();
      }
    });
    $("prompt").addEventListener("input", () => this._autosize());
    $("stop").addEventListener("click", () => this.stop());
    document.addEventListener("keydown", (event) => {
      if (event.key !== "Escape" || event.defaultPrevented) return;
      if (this.editing) this.cancelEdit();
      else if (this._run()) {
        event.preventDefault();
        this.stop();
      } else this._closeSidebar();
    });
    $("new-chat").addEventListener("click", () => {
      this.open(null);
      this._closeSidebar();
      $("prompt").focus();
    });
    $("messages").addEventListener("click", (event) => this._onMessageAction(event));
    $("model").addEventListener("change", () => this._onModelChange());
    $("system-toggle").addEventListener("click", () => this._toggleSystemPanel());
    $("system-prompt").addEventListener("input", () => this._onSystemInput());
    $("export").addEventListener("click", () => this.exportConversation());
    $("theme-toggle").addEventListener("click", () => {
      this.theme = nextTheme(this.theme);
      applyTheme(this.theme);
      $("theme-toggle").textContent = themeLabel(this.theme);
      this.store.updateSettings({ theme: this.theme });
    });
    $("language").addEventListener("change", () => {
      const choice = $("language").value;
      this.store.updateSettings({ language: choice });
      setLanguage(detectLanguage(choice, navigator.languages ?? [navigator.language]));
      translatePage();
      $("theme-toggle").textContent = themeLabel(this.theme);
      this._fillModelPicker();
      this.open(this.current?.id ?? null);
    });
    $("menu").addEventListener("click", () => this._toggleSidebar());
    $("scrim").addEventListener("click", () => this._closeSidebar());
    this.store.addEventListener("change", () => this._renderSidebar());
    this.store.addEventListener("external", (event) => this._onExternalChange(event.detail.id));
    this.store.addEventListener("quota", () => this._notice(t("app.storageFull")));
    this.runs.addEventListener("update", (event) => this._onRunUpdate(event.detail.run));
  }

  // Conversations

  open(id) {
    this.cancelEdit();
    this.current = id ? this.store.get(id) : null;
    this.store.updateSettings({ current: this.current?.id ?? null });
    this._showTitle();
    $("system-prompt").value = this.current ? (this.current.system ?? "") : this.draftSystem;
    this._selectModel();
    this.list.show(this.current, Boolean(this._run()));
    this._syncComposer();
    this._renderSidebar();
    this._closeSidebar();
  }

  rename(id, title) {
    if (title !== null) this.store.rename(id, title);
    this._renderSidebar();
    if (this.current?.id === id) this._showTitle();
  }

  remove(id) {
    for (const run of [...this.runs.active.values()]) if (run.conversation.id === id) run.discard();
    this.store.delete(id);
    if (this.current?.id === id) this.open(null);
  }

  // Sending and the answer's actions

  send() {
    const prompt = $("prompt");
    const text = prompt.value;
    if (!text.trim() || this._run()) return;
    if (!this.current) {
      this.current = this.store.create({ model: $("model").value || null, system: this.draftSystem });
      this.draftSystem = "";
      this.store.updateSettings({ current: this.current.id });
    }
    this.current.messages.push({ id: newId(), role: "user", content: text });
    prompt.value = "";
    this._autosize();
    this._answer();
  }

  /** Appends a new assistant message and asks for it, from everything before it. */
  _answer() {
    const conversation = this.current;
    const message = { id: newId(), role: "assistant", content: "", reasoning: "", status: "streaming" };
    conversation.messages.push(message);
    const body = { model: this._modelFor(conversation), messages: requestMessages(conversation, -1) };
    this.runs.start(conversation, message, body);
    this.list.show(conversation, true);
    this._showTitle();
    this._syncComposer();
  }

  stop() {
    this._run()?.stop();
  }

  regenerate(message) {
    const conversation = this.current;
    if (conversation.messages.at(-1) !== message || this._run()) return;
    conversation.messages.pop();
    this._answer();
  }

  continueAnswer(message) {
    const conversation = this.current;
    if (conversation.messages.at(-1) !== message || this._run()) return;
    const history = requestMessages(conversation, -1);
    history.push({ role: "assistant", content: message.content }, { role: "user", content: t("continue.prompt") });
    const body = { model: this._modelFor(conversation), messages: mergeSameRole(history) };
    this.runs.start(conversation, message, body);
    this.list.show(conversation, true);
    this._syncComposer();
  }

  startEdit(message) {
    if (this._run()) return;
    this.cancelEdit();
    const area = this.list.startEdit(message);
    this.editing = message;
    area.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
        event.preventDefault();
        this.saveEdit(area.value);
      }
    });
  }

  saveEdit(text) {
    const message = this.editing;
    if (!message || !text.trim() || this._run()) return;
    const conversation = this.current;
    const index = conversation.messages.indexOf(message);
    this.editing = null;
    message.content = text;
    conversation.messages.splice(index + 1);
    this._answer();
  }

  cancelEdit() {
    if (!this.editing) return;
    this.list.endEdit(this.editing);
    this.editing = null;
  }

  exportConversation() {
    if (!this.current) return;
    const text = conversationMarkdown(this.current, {
      untitled: t("app.untitled"),
      system: t("app.systemPrompt"),
      user: t("msg.you"),
      assistant: t("msg.assistant"),
    });
    downloadText(exportFilename(this.current.title), text);
  }

  async _onMessageAction(event) {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    const action = button.dataset.action;
    if (action === "copy-code") {
      const code = button.closest("pre")?.querySelector("code");
      if (code) this._flashCopied(button, await copyText(code.textContent));
      return;
    }
    if (action === "save-edit") {
      this.saveEdit(button.closest(".edit-box").querySelector("textarea").value);
      return;
    }
    if (action === "cancel-edit") {
      this.cancelEdit();
      return;
    }
    const id = this.list.messageIdOf(button);
    const message = this.current?.messages.find((item) => item.id === id);
    if (!message) return;
    if (action === "copy") this._flashCopied(button, await copyText(message.content));
    else if (action === "edit") this.startEdit(message);
    else if (action === "regenerate" || action === "retry") this.regenerate(message);
    else if (action === "continue") this.continueAnswer(message);
  }

  _flashCopied(button, ok) {
    if (!ok) return;
    button.textContent = t("msg.copied");
    clearTimeout(this.copiedTimers.get(button));
    this.copiedTimers.set(
      button,
      setTimeout(() => {
        button.textContent = t(button.dataset.i18n);
      }, COPIED_MS),
    );
  }

  _onRunUpdate(run) {
    if (run.conversation === this.current) {
      this.list.update(run.message);
      if (run.finished) {
        this.list.setRunning(Boolean(this._run()));
        this._syncComposer();
      }
    }
    // The sidebar only shows which conversations stream: redraw it when that set changes.
    const streaming = [...this.runs.active.keys()].join();
    if (streaming !== this.streamingKey) {
      this.streamingKey = streaming;
      this._renderSidebar();
    }
  }

  /** Another tab saved conversation id: show its version unless this tab is streaming into it. */
  _onExternalChange(id) {
    if (this.runs.forConversation(id)) return;
    this.store.reload(id);
    if (this.current?.id === id && !this.editing) this.open(this.store.get(id) ? id : null);
  }

  _run() {
    return this.current ? this.runs.forConversation(this.current.id) : null;
  }

  _showTitle() {
    const title = this.current?.title || t("app.untitled");
    $("chat-title").textContent = title;
    document.title = this.current?.title ? `${title} · Rill` : "Rill";
  }

  _syncComposer() {
    const running = Boolean(this._run());
    $("send").hidden = running;
    $("stop").hidden = !running;
    clearInterval(this.tickTimer);
    if (running) this.tickTimer = setInterval(() => this.list.tick(), TICK_MS);
  }

  _autosize() {
    const prompt = $("prompt");
    prompt.style.height = "auto";
    prompt.style.height = `${Math.min(prompt.scrollHeight, window.innerHeight * 0.4)}px`;
  }

  // Models and settings

  async loadModels() {
    try {
      this.models = await listModels();
    } catch (error) {
      $("model").replaceChildren(new Option(t("app.modelsFailed"), ""));
      this._notice(error.message);
      return;
    }
    this._fillModelPicker();
  }

  _fillModelPicker() {
    const select = $("model");
    if (!this.models.models.length) return;
    const groups = new Map();
    for (const model of this.models.models) {
      const key = model.provider_label || model.provider;
      if (!groups.has(key)) groups.set(key, []);
      const marked = !model.demo || /demo/i.test(model.label);
      const label = marked ? model.label : `${model.label} (${t("app.demoSuffix")})`;
      const option = new Option(label, model.id);
      option.dataset.demo = String(model.demo);
      groups.get(key).push(option);
    }
    if (groups.size === 1) select.replaceChildren(...[...groups.values()][0]);
    else {
      select.replaceChildren(
        ...[...groups].map(([label, options]) => {
          const group = document.createElement("optgroup");
          group.label = label;
          group.append(...options);
          return group;
        }),
      );
    }
    this._selectModel();
  }

  _selectModel() {
    const select = $("model");
    const wanted = this.current?.model ?? this.store.settings().model;
    const ids = this.models.models.map((model) => model.id);
    select.value = ids.includes(wanted) ? wanted : (this.models.default ?? ids[0] ?? "");
    select.classList.toggle("demo", select.selectedOptions[0]?.dataset.demo === "true");
  }

  _modelFor(conversation) {
    const ids = this.models.models.map((model) => model.id);
    if (ids.includes(conversation.model)) return conversation.model;
    return $("model").value || undefined; // undefined: the server's default model
  }

  _onModelChange() {
    const model = $("model").value;
    this.store.updateSettings({ model });
    if (this.current) {
      this.current.model = model;
      this.store.save(this.current, { touch: false });
    }
    this._selectModel();
  }

  _toggleSystemPanel() {
    const panel = $("system-panel");
    panel.hidden = !panel.hidden;
    $("system-toggle").setAttribute("aria-expanded", String(!panel.hidden));
    if (!panel.hidden) $("system-prompt").focus();
  }

  _onSystemInput() {
    const value = $("system-prompt").value;
    if (this.current) {
      this.current.system = value;
      this.store.save(this.current, { touch: false });
    } else this.draftSystem = value;
  }

  // Layout

  _renderSidebar() {
    if (this._sidebarFrame) return;
    this._sidebarFrame = requestAnimationFrame(() => {
      this._sidebarFrame = 0;
      const streaming = new Set([...this.runs.active.values()].map((run) => run.conversation.id));
      this.sidebar.render(this.store.list(), this.current?.id ?? null, streaming);
    });
  }

  _toggleSidebar() {
    const open = !$("app").classList.contains("sidebar-open");
    $("app").classList.toggle("sidebar-open", open);
    $("scrim").hidden = !open;
    $("menu").setAttribute("aria-expanded", String(open));
  }

  _closeSidebar() {
    $("app").classList.remove("sidebar-open");
    $("scrim").hidden = true;
    $("menu").setAttribute("aria-expanded", "false");
  }

  _notice(text) {
    const notice = $("notice");
    notice.textContent = text;
    notice.hidden = !text;
  }
}

/** The API messages for a conversation up to (not including) index `end` (negative: from the end). */
export function requestMessages(conversation, end) {
  const messages = [];
  const system = (conversation.system ?? "").trim();
  if (system) messages.push({ role: "system", content: system });
  for (const message of conversation.messages.slice(0, end)) {
    if (message.role === "user" || (message.role === "assistant" && message.content)) {
      messages.push({ role: message.role, content: message.content });
    }
  }
  return mergeSameRole(messages);
}

/** Joins neighbours with the same role (left by a failed answer): some APIs refuse them. */
function mergeSameRole(messages) {
  const merged = [];
  for (const message of messages) {
    const previous = merged.at(-1);
    if (previous && previous.role === message.role && message.role !== "system") {
      previous.content = `${previous.content}\n\n${message.content}`;
    } else merged.push({ ...message });
  }
  return merged;
}

new ChatApp();
