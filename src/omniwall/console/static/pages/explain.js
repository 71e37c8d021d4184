// One connection, hop by hop, as the manager's current desired states judge it (GET /v1/explain).

import { get } from "../api.js";
import { badge, el, errorBox, replace, route, verdictBadge } from "../dom.js";

function hopCard(h) {
  const v = h.verdict === "allow" ? "allowed" : h.verdict === "drop" ? "denied" : h.verdict;
  return el("div", { class: ["hop", h.reached ? null : "unreached"] },
    el("div", el("strong", h.direction || "?"), " ", verdictBadge(v), h.reached ? null : badge("not reached", "neutral")),
    el("div", { class: "small" }, h.workload || (h.redacted ? "another tenant's vNIC" : "—")),
    h.host ? el("div", { class: "muted small" }, `host ${h.host}${h.ifname ? ` · ${h.ifname}` : ""}`) : null,
    el("div", { class: "small decision" }, h.decision || h.reason || ""),
    h.monitored ? el("div", { class: "small" }, `monitor mode: would ${h.would}`) : null);
}

function pathBlock(title, p) {
  if (!p) return null;
  const hops = [];
  (p.hops || []).forEach((h, i) => { if (i) hops.push(el("span", { class: "arrow" }, "→")); hops.push(hopCard(h)); });
  return el("div", { class: "panel" },
    el("h3", title, " ", verdictBadge(p.allowed ? "allowed" : "denied"), " ",
      el("span", { class: "muted small" }, p.description || "")),
    hops.length ? el("div", { class: "hops" }, hops) : el("p", { class: "muted small" }, "no vNIC of ours on this path"));
}

export function mount(root, ctx) {
  const q = { from: ctx.params.get("from"), to: ctx.params.get("to"), proto: ctx.params.get("proto") || "tcp", port: ctx.params.get("port") };
  const form = el("form", { class: "filters", id: "explain-form" },
    el("label", "from", el("input", { name: "from", value: q.from || "", placeholder: "workload or IP", "data-control": "view" })),
    el("label", "to", el("input", { name: "to", value: q.to || "", placeholder: "workload or IP", "data-control": "view" })),
    el("label", "protocol", el("select", { name: "proto", "data-control": "view" },
      ["tcp", "udp", "icmp", "icmpv6"].map((p) => el("option", { value: p, selected: p === q.proto }, p)))),
    el("label", "port", el("input", { name: "port", value: q.port || "", placeholder: "443", "data-control": "view" })),
    el("button", { type: "submit", class: "primary", "data-control": "view" }, "Explain"));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    location.hash = route("/explain", Object.fromEntries(new FormData(form).entries()));
  });
  const out = el("div", { id: "explanation" });
  replace(root, el("h1", "Explain", el("span", { class: "muted small" }, "would this connection be allowed now, and by which rule at each hop?")), form, out);
  if (!q.from || !q.to) return null;
  out.append(el("p", { class: "muted" }, "judging ..."));
  get("/v1/explain", q, { signal: ctx.signal }).then((e) => {
    replace(out,
      el("div", { class: "panel" },
        el("h2", `${e.from} → ${e.to} `, el("span", { class: "muted small" }, e.service), " ",
          verdictBadge(e.allowed ? "allowed" : "denied")),
        el("div", { class: "small muted" }, `model revision ${e.revision}; the sim judges the desired states the agents realize`)),
      pathBlock("request", e.request),
      pathBlock("reply", e.reply),
      pathBlock("ack", e.ack));
  }).catch((err) => { if (!ctx.signal.aborted) replace(out, errorBox(err)); });
  return null;
}
