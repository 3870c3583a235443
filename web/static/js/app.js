// The chat page: wires the store, the running generations and the views together.

import { AUTH_REQUIRED_EVENT, listModels } from "./api.js";
import { versionAt } from "./branches.js";
import { copyText, downloadText } from "./clipboard.js";
import { describeError } from "./errors.js";
import { HistoryStore, answerBody } from "./history.js";
import { conversationMarkdown, exportFilename } from "./export.js";
import { detectLanguage, setLanguage, t, translatePage } from "./i18n.js";
import { newId } from "./ids.js";
import { MessageList } from "./messages.js";
import { Runs } from "./runs.js";
import { SearchBox } from "./search.js";
import { SignInDialog, sessionState, signOut } from "./session.js";
import { Sidebar } from "./sidebar.js";
import { titleOf } from "./store.js";
import { applyTheme, nextTheme, themeLabel } from "./theme.js";
import { DataDialog } from "./transfer.js";
import { allMessages } from "./tree.js";

const TICK_MS = 250;
const COPIED_MS = 1500;
const MODELS_RETRY_MS = [2000, 5000, 15000, 30000];
const HISTORY_RETRY_MS = [2000, 5000, 15000, 30000];

const $ = (id) => document.getElementById(id);

class ChatApp {
  constructor() {
    this.store = new HistoryStore(); // the server's history when it keeps one, else localStorage
    this.runs = new Runs(this.store);
    this.models = { default: null, models: [] };
    this.current = null; // the open conversation; null for a new chat not yet sent
    this.draftSystem = "";
    this.editing = null;
    this.tickTimer = 0;
    this.copiedTimers = new WeakMap(); // button -> timer putting its label back
    this.running = false; // whether the open conversation has an answer streaming
    this.streamingKey = ""; // which conversations stream, as last drawn in the sidebar

    const settings = this.store.settings();
    this.theme = settings.theme ?? "system";
    setLanguage(detectLanguage(settings.language, navigator.languages ?? [navigator.language]));
    applyTheme(this.theme);
    translatePage();
    $("language").value = settings.language ?? "auto";
    $("theme-toggle").textContent = themeLabel(this.theme);

    this.signIn = new SignInDialog($("signin"));
    this.list = new MessageList($("messages"), $("jump"), { autoRetryIn: (id) => this.runs.autoRetryIn(id) });
    this.sidebar = new Sidebar($("conversations"), $("no-conversations"), {
      onOpen: (id) => this.open(id),
      onRename: (id, title) => this.rename(id, title),
      onDelete: (id) => this.remove(id),
    });
    this.search = new SearchBox(
      {
        box: $("search"),
        input: $("search-input"),
        clear: $("search-clear"),
        results: $("search-results"),
        list: $("search-list"),
        status: $("search-status"),
        conversations: $("conversations"),
      },
      { onOpen: (id, messageId) => this.openAt(id, messageId) },
    );
    this.data = new DataDialog($("data-dialog"), {
      current: () => (this.current ? { ...this.current, title: titleOf(this.current) } : null),
      labels: () => this._markdownLabels(),
      imported: (ids) => this._afterImport(ids),
      deletedAll: () => this._afterDeleteAll(),
    });
    this._bind();

    const last = settings.current && this.store.get(settings.current);
    this.open(last ? last.id : null);
    $("prompt").focus();
    this._start();
  }

  /** Signs in first if this Rill wants a token; then resumes answers and loads models. */
  async _start() {
    let state = null;
    try {
      state = await sessionState();
    } catch {
      // Unreachable for now: carry on; the calls below report it and retry.
    }
    if (state?.required) $("sign-out").hidden = false;
    this.list.setLocalRun(state?.required === false); // unknown (unreachable): not local
    if (state?.required && !state.signed_in) await this.signIn.ask();
    await this._connectHistory();
    this.runs.resumeAll();
    this.loadModels();
    $("prompt").focus();
  }

