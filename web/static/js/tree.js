// A conversation's messages as a tree: every message names its parent (null: a first
// question), and the conversation's `active` is the leaf of the branch shown and sent.
// Pure functions over the message list, so the browser test can check them directly.
//
// Messages saved by pages from before branches have no `parent` at all: each of those
// follows the one before it in the list, so an old conversation reads as one branch.

/** The tree of messages: by id, and each parent's children oldest first. */
export function buildTree(messages = []) {
  const byId = new Map();
  const parents = new Map(); // id -> parent id (null: root)
  const children = new Map(); // parent id (null: root) -> [message], oldest first
  const order = new Map(); // id -> position in the list, to order equal timestamps
  let previous = null;
  for (const [position, message] of messages.entries()) {
    if (!message || typeof message.id !== "string" || byId.has(message.id)) continue;
    byId.set(message.id, message);
    order.set(message.id, position);
    const parent = message.parent === undefined ? previous : (message.parent ?? null);
    parents.set(message.id, parent);
    previous = message.id;
  }
  for (const [id, message] of byId) {
    let parent = parents.get(id);
    if (parent !== null && !byId.has(parent)) parent = null; // a lost parent: show it as a root
    parents.set(id, parent);
    if (!children.has(parent)) children.set(parent, []);
    children.get(parent).push(message);
  }
  const age = (message) => [message.created ?? 0, order.get(message.id)];
  for (const list of children.values()) {
    list.sort((a, b) => {
      const [ca, oa] = age(a);
      const [cb, ob] = age(b);
      return ca - cb || oa - ob;
    });
  }
  return { byId, parents, children, order };
}

/** The children of message id (null: the first questions), oldest first. */
export function childrenOf(tree, id) {
  return tree.children.get(id ?? null) ?? [];
}

/** The message and its alternatives: the children of its parent, oldest first. */
export function siblingsOf(tree, id) {
  if (!tree.byId.has(id)) return [];
  return childrenOf(tree, tree.parents.get(id));
}

/** The messages from the root down to id (empty if id is unknown). Cycles end the walk. */
export function pathTo(tree, id) {
  const path = [];
  const seen = new Set();
  for (let at = id; at !== null && tree.byId.has(at) && !seen.has(at); at = tree.parents.get(at)) {
    seen.add(at);
    path.push(tree.byId.get(at));
  }
  return path.reverse();
}

/**
 * The newest leaf at or below id (null: anywhere): the last message of the most recent
 * branch through it. Newest by creation time, then by position in the list.
 */
export function newestLeaf(tree, id) {
  let best = null;
  const stack = id === null || id === undefined ? [...childrenOf(tree, null)] : [tree.byId.get(id)].filter(Boolean);
  const seen = new Set();
  while (stack.length) {
    const message = stack.pop();
    if (seen.has(message.id)) continue;
    seen.add(message.id);
    const below = childrenOf(tree, message.id);
    if (below.length) stack.push(...below);
    else if (!best || newer(tree, message, best)) best = message;
  }
  return best;
}

function newer(tree, a, b) {
  const ca = a.created ?? 0;
  const cb = b.created ?? 0;
  return ca !== cb ? ca > cb : tree.order.get(a.id) > tree.order.get(b.id);
}

/**
 * The branch a conversation shows: root to its `active` leaf. An active message that is
 * not a leaf (or unknown, or not set) continues down to the newest leaf under it.
 */
export function activePath(conversation, tree = buildTree(conversation?.messages ?? [])) {
  const active = conversation?.active;
  const start = active && tree.byId.has(active) ? active : null;
  const leaf = newestLeaf(tree, start);
  return leaf ? pathTo(tree, leaf.id) : [];
}

/**
 * Where `‹ 2 / 3 ›` switching leads: the leaf to make active when the reader moves from
 * message id to its sibling `step` places away (-1: previous, +1: next). Null at an end.
 */
export function switchTarget(tree, id, step) {
  const siblings = siblingsOf(tree, id);
  const index = siblings.findIndex((message) => message.id === id);
  const next = siblings[index + step];
  return next ? newestLeaf(tree, next.id) : null;
}

/** "2 / 3" as numbers: the message's place among its siblings (1-based) and their count. */
export function branchPosition(tree, id) {
  const siblings = siblingsOf(tree, id);
  return { index: siblings.findIndex((message) => message.id === id) + 1, count: siblings.length };
}
