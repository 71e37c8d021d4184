// The dependency map: who talked to whom over a window, allowed and denied edges (GET /v1/flows/graph),
// drawn as SVG with a circular layout (small graphs; no layout library needed).

import { ApiError, get } from "../api.js";
import { el, errorBox, num, replace, route, svg } from "../dom.js";
import { flowOf, recordsOf } from "./flowrec.js";
import { poll } from "./live.js";

const WINDOWS = ["5m", "15m", "1h", "6h", "24h"];
const DENY = ["denied", "rejected", "would-deny"];

function endOf(e, ...keys) {
  for (const k of keys) if (e[k] !== undefined && e[k] !== null) return typeof e[k] === "object" ? e[k].id ?? e[k].name : e[k];
  return undefined;
}

// Any of the shapes a graph answer may take -> {nodes: Map(id -> {id, label, external}), edges: [...]}.
export function normalize(g) {
  const nodes = new Map();
  for (const n of g.nodes || []) {
    const id = typeof n === "string" ? n : n.id ?? n.name;
    nodes.set(id, { id, label: (typeof n === "object" && (n.label ?? n.name)) || id, external: !!(n.external || n.kind === "address" || n.kind === "external") });
  }
  const edges = [];
  for (const e of g.edges || []) {
    const src = endOf(e, "src", "source", "from");
    const dst = endOf(e, "dst", "target", "to", "destination");
    if (src === undefined || dst === undefined) continue;
    const v = e.verdicts || {};
    let allowed = e.allowed ?? v.allowed ?? 0;
    let denied = e.denied ?? DENY.reduce((sum, k) => sum + (v[k] || 0), 0);
    if (typeof allowed === "boolean") allowed = allowed ? e.count ?? 1 : 0;
    if (typeof denied === "boolean") denied = denied ? e.count ?? 1 : 0;
    if (!allowed && !denied && e.verdict) {
      if (e.verdict === "allowed") allowed = e.count ?? 1; else denied = e.count ?? 1;
    }
    for (const id of [src, dst]) if (!nodes.has(id)) nodes.set(id, { id, label: id, external: /^[0-9a-f.:]+$/i.test(id) });
    edges.push({ src, dst, allowed: Number(allowed) || 0, denied: Number(denied) || 0, services: e.services || e.ports || null });
  }
  return { nodes, edges };
}

// Without a graph route: the same picture from the flow records of the window.
function fromFlows(items) {
  const owner = new Map(); // address -> workload, learnt from each record's local side
  const flows = items.map(flowOf);
  for (const f of flows) if (f.workload) owner.set(f.hop === "egress" ? f.src : f.dst, f.workload);
  const edges = new Map();
  for (const f of flows) {
    const src = owner.get(f.src) || f.srcWorkload || f.src;
    const dst = owner.get(f.dst) || f.dstWorkload || f.dst;
    const k = `${src}\u0000${dst}`;
    const e = edges.get(k) || { src, dst, allowed: 0, denied: 0 };
    if (f.verdict === "allowed") e.allowed += f.count; else e.denied += f.count;
    edges.set(k, e);
  }
  return normalize({ edges: [...edges.values()] });
}

async function load(ctx, since, by) {
  try {
    return { graph: normalize(await get("/v1/flows/graph", { window: since, by }, { signal: ctx.signal })), source: "graph" };
  } catch (err) {
    if (!(err instanceof ApiError) || err.status !== 404) throw err;
  }
  const page = await get("/v1/flows", { since, limit: 5000 }, { signal: ctx.signal });
  return { graph: fromFlows(recordsOf(page)), source: "flows" };
}

function labelOf(graph, id) {
  const n = graph.nodes.get(id);
  return n ? n.label : id;
}

