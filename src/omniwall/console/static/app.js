// The console's shell: sign-in, the principal, the navigation, and one page mounted at a time.
// Pages: mount(root, ctx) -> cleanup(). ctx = {principal, params, signal, every(ms, fn)}.

import { ApiError, get, token } from "./api.js";
import { el, errorBox, parseHash, replace } from "./dom.js";
import * as audit from "./pages/audit.js";
import * as explain from "./pages/explain.js";
import * as flows from "./pages/flows.js";
import * as groups from "./pages/groups.js";
import * as hosts from "./pages/hosts.js";
import * as map from "./pages/map.js";
import * as policies from "./pages/policies.js";

const READERS = new Set(["provider-admin", "auditor", "tenant-admin", "tenant-viewer"]);
const TENANT_ROLES = new Set(["tenant-admin", "tenant-viewer"]);

// path -> [label, module, shown in the nav for this principal?]
const PAGES = {
  "/flows": ["Flows", flows, () => true],
  "/map": ["Map", map, () => true],
  "/policies": ["Policies", policies, () => true],
  "/groups": ["Groups", groups, () => true],
  "/hosts": ["Hosts", hosts, (p) => !TENANT_ROLES.has(p.role)],
  "/audit": ["Audit", audit, () => true],
  "/explain": ["Explain", explain, () => false],
};

const view = document.getElementById("view");
const nav = document.getElementById("nav");
const who = document.getElementById("who");
let principal = null;
let current = null; // {cleanup, controller}

function signOut() {
  token.clear();
  principal = null;
  unmount();
  showSignIn();
}

function unmount() {
  if (!current) return;
  current.controller.abort();
  for (const t of current.timers) clearInterval(t);
  try { current.cleanup && current.cleanup(); } catch (_) { /* page already gone */ }
  current = null;
}

function showSignIn(message) {
  replace(nav);
  replace(who);
  const input = el("input", {
    id: "token", type: "password", autocomplete: "off", spellcheck: "false",
    placeholder: "bearer token", "aria-label": "token",
  });
  const submit = el("button", { class: "primary", id: "signin", type: "submit" }, "Sign in");
  const form = el("form", { class: "panel signin", id: "signin-form" },
    el("h1", "Sign in to Omniwall"),
    el("p", { class: "muted" },
      "Paste an API token (omniwall token create, or the one `make demo` prints). It is kept in this tab only " +
      "(sessionStorage) and sent as an Authorization header."),
    input, submit, message ? errorBox(message) : null);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const t = input.value.trim();
    if (!t) return;
    token.set(t);
    await start();
  });
  replace(view, form);
  input.focus();
}

function showPrincipal(p) {
  const scope = p.tenant ? `tenant ${p.tenant}` : p.host ? `host ${p.host}` : "all tenants";
  replace(who,
    el("span", { id: "principal-name" }, p.name || p.id),
    el("span", { class: "role", id: "principal-role" }, p.role),
    el("span", { id: "principal-scope" }, scope),
    el("span", { class: "readonly" }, "read-only view"),
    el("button", { id: "signout", type: "button", "data-control": "view", onclick: signOut }, "Sign out"));
}

function showNav(active) {
  replace(nav, Object.entries(PAGES)
    .filter(([, [, , shown]]) => shown(principal))
    .map(([path, [label]]) => el("a", { href: `#${path}`, class: path === active ? "active" : null }, label)));
}

function render() {
  unmount();
  if (!principal) return;
  let { path, params } = parseHash(location.hash);
  if (!PAGES[path]) path = "/flows";
  showNav(path);
  const [label, page] = PAGES[path];
  document.title = `${label} · Omniwall`;
  const controller = new AbortController();
  const timers = [];
  const root = el("section", { id: `page-${path.slice(1)}`, class: "page" });
  replace(view, root);
  current = { controller, timers, cleanup: null };
  const ctx = {
    principal, params, signal: controller.signal,
    every(ms, fn) { fn(); timers.push(setInterval(fn, ms)); },
  };
  try {
    current.cleanup = page.mount(root, ctx);
  } catch (err) {
    replace(root, errorBox(err));
  }
}

async function start() {
  if (!token.get()) { showSignIn(); return; }
  try {
    principal = await get("/v1/whoami");
  } catch (err) {
    token.clear();
    const why = err instanceof ApiError && err.status === 401 ? "That token is not valid (or was revoked)." : err;
    showSignIn(why);
    return;
  }
  if (!READERS.has(principal.role)) {
    const p = principal;
    principal = null;
    token.clear();
    showSignIn(`A ${p.role} token cannot read the console; sign in with a provider-admin, auditor, ` +
      "tenant-admin or tenant-viewer token.");
    return;
  }
  showPrincipal(principal);
  if (!location.hash || location.hash === "#" || location.hash === "#/") location.hash = "#/flows";
  render();
}

window.addEventListener("hashchange", render);
start();
