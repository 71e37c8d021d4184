// Live flows: the newest records first, filtered (the filters are the API's), with pause. Each row names
// its verdict and the rule that decided it, and links to the hop-by-hop explanation.

import { ApiError, follow, get } from "../api.js";
import { el, errorBox, fmtTime, num, replace, route, verdictBadge } from "../dom.js";
import { explainHref, flowOf, portText, recordsOf, ruleCell } from "./flowrec.js";

const MAX_ROWS = 500;
const MAX_BUFFER = 5000;
// filter name -> [label, placeholder]
const FILTERS = {
  verdict: ["verdict", null],
  tenant: ["tenant", "acme"],
  workload: ["workload", "tenant/name"],
  policy: ["policy", "tenant/name"],
  rule: ["rule", "name or id"],
  host: ["host", "h1"],
  proto: ["protocol", "tcp"],
  port: ["port", "443"],
  since: ["since", "5m"],
};
const VERDICTS = ["", "allowed", "denied", "rejected", "would-deny"];

export function mount(root, ctx) {
  const tenantScoped = ctx.principal.role.startsWith("tenant-");
  const filters = {};
  for (const k of Object.keys(FILTERS)) if (ctx.params.get(k)) filters[k] = ctx.params.get(k);

  const rows = new Map(); // key -> {f, tr}
  const tbody = el("tbody", { id: "flow-rows" });
  const dot = el("span", { class: "dot" });
  const state = el("span", { id: "flow-state" }, "connecting");
  const shown = el("span", { id: "flow-count" }, "0 flows");
  const lost = el("span", { id: "flow-lost" });
  // Several managers: a store whose rows are missing (its manager down) is said, never silent.
  const partial = el("span", { id: "flow-partial", class: "bad" });
  const errors = el("div");
  let paused = false;
  const buffer = [];
  const pauseBtn = el("button", { id: "pause", type: "button", "data-control": "view" }, "Pause");
  const pending = el("span", { id: "flow-pending", class: "muted" });

  function add(rec, fresh) {
    const f = flowOf(rec);
    const old = rows.get(f.key);
    const tr = el("tr", { class: fresh ? "new" : null, "data-verdict": f.verdict || "" },
      el("td", { class: "nowrap mono" }, fmtTime(f.end)),
      tenantScoped ? null : el("td", { class: "nowrap" }, f.host || "—"),
      el("td", f.hop || "—"),
      el("td", f.workload || el("span", { class: "muted small" }, "another tenant's")),
      el("td", endpoint(f.srcWorkload, f.src, f.sport), el("span", { class: "muted" }, " → "), endpoint(f.dstWorkload, f.dst, 0)),
      el("td", { class: "mono svc" }, portText(f)),
      el("td", verdictBadge(f.verdict)),
      el("td", ruleCell(f)),
      // a connection's completion record carries count 0 (its start was counted already)
      el("td", { class: "right" }, f.count === 0 && f.final ? el("span", { class: "muted small" }, "ended") : num(f.count)),
      el("td", { class: "right" }, num(f.packets)),
      el("td", el("a", { href: explainHref(f), class: "explain" }, "explain")));
    if (old) old.tr.replaceWith(tr);
    else tbody.prepend(tr);
    rows.set(f.key, { f, tr });
    while (rows.size > MAX_ROWS) {
      const [k, v] = rows.entries().next().value;
      v.tr.remove();
      rows.delete(k);
    }
  }

  function showCount() {
    shown.textContent = `${num(rows.size)} flows shown`;
    pending.textContent = paused ? `${num(buffer.length)} new while paused` : "";
  }

  function receive(records) {
    for (const r of records) {
      if (paused) {
        buffer.push(r);
        if (buffer.length > MAX_BUFFER) buffer.shift();
      } else add(r, true);
    }
    showCount();
  }

  pauseBtn.addEventListener("click", () => {
    paused = !paused;
    pauseBtn.textContent = paused ? "Resume" : "Pause";
    dot.className = `dot ${paused ? "paused" : "live"}`;
    if (!paused) {
      const batch = buffer.splice(0);
      for (const r of batch) add(r, true);
    }
    showCount();
  });

  const form = el("form", { class: "filters", id: "flow-filters" });
  for (const [k, [label, ph]] of Object.entries(FILTERS)) {
    if (k === "tenant" && tenantScoped) continue;
    if (k === "host" && tenantScoped) continue;
    const input = k === "verdict"
      ? el("select", { name: k, "data-control": "view" },
        VERDICTS.map((v) => el("option", { value: v, selected: (filters[k] || "") === v }, v || "any")))
      : el("input", { name: k, value: filters[k] || "", placeholder: ph, "data-control": "view" });
    form.append(el("label", label, input));
  }
  form.append(el("button", { type: "submit", class: "primary", "data-control": "view" }, "Filter"),
    el("button", { type: "button", "data-control": "view", onclick: () => { location.hash = "#/flows"; } }, "Clear"));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const p = {};
    for (const [k, v] of new FormData(form).entries()) if (String(v).trim()) p[k] = String(v).trim();
    location.hash = route("/flows", p);
  });

  const head = el("tr",
    el("th", "time"), tenantScoped ? null : el("th", "host"), el("th", "hop"), el("th", "workload"),
    el("th", "source → destination"), el("th", "service"), el("th", "verdict"),
    el("th", "deciding rule"), el("th", { class: "right" }, "count"), el("th", { class: "right" }, "packets"),
    el("th", "why"));
  replace(root,
    el("h1", "Flows", el("span", { class: "muted small" }, "every verdict at every hop, with the rule that decided it")),
    form,
    el("div", { class: "status-line" }, el("span", dot, state), shown, pending, lost, partial, pauseBtn),
    errors,
    el("div", { class: "scroll" }, el("table", { id: "flows" }, el("thead", head), tbody)));

  const query = { ...filters };
  get("/v1/flows", { ...query, limit: 200 }, { signal: ctx.signal })
    .then((page) => {
      partial.textContent = partialWords(page);
      const items = recordsOf(page).map((r) => [flowOf(r), r]);
      items.sort((a, b) => Number(new Date(a[0].end)) - Number(new Date(b[0].end)) || (a[0].end > b[0].end ? 1 : -1));
      for (const [, r] of items) add(r, false);
      showCount();
    })
    .catch((err) => {
      if (ctx.signal.aborted) return;
      replace(errors, errorBox(err instanceof ApiError && err.status === 404
        ? "This manager has no flow API (GET /v1/flows answered 404)." : err));
    });

  // The list above is the history; the stream only what arrives from now on (no `since` catch-up).
  const live = { ...query };
  delete live.since;
  follow("/v1/flows/watch", live, (msg) => {
    if (msg.event === "stats") { lost.textContent = lostWords(msg.data); return; }
    if (msg.event === "peers") { partial.textContent = partialWords(msg.data); return; }
    receive(recordsOf(msg.data));
  }, {
    signal: ctx.signal,
    onState(s) {
      if (s === "live") { state.textContent = paused ? "paused" : "live"; dot.className = `dot ${paused ? "paused" : "live"}`; }
      else if (s === "connecting") { state.textContent = "connecting"; dot.className = "dot"; }
      else { state.textContent = `stream down: ${s.message}`; dot.className = "dot down"; }
    },
  });

  // Records lost on the way (kernel queue, agent buffer, manager): never silent.
  ctx.every(5000, async () => {
    try {
      const stats = await get("/v1/flows/stats", {}, { signal: ctx.signal });
      lost.textContent = lostWords(stats);
    } catch (_) { lost.textContent = ""; }
  });
  return null;
}