  /** Takes the server's history (uploading this browser's own the first time); retries while unreachable. */
  async _connectHistory(attempt = 0) {
    try {
      await this.store.connect();
      this._historyFeatures();
      if (attempt > 0) this._notice("");
    } catch (error) {
      if (error.code === "auth_required") return; // signing in again connects
      this._notice(t("history.unreachable"));
      const delay = HISTORY_RETRY_MS[Math.min(attempt, HISTORY_RETRY_MS.length - 1)];
      setTimeout(() => this._connectHistory(attempt + 1), delay);
    }
  }

  /** The session ended while the page was open (expired, or its token was removed). */
  async _signInAgain() {
    if (this.signIn.open) return;
    $("sign-out").hidden = false;
    await this.signIn.ask();
    this._notice("");
    this._connectHistory();
    if (!this.models.models.length) this.loadModels();
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
    $("stop").addEventListener("click", () => {
      this.stop();
      $("prompt").focus(); // the Stop button hides itself: keep the focus where typing happens
    });
    document.addEventListener("keydown", (event) => {
      // isComposing: Esc then only cancels the input method's candidate.
      if (event.key !== "Escape" || event.defaultPrevented || event.isComposing) return;
      if (this.editing) this.cancelEdit();
      else if (this._busy()) {
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
    $("data-open").addEventListener("click", () => this.data.open());
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
    $("sign-out").addEventListener("click", async () => {
      try {
        await signOut();
      } catch (error) {
        this._notice(describeError(error).text);
        return;
      }
      this.store.clearCache(); // the next person at this browser sees none of it
      location.reload(); // the page comes back asking for a token
    });
    window.addEventListener(AUTH_REQUIRED_EVENT, () => this._signInAgain());
    $("scrim").addEventListener("click", () => this._closeSidebar());
    this.store.addEventListener("change", () => this._renderSidebar());
    this.store.addEventListener("external", (event) => this._onExternalChange(event.detail.id));
    this.store.addEventListener("removed", (event) => this._onExternalRemove(event.detail.ids));
    this.store.addEventListener("quota", () => this._notice(t("app.storageFull")));
    this.store.addEventListener("failed", (event) => this._notice(describeError(event.detail).text));
    this.store.addEventListener("message", (event) => {
      if (event.detail.conversation === this.current) this.list.update(event.detail.message);
    });
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
    this._redraw();
    this._renderSidebar();
    this._closeSidebar();
  }

  rename(id, title) {
    if (title !== null) this.store.rename(id, title);
    this._renderSidebar();
    if (this.current?.id === id) this._showTitle();
  }

  remove(id) {
    this._discardAnswers([id]);
    this.store.delete(id);
    if (this.current?.id === id) this.open(null);
  }

  // Sending and the answer's actions

  send() {
    const prompt = $("prompt");
    const text = prompt.value;
    if (!text.trim() || this._busy()) return;
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
    const model = this._modelFor(conversation);
    const body = this.store.remote
      ? answerBody(conversation, message, { model })
      : { model, messages: requestMessages(conversation, -1) };
    this.runs.start(conversation, message, body);
    this._redraw();
    this._showTitle();
    $("prompt").focus();
  }

  stop() {
    const message = this.current?.messages.find((item) => item.pending);
    if (message) this.runs.requestStop(message);
  }

  regenerate(message) {
    const conversation = this.current;
    if (this._busy()) return;
    if (this.store.remote) {
      // Any answer: it and what followed stay on the server as another version.
      const index = conversation.messages.indexOf(message);
      if (index < 1) return;
      this.store.branchFrom(conversation, index);
    } else if (conversation.messages.at(-1) === message) conversation.messages.pop();
    else return;
    this._answer();
  }

  /** Redoes the failed request into the same message (keeping text from before it). */
  retry(message) {
    const conversation = this.current;
    if (conversation.messages.at(-1) !== message || this._busy()) return;
    if (!message.request) {
      this.regenerate(message);
      return;
    }
    this.runs.retry(conversation, message);
    this._redraw();
  }

  continueAnswer(message) {
    const conversation = this.current;
    if (conversation.messages.at(-1) !== message || this._busy()) return;
    if (this.store.remote) {
      this.runs.start(conversation, message, answerBody(conversation, message, { model: this._modelFor(conversation), continued: true }));
      this._redraw();
      return;
    }
    const history = requestMessages(conversation, -1);
    history.push({ role: "assistant", content: message.content }, { role: "user", content: t("continue.prompt") });
    const body = { model: this._modelFor(conversation), messages: mergeSameRole(history) };
    this.runs.start(conversation, message, body);
    this._redraw();
  }

  startEdit(message) {
    if (this._busy()) return;
    this.cancelEdit();
    this.runs.cancelAutoRetries(this.current.id); // a retry now would end the editing
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
    if (!message || !text.trim() || this._busy()) return;
    const conversation = this.current;
    const index = conversation.messages.indexOf(message);
    this.editing = null;
    if (this.store.remote) {
      // The question as it was, and what followed, stay on the server as another version.
      this.store.branchFrom(conversation, index);
      conversation.messages.push({ id: newId(), role: "user", content: text });
    } else {
      message.content = text;
      conversation.messages.splice(index + 1);
    }
    this._answer();
  }

  cancelEdit() {
    if (!this.editing) return;
    this.list.endEdit(this.editing);
    this.editing = null;
  }

  exportConversation() {
    if (!this.current) return;
    const title = titleOf(this.current);
    const text = conversationMarkdown({ ...this.current, title }, this._markdownLabels());
    downloadText(exportFilename(title), text);
  }

  _markdownLabels() {
    return {
      untitled: t("app.untitled"),
      system: t("app.systemPrompt"),
      user: t("msg.you"),
      assistant: t("msg.assistant"),
      error: (error) => describeError(error, { local: this.list.localRun }).text,
    };
  }

  // Stored conversations: branches, search, export / import, delete all

  /** Turns on what needs conversations stored on the server (GET /api/history said so). */
  _historyFeatures() {
    const enabled = this.store.remote;
    this.search.setEnabled(enabled);
    $("data-open").hidden = !enabled;
    this.list.branching = enabled;
    this.list.refreshActions();
  }

  /** ‹ / ›: shows the version `step` away from message, with the newest answers under it. */
  switchBranch(message, step) {
    if (!this.current || this._busy()) return;
    const version = versionAt(this.current, message, step);
    if (!version) return;
    this.cancelEdit();
    this.store.switchTo(this.current, version.id); // and PATCHes active: what is sent to the model
    this._redraw({ keepScroll: true });
    // The buttons were rebuilt: keep the keyboard on the same control of the new version.
    const action = step < 0 ? "branch-prev" : "branch-next";
    const nav = $("messages").querySelector(`.message[data-message-id="${CSS.escape(version.id)}"] .branch-nav`);
    const button = nav?.querySelector(`[data-action="${action}"]:not(:disabled)`) ?? nav?.querySelector("button:not(:disabled)");
    button?.focus({ preventScroll: true });
  }

  /** A search result: opens its conversation on the branch that holds the message found. */
  async openAt(id, messageId) {
    this.open(id);
    if (!messageId) return;
    const conversation = await this._loaded(id, messageId);
    if (!conversation || this.current !== conversation || this._busy()) return;
    if (!conversation.messages.some((message) => message.id === messageId)) {
      this.store.switchTo(conversation, messageId);
      this._redraw();
    }
    const element = $("messages").querySelector(`.message[data-message-id="${CSS.escape(messageId)}"]`);
    element?.scrollIntoView({ block: "center" });
    element?.classList.add("found");
  }

  /** The conversation once the page's copy of it holds messageId (it may still be on its way). */
  _loaded(id, messageId, timeout = 5000) {
    const has = () => {
      const conversation = this.store.get(id);
      return conversation && allMessages(conversation).some((message) => message.id === messageId) ? conversation : null;
    };
    if (has()) return Promise.resolve(has());
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.store.removeEventListener("external", check);
        resolve(has());
      };
      const check = (event) => {
        if (event.detail.id === id && has()) done();
      };
      const timer = setTimeout(done, timeout);
      this.store.addEventListener("external", check);
    });
  }

