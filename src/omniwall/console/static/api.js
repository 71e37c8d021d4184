// The API client: bearer token from sessionStorage, JSON calls, and SSE read through fetch() streaming
// (EventSource cannot send an Authorization header, and a token in the URL would land in logs).

const KEY = "omniwall.token";

export const token = {
  get: () => sessionStorage.getItem(KEY),
  set: (t) => sessionStorage.setItem(KEY, t),
  clear: () => sessionStorage.removeItem(KEY),
};

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

export function url(path, params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) {
    if (v === null || v === undefined || v === "") continue;
    q.set(k, String(v));
  }
  const s = q.toString();
  return s ? `${path}?${s}` : path;
}

function headers(extra) {
  const h = { Accept: "application/json", ...(extra || {}) };
  const t = token.get();
  if (t) h.Authorization = `Bearer ${t}`;
  return h;
}

async function errorOf(resp) {
  let body = null;
  let message = `HTTP ${resp.status}`;
  try {
    body = await resp.json();
    const m = body && (body.message || body.detail || body.error);
    if (m) message = `${message}: ${typeof m === "string" ? m : JSON.stringify(m)}`;
  } catch (_) { /* not JSON */ }
  return new ApiError(resp.status, message, body);
}

// GET only: the console is a view and never changes anything.
export async function get(path, params, { signal } = {}) {
  const resp = await fetch(url(path, params), { headers: headers(), signal, cache: "no-store" });
  if (!resp.ok) throw await errorOf(resp);
  return resp.json();
}

// Every page of a paginated list (`items` + `continue`), up to `max` items.
export async function getAll(path, params, { signal, max = 5000 } = {}) {
  const items = [];
  let cont = null;
  do {
    const page = await get(path, { ...params, continue: cont }, { signal });
    items.push(...(page.items || []));
    cont = page.continue;
  } while (cont && items.length < max);
  return items;
}

// One SSE response, message by message: onMessage({event, data, id}); resolves when the server ends it.
async function readSse(resp, onMessage) {
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value.replace(/\r\n?/g, "\n");
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, i);
      buf = buf.slice(i + 2);
      let event = "message";
      let id = null;
      const data = [];
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue; // comment: heartbeat
        const c = line.indexOf(":");
        const field = c < 0 ? line : line.slice(0, c);
        const val = c < 0 ? "" : line.slice(c + 1).replace(/^ /, "");
        if (field === "event") event = val;
        else if (field === "data") data.push(val);
        else if (field === "id") id = val;
      }
      if (!data.length) continue;
      let parsed = data.join("\n");
      try { parsed = JSON.parse(parsed); } catch (_) { /* plain text */ }
      onMessage({ event, data: parsed, id });
    }
  }
}

// Follow an SSE route until `signal` aborts, reconnecting after a pause; onState("live" | "connecting" |
// Error) reports the connection. A 4xx other than 429 is final (the route or the permission is missing).
export async function follow(path, params, onMessage, { signal, onState } = {}) {
  const state = onState || (() => {});
  let delay = 1000;
  while (!signal || !signal.aborted) {
    try {
      state("connecting");
      const resp = await fetch(url(path, params), {
        headers: headers({ Accept: "text/event-stream" }), signal, cache: "no-store",
      });
      if (!resp.ok) {
        const err = await errorOf(resp);
        if (resp.status >= 400 && resp.status < 500 && resp.status !== 429) { state(err); return err; }
        throw err;
      }
      state("live");
      delay = 1000;
      await readSse(resp, onMessage);
    } catch (err) {
      if (signal && signal.aborted) return null;
      state(err instanceof Error ? err : new Error(String(err)));
    }
    await new Promise((r) => setTimeout(r, delay));
    delay = Math.min(delay * 2, 10000);
  }
  return null;
}
