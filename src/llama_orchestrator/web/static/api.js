// The daemon's HTTP API from the page: the key as a bearer (never in a URL), JSON bodies for every POST (the
// daemon's browser rules refuse form and text/plain requests), and server-sent events read with fetch, because an
// EventSource cannot send an Authorization header.

const KEY_ITEM = "llama-orch-key";
const ROUTER_KEY_ITEM = "llama-orch-router-key";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export class Api {
  constructor() {
    this.key = sessionStorage.getItem(KEY_ITEM) || "";
    this.routerKey = sessionStorage.getItem(ROUTER_KEY_ITEM) || "";
  }

  setKey(key) {
    this.key = key;
    if (key) sessionStorage.setItem(KEY_ITEM, key);
    else sessionStorage.removeItem(KEY_ITEM);
  }

  setRouterKey(key) {
    this.routerKey = key;
    if (key) sessionStorage.setItem(ROUTER_KEY_ITEM, key);
    else sessionStorage.removeItem(ROUTER_KEY_ITEM);
  }

  headers(router, json) {
    const headers = {};
    const key = router ? this.routerKey || this.key : this.key;
    if (key) headers["Authorization"] = `Bearer ${key}`;
    if (json) headers["Content-Type"] = "application/json";
    return headers;
  }

  async fetch(method, path, { body, router = false, signal, accept } = {}) {
    const post = method !== "GET";
    const headers = this.headers(router, post);
    if (accept) headers["Accept"] = accept;
    const response = await fetch(path, {
      method,
      headers,
      body: post ? JSON.stringify(body ?? {}) : undefined,
      signal,
      cache: "no-store",
      credentials: "omit",
    });
    if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
    return response;
  }

  async json(method, path, options) {
    return (await this.fetch(method, path, options)).json();
  }

  // Server-sent events: yields {event, data} until the stream ends or `signal` aborts.
  async *events(method, path, options = {}) {
    const response = await this.fetch(method, path, { ...options, accept: "text/event-stream" });
    yield* parseEvents(response.body);
  }
}

// The text of a byte stream cut at each `separator` (a RegExp without the g flag); with `keepRest`, what follows
// the last separator is yielded too when the stream ends.
async function* pieces(stream, separator, keepRest) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    while (true) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let match;
      while ((match = separator.exec(buffer)) !== null) {
        yield buffer.slice(0, match.index);
        buffer = buffer.slice(match.index + match[0].length);
      }
    }
    if (keepRest && buffer) yield buffer;
  } finally {
    reader.releaseLock();
  }
}

// Newline-delimited JSON (a model pull's progress): yields one object a line.
export async function* parseLines(stream) {
  for await (const piece of pieces(stream, /\n/, true)) {
    const line = piece.trim();
    if (line) yield JSON.parse(line);
  }
}

async function errorMessage(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    return body?.error?.message || body?.detail || text;
  } catch {
    return text || response.statusText;
  }
}

export async function* parseEvents(stream) {
  for await (const block of pieces(stream, /\r?\n\r?\n/, false)) {
    const event = parseBlock(block);
    if (event) yield event;
  }
}

function parseBlock(block) {
  let event = "message";
  const data = [];
  for (const line of block.split(/\r?\n/)) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  return data.length ? { event, data: data.join("\n") } : null;
}
