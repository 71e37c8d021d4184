// DOM helpers. Everything the console shows goes through here: strings become text nodes (never HTML),
// so an object named `<img onerror=...>` is shown as those characters.

const SVG_NS = "http://www.w3.org/2000/svg";

function append(node, child) {
  if (child === null || child === undefined || child === false) return;
  if (Array.isArray(child)) { child.forEach((c) => append(node, c)); return; }
  node.append(child instanceof Node ? child : document.createTextNode(String(child)));
}

function setAttrs(node, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.setAttribute("class", Array.isArray(v) ? v.filter(Boolean).join(" ") : v);
    else if (k.startsWith("on") && typeof v === "function") node.addEventListener(k.slice(2), v);
    else if (k === "href") node.setAttribute("href", safeHref(v));
    else node.setAttribute(k, v === true ? "" : String(v));
  }
}

// Links the console builds are its own routes ("#/...") or same-origin API paths; nothing else.
function safeHref(v) {
  const s = String(v);
  return s.startsWith("#/") || s.startsWith("/") ? s : "#/";
}

// el("td", {class: "x"}, "text", child, [more]) -> an HTML element.
export function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  if (attrs && (typeof attrs !== "object" || attrs instanceof Node || Array.isArray(attrs))) {
    children.unshift(attrs);
  } else setAttrs(node, attrs);
  append(node, children);
  return node;
}

export function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  setAttrs(node, attrs);
  append(node, children);
  return node;
}

export function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
  return node;
}

export function replace(node, ...children) {
  clear(node);
  append(node, children);
  return node;
}

// Epoch seconds (or milliseconds) or an ISO string -> a local time with seconds.
export function toDate(t) {
  if (t === null || t === undefined || t === "") return null;
  if (typeof t === "number") return new Date(t > 1e12 ? t : t * 1000);
  const d = new Date(t);
  return Number.isNaN(d.getTime()) ? null : d;
}

export function fmtTime(t, withDate = false) {
  const d = toDate(t);
  if (!d) return "—";
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  const time = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  return withDate ? `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${time}` : time;
}

export function ago(t) {
  const d = toDate(t);
  if (!d) return "never";
  const s = Math.max(0, Math.round((Date.now() - d.getTime()) / 1000));
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
  return `${Math.floor(s / 86400)}d ago`;
}

export function num(n) {
  if (n === null || n === undefined) return "—";
  return Number(n).toLocaleString("en-US");
}

export function badge(text, cls) {
  return el("span", { class: ["badge", cls] }, text);
}

export function verdictBadge(v) {
  return badge(v || "?", `v-${String(v || "unknown").replace(/[^a-z-]/g, "")}`);
}

export function errorBox(err) {
  return el("div", { class: "error", role: "alert" }, err && err.message ? err.message : String(err));
}

export function labels(obj) {
  const ls = Object.entries(obj || {});
  if (!ls.length) return null;
  return el("span", { class: "labels" }, ls.map(([k, v]) => el("span", { class: "label" }, `${k}=${v}`)));
}

// "#/path?x=1" -> {path, params}
export function parseHash(hash) {
  const h = (hash || "").replace(/^#/, "");
  const [path, query] = h.split("?", 2);
  return { path: path || "/", params: new URLSearchParams(query || "") };
}

export function route(path, params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) if (v !== null && v !== undefined && v !== "") q.set(k, v);
  const s = q.toString();
  return `#${path}${s ? `?${s}` : ""}`;
}
