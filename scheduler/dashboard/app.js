// sandfleet live dashboard: polls the Monitor's JSON API and renders three views.
// Plain JavaScript, no build step, no dependencies.
"use strict";

const REFRESH_MS = Number(document.querySelector('meta[name="sandfleet-refresh-ms"]').content) || 1000;
const STATES = ["running", "queued", "succeeded", "failed", "oom", "timed_out", "cancelled",
  "budget_exceeded", "stopped_by_rule", "awaiting_review", "rejected"];
const FAILED = ["failed", "oom", "timed_out", "budget_exceeded", "stopped_by_rule", "rejected"];
const main = document.getElementById("main");
const crumbs = document.getElementById("crumbs");
const live = document.getElementById("live");
const updated = document.getElementById("updated");
let lastOk = 0;
let lastBody = "";
let timer = null;
let selectedAttempt = null;

// -- formatting ------------------------------------------------------------------------
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) =>
  ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const argv = (a) => (a || []).map((w) => (/^[\w@%+=:,./-]+$/.test(w) ? w : `'${String(w).replace(/'/g, "'\\''")}'`)).join(" ");
const money = (s) => { const n = Number(s || 0); return n === 0 ? "$0" : n < 0.01 ? `$${n.toFixed(4)}` : `$${n.toFixed(2)}`; };
const num = (n) => (n == null ? "–" : Number(n).toLocaleString("en-US"));
const clock = (iso) => (iso ? new Date(iso).toLocaleTimeString("en-GB", { hour12: false }) : "–");
function bytes(n) {
  if (n == null) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0; let v = Number(n);
  while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
  return `${v < 10 && i ? v.toFixed(1) : Math.round(v)} ${u[i]}`;
}
function ago(iso, now) {
  if (!iso) return "–";
  const s = Math.max(0, Math.round(((now ? new Date(now) : new Date()) - new Date(iso)) / 1000));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}
const pill = (s) => `<span class="pill ${esc(s)}">${esc(String(s).replace(/_/g, " "))}</span>`;
const taskHref = (key) => "/task/" + key.split("/").map(encodeURIComponent).join("/");
const batchHref = (b) => "/batch/" + encodeURIComponent(b);
function meter(pct, label) {
  if (pct == null) return `<span class="faint">–</span>`;
  const w = Math.max(0, Math.min(100, pct));
  return `<span class="meter${pct >= 90 ? " hot" : ""}"><span style="width:${w}%"></span></span>${label}`;
}
function stateBar(states, total) {
  const sum = total || Object.values(states || {}).reduce((a, b) => a + b, 0) || 1;
  const parts = STATES.filter((s) => states?.[s]).map((s) =>
    `<span title="${esc(s)}: ${states[s]}" style="width:${(100 * states[s]) / sum}%;background:var(--s-${s})"></span>`);
  return `<div class="bar">${parts.join("")}</div>`;
}
function panel(title, body, extra = "", cls = "") {
  return `<section class="panel ${cls}"><h2>${title}${extra}</h2>${body}</section>`;
}
function table(head, rows, empty) {
  if (!rows.length) return `<div class="none">${empty}</div>`;
  const th = head.map((h) => (h.startsWith("#") ? `<th class="num">${h.slice(1)}</th>` : `<th>${h}</th>`)).join("");
  return `<table><thead><tr>${th}</tr></thead><tbody>${rows.join("")}</tbody></table>`;
}
function findingsFeed(list, empty = "No findings.") {
  if (!list.length) return `<div class="none">${empty}</div>`;
  return `<ul class="feed">${list.map((f) => `<li>
    <div class="meta"><span class="sev ${esc(f.severity)}">${esc(f.severity)}</span>
      <b>${esc(f.rule)}</b><span class="act ${esc(f.action)}">${esc(f.action)}</span>
      <a href="${taskHref(f.task)}" data-nav class="mono">${esc(f.task)}</a><span class="t">${clock(f.time)}</span></div>
    <div class="d">${esc(f.detail)} <span class="faint">· ${esc(f.status)}</span></div></li>`).join("")}</ul>`;
}

