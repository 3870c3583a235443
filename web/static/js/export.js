// A conversation as a Markdown document, for the export button: the branch shown (the
// other versions of edited questions and regenerated answers are in the JSON export).

/** labels: the headings in the page's language, and error(error): what the page says about one. */
export function conversationMarkdown(conversation, labels) {
  const lines = [`# ${conversation.title || labels.untitled}`, ""];
  if (conversation.system?.trim()) lines.push(`> **${labels.system}:** ${conversation.system.trim()}`, "");
  for (const message of conversation.messages) {
    if (message.role === "user") {
      lines.push(`## ${labels.user}`, "", message.content, "");
    } else if (message.role === "assistant" && (message.content || message.error)) {
      const model = message.modelLabel || message.model;
      lines.push(`## ${labels.assistant}${model ? ` (${model})` : ""}`, "");
      if (message.content) lines.push(message.content, "");
      if (message.error) lines.push(`> ${labels.error(message.error)}`, "");
    }
  }
  return `${lines.join("\n").trimEnd()}\n`;
}

/** A file name from a title: keeps letters of any script, drops what file systems dislike. */
export function exportFilename(title, extension = "md") {
  const base = (title || "conversation").replace(/[\\/:*?"<>|\u0000-\u001f]+/g, " ").trim().slice(0, 80);
  return `${base || "conversation"}.${extension}`;
}
