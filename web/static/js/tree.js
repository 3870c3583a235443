// Conversations stored on the server are trees: every message names its parent, and the
// conversation's `active` leaf picks the branch shown and sent. The page renders one
// branch as a list (conversation.messages) and keeps the others in conversation.branches.

/** Every message of the tree: the branch shown, then the others. */
export function allMessages(conversation) {
  return [...(conversation.messages ?? []), ...(conversation.branches ?? [])];
}

/** Messages by id. */
export function byId(messages) {
  return new Map(messages.map((message) => [message.id, message]));
}

/** The messages from the root down to leafId (empty if it is not in the tree). */
export function pathTo(messages, leafId) {
  const index = byId(messages);
  const path = [];
  const seen = new Set();
  for (let message = index.get(leafId); message && !seen.has(message.id); message = index.get(message.parent)) {
    seen.add(message.id); // a cycle (never expected from the server) ends the walk
    path.push(message);
  }
  return path.reverse();
}

/** The children of parentId (null: the roots), oldest first: the versions ‹ 1 / n › of a turn. */
export function childrenOf(messages, parentId) {
  return messages
    .filter((message) => (message.parent ?? null) === (parentId ?? null))
    .sort((a, b) => (a.created ?? 0) - (b.created ?? 0));
}

/** The leaf reached from messageId by always taking the newest child: what switching to it shows. */
export function newestLeaf(messages, messageId) {
  let leaf = messageId;
  const seen = new Set();
  for (;;) {
    seen.add(leaf);
    const children = childrenOf(messages, leaf);
    const next = children.at(-1);
    if (!next || seen.has(next.id)) return leaf;
    leaf = next.id;
  }
}

/**
 * Puts conversation's messages in place for leafId: the path to it in `messages`, the
 * rest in `branches`. The same message objects are kept (a streaming answer holds one).
 */
export function showBranch(conversation, leafId) {
  const all = allMessages(conversation);
  const path = pathTo(all, leafId);
  const shown = new Set(path.map((message) => message.id));
  conversation.active = path.at(-1)?.id ?? null;
  conversation.messages = path;
  conversation.branches = all.filter((message) => !shown.has(message.id));
}

/** The leaf a tree shows when it names none: the newest message that has no children. */
export function defaultLeaf(messages) {
  const parents = new Set(messages.map((message) => message.parent).filter(Boolean));
  const leaves = messages.filter((message) => !parents.has(message.id));
  leaves.sort((a, b) => (a.created ?? 0) - (b.created ?? 0));
  return leaves.at(-1)?.id ?? null;
}

/** Gives the shown list's messages the parent links their order implies (new ones have none yet). */
export function linkPath(conversation) {
  let parent = null;
  for (const message of conversation.messages) {
    message.parent = parent;
    parent = message.id;
  }
  conversation.active = parent;
}
