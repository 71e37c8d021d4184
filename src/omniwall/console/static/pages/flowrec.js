// Flow records as the API sends them (FlowRecord.to_json: snake_case; camelCase accepted too), made into
// one shape for the pages, plus the words and links every page uses for them.

import { el, route } from "../dom.js";

function pick(r, ...keys) {
  for (const k of keys) if (r[k] !== undefined && r[k] !== null) return r[k];
  return undefined;
}

export function flowOf(r) {
  const f = {
    start: pick(r, "start", "startTime", "first"),
    end: pick(r, "end", "endTime", "last", "time", "start"),
    host: pick(r, "host"),
    hop: pick(r, "hop", "direction"),
    ifname: pick(r, "ifname"),
    workload: pick(r, "workload"),
    verdict: pick(r, "verdict"),
    ruleId: pick(r, "rule_id", "ruleId"),
    ruleTenant: pick(r, "rule_tenant", "ruleTenant", "tenant"),
    policy: pick(r, "policy"),
    rule: pick(r, "rule"),
    category: pick(r, "category"),
    revision: pick(r, "revision"),
    proto: pick(r, "proto", "protocol"),
    src: pick(r, "src", "source"),
    dst: pick(r, "dst", "destination"),
    sport: pick(r, "sport") || 0,
    dport: pick(r, "dport", "port") || 0,
    packets: pick(r, "packets") || 0,
    bytes: pick(r, "bytes") || 0,
    count: pick(r, "count") ?? 1,
    final: pick(r, "final"),
    srcWorkload: pick(r, "src_workload", "srcWorkload"),
    dstWorkload: pick(r, "dst_workload", "dstWorkload"),
    id: pick(r, "id", "seq"),
  };
  f.key = [f.host, f.hop, f.ifname, f.proto, f.src, f.sport, f.dst, f.dport, f.ruleId, f.verdict, f.start]
    .map((x) => (x === undefined ? "" : String(x))).join("|");
  return f;
}

// The messages of a flow stream may carry one record, a list, or {items|records: [...]}.
export function recordsOf(data) {
  if (Array.isArray(data)) return data;
  if (data && typeof data === "object") {
    if (Array.isArray(data.items)) return data.items;
    if (Array.isArray(data.records)) return data.records;
    if ("verdict" in data) return [data];
  }
  return [];
}

export const OTHER_TENANT = "(other tenant)";

export function ruleWords(f) {
  if (f.ruleTenant === OTHER_TENANT) return "a rule of another tenant";
  if (f.category === "default") return `default of tenant ${f.ruleTenant || "?"}: ${f.rule || "?"}`;
  return `${f.ruleTenant || "?"}/${f.policy || "?"}/${f.rule || "?"}`;
}

export function ruleCell(f) {
  return el("span", { class: "rule" },
    el("span", { class: "rule-name" }, ruleWords(f)),
    " ",
    el("span", { class: "muted small" }, `${f.category || ""}${f.ruleId ? ` · id ${f.ruleId}` : ""}`));
}

export function portText(f) {
  const p = String(f.proto || "");
  if (p.startsWith("icmp")) return `${p}${f.dport ? ` type ${f.dport}` : ""}`;
  return f.dport ? `${p}/${f.dport}` : p;
}

export function explainHref(f) {
  const p = String(f.proto || "tcp");
  const withPort = p === "tcp" || p === "udp";
  return route("/explain", { from: f.src, to: f.dst, proto: p, port: withPort && f.dport ? f.dport : null });
}
