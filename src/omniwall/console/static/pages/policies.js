// Policies by category (evaluation order), each rule with its hits (kernel counters and flow records),
// last hit, where it is realized (desired vs realized revision per host), and whether it is unused.

import { get, getAll } from "../api.js";
import { ago, badge, el, labels, num } from "../dom.js";
import { optional, poll } from "./live.js";

const CATEGORIES = ["emergency", "infrastructure", "environment", "application"];

function ruleKey(tenant, policy, rule) { return `${tenant}/${policy}/${rule}`; }

// /v1/flows/hits and /v1/flows/unused: items naming a rule (tenant, policy, rule, rule id).
function indexRules(answer) {
  const by = new Map();
  const items = answer ? (Array.isArray(answer) ? answer : answer.items || answer.rules || []) : [];
  for (const it of items) {
    const t = it.tenant ?? it.rule_tenant ?? it.ruleTenant;
    const key = ruleKey(t, it.policy, it.rule);
    by.set(key, it);
    const id = it.rule_id ?? it.ruleId;
    if (id !== undefined) by.set(`#${id}`, it);
  }
  return by;
}

async function load(ctx) {
  const params = {};
  const t = ctx.params.get("tenant");
  if (t) params.tenant = t;
  const pols = await getAll("/v1/policies", params, { signal: ctx.signal });
  const real = await Promise.all(pols.map((p) => get(`/v1/policies/${encodeURIComponent(p.metadata.name)}/realization`,
    { tenant: p.metadata.tenant }, { signal: ctx.signal }).catch((e) => ({ error: e.message }))));
  const hits = await optional(get("/v1/flows/hits", {}, { signal: ctx.signal }));
  const unused = await optional(get("/v1/flows/unused", {}, { signal: ctx.signal }));
  return { pols, real, hits, unused };
}

function hitOf(hits, tenant, policy, rule, id) {
  return hits.get(ruleKey(tenant, policy, rule)) || (id !== null && id !== undefined ? hits.get(`#${id}`) : undefined);
}

function realizedCell(r) {
  if (r.disabled) return badge("disabled", "neutral");
  if (!r.installed) return badge("installed nowhere", "neutral");
  return el("div", r.hosts.map((h) => {
    const lag = h.desiredRevision - h.realizedRevision;
    const cls = h.realized ? "ok" : lag > 0 ? "lag" : "bad";
    const where = h.host ?? "a host";
    const words = h.realized ? `realized r${h.realizedRevision}` : `desired r${h.desiredRevision}, realized r${h.realizedRevision}`;
    const vnics = (h.vnics || []).map((v) => `${v.workload ?? v.ifname} (${(v.directions || []).join("+")})`).join(", ");
    return el("div", { class: "small" }, el("strong", where), " ", badge(words, cls),
      h.connected ? null : badge("agent away", "bad"), el("div", { class: "muted" }, vnics));
  }));
}

function ruleRow(p, r, spec, hits, unused) {
  const tenant = p.metadata.tenant;
  const name = p.metadata.name;
  const hit = hitOf(hits, tenant, name, r.rule, r.ruleId);
  const flowHits = hit ? hit.total ?? hit.hits ?? hit.count : null;
  const last = hit ? hit.last_hit ?? hit.lastHit ?? hit.last : null;
  const listedUnused = hitOf(unused, tenant, name, r.rule, r.ruleId);
  // Unused: no kernel hit, and no flow record over the window (a `pass` rule decides nothing, so it
  // has no flow record of its own: its kernel counter tells whether traffic reaches it).
  const isUnused = r.installed && !r.disabled && !r.packets && (listedUnused !== undefined || !flowHits);
  return el("tr", { "data-rule": r.rule, class: isUnused ? "unused" : null },
    el("td", el("strong", r.rule), r.ruleId !== null && r.ruleId !== undefined ? el("div", { class: "muted small" }, `id ${r.ruleId}`) : null),
    el("td", badge(r.action || spec?.action || "?", r.action === "allow" ? "ok" : r.action === "pass" ? "neutral" : "bad")),
    el("td", { class: "mono small" }, (spec?.sources || ["any"]).join(", "), " → ", (spec?.destinations || ["any"]).join(", "),
      spec?.direction && spec.direction !== "both" ? ` (${spec.direction})` : ""),
    el("td", { class: "mono small" }, (spec?.services || []).join(", ") || "any"),
    el("td", { class: "right hits", "data-packets": String(r.packets || 0) }, num(r.packets || 0),
      el("div", { class: "muted small" }, `${num(r.bytes || 0)} B`)),
    el("td", { class: "right flow-hits" }, flowHits === null || flowHits === undefined ? "—" : num(flowHits)),
    el("td", { class: "small last-hit" }, last ? ago(last) : "never"),
    el("td", realizedCell(r)),
    el("td", isUnused ? badge("unused", "lag") : null));
}