// -- views -----------------------------------------------------------------------------
function activeRows(active, now) {
  return active.map((a) => {
    const cmd = a.command ? argv(a.command) : "";
    const memPct = a.mem && a.mem_limit ? (100 * a.mem) / a.mem_limit : null;
    const llm = a.llm_in_flight ? `<span class="live-dot"></span>${a.llm_calls}` : num(a.llm_calls);
    return `<tr>
      <td><a href="${taskHref(a.task)}" data-nav class="mono">${esc(a.task_id)}</a>${a.attempt > 1 ? ` <span class="faint">#${a.attempt}</span>` : ""}</td>
      <td>${esc(a.team)}</td><td class="muted">${esc(a.node || "–")}</td><td class="muted">${esc(a.template || "–")}</td>
      <td class="num">${ago(a.started, now)}</td>
      <td class="cmd${a.command_running ? "" : " idle"}" title="${esc(cmd)}">${a.command_running ? '<span class="live-dot"></span>' : ""}${esc(cmd || "—")}</td>
      <td>${meter(a.cpu_pct, a.cpu_pct == null ? "" : `${Math.round(a.cpu_pct)}%`)}</td>
      <td>${meter(memPct, bytes(a.mem))}</td>
      <td class="num">${llm}</td><td class="num">${money(a.spend)}</td>
      <td class="num">${a.findings ? `<span class="sev high">${a.findings}</span>` : ""}</td></tr>`;
  });
}

function renderFleet(d) {
  crumbs.innerHTML = "";
  const st = d.states || {};
  const failed = FAILED.reduce((n, s) => n + (st[s] || 0), 0);
  const kpis = [
    ["Running", num(st.running || 0)], ["Queued", num(d.queue_depth)], ["Succeeded", num(st.succeeded || 0)],
    ["Failed", num(failed), failed ? "bad" : ""], ["Stopped by rule", num(st.stopped_by_rule || 0), st.stopped_by_rule ? "warn" : ""],
    ["Spend", money(d.spend.total)], ["Findings", num(d.findings.length), d.findings.length ? "warn" : ""],
    ["Egress denied", num(d.egress.denied || 0), d.egress.denied ? "warn" : ""],
  ].map(([l, v, c]) => `<div class="kpi ${c || ""}"><div class="v">${v}</div><div class="l">${l}</div></div>`).join("");
  const teams = Object.entries(d.teams).map(([t, s]) => {
    const total = Object.values(s).reduce((a, b) => a + b, 0);
    // the state bar sits under the team's name: a column of its own overflowed the panel
    return `<tr><td class="team">${esc(t)}${stateBar(s, total)}</td><td class="num">${num(s.queued || 0)}</td>
      <td class="num">${num(s.running || 0)}</td><td class="num">${num(s.succeeded || 0)}</td>
      <td class="num">${num(FAILED.reduce((n, k) => n + (s[k] || 0), 0))}</td><td class="num">${money(d.spend.by_team[t])}</td></tr>`;
  });
  const models = Object.entries(d.spend.by_model).map(([m, v]) => `<tr><td class="mono">${esc(m)}</td><td class="num">${money(v)}</td></tr>`);
  const batches = d.batches.slice().reverse().map((b) => `<tr>
    <td><a href="${batchHref(b.batch)}" data-nav class="mono">${esc(b.batch)}</a></td><td>${esc(b.team)}</td>
    <td class="num">${num(b.total)}</td><td style="width:40%">${stateBar(b.states, b.total)}</td>
    <td class="num">${money(b.spend)}</td><td class="muted">${clock(b.submitted)}</td></tr>`);
  const attention = d.escalated.length
    ? panel("Needs attention", findingsFeed(d.escalated), ` <span class="n">${d.escalated.length}</span>`, "attention") : "";
  return `<div class="kpis">${kpis}</div>
  <div class="grid"><div class="stack">
    ${panel("Active sandboxes", `<div class="scroll">${table(["Task", "Team", "Node", "Template", "#Up", "Current command", "CPU", "Memory", "#LLM", "#Spend", "#⚑"], activeRows(d.active, d.now), "No sandbox is running.")}</div>`, ` <span class="n">${d.active.length}</span>`)}
    ${panel("Batches", `<div class="scroll">${table(["Batch", "Team", "#Tasks", "Progress", "#Spend", "Submitted"], batches, "No batch yet.")}</div>`)}
  </div><div class="stack">
    ${attention}
    ${panel("Teams", table(["Team", "#Queued", "#Running", "#Done", "#Failed", "#Spend"], teams, "No task yet."))}
    ${panel("Spend by model", table(["Model", "#USD"], models, "No LLM call yet."))}
    ${panel("Findings", `<div class="scroll">${findingsFeed(d.findings)}</div>`, ` <span class="n">${d.findings.length}</span>`)}
  </div></div>`;
}

function renderBatch(d) {
  crumbs.innerHTML = `<span class="sep">/</span><span>batch</span><span class="sep">/</span><span class="mono">${esc(d.batch)}</span>`;
  const rows = d.tasks.map((t) => `<tr>
    <td><a href="${taskHref(t.task)}" data-nav class="mono">${esc(t.task_id || t.task.split("/").pop())}</a></td>
    <td>${pill(t.state)}</td><td class="num">${t.attempt}</td><td class="muted">${esc(t.node || "–")}</td>
    <td class="cmd${t.command_running ? "" : " idle"}">${esc(t.command ? argv(t.command) : "")}</td>
    <td class="num">${t.spend ? money(t.spend) : "–"}</td><td class="num">${t.findings || ""}</td></tr>`);
  const legend = STATES.filter((s) => d.states[s]).map((s) => `<span><i style="background:var(--s-${s})"></i>${s.replace(/_/g, " ")} ${num(d.states[s])}</span>`).join("");
  return `<div class="head"><h1>${esc(d.name)}</h1><div class="facts">
      <span>batch <b class="mono">${esc(d.batch)}</b></span><span>team <b>${esc(d.team)}</b></span>
      <span>tasks <b>${num(d.total)}</b></span><span>spend <b>${money(d.spend)}</b></span>
      <span>submitted <b>${clock(d.submitted)}</b></span></div></div>
    <div class="panel"><div class="body">${stateBar(d.states, d.total)}<div class="legend">${legend}</div></div></div>
    <div class="grid" style="margin-top:14px"><div class="stack">
      ${panel("Tasks", `<div class="scroll">${table(["Task", "State", "#Attempt", "Node", "Command", "#Spend", "#⚑"], rows, "No task.")}</div>`,
        ` <span class="n">${d.tasks.length < d.tasks_total ? `${d.tasks.length} of ${num(d.tasks_total)}` : d.tasks_total}</span>`)}
    </div><div class="stack">${panel("Findings", findingsFeed(d.findings))}</div></div>`;
}

function chart(samples) {
  if (samples.length < 2) return `<div class="none">Waiting for resource samples…</div>`;
  const W = 600, H = 170, L = 34, R = 8, T = 8, B = 18;
  const t0 = samples[0].t, t1 = samples[samples.length - 1].t, span = Math.max(1, t1 - t0);
  const x = (t) => L + ((t - t0) / span) * (W - L - R);
  const y = (p) => T + (1 - Math.min(p, 100) / 100) * (H - T - B);
  const limit = samples.reduce((m, s) => Math.max(m, s.mem_limit || 0), 0) || samples.reduce((m, s) => Math.max(m, s.mem || 0), 1);
  const cpu = samples.filter((s) => s.cpu_pct != null).map((s) => `${x(s.t).toFixed(1)},${y(s.cpu_pct).toFixed(1)}`);
  const mem = samples.filter((s) => s.mem != null).map((s) => `${x(s.t).toFixed(1)},${y((100 * s.mem) / limit).toFixed(1)}`);
  const area = mem.length ? `M${x(samples[0].t)},${y(0)} L${mem.join(" L")} L${x(t1)},${y(0)} Z` : "";
  const grid = [0, 25, 50, 75, 100].map((p) => `<line x1="${L}" x2="${W - R}" y1="${y(p)}" y2="${y(p)}"/><text x="${L - 4}" y="${y(p) + 3}" text-anchor="end">${p}%</text>`).join("");
  const secs = Math.round(span / 1000);
  return `<svg class="chart" viewBox="0 0 ${W} ${H}" preserveAspectRatio="none" role="img" aria-label="CPU and memory">
    <g class="grid">${grid}</g>
    <path d="${area}" fill="rgba(147,51,234,.12)" stroke="none"/>
    <polyline points="${mem.join(" ")}" fill="none" stroke="#9333ea" stroke-width="1.4"/>
    <polyline points="${cpu.join(" ")}" fill="none" stroke="#2563eb" stroke-width="1.6"/>
    <text x="${L}" y="${H - 4}">−${secs}s</text><text x="${W - R}" y="${H - 4}" text-anchor="end">now</text></svg>
    <div class="legend"><span><i style="background:#2563eb"></i>CPU % of limit</span>
    <span><i style="background:#9333ea"></i>memory % of ${bytes(limit)}</span>
    <span>pids ${num(samples[samples.length - 1].pids)}</span></div>`;
}

function renderTask(d) {
  const attempts = d.attempts;
  const a = attempts.find((x) => x.attempt === selectedAttempt) || attempts[0];
  crumbs.innerHTML = `<span class="sep">/</span><a href="${batchHref(d.batch)}" data-nav class="mono">${esc(d.batch)}</a>
    <span class="sep">/</span><span class="mono">${esc(d.task.split("/").pop())}</span>`;
  if (!a) return `<div class="head"><h1>${esc(d.task)}</h1>${pill(d.state)}</div><p class="empty">No attempt detail is held for this task.</p>`;
  const tabs = attempts.length > 1 ? `<div class="tabs">${attempts.map((x) =>
    `<a href="#" data-attempt="${x.attempt}" class="${x === a ? "on" : ""}">attempt ${x.attempt}</a>`).join("")}</div>` : "";
  const now = a.command ? `<div class="now${a.command_running ? "" : " idle"}"><span class="p">${a.command_running ? "$ " : "last: "}</span>${esc(argv(a.command))}</div>` : "";
  const cmds = a.commands.slice().reverse().map((c) => `<tr><td class="muted">${clock(c.time)}</td><td class="num faint">${esc(c.pid)}</td>
    <td class="cmd" title="${esc(argv(c.argv))}">${esc(argv(c.argv))}</td>
    <td class="num">${c.running ? '<span class="live-dot"></span>' : c.exit == null ? "" : `<span class="${c.exit === 0 ? "exit0" : "exitn"}">${c.exit}</span>`}</td>
    <td class="num muted">${c.duration_ms == null ? "" : `${num(Math.round(c.duration_ms))} ms`}</td></tr>`);
  const files = a.files.slice().reverse().map((f) => `<tr><td class="muted">${clock(f.time)}</td><td>${esc(f.op)}</td>
    <td class="cmd" title="${esc(f.path)}">${f.from ? `${esc(f.from)} → ` : ""}${esc(f.path)}</td><td class="num muted">${bytes(f.bytes)}</td></tr>`);
  const llm = a.llm_calls.slice().reverse().map((c) => `<tr><td class="muted">${clock(c.time)}</td><td class="mono">${esc(c.model)}</td>
    <td class="num">${num(c.tokens_in)}</td><td class="num">${num(c.tokens_out)}</td><td class="num muted">${num(Math.round(c.latency_ms || 0))} ms</td>
    <td class="num">${money(c.cost)}</td><td>${esc(c.status)}</td></tr>`);
  const gates = a.gates.map((g) => `<tr><td>${esc(g.gate)}</td><td>${g.passed ? '<span class="exit0">passed</span>' : '<span class="exitn">failed</span>'}</td><td class="wrap muted">${esc(g.detail)}</td></tr>`);
  const outcome = a.outcome && a.outcome.outcome ? ` <span>outcome <b>${esc(a.outcome.outcome)}</b></span><span>exit <b>${esc(a.outcome.exit_code ?? "–")}</b></span>` : "";
  return `<div class="head"><h1>${esc(d.task)}</h1>${pill(a.state)}<div class="facts">
      <span>team <b>${esc(d.team)}</b></span><span>attempt <b>${a.attempt}</b></span><span>node <b>${esc(a.node || "–")}</b></span>
      <span>template <b>${esc(a.template || "–")}</b></span><span>${a.ended ? "ran" : "up"} <b>${ago(a.started, a.ended || undefined)}</b></span>
      <span>spend <b>${money(a.spend)}</b></span>${outcome}</div></div>
    ${tabs}${now}
    <div class="grid halves"><div class="stack">
      ${panel("Resources", `<div class="body">${chart(a.samples)}</div>`)}
      ${panel("Commands", `<div class="scroll">${table(["Time", "#PID", "Command", "#Exit", "#Took"], cmds, "No command yet.")}</div>`, ` <span class="n">${num(a.commands.length)}</span>`)}
      ${panel("File changes", `<div class="scroll">${table(["Time", "Op", "Path", "#Size"], files, "No file changed yet.")}</div>`, ` <span class="n">${num(a.files.length)}</span>`)}
    </div><div class="stack">
      ${panel("LLM calls", `<div class="scroll">${table(["Time", "Model", "#In", "#Out", "#Latency", "#Cost", "Status"], llm, "No LLM call yet.")}</div>`,
        ` <span class="n">${num(a.llm.calls || 0)}</span><span class="right">${num(a.llm.tokens_in || 0)} in · ${num(a.llm.tokens_out || 0)} out · ${money(a.llm.cost)}</span>`)}
      ${panel("Findings", findingsFeed(a.findings, "No finding for this attempt."))}
      ${panel("Gates", table(["Gate", "Result", "Detail"], gates, "No gate result yet."))}
      ${panel("Egress", `<div class="body">allowed <b>${num(a.egress.allowed || 0)}</b> · denied <b>${num(a.egress.denied || 0)}</b>
        ${a.denied_hosts.length ? `<div class="mono muted">${a.denied_hosts.map(esc).join(", ")}</div>` : ""}</div>`)}
    </div></div>`;
}

// -- routing and polling -------------------------------------------------------------------
function route() {
  const p = decodeURIComponent(location.pathname);
  if (p.startsWith("/batch/")) return { view: "batch", id: p.slice(7), api: "/api/batch/" + encodeURIComponent(p.slice(7)) };
  if (p.startsWith("/task/")) return { view: "task", id: p.slice(6), api: "/api/task/" + p.slice(6).split("/").map(encodeURIComponent).join("/") };
  return { view: "fleet", api: "/api/fleet" };
}

function keepScroll(fn) {
  const tops = [...main.querySelectorAll(".scroll")].map((e) => e.scrollTop);
  const y = window.scrollY;
  fn();
  main.querySelectorAll(".scroll").forEach((e, i) => { e.scrollTop = tops[i] || 0; });
  window.scrollTo(0, y);
}

async function refresh() {
  clearTimeout(timer);
  const r = route();
  try {
    const res = await fetch(r.api, { cache: "no-store" });
    const body = await res.text();
    lastOk = Date.now();
    if (body !== lastBody) {
      lastBody = body;
      const d = JSON.parse(body);
      const html = !res.ok ? `<p class="empty">${esc(d.error || res.statusText)}</p>`
        : r.view === "batch" ? renderBatch(d) : r.view === "task" ? renderTask(d) : renderFleet(d);
      keepScroll(() => { main.innerHTML = html; });
      document.title = `${r.view === "fleet" ? "fleet" : r.id} · sandfleet`;
    }
  } catch (e) {
    console.warn("sandfleet: refresh failed", e);
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

function tickLive() {
  const age = lastOk ? (Date.now() - lastOk) / 1000 : Infinity;
  live.className = "live " + (age < 3 * REFRESH_MS / 1000 ? "ok" : age < 30 ? "stale" : "down");
  updated.textContent = lastOk ? `live · updated ${age < 1 ? "just now" : `${Math.round(age)}s ago`}` : "connecting…";
}

document.addEventListener("click", (e) => {
  const tab = e.target.closest("a[data-attempt]");
  if (tab) { e.preventDefault(); selectedAttempt = Number(tab.dataset.attempt); lastBody = ""; refresh(); return; }
  const a = e.target.closest("a[data-nav]");
  if (!a || e.metaKey || e.ctrlKey || e.shiftKey || a.origin !== location.origin) return;
  e.preventDefault();
  history.pushState(null, "", a.pathname);
  selectedAttempt = null; lastBody = ""; refresh();
});
window.addEventListener("popstate", () => { lastBody = ""; selectedAttempt = null; refresh(); });
setInterval(tickLive, 500);
refresh();
