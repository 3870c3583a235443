// Export, import and "delete all my data", for conversations stored on the server: the
// dialog opened from the sidebar. JSON is the server's export document (it imports back
// exactly, every branch included); Markdown is the branch shown, in the page's language.

import { request } from "./api.js";
import { shownPath } from "./branches.js";
import { downloadText } from "./clipboard.js";
import { describeError } from "./errors.js";
import { conversationMarkdown, exportFilename } from "./export.js";
import { t } from "./i18n.js";

export const EXPORT_FORMAT = "rill.conversations";

const id = (value) => encodeURIComponent(value);

export function exportDocument(conversationId = null) {
  const url = conversationId ? `/api/conversations/${id(conversationId)}/export?format=json` : "/api/export?format=json";
  return request("GET", url);
}

export function importDocument(document) {
  return request("POST", "/api/import", document);
}

export function deleteAllData() {
  return request("DELETE", "/api/data");
}

export function historyInfo() {
  return request("GET", "/api/history");
}

/** The export document in a file, or throws ApiError "bad_file" when it is not one. */
export async function readExportFile(file) {
  let document;
  try {
    document = JSON.parse(await file.text());
  } catch {
    document = null;
  }
  if (!document || document.format !== EXPORT_FORMAT || !Array.isArray(document.conversations)) {
    const error = new Error(t("data.badFile"));
    error.code = "bad_file";
    throw error;
  }
  return document;
}

/** Several stored conversations (all their messages) as one Markdown file of the branches shown. */
export function documentMarkdown(document, labels) {
  return document.conversations
    .map((conversation) => conversationMarkdown({ ...conversation, messages: shownPath(conversation) }, labels))
    .join("\n---\n\n");
}

const today = () => new Date().toISOString().slice(0, 10);

export class DataDialog {
  /**
   * hooks: current() -> the open conversation or null, labels() -> Markdown headings,
   * imported(ids) and deletedAll(counts) -> the page refreshes what it shows.
   */
  constructor(dialog, hooks) {
    this.dialog = dialog;
    this.hooks = hooks;
    this.enabled = false;
    const $ = (name) => dialog.querySelector(`#${name}`);
    this.status = $("data-status");
    this.confirmBox = $("delete-confirm");
    this.warning = $("delete-warning");
    this.deleteButton = $("delete-all");
    this.fileInput = $("import-file");
    this.oneButtons = [$("export-one-md"), $("export-one-json")];
    this.noneOpen = $("data-none-open");
    $("export-one-md").addEventListener("click", () => this._exportOneMarkdown());
    $("export-one-json").addEventListener("click", () => this._run(() => this._exportJson(this.hooks.current())));
    $("export-all-md").addEventListener("click", () => this._run(() => this._exportAllMarkdown()));
    $("export-all-json").addEventListener("click", () => this._run(() => this._exportJson(null)));
    this.fileInput.addEventListener("change", () => this._import());
    this.deleteButton.addEventListener("click", () => this._run(() => this._askDelete()));
    $("delete-all-cancel").addEventListener("click", () => this._closeConfirm());
    $("delete-all-confirm").addEventListener("click", () => this._run(() => this._deleteAll()));
    dialog.addEventListener("close", () => this._closeConfirm());
  }

  open() {
    const current = this.hooks.current();
    const hasMessages = Boolean(current?.messages?.length);
    for (const button of this.oneButtons) button.disabled = !hasMessages;
    this.noneOpen.hidden = hasMessages;
    this._setStatus("");
    this._closeConfirm();
    this.dialog.showModal();
  }

  async _run(action) {
    try {
      await action();
    } catch (error) {
      this._setStatus(error.code === "bad_file" ? error.message : describeError(error).text, true);
    }
  }

  _exportOneMarkdown() {
    const conversation = this.hooks.current();
    if (!conversation) return;
    const text = conversationMarkdown(conversation, this.hooks.labels());
    downloadText(exportFilename(conversation.title), text);
  }

  async _exportJson(conversation) {
    const document = await exportDocument(conversation?.id ?? null);
    const name = conversation ? exportFilename(conversation.title, "json") : `rill-conversations-${today()}.json`;
    downloadText(name, `${JSON.stringify(document, null, 2)}\n`, "application/json");
  }

  async _exportAllMarkdown() {
    const document = await exportDocument(null);
    downloadText(`rill-conversations-${today()}.md`, documentMarkdown(document, this.hooks.labels()));
  }

  async _import() {
    const file = this.fileInput.files?.[0];
    this.fileInput.value = ""; // the same file chosen again is a new import
    if (!file) return;
    await this._run(async () => {
      this._setStatus(t("data.importing"));
      const document = await readExportFile(file);
      const counts = await importDocument(document);
      this._setStatus(t("data.imported", counts));
      this.hooks.imported(document.conversations.map((conversation) => conversation?.id));
    });
  }

  /** Names what goes before anything is deleted: the owner and the counts, from the server. */
  async _askDelete() {
    const info = await historyInfo();
    const usage = info.usage ?? {};
    this.warning.textContent = t("data.deleteWarning", {
      owner: info.owner ?? "",
      conversations: usage.conversations ?? 0,
      messages: usage.messages ?? 0,
    });
    this.confirmBox.hidden = false;
    this.deleteButton.hidden = true;
    this.dialog.querySelector("#delete-all-cancel").focus();
  }

  _closeConfirm() {
    this.confirmBox.hidden = true;
    this.deleteButton.hidden = false;
  }

  async _deleteAll() {
    const counts = await deleteAllData();
    this._closeConfirm();
    this._setStatus(t("data.deleted", counts));
    this.hooks.deletedAll(counts);
  }

  _setStatus(text, error = false) {
    this.status.textContent = text;
    this.status.hidden = !text;
    this.status.classList.toggle("error", error);
  }
}
