// The audit log, newest first, live: /v1/audit/watch when the manager has it, else polling /v1/audit.

import { ApiError, follow, get } from "../api.js";
import { el, errorBox, fmtTime, replace } from "../dom.js";

const MAX_ROWS = 1000;

function keyOf(e) { return `${e.time}|${e.revision}|${e.actorId}|${e.action}|${e.kind}|${e.tenant}|${e.name}`; }

function row(e, fresh) {
  const obj = [e.kind, e.tenant, e.name].filter(Boolean).join("/");
  return el("tr", { class: fresh ? "new" : null },
    el("td", { class: "nowrap mono small" }, fmtTime(e.time, true)),
    el("td", e.actor || e.actorId || "—", el("div", { class: "muted small" }, e.role || "")),
    el("td", el("strong", e.action || "—")),
    el("td", obj || "—"),
    el("td", { class: "small mono" }, (e.changed || []).join(", ")),
    el("td", { class: "right mono" }, e.revision ?? "—"),
    el("td", { class: "small muted" }, e.request ? (typeof e.request === "string" ? e.request : JSON.stringify(e.request)) : ""));
}

export function mount(root, ctx) {
  const seen = new Set();
  const tbody = el("tbody", { id: "audit-rows" });
  const state = el("span", { id: "audit-state" }, "loading");
  const errors = el("div");
  replace(root,
    el("h1", "Audit log", el("span", { class: "muted small" }, "every change, who made it, and when")),
    el("div", { class: "status-line" }, state),
    errors,
    el("div", { class: "scroll" }, el("table", { id: "audit" },
      el("thead", el("tr", el("th", "time"), el("th", "actor"), el("th", "action"), el("th", "object"),
        el("th", "changed"), el("th", { class: "right" }, "revision"), el("th", "request"))), tbody)));
  let newest = null;

  function add(e, fresh) {
    const k = keyOf(e);
    if (seen.has(k)) return;
    seen.add(k);
    if (!newest || e.time > newest) newest = e.time;
    tbody.prepend(row(e, fresh));
    while (tbody.childElementCount > MAX_ROWS) tbody.lastElementChild.remove();
  }

  async function catchUp(fresh) {
    // Oldest first, paginated: read every page since the newest entry we have.
    let cont = null;
    do {
      const page = await get("/v1/audit", { since: newest, limit: 1000, continue: cont }, { signal: ctx.signal });
      for (const e of page.items || []) add(e, fresh);
      cont = page.continue;
    } while (cont);
  }

  let polling = false;
  function startPolling() {
    if (polling) return;
    polling = true;
    state.textContent = "live (polling every 2 s)";
    ctx.every(2000, () => catchUp(true).catch((err) => { if (!ctx.signal.aborted) replace(errors, errorBox(err)); }));
  }

  catchUp(false).then(() => {
    state.textContent = "live";
    follow("/v1/audit/watch", { since: newest }, (msg) => {
      const d = msg.data;
      const items = Array.isArray(d) ? d : d && Array.isArray(d.items) ? d.items : d && d.time ? [d] : [];
      for (const e of items) add(e, true);
    }, {
      signal: ctx.signal,
      onState(s) {
        if (s === "live") state.textContent = "live";
        else if (s instanceof ApiError && s.status === 404) startPolling();
        else if (s instanceof Error) state.textContent = `stream down: ${s.message}`;
      },
    }).then((final) => { if (final instanceof ApiError) startPolling(); });
  }).catch((err) => { if (!ctx.signal.aborted) replace(errors, errorBox(err)); });
  return null;
}
