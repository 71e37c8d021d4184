// Groups with their effective members (selector, static list, nested groups) and addresses.

import { get, getAll } from "../api.js";
import { badge, el, labels } from "../dom.js";
import { poll } from "./live.js";

async function load(ctx) {
  const params = {};
  const t = ctx.params.get("tenant");
  if (t) params.tenant = t;
  const groups = await getAll("/v1/groups", params, { signal: ctx.signal });
  const members = await Promise.all(groups.map((g) => get(`/v1/groups/${encodeURIComponent(g.metadata.name)}/members`,
    { tenant: g.metadata.tenant }, { signal: ctx.signal }).catch((e) => ({ error: e.message }))));
  return { groups, members };
}

function groupPanel(g, m) {
  const s = g.spec || {};
  const def = [];
  if (s.selector) def.push(el("div", { class: "small" }, "selector ", el("code", { class: "selector" }, s.selector)));
  if (s.workloads && s.workloads.length) def.push(el("div", { class: "small" }, "workloads ", el("code", s.workloads.join(", "))));
  if (s.groups && s.groups.length) def.push(el("div", { class: "small" }, "groups ", el("code", s.groups.join(", "))));
  if (s.cidrs && s.cidrs.length) def.push(el("div", { class: "small" }, "CIDRs ", el("code", s.cidrs.join(", "))));
  if (s.shareWith && s.shareWith.length) def.push(el("div", { class: "small" }, "shared with ", s.shareWith.join(", ")));
  const body = m.error
    ? badge(m.error, "bad")
    : el("table", { class: "members" },
      el("thead", el("tr", el("th", "workload"), el("th", "addresses"), el("th", "why"))),
      el("tbody", m.workloads.length
        ? m.workloads.map((w) => el("tr", { "data-member": w.workload },
          el("td", w.workload, w.host ? el("div", { class: "muted small" }, `on ${w.host}`) : null),
          el("td", { class: "mono small" }, (w.addresses || []).join(", ")),
          el("td", { class: "small" }, (w.via || []).join(", "))))
        : el("tr", el("td", { colspan: "3", class: "muted small" }, "no workload members"))));
  const count = m.error ? "" : `${m.workloads.length} workloads · ${m.addresses.length} addresses` +
    (m.cidrs && m.cidrs.length ? ` · ${m.cidrs.length} CIDRs` : "") +
    (m.hiddenWorkloads ? ` · ${m.hiddenWorkloads} of other tenants not shown` : "");
  return el("div", { class: "panel group", "data-group": `${g.metadata.tenant}/${g.metadata.name}` },
    el("div", { class: "policy-head" }, el("h3", `${g.metadata.tenant}/${g.metadata.name}`),
      el("span", { class: "muted small" }, count), labels(g.metadata.labels)),
    def, body);
}

function build(data) {
  return [
    el("h1", "Groups", el("span", { class: "muted small" }, "effective members, as the compiler computes them now")),
    data.groups.length
      ? el("div", { class: "grid" }, data.groups.map((g, i) => groupPanel(g, data.members[i])))
      : el("p", { class: "muted" }, "No groups visible to this token."),
  ];
}

export function mount(root, ctx) {
  poll(ctx, root, 4000, () => load(ctx), build);
  return null;
}
