// Signpost console: a page per view, rendered in the browser from the
// control plane's HTTP API (the same endpoints the CLI uses, so the
// server enforces every ACL rule). The token is kept in sessionStorage
// and sent as X-Consul-Token; it never goes into a URL. Live: a stream
// of change notices (/v1/ui/events) makes the page in view fetch again.
"use strict";

const TOKEN_KEY = "signpost.token";
const main = () => document.getElementById("main");
let me = null; // the token's description and what it may do
let refreshTimer = null;
let stream = null; // AbortController of the event stream
let lastGood = true;

// ---------- DOM helpers (text only: nothing is parsed as HTML) ----------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function badge(state, text) {
  return h("span", { class: `badge ${state}` }, text || state);
}

function table(headers, rows, opts = {}) {
  const head = h("tr", {}, headers.map((c) => h("th", { scope: "col", class: c.num ? "num" : null }, c.label)));
  const body = rows.map((r) =>
    h("tr", {}, r.map((cell, i) =>
      h("td", { "data-label": headers[i].label, class: headers[i].num ? "num" : null }, cell))));
  return h("div", { class: "table-wrap" },
    h("table", { class: "responsive", "aria-label": opts.label || null },
      h("thead", {}, head), h("tbody", {}, body)));
}

function field(id, label, input, hint) {
  input.id = id;
  return h("div", { class: "field" },
    h("label", { for: id }, label),
    input,
    hint ? h("span", { class: "hint", id: `${id}-hint` }, hint) : null);
}

function ago(ms) {
  const s = Math.round((Date.now() - ms) / 1000);
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
  return `${Math.floor(s / 86400)}d ago`;
}

function countdown(ms) {
  let s = Math.max(0, Math.round((ms - Date.now()) / 1000));
  const d = Math.floor(s / 86400); s %= 86400;
  const hh = Math.floor(s / 3600); s %= 3600;
  const mm = Math.floor(s / 60); s %= 60;
  return (d ? `${d}d ` : "") + (d || hh ? `${hh}h ` : "") + `${mm}m ${s}s`;
}

function when(ms) {
  return ms ? new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC") : "";
}

// ---------- the API ----------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path, body) {
  const headers = { "X-Consul-Token": sessionStorage.getItem(TOKEN_KEY) || "" };
  let payload;
  if (body !== undefined) {
    if (typeof body === "string") payload = body;
    else { payload = JSON.stringify(body); headers["Content-Type"] = "application/json"; }
  }
  let r;
  try {
    r = await fetch(path, { method, headers, body: payload, cache: "no-store" });
  } catch (e) {
    connection(false);
    throw new ApiError(0, "the control plane does not answer");
  }
  connection(true);
  const text = await r.text();
  let data = text;
  try { data = text ? JSON.parse(text) : null; } catch (_) { /* plain text */ }
  if (!r.ok) {
    const why = (data && data.error) || (typeof data === "string" && data) || r.statusText;
    if (r.status === 401 && path !== "/v1/acl/token/self") { logout("Your token is no longer valid: log in again."); }
    throw new ApiError(r.status, why);
  }
  return data;
}

function connection(ok) {
  if (ok === lastGood) return;
  lastGood = ok;
  const banner = document.getElementById("banner");
  banner.hidden = ok;
  banner.textContent = ok ? "" : "Lost the connection to the control plane: what you see may be out of date. Retrying…";
}

// ---------- login ----------

function logout(why) {
  sessionStorage.removeItem(TOKEN_KEY);
  me = null;
  if (stream) stream.abort();
  stream = null;
  document.getElementById("nav").hidden = true;
  document.getElementById("logout").hidden = true;
  document.getElementById("who").textContent = "";
  showLogin(why);
}

function showLogin(why) {
  const input = h("input", { type: "password", autocomplete: "off", required: true, "aria-describedby": "token-hint" });
  const error = h("p", { class: "error", role: "alert" }, why || "");
  const form = h("form", { class: "panel login", "aria-labelledby": "login-title" },
    h("h1", { id: "login-title" }, "Log in"),
    field("token", "ACL token (SecretID)", input, "Kept in this tab only (sessionStorage); never put in a URL."),
    error,
    h("button", { type: "submit" }, "Log in"));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    try {
      await loadMe();
      if (!location.hash || location.hash === "#/login") location.hash = "#/services";
      start();
    } catch (e) {
      sessionStorage.removeItem(TOKEN_KEY);
      error.textContent = e.status === 401 || e.status === 403 ? "This token is not valid here." : e.message;
    }
  });
  main().replaceChildren(form);
  shown = null;
  input.focus();
}

