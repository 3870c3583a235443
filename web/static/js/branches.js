// `‹ 2 / 3 ›`: where a message stands among its versions (edited questions, regenerated
// answers: the children of the same parent), and which version a step leads to. The tree
// itself is tree.js's; the page shows one branch as conversation.messages and keeps the
// others in conversation.branches.

import { allMessages, childrenOf, defaultLeaf, newestLeaf, pathTo } from "./tree.js";

/** The versions of message, itself included, oldest first; [] for a message without a parent link. */
export function versionsOf(conversation, message) {
  if (!conversation || message?.parent === undefined) return []; // a browser-only conversation: no tree
  return childrenOf(allMessages(conversation), message.parent ?? null);
}

/** {index (1-based), count} of message among its versions; count 0 or 1: nothing to switch. */
export function branchPosition(conversation, message) {
  const versions = versionsOf(conversation, message);
  return { index: versions.indexOf(message) + 1, count: versions.length };
}

/** The version `step` places away from message (-1: previous, +1: next), or null at an end. */
export function versionAt(conversation, message, step) {
  const versions = versionsOf(conversation, message);
  const index = versions.indexOf(message);
  return index < 0 ? null : (versions[index + step] ?? null);
}

/**
 * The branch a stored conversation (all of its messages, as the server and the export
 * send it) shows: root to its active leaf, or to the newest leaf when none is named.
 */
export function shownPath(conversation) {
  const messages = conversation?.messages ?? [];
  const start = conversation?.active ?? defaultLeaf(messages);
  return start ? pathTo(messages, newestLeaf(messages, start)) : [];
}