function policyPanel(p, real, hits, unused) {
  const specRules = new Map((p.spec.rules || []).map((r) => [r.name, r]));
  const head = el("div", { class: "policy-head" },
    el("h3", `${p.metadata.tenant}/${p.metadata.name}`),
    el("span", { class: "muted small" }, `priority ${p.spec.priority ?? "—"}`),
    p.spec.appliedTo && p.spec.appliedTo.length ? el("span", { class: "small" }, `applied to ${p.spec.appliedTo.join(", ")}`) : null,
    p.spec.stateful === false ? badge("stateless", "neutral") : null,
    real.error ? badge(real.error, "bad") : badge(real.realized ? "realized" : "not realized yet", real.realized ? "ok" : "lag"),
    labels(p.metadata.labels));
  if (real.error) return el("div", { class: "panel policy" }, head);
  return el("div", { class: "panel policy", "data-policy": `${p.metadata.tenant}/${p.metadata.name}` }, head,
    el("table", { class: "rules" },
      el("thead", el("tr", el("th", "rule"), el("th", "action"), el("th", "sources → destinations"),
        el("th", "services"), el("th", { class: "right" }, "hits (kernel)"), el("th", { class: "right" }, "flows (1h)"),
        el("th", "last hit"), el("th", "where realized"), el("th", ""))),
      el("tbody", real.rules.map((r) => ruleRow(p, r, specRules.get(r.rule), hits, unused)))));
}

function build(data, tenantScoped) {
  const hits = indexRules(data.hits);
  const unused = indexRules(data.unused);
  const hasFlowApi = data.hits !== null;
  const out = [el("h1", "Policies", el("span", { class: "muted small" },
    "in evaluation order: category, then priority; first match wins"))];
  if (tenantScoped) out.push(el("p", { class: "muted small" }, "Your tenant's policies; the provider's (emergency, infrastructure) are not shown to tenant tokens (in the flow table, a verdict of theirs reads “a rule of another tenant”)."));
  if (!hasFlowApi) out.push(el("p", { class: "muted small" }, "No flow statistics on this manager: hits are the kernel counters the agents report."));
  const sorted = data.pols.map((p, i) => [p, data.real[i]]);
  sorted.sort(([a], [b]) => (a.spec.priority ?? 0) - (b.spec.priority ?? 0) ||
    `${a.metadata.tenant}/${a.metadata.name}`.localeCompare(`${b.metadata.tenant}/${b.metadata.name}`));
  for (const cat of CATEGORIES) {
    const mine = sorted.filter(([p]) => (p.spec.category || "application") === cat);
    out.push(el("section", { class: `cat cat-${cat}`, id: `cat-${cat}` },
      el("h2", `${cat} `, el("span", { class: "muted small" }, `${mine.length} ${mine.length === 1 ? "policy" : "policies"}`)),
      mine.length ? mine.map(([p, r]) => policyPanel(p, r, hits, unused)) : el("p", { class: "muted small" }, "none")));
  }
  return out;
}

export function mount(root, ctx) {
  const tenantScoped = ctx.principal.role.startsWith("tenant-");
  poll(ctx, root, 4000, () => load(ctx), (data) => build(data, tenantScoped));
  return null;
}
