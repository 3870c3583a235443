// The server's conversation history API (GET /api/history and friends). Failures are
// ApiErrors, as for the rest of the API (api.js).

import { ApiError, request } from "./api.js";

const POST_ATTEMPTS = 3;
const POST_RETRY_DELAY_MS = 700;

const conversationUrl = (id) => `/api/conversations/${encodeURIComponent(id)}`;

/** {enabled, owner, usage, auto_titles}; a server from before history answers 404: disabled. */
export async function historyInfo() {
  try {
    return await request("GET", "/api/history");
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) return { enabled: false };
    throw error;
  }
}

/** Every summary, most recently updated first (the API pages by `before`). */
export async function listConversations() {
  const all = [];
  let before = null;
  for (;;) {
    const query = before === null ? "" : `&before=${before}`;
    const page = await request("GET", `/api/conversations?limit=200${query}`);
    all.push(...(page.conversations ?? []));
    if (page.next === null || page.next === undefined || !page.conversations?.length) return all;
    before = page.next;
  }
}

export function getConversation(id) {
  return request("GET", conversationUrl(id));
}

export function patchConversation(id, changes) {
  // keepalive: a rename just before a reload or a closed tab still reaches the server.
  return request("PATCH", conversationUrl(id), changes, { keepalive: true });
}

export async function deleteConversation(id) {
  try {
    await request("DELETE", conversationUrl(id));
  } catch (error) {
    // 204 has no JSON body: request() calls that a bad response, though it is the success.
    if (error.code === "bad_response" && error.status === 204) return;
    if (error.code === "conversation_not_found") return; // already gone: what was wanted
    throw error;
  }
}

/**
 * Adds a message and starts its answer. A POST lost in the network is sent again with
 * the same client_id: the server then returns what it started, and asks the model once.
 */
export async function postMessage(id, body) {
  for (let attempt = 1; ; attempt++) {
    try {
      return await request("POST", `${conversationUrl(id)}/messages`, body);
    } catch (error) {
      if (error.code !== "network" || attempt >= POST_ATTEMPTS) throw error;
      await new Promise((resolve) => setTimeout(resolve, POST_RETRY_DELAY_MS * attempt));
    }
  }
}

export function importDocument(document) {
  return request("POST", "/api/import", document);
}
