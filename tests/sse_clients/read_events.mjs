// Reads one Rill event stream with npm's `eventsource` (a WHATWG EventSource for Node)
// until its terminal event, and prints what the client saw as JSON on stdout:
// every event (type, data, lastEventId), how often it connected, and the raw bytes.
// Usage: node read_events.mjs <url> [timeout-ms]
import { EventSource } from "eventsource";

const [url, timeoutMs = "20000"] = process.argv.slice(2);
const seen = { events: [], opens: 0, errors: 0, raw: "", requests: [] };

// Keeps a copy of the bytes the client parses, to show what it was given.
async function teeFetch(input, init) {
  seen.requests.push({ at: Date.now(), lastEventId: new Headers(init?.headers).get("Last-Event-ID") });
  const response = await fetch(input, init);
  if (!response.body) return response;
  const [mine, theirs] = response.body.tee();
  (async () => {
    const decoder = new TextDecoder();
    try {
      for await (const piece of mine) seen.raw += decoder.decode(piece, { stream: true });
    } catch {
      // the connection was cut: the client reconnects by itself
    }
  })();
  return new Response(theirs, { status: response.status, statusText: response.statusText, headers: response.headers });
}

const source = new EventSource(url, { fetch: teeFetch });
const finish = (code) => {
  source.close();
  process.stdout.write(JSON.stringify(seen));
  process.exit(code);
};
const timer = setTimeout(() => finish(2), Number(timeoutMs));
source.onopen = () => seen.opens++;
source.onerror = () => seen.errors++; // connection errors (a named `error` event goes to listeners)
const record = (event) => {
  seen.events.push({ type: event.type, data: event.data, lastEventId: event.lastEventId });
  if (event.type === "done" || event.type === "error") {
    clearTimeout(timer);
    source.close(); // as a page does: else the end of the body is an error and a reconnect
    setTimeout(() => finish(0), 50); // the raw copy catches up
  }
};
for (const type of ["message", "meta", "reasoning", "delta", "usage", "done"]) source.addEventListener(type, record);
// A named `error` event from the server arrives as a MessageEvent; a connection error as a plain Event.
source.addEventListener("error", (event) => {
  if (typeof event.data === "string") record(event);
});