// "partial: ..." when an answer lacks some manager's flow store (GET /v1/flows, the watch's `peers` event).
function partialWords(answer) {
  if (!answer || !answer.partial) return "";
  const errs = answer.errors || [];
  const who = errs.map((e) => e.manager || e.url || e.store).filter(Boolean).join(", ");
  return `partial: ${errs.length} manager store(s) not in view${who ? ` (${who})` : ""}`;
}

// A workload's name when the reader may know it, its address always.
function endpoint(workload, addr, port) {
  const where = el("span", { class: "mono small" }, `${addr}${port ? `:${port}` : ""}`);
  return workload ? el("span", el("span", workload), " ", el("span", { class: "muted" }, "(", where, ")")) : where;
}

// Losses by place: the manager's (`dropped`), the agents' (per host `agentDropped`), live readers'.
function lostWords(stats) {
  if (!stats) return "";
  const places = {};
  const addAll = (d, prefix) => {
    if (typeof d === "number") places[prefix] = (places[prefix] || 0) + d;
    else if (d && typeof d === "object") for (const [k, v] of Object.entries(d)) addAll(v, prefix ? `${prefix} ${k}` : k);
  };
  addAll(stats.dropped, "manager");
  for (const h of Object.values(stats.hosts || {})) addAll(h.agentDropped, "agent");
  if (typeof stats.watchDropped === "number") places["live view"] = stats.watchDropped;
  const parts = Object.entries(places);
  const total = parts.reduce((sum, [, v]) => sum + v, 0);
  const detail = parts.filter(([, v]) => v).map(([k, v]) => `${k} ${num(v)}`).join(", ");
  return `${num(total)} records lost${detail ? ` (${detail})` : ""}`;
}