async function loadMe() {
  me = await api("GET", "/v1/acl/token/self");
  const can = me.Can || {};
  for (const a of document.querySelectorAll("#nav a[data-needs]")) {
    a.hidden = !can[a.dataset.needs];
  }
  document.getElementById("nav").hidden = false;
  document.getElementById("logout").hidden = false;
  document.getElementById("who").textContent =
    `Token ${me.Description || me.AccessorID.slice(0, 8)}${me.Role ? ` (${me.Role})` : ""}`;
}

function can(what) { return Boolean(me && me.Can && me.Can[what]); }

// ---------- live updates ----------

// Reads the server's change notices (server-sent events over fetch, so
// that the token goes in a header); each makes the view fetch again.
async function follow() {
  if (stream) stream.abort();
  const ctl = new AbortController();
  stream = ctl;
  let wait = 500;
  while (!ctl.signal.aborted) {
    try {
      const r = await fetch("/v1/ui/events", {
        headers: { "X-Consul-Token": sessionStorage.getItem(TOKEN_KEY) || "" },
        signal: ctl.signal, cache: "no-store",
      });
      if (r.status === 401) { logout("Your token is no longer valid: log in again."); return; }
      if (!r.ok || !r.body) throw new Error(`events: ${r.status}`);
      connection(true);
      wait = 500;
      refresh();
      const reader = r.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let at;
        while ((at = buf.indexOf("\n\n")) >= 0) {
          const frame = buf.slice(0, at);
          buf = buf.slice(at + 2);
          if (frame.split("\n").some((l) => l.startsWith("event: change"))) refresh();
        }
      }
      throw new Error("events ended");
    } catch (e) {
      if (ctl.signal.aborted) return;
      connection(false);
      await new Promise((res) => setTimeout(res, wait));
      wait = Math.min(wait * 2, 5000);
    }
  }
}

function refresh() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(() => render(false), 150);
}

// ---------- routing ----------

