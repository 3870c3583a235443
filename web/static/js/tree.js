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

/**
 * The newest leaf at or below messageId: the end of the branch through it that was
 * written last (by creation time, then list order), so switching to a version shows
 * where the conversation went on from it most recently. messageId itself if it has no
 * children (or is unknown).
 */
export function newestLeaf(messages, messageId) {
  const children = new Map();
  for (const message of messages) {
    const parent = message.parent ?? null;
    if (!children.has(parent)) children.set(parent, []);
    children.get(parent).push(message);
  }
  const position = new Map(messages.map((message, index) => [message.id, index]));
  const newer = (a, b) => (a.created ?? 0) - (b.created ?? 0) || position.get(a.id) - position.get(b.id);
  let best = null;
  const seen = new Set([messageId]); // a cycle (never expected from the server) is walked once
  const stack = [...(children.get(messageId) ?? [])];
  while (stack.length) {
    const message = stack.pop();
    if (seen.has(message.id)) continue;
    seen.add(message.id);
    const below = children.get(message.id) ?? [];
    if (below.length) stack.push(...below);
    else if (!best || newer(message, best) > 0) best = message;
  }
  return best?.id ?? messageId;
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
