// The one-time move of a browser's conversations to the server: the localStorage
// conversations (linear message lists) become an export document whose messages form
// parent chains, with their ids kept, so uploading it twice changes nothing.

const ID = /^[A-Za-z0-9_-]{1,64}$/;
const ENDED = new Set(["done", "stopped", "length", "filtered", "error", "abandoned", "interrupted"]);

/** The export document for conversations (as the localStorage Store keeps them). */
export function exportDocument(conversations) {
  return {
    format: "rill.conversations",
    version: 1,
    exported: Date.now(),
    conversations: conversations.filter((c) => c && ID.test(c.id) && Array.isArray(c.messages)).map(convert),
  };
}

function convert(conversation) {
  const created = finite(conversation.created) ?? Date.now();
  const updated = Math.max(finite(conversation.updated) ?? created, created);
  const messages = [];
  const seen = new Set();
  let parent = null;
  for (const [index, message] of conversation.messages.entries()) {
    if (!message || !ID.test(message.id ?? "") || seen.has(message.id)) continue;
    if (message.role !== "user" && message.role !== "assistant") continue;
    seen.add(message.id);
    // Older pages kept no time per message: their order gives one, inside the conversation's span.
    const at = Math.min(created + index, updated);
    messages.push({
      id: message.id,
      parent,
      role: message.role,
      content: String(message.content ?? ""),
      reasoning: String(message.reasoning ?? ""),
      status: message.role === "user" ? "done" : statusOf(message),
      model: typeof message.model === "string" ? message.model : null,
      finish_reason: null,
      error: errorOf(message.error),
      usage: message.usage && typeof message.usage === "object" ? message.usage : null,
      generation: null,
      last_event_id: 0,
      created: at,
      updated: at,
    });
    parent = message.id;
  }
  return {
    id: conversation.id,
    title: conversation.titled ? String(conversation.title ?? "") : "",
    title_source: conversation.titled ? "user" : null,
    system: String(conversation.system ?? ""),
    model: typeof conversation.model === "string" && conversation.model ? conversation.model : null,
    active: parent,
    created,
    updated,
    messages,
  };
}

/** An answer still streaming when it was uploaded lives on nowhere else: interrupted, text kept. */
function statusOf(message) {
  if (ENDED.has(message.status)) return message.status;
  return "interrupted";
}

function errorOf(error) {
  if (!error || typeof error !== "object") return null;
  return { code: String(error.code ?? "error"), message: String(error.message ?? ""), retryable: Boolean(error.retryable) };
}

function finite(value) {
  return Number.isFinite(value) ? value : null;
}
