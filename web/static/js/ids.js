// Random ids. crypto.randomUUID only exists in secure contexts (https or localhost), and a
// self-hosted server may be reached over plain http, so v4 UUIDs are built by hand there.

export function uuid4() {
  if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  bytes[6] = (bytes[6] & 0x0f) | 0x40;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  const hex = Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/** A short id for local objects (conversations, messages). */
export function newId() {
  return uuid4().replaceAll("-", "").slice(0, 16);
}