const routes = [
  [/^#\/services$/, viewServices],
  [/^#\/services\/(.+)$/, viewService],
  [/^#\/nodes$/, viewNodes],
  [/^#\/commands$/, viewCommands],
  [/^#\/commands\/(.+)$/, viewCommand],
  [/^#\/kv\/(.*)$/, viewKv],
  [/^#\/acl$/, viewAcl],
  [/^#\/audit$/, viewAudit],
];

let rendering = null;
let shown = null; // the hash of the page on screen
let viewState = {}; // what the user typed in filters, kept across refreshes

// Figures that change without a change notice (traffic) are fetched
// again after a while, as long as the page shows them.
let pollTimer = null;
function pollIn(ms) {
  pollTimer = setTimeout(refresh, ms);
}

async function render(navigated) {
  if (!me) return;
  clearTimeout(pollTimer);
  const hash = location.hash || "#/services";
  for (const a of document.querySelectorAll("#nav a")) {
    const section = a.getAttribute("href");
    if (hash.startsWith(section.replace(/\/$/, ""))) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  for (const [re, view] of routes) {
    const m = hash.match(re);
    if (!m) continue;
    const token = Symbol("render");
    rendering = token;
    try {
      const content = await view(...m.slice(1).map(decodeURIComponent));
      if (rendering !== token) return;
      // A form being filled in is not replaced by a refresh of its page
      // (a refresh that lands on another page replaces it: it is a
      // navigation that overtook its own render).
      const editing = !navigated && shown === hash
        && main().querySelector("[data-keep]:focus-within, [data-keep].dirty");
      if (editing) {
        const fresh = content.querySelector("[data-live]");
        const old = main().querySelector("[data-live]");
        if (fresh && old) old.replaceWith(fresh);
        return;
      }
      main().replaceChildren(content);
      if (navigated || shown !== hash) main().focus();
      shown = hash;
    } catch (e) {
      if (rendering !== token) return;
      if (e.status === 403) {
        main().replaceChildren(h("section", {},
          h("h1", {}, "Not allowed"),
          h("p", { class: "error", role: "alert" }, `Your token may not see this page: ${e.message}`)));
        shown = hash;
      } else if (e.status !== 0 || navigated) {
        main().replaceChildren(h("p", { class: "error", role: "alert" }, e.message));
        shown = hash;
      }
    }
    return;
  }
  location.hash = "#/services";
}

// ---------- services ----------

async function viewServices() {
  const services = await api("GET", "/v1/ui/services");
  const q = viewState.serviceFilter || "";
  const health = viewState.serviceHealth || "";
  const search = h("input", { type: "search", value: q, placeholder: "name or tag" });
  const select = h("select", {},
    ["", "passing", "warning", "critical"].map((v) =>
      h("option", { value: v, selected: v === health }, v ? `with ${v} instances` : "any health")));
  const rows = services
    .filter((s) => !q || s.Name.includes(q) || s.Tags.some((t) => t.includes(q)))
    .filter((s) => !health || s[health[0].toUpperCase() + health.slice(1)] > 0)
    .map((s) => [
      h("a", { href: `#/services/${encodeURIComponent(s.Name)}` }, s.Name),
      s.Instances,
      s.Passing ? badge("passing", `${s.Passing} passing`) : "",
      s.Warning ? badge("warning", `${s.Warning} warning`) : "",
      s.Critical ? badge("critical", `${s.Critical} critical`) : "",
      s.Zones.join(", "),
      s.Nodes,
      s.Tags.map((t) => h("span", { class: "tag" }, t)),
      s.Protocol,
      s.Commands ? h("a", { href: "#/commands" }, s.Commands) : "0",
    ]);
  const live = h("div", { "data-live": true },
    h("p", { class: "muted" }, `${rows.length} of ${services.length} services`),
    table([
      { label: "Service" }, { label: "Instances", num: true }, { label: "Passing" },
      { label: "Warning" }, { label: "Critical" }, { label: "Zones" }, { label: "Nodes", num: true },
      { label: "Tags" }, { label: "Protocol" }, { label: "Commands in force", num: true },
    ], rows, { label: "Services" }));
  search.addEventListener("input", () => { viewState.serviceFilter = search.value; rerenderSoon(); });
  select.addEventListener("change", () => { viewState.serviceHealth = select.value; render(false); });
  return h("section", {},
    h("h1", {}, "Services"),
    h("div", { class: "toolbar", role: "search" },
      field("service-filter", "Search", search),
      field("service-health", "Health", select)),
    live);
}

let rerender = null;
function rerenderSoon() {
  clearTimeout(rerender);
  rerender = setTimeout(async () => {
    const active = document.activeElement && document.activeElement.id;
    await render(false);
    const again = active && document.getElementById(active);
    if (again && again !== document.activeElement) {
      again.focus();
      if (again.setSelectionRange && again.type === "search") again.setSelectionRange(again.value.length, again.value.length);
    }
  }, 120);
}

async function viewService(name) {
  const [entries, commands, intentions, traffic] = await Promise.all([
    api("GET", `/v1/health/service/${encodeURIComponent(name)}`),
    api("GET", `/v1/commands?service=${encodeURIComponent(name)}&state=active`),
    api("GET", "/v1/connect/intentions").catch(() => null),
    api("GET", `/v1/ui/services/${encodeURIComponent(name)}`),
  ]);
  pollIn(5000);
  const changes = traffic.CheckChanges || {};
  const rows = entries.map((e) => {
    const svc = e.Service;
    const changed = changes[e.Node.Node] || {};
    const checks = e.Checks.map((c) => h("div", { class: "check" },
      badge(c.Status), " ", h("strong", {}, c.Name || c.CheckID),
      changed[c.CheckID] ? h("span", { class: "muted" }, ` since ${when(changed[c.CheckID])} (${ago(changed[c.CheckID])})`) : null,
      c.Output ? h("pre", {}, c.Output) : null));
    return [
      svc.ID,
      e.Node.Node,
      `${svc.Address || e.Node.Address}:${svc.Port}`,
      (svc.Tags || []).map((t) => h("span", { class: "tag" }, t)),
      Object.entries(svc.Meta || {}).map(([k, v]) => h("div", {}, h("code", {}, `${k}=${v}`))),
      checks,
    ];
  });
  const own = (intentions || []).filter((i) => i.DestinationName === name || i.SourceName === name);
  return h("section", {},
    h("p", {}, h("a", { href: "#/services" }, "← Services")),
    h("h1", {}, `Service ${name}`),
    h("p", { class: "muted" }, "Reached by name: ", h("code", {}, `${name}.service.internal`),
      " — each host's agent answers it with a VIP of its own (its proxy), stable on that host."),
    h("div", { "data-live": true },
      traffic ? trafficCards(traffic) : null,
      h("h2", {}, `Instances (${entries.length})`),
      entries.length ? table([{ label: "ID" }, { label: "Node" }, { label: "Address" }, { label: "Tags" }, { label: "Meta" }, { label: "Checks" }], rows, { label: "Instances" })
        : h("p", { class: "muted" }, "No instance registered."),
      h("h2", {}, `Commands in force (${commands.length})`),
      commands.length ? commandTable(commands) : h("p", { class: "muted" }, "None."),
      intentions === null ? null : h("h2", {}, `Intentions (${own.length})`),
      intentions === null ? null : (own.length
        ? table([{ label: "Source" }, { label: "Destination" }, { label: "Action" }, { label: "Description" }],
          own.map((i) => [i.SourceName, i.DestinationName, badge(i.Action === "allow" ? "passing" : "critical", i.Action), i.Description || ""]), { label: "Intentions" })
        : h("p", { class: "muted" }, "None: the mesh's default applies."))));
}

function trafficCards(t) {
  if (!t.Traffic) {
    return h("p", { class: "muted", id: "traffic" }, "No traffic through Signpost's proxies lately.");
  }
  const tr = t.Traffic;
  return h("div", { id: "traffic" },
    h("h2", {}, "Traffic (from the agents that call it)"),
    h("div", { class: "cards" },
      h("div", { class: "card" }, h("div", { class: "muted" }, "Requests/s"), h("div", { class: "value" }, tr.RequestsPerSecond.toFixed(1))),
      h("div", { class: "card" }, h("div", { class: "muted" }, "Error rate"), h("div", { class: "value" }, `${(tr.ErrorRate * 100).toFixed(2)}%`)),
      h("div", { class: "card" }, h("div", { class: "muted" }, "p99 latency"), h("div", { class: "value" }, `${tr.P99Ms.toFixed(1)} ms`)),
      h("div", { class: "card" }, h("div", { class: "muted" }, "Reporting agents"), h("div", { class: "value" }, tr.Agents))));
}

// ---------- nodes ----------

async function viewNodes() {
  const nodes = await api("GET", "/v1/nodes");
  const q = viewState.nodeFilter || "";
  const search = h("input", { type: "search", value: q, placeholder: "name, address or zone" });
  search.addEventListener("input", () => { viewState.nodeFilter = search.value; rerenderSoon(); });
  const rows = nodes
    .filter((n) => !q || n.Node.includes(q) || n.Address.includes(q) || (n.Zone || "").includes(q))
    .map((n) => [
      n.Node,
      n.Address,
      n.Zone || "",
      h("div", {}, badge(n.Status),
        n.FailedAt ? h("div", { class: "muted" }, `since ${when(n.FailedAt)}`) : null,
        n.Probes ? h("div", { class: "muted" }, `probed ${ago(n.Probes.At)}: `,
          n.Probes.Answers.length ? n.Probes.Answers.map((p) =>
            `${p.Peer} ${p.Reachable ? "reached it" : `could not reach it${p.Error ? ` (${p.Error})` : ""}`}`).join("; ")
            : "no peer answered") : null),
      n.Version || "",
      n.Services,
      n.LastContact ? ago(n.LastContact) : (n.Status === "alive" ? "connected" : ""),
      n.Replica || "",
    ]);
  return h("section", {},
    h("h1", {}, "Nodes"),
    h("div", { class: "toolbar", role: "search" }, field("node-filter", "Search", search)),
    h("div", { "data-live": true },
      h("p", { class: "muted" }, `${rows.length} of ${nodes.length} nodes`),
      table([{ label: "Node" }, { label: "Address" }, { label: "Zone" }, { label: "Liveness" },
        { label: "Agent version" }, { label: "Services", num: true }, { label: "Last contact" }, { label: "Replica" }], rows, { label: "Nodes" })));
}

// ---------- commands ----------

function describeAction(c) {
  const a = c.action;
  switch (a.kind) {
    case "degrade": return a.fallback ? `degrade → ${a.fallback.status}` : "degrade";
    case "circuit": return `circuit ${a.state}`;
    case "rate_limit": return `rate limit ${a.per_second}/s (burst ${a.burst})`;
    default: return a.kind;
  }
}

function describeTarget(c) {
  const t = c.target;
  let s = t.service;
  if (t.instance) s += ` ${t.instance}`;
  if (t.route) s += ` ${t.route.method || ""} ${t.route.path_prefix}`;
  if ((t.callers || []).length) s += ` (from ${t.callers.join(", ")})`;
  return s;
}

function commandTable(commands) {
  const rows = commands.map((c) => [
    h("a", { href: `#/commands/${encodeURIComponent(c.id)}` }, c.id.slice(0, 8)),
    describeAction(c),
    describeTarget(c),
    c.reason,
    badge(c.state),
    c.state === "active" ? h("span", { "data-expires": c.expires_at }, countdown(c.expires_at)) : when(c.revoked_at || c.expires_at),
    `${c.agents_subscribed - (c.pending_agents || []).length} of ${c.agents_subscribed} using it (${c.applied} in all)`,
  ]);
  return table([{ label: "ID" }, { label: "Action" }, { label: "Target" }, { label: "Reason" },
    { label: "State" }, { label: "Expires in / ended" }, { label: "Applied by" }], rows, { label: "Commands" });
}

setInterval(() => {
  for (const el of document.querySelectorAll("[data-expires]")) el.textContent = countdown(Number(el.dataset.expires));
}, 1000);

async function viewCommands() {
  const commands = await api("GET", "/v1/commands");
  const state = viewState.commandState ?? "active";
  const select = h("select", {}, ["active", "expired", "revoked", ""].map((v) =>
    h("option", { value: v, selected: v === state }, v || "all (history)")));
  select.addEventListener("change", () => { viewState.commandState = select.value; render(false); });
  const shown = commands.filter((c) => !state || c.state === state)
    .sort((a, b) => b.created_at - a.created_at);
  return h("section", {},
    h("h1", {}, "Commands"),
    h("div", { class: "toolbar" }, field("command-state", "Show", select)),
    h("div", { "data-live": true },
      shown.length ? commandTable(shown) : h("p", { class: "muted" }, "No command.")),
    can("operator_write") ? commandForm() : h("p", { class: "muted" }, "Your token may read commands; creating them needs operator write."));
}

function commandForm() {
  const kind = h("select", { required: true }, [
    ["block", "Block an instance"], ["degrade", "Degrade (answer with a fallback)"],
    ["circuit", "Open/close the circuit"], ["rate_limit", "Rate-limit"], ["policy", "Set timeouts/retries/weights (policy)"],
  ].map(([v, l]) => h("option", { value: v }, l)));
  const service = h("input", { required: true, autocomplete: "off" });
  const instance = h("input", { placeholder: "ip:port", autocomplete: "off" });
  const path = h("input", { placeholder: "/api/ (optional)", autocomplete: "off" });
  const status = h("input", { type: "number", min: 100, max: 599, value: 503 });
  const body = h("input", { autocomplete: "off" });
  const circuit = h("select", {}, [h("option", { value: "open" }, "open"), h("option", { value: "closed" }, "closed")]);
  const perSecond = h("input", { type: "number", min: 0, step: "any", value: 100 });
  const burst = h("input", { type: "number", min: 1, value: 100 });
  const policy = h("textarea", { spellcheck: "false" }, '{"timeout": "2s", "retries": 1}');
  const reason = h("input", { required: true, autocomplete: "off" });
  const ttl = h("input", { required: true, value: "30m", autocomplete: "off", pattern: "\\d+(ms|s|m|h)" });
  const error = h("p", { class: "error", role: "alert" });
  const groups = {
    instance: field("cmd-instance", "Instance", instance, "The instance's address, as its agent registered it (ip:port)."),
    route: field("cmd-path", "Route path prefix", path),
    status: field("cmd-status", "Fallback status", status),
    body: field("cmd-body", "Fallback body", body),
    circuit: field("cmd-circuit", "Circuit", circuit),
    perSecond: field("cmd-rate", "Requests per second", perSecond),
    burst: field("cmd-burst", "Burst", burst),
    policy: field("cmd-policy", "Policy (JSON)", policy, "The fields of a proxy policy, as in agent.yaml's proxy.services."),
  };
  const shownFor = {
    block: ["instance"], degrade: ["instance", "route", "status", "body"], circuit: ["instance", "route", "circuit"],
    rate_limit: ["instance", "route", "perSecond", "burst"], policy: ["policy"],
  };
  const sync = () => {
    for (const [name, el] of Object.entries(groups)) el.hidden = !shownFor[kind.value].includes(name);
    instance.required = kind.value === "block";
  };
  kind.addEventListener("change", sync);
  const form = h("form", { class: "panel", "data-keep": true, "aria-labelledby": "cmd-title", novalidate: true },
    h("h2", { id: "cmd-title" }, "New command"),
    field("cmd-kind", "Kind", kind),
    field("cmd-service", "Service", service),
    Object.values(groups),
    field("cmd-reason", "Reason", reason, "Required: it goes to the audit log."),
    field("cmd-ttl", "Lasts for (TTL)", ttl, "Required, e.g. 30m or 2h; at most 168h."),
    error,
    h("button", { type: "submit" }, "Create"));
  form.addEventListener("input", () => form.classList.add("dirty"));
  sync();
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    error.textContent = "";
    const problems = [];
    if (!service.value.trim()) problems.push("service: must name a service");
    if (!reason.value.trim()) problems.push("reason: say why (it goes to the audit log)");
    if (!/^\d+(ms|s|m|h)$/.test(ttl.value.trim())) problems.push("ttl: a duration such as 30m or 2h");
    if (kind.value === "block" && !instance.value.trim()) problems.push("instance: block needs the instance (ip:port)");
    const action = { kind: kind.value };
    if (kind.value === "degrade") action.fallback = { status: Number(status.value), body: body.value };
    if (kind.value === "circuit") action.state = circuit.value;
    if (kind.value === "rate_limit") { action.per_second = Number(perSecond.value); action.burst = Number(burst.value); }
    if (kind.value === "policy") {
      try { action.policy = JSON.parse(policy.value); } catch (e) { problems.push(`policy: not JSON (${e.message})`); }
    }
    if (problems.length) { error.textContent = problems.join("; "); return; }
    const target = { service: service.value.trim() };
    if (!groups.instance.hidden && instance.value.trim()) target.instance = instance.value.trim();
    if (!groups.route.hidden && path.value.trim()) target.route = { path_prefix: path.value.trim() };
    try {
      const made = await api("POST", "/v1/commands", { action, target, reason: reason.value.trim(), ttl: ttl.value.trim() });
      location.hash = `#/commands/${encodeURIComponent(made.id)}`;
    } catch (e) {
      error.textContent = e.message;
    }
  });
  return form;
}

async function viewCommand(id) {
  const c = await api("GET", `/v1/commands/${encodeURIComponent(id)}`);
  const pending = c.pending_agents || [];
  const revoke = h("button", { type: "button", class: "danger", disabled: !can("operator_write") || c.state !== "active" }, "Revoke");
  const error = h("p", { class: "error", role: "alert" });
  revoke.addEventListener("click", async () => {
    if (!confirm(`Revoke command ${c.id}?`)) return;
    try { await api("DELETE", `/v1/commands/${encodeURIComponent(c.id)}`); render(false); } catch (e) { error.textContent = e.message; }
  });
  return h("section", {},
    h("p", {}, h("a", { href: "#/commands" }, "← Commands")),
    h("h1", {}, `Command ${c.id}`),
    h("div", { "data-live": true },
      h("dl", { class: "facts" },
        h("dt", {}, "State"), h("dd", {}, badge(c.state)),
        h("dt", {}, "Action"), h("dd", {}, describeAction(c)),
        h("dt", {}, "Target"), h("dd", {}, describeTarget(c)),
        h("dt", {}, "Reason"), h("dd", {}, c.reason),
        h("dt", {}, "Created"), h("dd", {}, `${when(c.created_at)} by ${c.creator}`),
        h("dt", {}, c.state === "active" ? "Expires in" : "Ended"),
        h("dd", {}, c.state === "active" ? h("span", { "data-expires": c.expires_at }, countdown(c.expires_at)) : when(c.revoked_at || c.expires_at)),
        h("dt", {}, "Applied"), h("dd", { id: "applied-count" },
          `${c.agents_subscribed - pending.length} of ${c.agents_subscribed} agents using ${c.target.service}; ${c.applied} agents in all`)),
      h("h2", {}, "Applied by"),
      c.applied_by.length ? h("ul", { id: "applied-by" }, c.applied_by.map((n) => h("li", {}, n))) : h("p", { class: "muted", id: "applied-by" }, "No agent yet."),
      h("h2", {}, "Not applied yet"),
      pending.length ? h("ul", { id: "pending-agents" }, pending.map((n) => h("li", {}, n))) : h("p", { class: "muted" }, "None.")),
    revoke, error);
}

// ---------- key/value ----------

function b64decode(s) {
  try { return new TextDecoder().decode(Uint8Array.from(atob(s || ""), (ch) => ch.charCodeAt(0))); } catch (_) { return ""; }
}

async function viewKv(path) {
  if (path && !path.endsWith("/")) return viewKey(path);
  const keys = await api("GET", `/v1/kv/${path.split("/").map(encodeURIComponent).join("/")}?keys&separator=/`).catch((e) => {
    if (e.status === 404) return [];
    throw e;
  });
  const crumbs = [h("a", { href: "#/kv/" }, "(root)")];
  let acc = "";
  for (const part of path.split("/").filter(Boolean)) {
    acc += `${part}/`;
    crumbs.push(" / ", h("a", { href: `#/kv/${acc}` }, part));
  }
  const newKey = h("input", { autocomplete: "off", placeholder: "name" });
  const form = h("form", { class: "toolbar", "data-keep": true },
    field("kv-new", `New key under ${path || "(root)"}`, newKey),
    h("button", { type: "submit", disabled: !can("kv_write") }, "Create…"));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (newKey.value.trim()) location.hash = `#/kv/${path}${newKey.value.trim()}?new`;
  });
  return h("section", {},
    h("h1", {}, "Key/value"),
    h("p", {}, crumbs),
    form,
    h("div", { "data-live": true },
      keys.length ? h("ul", {}, keys.map((k) => h("li", {}, h("a", { href: `#/kv/${k}` }, k.slice(path.length) || k))))
        : h("p", { class: "muted" }, "No key here.")));
}

async function viewKey(raw) {
  const fresh = raw.endsWith("?new");
  const key = fresh ? raw.slice(0, -4) : raw;
  const url = `/v1/kv/${key.split("/").map(encodeURIComponent).join("/")}`;
  let entry = null;
  try { entry = (await api("GET", url))[0]; } catch (e) { if (e.status !== 404) throw e; }
  const value = h("textarea", { spellcheck: "false" }, entry ? b64decode(entry.Value) : "");
  const status = h("p", { role: "status" });
  const error = h("p", { class: "error", role: "alert" });
  const index = entry ? entry.ModifyIndex : 0;
  const save = h("button", { type: "submit", disabled: !can("kv_write") }, "Save");
  const del = h("button", { type: "button", class: "danger", disabled: !can("kv_write") || !entry }, "Delete…");
  const form = h("form", { class: "panel", "data-keep": true },
    field("kv-value", `Value of ${key}`, value, entry ? `Version ${index}; saving checks nobody changed it since (CAS).` : "New key."),
    h("div", { class: "toolbar" }, save, del),
    status, error);
  form.addEventListener("input", () => form.classList.add("dirty"));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    error.textContent = ""; status.textContent = "";
    try {
      const ok = await api("PUT", `${url}?cas=${index}`, value.value);
      if (ok === true) {
        form.classList.remove("dirty");
        status.textContent = "Saved.";
        if (fresh) location.hash = `#/kv/${key}`; else render(false);
      } else {
        error.textContent = "Not saved: someone changed this key since you opened it (CAS conflict). Reload it to see their value.";
      }
    } catch (e) { error.textContent = e.message; }
  });
  del.addEventListener("click", async () => {
    if (!confirm(`Delete ${key}?`)) return;
    try {
      const ok = await api("DELETE", `${url}?cas=${index}`);
      if (ok === false) { error.textContent = "Not deleted: someone changed this key since you opened it (CAS conflict)."; return; }
      location.hash = `#/kv/${key.includes("/") ? key.slice(0, key.lastIndexOf("/") + 1) : ""}`;
    } catch (e) { error.textContent = e.message; }
  });
  const parent = key.includes("/") ? key.slice(0, key.lastIndexOf("/") + 1) : "";
  return h("section", {},
    h("p", {}, h("a", { href: `#/kv/${parent}` }, `← ${parent || "(root)"}`)),
    h("h1", {}, key),
    h("div", { "data-live": true }, entry ? h("p", { class: "muted" }, `Flags ${entry.Flags}, modify index ${entry.ModifyIndex}`) : null),
    form);
}

// ---------- ACL and audit ----------

async function viewAcl() {
  const [tokens, policies] = await Promise.all([api("GET", "/v1/acl/tokens"), api("GET", "/v1/acl/policies")]);
  const tokenRows = tokens.map((t) => [
    h("code", {}, t.AccessorID), t.Description || "", t.Role || "",
    (t.Policies || []).map((p) => p.Name || p.ID).join(", "),
    t.CreateTime ? when(Date.parse(t.CreateTime) || t.CreateTime) : "",
    h("button", { type: "button", class: "secondary", disabled: !can("acl_write"), onclick: async () => {
      if (!confirm(`Delete token ${t.AccessorID}?`)) return;
      try { await api("DELETE", `/v1/acl/token/${t.AccessorID}`); render(false); } catch (e) { alert(e.message); }
    } }, "Delete"),
  ]);
  const policyRows = policies.map((p) => [p.Name, p.Description || "", h("code", {}, p.ID)]);
  return h("section", {},
    h("h1", {}, "ACL"),
    h("div", { "data-live": true },
      h("h2", {}, `Tokens (${tokens.length})`),
      table([{ label: "Accessor" }, { label: "Description" }, { label: "Role" }, { label: "Policies" }, { label: "Created" }, { label: "" }], tokenRows, { label: "Tokens" }),
      h("h2", {}, `Policies (${policies.length})`),
      table([{ label: "Name" }, { label: "Description" }, { label: "ID" }], policyRows, { label: "Policies" })));
}

async function viewAudit() {
  const entries = await api("GET", "/v1/audit?limit=1000");
  const q = viewState.auditFilter || "";
  const outcome = viewState.auditOutcome || "";
  const search = h("input", { type: "search", value: q, placeholder: "action, target or token" });
  search.addEventListener("input", () => { viewState.auditFilter = search.value; rerenderSoon(); });
  const select = h("select", {}, [["", "any outcome"], ["ok", "ok"], ["refused", "refused"]].map(([v, l]) =>
    h("option", { value: v, selected: v === outcome }, l)));
  select.addEventListener("change", () => { viewState.auditOutcome = select.value; render(false); });
  const rows = entries
    .filter((e) => !q || [e.action, e.target, e.who, e.reason].some((f) => (f || "").includes(q)))
    .filter((e) => !outcome || (outcome === "ok" ? e.outcome === "ok" : e.outcome !== "ok"))
    .sort((a, b) => b.time - a.time)
    .map((e) => [when(e.time), h("code", {}, (e.who || "anonymous").slice(0, 8)), e.action, e.target, e.outcome === "ok" ? badge("passing", "ok") : badge("denied", e.outcome), e.reason || ""]);
  return h("section", {},
    h("h1", {}, "Audit log"),
    h("div", { class: "toolbar", role: "search" }, field("audit-filter", "Search", search), field("audit-outcome", "Outcome", select)),
    h("div", { "data-live": true },
      table([{ label: "Time" }, { label: "Token" }, { label: "Action" }, { label: "Target" }, { label: "Outcome" }, { label: "Reason" }], rows, { label: "Audit log" })));
}

// ---------- start ----------

function start() {
  follow();
  render(true);
}

window.addEventListener("hashchange", () => render(true));
document.addEventListener("DOMContentLoaded", async () => {
  document.getElementById("logout").addEventListener("click", () => logout());
  if (!sessionStorage.getItem(TOKEN_KEY)) { showLogin(); return; }
  try {
    await loadMe();
    start();
  } catch (e) {
    if (e.status === 0) { main().replaceChildren(h("p", { class: "error", role: "alert" }, e.message)); return; }
    logout(e.status === 401 || e.status === 403 ? "Log in again." : e.message);
  }
});