  _afterImport(ids) {
    // Deleted here before (delete all, say) and now back: the page may show them again.
    for (const id of ids) this.store.deleted.delete(id);
    this.store.refreshAll().catch(() => {}); // the feed brings it too; this does not wait for it
    this.search.refresh();
  }

  /** Everything of this owner is gone from the server: forget this page's copy too. */
  _afterDeleteAll() {
    this._discardAnswers(this.store.list().map((summary) => summary.id));
    this.open(null); // first: nothing asks the server for the open one any more
    this.store.clearCache();
    this.search.clear();
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
    else if (action === "regenerate") this.regenerate(message);
    else if (action === "retry") this.retry(message);
    else if (action === "cancel-retry") this.runs.cancelAutoRetry(message.id);
    else if (action === "continue") this.continueAnswer(message);
    else if (action === "branch-prev") this.switchBranch(message, -1);
    else if (action === "branch-next") this.switchBranch(message, 1);
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
      // A retry may answer into a new version of the message (history.js retryBody): draw it.
      if (this.list.elements.has(run.message.id)) this.list.update(run.message);
      else this._redraw({ keepScroll: true });
      // Covers answers resumed after a reload too, not only the ones sent from here.
      if (this._busy() !== this.running) {
        this._syncComposer();
        this.list.setRunning(this.running);
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
    if (this.runs.owns(id)) {
      // This tab writes the messages; take only what the other tab may have changed.
      this.store.mergeSettings(id);
      if (this.current?.id === id) {
        this._showTitle();
        if (document.activeElement !== $("system-prompt")) $("system-prompt").value = this.current.system ?? "";
        this._selectModel();
      }
      return;
    }
    this.runs.cancelAutoRetries(id); // another tab moved on: its version decides what comes next
    this.store.reload(id);
    this.runs.watch(this.store.get(id)); // an answer another tab started: follow it if that tab goes
    if (this.current?.id !== id) return;
    this.cancelEdit(); // its message object is stale now; saving it would undo the other tab
    this.current = this.store.get(id);
    if (!this.current) {
      this.open(null);
      return;
    }
    this._showTitle();
    this._redraw({ keepScroll: true });
  }

  /** Another tab deleted conversations: stop answering into them here too. */
  _onExternalRemove(ids) {
    this._discardAnswers(ids);
    if (this.current && ids.includes(this.current.id)) this.open(null);
  }

  /** Stops the answers streaming into conversations that are going away. */
  _discardAnswers(conversationIds) {
    for (const id of conversationIds) this.runs.cancelAutoRetries(id);
    for (const run of [...this.runs.active.values()]) {
      if (conversationIds.includes(run.conversation.id)) run.discard();
    }
  }

  _run() {
    return this.current ? this.runs.forConversation(this.current.id) : null;
  }

  /** An answer streams in the open conversation, from this tab or another one. */
  _busy() {
    return Boolean(this._run() || this.current?.messages.some((message) => message.pending));
  }

  _showTitle() {
    // Derived, not read from the stored title: a new answer is saved only once it has its lock.
    const given = this.current ? titleOf(this.current) : "";
    $("chat-title").textContent = given || t("app.untitled");
    document.title = given ? `${given} · Rill` : "Rill";
  }

  /** Redraws the open conversation from scratch, with the composer in the matching state. */
  _redraw({ keepScroll = false } = {}) {
    this._syncComposer();
    this.list.show(this.current, this.running, { keepScroll });
  }

  _syncComposer() {
    this.running = this._busy();
    $("send").hidden = this.running;
    $("stop").hidden = !this.running;
    clearInterval(this.tickTimer);
    if (this.running) this.tickTimer = setInterval(() => this.list.tick(), TICK_MS);
  }

  _autosize() {
    const prompt = $("prompt");
    prompt.style.height = "auto";
    prompt.style.height = `${Math.min(prompt.scrollHeight, window.innerHeight * 0.4)}px`;
  }

  // Models and settings

  async loadModels(attempt = 0) {
    try {
      this.models = await listModels();
    } catch (error) {
      $("model").replaceChildren(new Option(t("app.modelsFailed"), ""));
      this._notice(describeError(error).text);
      const delay = MODELS_RETRY_MS[Math.min(attempt, MODELS_RETRY_MS.length - 1)];
      setTimeout(() => this.loadModels(attempt + 1), delay);
      return;
    }
    if (attempt > 0) this._notice("");
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
      for (const entry of this.store.list()) if (entry.streaming) streaming.add(entry.id); // on another device
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
function requestMessages(conversation, end) {
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