function draw({ nodes, edges }) {
  const list = [...nodes.values()].sort((a, b) => Number(a.external) - Number(b.external) || String(a.label).localeCompare(String(b.label)));
  const n = list.length;
  const W = 960;
  const H = Math.max(440, Math.min(760, 200 + n * 30));
  const cx = W / 2;
  const cy = H / 2;
  // an ellipse: labels sit outside it, left and right, where the page is wide
  const rx = W / 2 - 190;
  const ry = H / 2 - 45;
  const pos = new Map();
  list.forEach((node, i) => {
    const a = -Math.PI / 2 + (2 * Math.PI * i) / Math.max(n, 1);
    pos.set(node.id, { x: cx + rx * Math.cos(a), y: cy + ry * Math.sin(a), a });
  });
  const max = Math.max(1, ...edges.map((e) => e.allowed + e.denied));
  const width = (c) => 1.2 + 4 * Math.log1p(c) / Math.log1p(max);
  const defs = svg("defs", {}, ["allowed", "denied", "mixed"].map((k) => svg("marker", {
    id: `arrow-${k}`, viewBox: "0 0 10 10", refX: "10", refY: "5", markerWidth: "9", markerHeight: "9",
    markerUnits: "userSpaceOnUse", orient: "auto-start-reverse",
  }, svg("path", { d: "M0,0 L10,5 L0,10 z", class: k }))));
  const paths = edges.map((e) => {
    const a = pos.get(e.src);
    const b = pos.get(e.dst);
    const kind = e.allowed && e.denied ? "mixed" : e.denied ? "denied" : "allowed";
    const title = `${labelOf({ nodes }, e.src)} → ${labelOf({ nodes }, e.dst)}: ${num(e.allowed)} allowed, ${num(e.denied)} denied`;
    if (e.src === e.dst) {
      // a small loop on the inner side of the node (its label is on the outer side)
      const r = 11;
      const lx = a.x - Math.cos(a.a) * (8 + r);
      const ly = a.y - Math.sin(a.a) * (8 + r);
      const d = `M${(lx - r).toFixed(1)},${ly.toFixed(1)} a${r},${r} 0 1,0 ${2 * r},0 a${r},${r} 0 1,0 ${-2 * r},0`;
      return svg("path", { d, class: ["edge", kind], "stroke-width": width(e.allowed + e.denied), "data-src": e.src, "data-dst": e.dst }, svg("title", {}, title));
    }
    // bend each edge to its right so a -> b and b -> a stay apart; stop short of the node's circle
    const dx = b.x - a.x;
    const dy = b.y - a.y;
    const len = Math.hypot(dx, dy) || 1;
    const ux = dx / len;
    const uy = dy / len;
    const sx = a.x + ux * 9;
    const sy = a.y + uy * 9;
    const ex = b.x - ux * 11;
    const ey = b.y - uy * 11;
    const mx = (sx + ex) / 2 - uy * len * 0.12;
    const my = (sy + ey) / 2 + ux * len * 0.12;
    return svg("path", {
      d: `M${sx.toFixed(1)},${sy.toFixed(1)} Q${mx.toFixed(1)},${my.toFixed(1)} ${ex.toFixed(1)},${ey.toFixed(1)}`,
      class: ["edge", kind], "stroke-width": width(e.allowed + e.denied).toFixed(2),
      "marker-end": `url(#arrow-${kind})`, "data-src": e.src, "data-dst": e.dst,
    }, svg("title", {}, title));
  });
  const circles = list.map((node) => {
    const p = pos.get(node.id);
    const right = Math.cos(p.a) >= -0.01;
    const lx = p.x + Math.cos(p.a) * 14;
    const ly = p.y + Math.sin(p.a) * 14 + 4;
    return svg("g", { class: ["node", node.external ? "ext" : null], "data-node": node.id },
      svg("circle", { cx: p.x.toFixed(1), cy: p.y.toFixed(1), r: "8" }),
      svg("text", { x: lx.toFixed(1), y: ly.toFixed(1), "text-anchor": right ? "start" : "end" }, node.label),
      svg("title", {}, node.id));
  });
  return svg("svg", { class: "map", id: "map", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "dependency map" },
    defs, svg("g", {}, paths), svg("g", {}, circles));
}

// Only the allowed (or denied) part of each edge, and the nodes those edges touch.
function keep(graph, show) {
  if (show === "all") return graph;
  const edges = graph.edges
    .map((e) => ({ ...e, allowed: show === "allowed" ? e.allowed : 0, denied: show === "denied" ? e.denied : 0 }))
    .filter((e) => e.allowed + e.denied > 0);
  const used = new Set(edges.flatMap((e) => [e.src, e.dst]));
  return { nodes: new Map([...graph.nodes].filter(([id]) => used.has(id))), edges };
}

export function mount(root, ctx) {
  const since = WINDOWS.includes(ctx.params.get("since")) ? ctx.params.get("since") : "15m";
  const by = ctx.params.get("by") === "group" ? "group" : "workload";
  const show = ["allowed", "denied"].includes(ctx.params.get("show")) ? ctx.params.get("show") : "all";
  const controls = el("form", { class: "filters" },
    el("label", "window", el("select", { name: "since", "data-control": "view" }, WINDOWS.map((w) => el("option", { value: w, selected: w === since }, `last ${w}`)))),
    el("label", "nodes", el("select", { name: "by", "data-control": "view" }, ["workload", "group"].map((w) => el("option", { value: w, selected: w === by }, w)))),
    el("label", "edges", el("select", { name: "show", "data-control": "view" }, ["all", "allowed", "denied"].map((w) => el("option", { value: w, selected: w === show }, w)))));
  controls.addEventListener("change", () => { location.hash = route("/map", Object.fromEntries(new FormData(controls).entries())); });
  controls.addEventListener("submit", (ev) => ev.preventDefault());
  const body = el("div");
  replace(root,
    el("h1", "Dependency map", el("span", { class: "muted small" }, "who talked to whom; an edge per direction")),
    controls, body);
  poll(ctx, body, 5000, () => load(ctx, since, by), ({ graph: all, source }) => {
    const graph = keep(all, show);
    if (!graph.nodes.size) return el("p", { class: "muted", id: "map-empty" }, `No flows in the last ${since}.`);
    const table = el("table", { class: "small", id: "edges" },
      el("thead", el("tr", el("th", "from"), el("th", "to"), el("th", { class: "right" }, "allowed"), el("th", { class: "right" }, "denied"))),
      el("tbody", graph.edges.slice().sort((a, b) => b.allowed + b.denied - a.allowed - a.denied).map((e) =>
        el("tr", el("td", labelOf(graph, e.src)), el("td", labelOf(graph, e.dst)), el("td", { class: "right" }, num(e.allowed)), el("td", { class: "right" }, num(e.denied))))));
    return [
      el("div", { class: "map-wrap" }, draw(graph),
        el("div", { class: "legend" },
          el("span", el("span", { class: "sw allowed" }), "allowed"),
          el("span", el("span", { class: "sw denied" }), "denied"),
          el("span", el("span", { class: "sw mixed" }), "both"),
          el("span", `${graph.nodes.size} nodes, ${graph.edges.length} edges${source === "flows" ? " (from the flow records)" : ""}`))),
      el("h2", "Edges"), table,
    ];
  });
  return null;
}
