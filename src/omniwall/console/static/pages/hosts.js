// Hosts: agent connected, desired vs realized revision (the lag), last error, last seen.

import { get } from "../api.js";
import { ago, badge, el, num } from "../dom.js";
import { poll } from "./live.js";

function build(status) {
  const hosts = Object.entries(status.hosts || {});
  const sum = status.summary || {};
  return [
    el("h1", "Hosts", el("span", { class: "muted small" }, `model revision ${num(status.revision)}`)),
    status.compileError ? el("div", { class: "error" }, `compile error: ${status.compileError}`) : null,
    el("p", { class: "small", id: "hosts-summary" },
      `${num(sum.hosts ?? hosts.length)} hosts · ${num(sum.connected ?? 0)} connected · ${num(sum.inSync ?? 0)} in sync`),
    el("table", { id: "hosts" },
      el("thead", el("tr", el("th", "host"), el("th", "agent"), el("th", { class: "right" }, "desired"),
        el("th", { class: "right" }, "realized"), el("th", { class: "right" }, "lag"), el("th", "state"),
        el("th", "last error"), el("th", "last seen"))),
      el("tbody", hosts.map(([name, h]) => {
        const lag = (h.desiredRevision ?? 0) - (h.realizedRevision ?? 0);
        return el("tr", { "data-host": name },
          el("td", el("strong", name)),
          el("td", h.connected ? badge("connected", "ok") : badge("away", "bad")),
          el("td", { class: "right mono" }, num(h.desiredRevision)),
          el("td", { class: "right mono" }, num(h.realizedRevision)),
          el("td", { class: "right mono" }, lag > 0 ? badge(`${lag} behind`, "lag") : "0"),
          el("td", h.inSync ? badge("in sync", "ok") : badge("not in sync", h.lastError ? "bad" : "lag")),
          el("td", { class: "small mono" }, h.lastError || "—"),
          el("td", { class: "small" }, ago(h.lastSeen)));
      }))),
  ];
}

export function mount(root, ctx) {
  if (ctx.principal.role.startsWith("tenant-")) {
    root.append(el("p", { class: "muted" }, "Hosts belong to the provider; a tenant token does not see them."));
    return null;
  }
  poll(ctx, root, 2000, () => get("/v1/status", {}, { signal: ctx.signal }), build);
  return null;
}
