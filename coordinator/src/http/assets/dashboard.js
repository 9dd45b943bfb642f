// Drover dashboard: plain JavaScript, no dependencies. Lists are refreshed by polling the JSON endpoints
// every second; a step's log streams from /api/logs/... over one long response.
"use strict";

const $ = (sel) => document.querySelector(sel);
const POLL_MS = 1000;
const MAX_LOG_CHARS = 4 * 1024 * 1024;

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function ago(ms) {
  if (!ms) return "";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return s + "s ago";
  if (s < 3600) return Math.floor(s / 60) + "m ago";
  if (s < 86400) return Math.floor(s / 3600) + "h ago";
  return new Date(ms).toLocaleString();
}

function duration(from, to) {
  if (!from) return "";
  const s = Math.max(0, Math.round(((to || Date.now()) - from) / 1000));
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m " + (s % 60) + "s";
  return Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m";
}

function badge(state) {
  return '<span class="badge" data-state="' + esc(state) + '">' + esc(state.replace("_", " ")) + "</span>";
}

// ---------------------------------------------------------------- API token
// The JSON API needs a token with role read or higher. It is kept in sessionStorage (this tab only,
// gone when it closes), taken from the login form or from `?token=` in the address, which is then
// removed from the address bar and history.
const TOKEN_KEY = "drover-token";
(function tokenFromAddress() {
  const q = new URLSearchParams(location.search);
  const t = q.get("token");
  if (t) {
    sessionStorage.setItem(TOKEN_KEY, t.trim());
    q.delete("token");
    const rest = q.toString();
    history.replaceState(null, "", location.pathname + (rest ? "?" + rest : "") + location.hash);
  }
})();

function authHeaders() {
  const t = sessionStorage.getItem(TOKEN_KEY);
  return t ? { Authorization: "Bearer " + t } : {};
}

function askForToken(message) {
  const form = $("#login");
  if (!form.hidden) return;
  $("#login-message").textContent = message;
  form.hidden = false;
  $("#login-token").focus();
}

async function apiFetch(path, options) {
  const r = await fetch(path, Object.assign({ cache: "no-store", headers: authHeaders() }, options || {}));
  if (r.status === 401 || r.status === 403) {
    const why = (await r.text()).trim();
    askForToken(why);
    throw new Error(path + ": " + r.status + " " + why);
  }
  return r;
}

async function getJSON(path) {
  const r = await apiFetch(path);
  if (!r.ok) throw new Error(path + ": " + r.status + " " + (await r.text()).trim());
  return r.json();
}

// ---------------------------------------------------------------- ANSI SGR -> HTML

// 16 basic colours (normal, then bright).
const ANSI16 = ["#3b4048", "#e06c75", "#98c379", "#e5c07b", "#61afef", "#c678dd", "#56b6c2", "#d7dae0",
  "#7f848e", "#ff7b85", "#b5e890", "#ffd68a", "#82c4ff", "#e39bff", "#7fd8e3", "#ffffff"];

function color256(n) {
  if (n < 16) return ANSI16[n];
  if (n >= 232) { const v = 8 + (n - 232) * 10; return "rgb(" + v + "," + v + "," + v + ")"; }
  n -= 16;
  const c = (x) => (x === 0 ? 0 : 55 + x * 40);
  return "rgb(" + c(Math.floor(n / 36)) + "," + c(Math.floor(n / 6) % 6) + "," + c(n % 6) + ")";
}

// Converts text with ANSI escape sequences to HTML spans. Keeps its state across chunks, including an
// escape sequence split between two chunks. Every piece of text is HTML-escaped.
class AnsiToHtml {
  constructor() { this.reset(); this.pending = ""; }
  reset() { this.fg = null; this.bg = null; this.bold = false; this.dim = false; this.italic = false; this.underline = false; }
  sgr(params) {
    const p = params.length ? params.split(";").map((x) => (x === "" ? 0 : parseInt(x, 10))) : [0];
    for (let i = 0; i < p.length; i++) {
      const n = p[i];
      if (n === 0) this.reset();
      else if (n === 1) this.bold = true;
      else if (n === 2) this.dim = true;
      else if (n === 3) this.italic = true;
      else if (n === 4) this.underline = true;
      else if (n === 22) { this.bold = false; this.dim = false; }
      else if (n === 23) this.italic = false;
      else if (n === 24) this.underline = false;
      else if (n >= 30 && n <= 37) this.fg = ANSI16[n - 30];
      else if (n >= 90 && n <= 97) this.fg = ANSI16[n - 90 + 8];
      else if (n === 39) this.fg = null;
      else if (n >= 40 && n <= 47) this.bg = ANSI16[n - 40];
      else if (n >= 100 && n <= 107) this.bg = ANSI16[n - 100 + 8];
      else if (n === 49) this.bg = null;
      else if ((n === 38 || n === 48) && p[i + 1] === 5 && p.length > i + 2) {
        const c = color256(p[i + 2] & 255);
        if (n === 38) this.fg = c; else this.bg = c;
        i += 2;
      } else if ((n === 38 || n === 48) && p[i + 1] === 2 && p.length > i + 4) {
        const c = "rgb(" + (p[i + 2] & 255) + "," + (p[i + 3] & 255) + "," + (p[i + 4] & 255) + ")";
        if (n === 38) this.fg = c; else this.bg = c;
        i += 4;
      }
    }
  }
  span(text) {
    if (!text) return "";
    const cls = [];
    if (this.bold) cls.push("ansi-bold");
    if (this.dim) cls.push("ansi-dim");
    if (this.italic) cls.push("ansi-italic");
    if (this.underline) cls.push("ansi-underline");
    let style = "";
    if (this.fg) style += "color:" + this.fg + ";";
    if (this.bg) style += "background:" + this.bg + ";";
    if (!cls.length && !style) return esc(text);
    return "<span" + (cls.length ? ' class="' + cls.join(" ") + '"' : "") + (style ? ' style="' + style + '"' : "") + ">" + esc(text) + "</span>";
  }
  push(chunk) {
    let s = this.pending + chunk;
    this.pending = "";
    let out = "";
    let i = 0;
    while (i < s.length) {
      const e = s.indexOf("\x1b", i);
      if (e < 0) { out += this.span(s.slice(i).replace(/\r(?!\n)/g, "")); break; }
      out += this.span(s.slice(i, e).replace(/\r(?!\n)/g, ""));
      if (e + 1 >= s.length) { this.pending = s.slice(e); break; }
      if (s[e + 1] !== "[") { i = e + 2; continue; } // other escapes are dropped
      // CSI: parameters, then a final byte in @..~
      let j = e + 2;
      while (j < s.length && !(s.charCodeAt(j) >= 0x40 && s.charCodeAt(j) <= 0x7e)) j++;
      if (j >= s.length) {
        if (s.length - e < 64) this.pending = s.slice(e); // wait for the rest of the sequence
        break;
      }
      if (s[j] === "m") this.sgr(s.slice(e + 2, j));
      i = j + 1;
    }
    return out;
  }
}
window.AnsiToHtml = AnsiToHtml;

// ---------------------------------------------------------------- log streaming

let logStream = null; // { key, controller }

function stopLog() {
  if (logStream) { logStream.controller.abort(); logStream = null; }
}

async function openLog(runId, job, step) {
  const key = runId + "/" + job + "/" + step;
  if (logStream && logStream.key === key) return;
  stopLog();
  const controller = new AbortController();
  logStream = { key, controller };
  const pre = $("#log");
  pre.hidden = false;
  pre.innerHTML = "";
  pre.dataset.step = step;
  pre.dataset.complete = "false";
  $("#log-head").hidden = false;
  $("#log-title").textContent = job + " / " + step;
  $("#log-state").textContent = "streaming…";
  const conv = new AnsiToHtml();
  const dec = new TextDecoder("utf-8");
  const path = "/api/logs/" + encodeURIComponent(runId) + "/" + encodeURIComponent(job) + "/" + encodeURIComponent(step) + "?offset=0&follow=1";
  try {
    const r = await apiFetch(path, { signal: controller.signal });
    if (!r.ok) throw new Error((await r.text()).trim() || r.status);
    const reader = r.body.getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      const stick = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      pre.insertAdjacentHTML("beforeend", conv.push(dec.decode(value, { stream: true })));
      if (pre.innerHTML.length > MAX_LOG_CHARS) pre.innerHTML = pre.innerHTML.slice(-MAX_LOG_CHARS / 2);
      if (stick) pre.scrollTop = pre.scrollHeight;
    }
    pre.insertAdjacentHTML("beforeend", conv.push(dec.decode()));
    pre.dataset.complete = "true";
    $("#log-state").textContent = "complete";
  } catch (e) {
    if (e.name !== "AbortError") $("#log-state").textContent = "stream ended: " + e.message;
  }
}

// ---------------------------------------------------------------- views

let route = { view: "runs" };
let selectedJob = null;
let selectedStep = null;

function parseRoute() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  if (parts[0] === "run" && parts[1]) return { view: "run", id: parts[1], job: parts[2] || null, step: parts[3] || null };
  if (parts[0] === "agents") return { view: "agents" };
  if (parts[0] === "queue") return { view: "queue" };
  return { view: "runs" };
}

function show(view) {
  for (const v of document.querySelectorAll(".view")) v.hidden = v.id !== "view-" + view;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.id === "nav-" + (view === "run" ? "runs" : view));
}

async function renderRuns() {
  const runs = await getJSON("/api/runs?limit=100");
  const tb = $("#runs tbody");
  tb.innerHTML = runs.map((r) => {
    const counts = Object.entries(r.counts).map(([s, n]) => n + " " + s.replace("_", " ")).join(", ");
    return '<tr data-run="' + esc(r.id) + '" data-state="' + esc(r.state) + '">' +
      '<td class="mono">' + esc(r.id.slice(0, 8)) + "</td><td>" + esc(r.name) + "</td><td>" + badge(r.state) + "</td>" +
      "<td>" + esc(counts) + "</td><td>" + esc(ago(r.created_ms)) + "</td><td>" + esc(duration(r.created_ms, r.finished_ms)) + "</td></tr>";
  }).join("");
  $("#runs-empty").hidden = runs.length > 0;
}

function drawEdges(run) {
  const wrap = $("#dag-wrap");
  const svg = $("#dag-edges");
  const base = wrap.getBoundingClientRect();
  svg.setAttribute("width", wrap.scrollWidth);
  svg.setAttribute("height", wrap.scrollHeight);
  let paths = "";
  for (const j of run.jobs) {
    const to = wrap.querySelector('.job[data-job="' + CSS.escape(j.name) + '"]');
    for (const n of j.needs) {
      const from = wrap.querySelector('.job[data-job="' + CSS.escape(n) + '"]');
      if (!from || !to) continue;
      const a = from.getBoundingClientRect();
      const b = to.getBoundingClientRect();
      const x1 = a.right - base.left + wrap.scrollLeft, y1 = a.top + a.height / 2 - base.top;
      const x2 = b.left - base.left + wrap.scrollLeft, y2 = b.top + b.height / 2 - base.top;
      const mx = (x1 + x2) / 2;
      paths += '<path data-from="' + esc(n) + '" data-to="' + esc(j.name) + '" d="M' + x1 + "," + y1 + " C" + mx + "," + y1 + " " + mx + "," + y2 + " " + x2 + "," + y2 + '"/>';
    }
  }
  svg.innerHTML = paths;
}

async function renderRun() {
  const run = await getJSON("/api/run/" + encodeURIComponent(route.id));
  $("#view-run").dataset.run = run.id;
  $("#view-run").dataset.state = run.state;
  $("#run-name").textContent = run.name;
  $("#run-state").outerHTML = '<span id="run-state" class="badge" data-state="' + esc(run.state) + '">' + esc(run.state) + "</span>";
  $("#run-id").textContent = run.id;
  const layers = [];
  for (const j of run.jobs) (layers[j.depth] = layers[j.depth] || []).push(j);
  $("#dag").innerHTML = layers.map((l, d) => '<div class="layer" data-depth="' + d + '">' + (l || []).map((j) => {
    const meta = [j.state.replace("_", " ")];
    if (j.agent_id) meta.push(j.agent_id);
    if (j.failure !== "none") meta.push(j.failure);
    if (j.started_ms) meta.push(duration(j.started_ms, j.finished_ms));
    return '<div class="job' + (j.name === selectedJob ? " selected" : "") + '" data-job="' + esc(j.name) + '" data-state="' + esc(j.state) + '" data-failure="' + esc(j.failure) + '">' +
      '<div class="name">' + esc(j.name) + '</div><div class="meta">' + esc(meta.join(" · ")) + "</div></div>";
  }).join("") + "</div>").join("");
  drawEdges(run);
  if (!selectedJob && route.job) selectedJob = route.job;
  const job = run.jobs.find((j) => j.name === selectedJob);
  if (job) await renderJob(run, job); else { $("#job-detail").hidden = true; stopLog(); }
}

async function renderJob(run, job) {
  const d = $("#job-detail");
  d.hidden = false;
  d.dataset.job = job.name;
  d.dataset.state = job.state;
  $("#job-name").textContent = job.name;
  $("#job-state").outerHTML = '<span id="job-state" class="badge" data-state="' + esc(job.state) + '">' + esc(job.state.replace("_", " ")) + "</span>";
  const info = [];
  if (job.selector) info.push("agents: " + job.selector);
  if (job.needs.length) info.push("needs: " + job.needs.join(", "));
  if (job.agent_id) info.push("agent: " + job.agent_id);
  if (job.attempts) info.push("attempts: " + job.attempts);
  $("#job-info").textContent = info.join(" · ");
  const f = $("#job-failure");
  f.hidden = job.failure === "none" && !job.reason;
  f.dataset.failure = job.failure;
  f.textContent = (job.failure !== "none" ? job.failure + ": " : "") + job.reason + (job.exit_code ? " (exit " + job.exit_code + ")" : "");
  const ex = $("#job-explain");
  if (job.state === "queued" || job.state === "waiting") {
    const e = await getJSON("/api/explain/" + encodeURIComponent(run.id) + "/" + encodeURIComponent(job.name));
    ex.hidden = false;
    $("#explain-verdict").textContent = e.verdict;
    $("#explain-remedy").textContent = e.remedy;
    $("#explain-agents").hidden = e.agents.length === 0;
    $("#explain-agents tbody").innerHTML = e.agents.map((a) =>
      '<tr data-agent="' + esc(a.agent_id) + '"><td class="mono">' + esc(a.agent_id) + "</td><td>" + (a.matches ? "yes" : esc("no: " + a.mismatches.join(", "))) +
      "</td><td>" + (a.revoked ? "revoked" : a.connected ? "yes" : "no") + "</td><td>" + a.free + "/" + a.capacity + "</td><td>" + esc(a.busy_with.join(", ")) + "</td></tr>").join("");
  } else {
    ex.hidden = true;
  }
  $("#steps").innerHTML = job.steps.map((s) =>
    '<li class="step' + (s.name === selectedStep ? " selected" : "") + '" data-step="' + esc(s.name) + '" data-state="' + esc(s.state) + '">' +
    esc(s.name) + " " + badge(s.state) + ' <small>' + esc(s.image) + (s.log_bytes ? " · " + s.log_bytes + " B" : "") +
    (s.state === "failed" ? " · exit " + s.exit_code : "") + "</small></li>").join("");
  if (!selectedStep && route.step) selectedStep = route.step;
  if (selectedStep && job.steps.some((s) => s.name === selectedStep)) openLog(run.id, job.name, selectedStep);
}

async function renderAgents() {
  const agents = await getJSON("/api/agents");
  $("#agents tbody").innerHTML = agents.map((a) =>
    '<tr data-agent="' + esc(a.id) + '" data-state="' + esc(a.state) + '"><td class="mono">' + esc(a.id) + "</td><td>" + esc(a.hostname) + "</td><td>" + badge(a.state) + "</td><td>" +
    Object.entries(a.labels).map(([k, v]) => '<span class="label">' + esc(k + "=" + v) + "</span>").join("") + "</td><td>" +
    (a.capacity - a.free) + "/" + a.capacity + "</td><td>" +
    a.running.map((r) => '<a href="#/run/' + encodeURIComponent(r.run_id) + "/" + encodeURIComponent(r.job) + '">' + esc(r.job) + "</a>").join(", ") +
    "</td><td>" + esc(ago(a.last_seen_ms)) + "</td></tr>").join("");
  $("#agents-empty").hidden = agents.length > 0;
}

async function renderQueue() {
  const queues = await getJSON("/api/queue");
  const live = queues.filter((q) => q.depth > 0);
  $("#queue tbody").innerHTML = queues.map((q) =>
    '<tr data-selector="' + esc(q.selector) + '" data-depth="' + q.depth + '"><td class="mono">' + esc(q.selector || "(any agent)") + "</td><td>" + q.depth + "</td><td>" +
    (q.depth ? esc(Math.round(q.oldest_age_seconds) + "s") : "") + "</td><td>" + q.matching_agents + "</td><td>" + q.free_slots + "</td><td>" +
    q.jobs.map((j) => '<a href="#/run/' + encodeURIComponent(j.run_id) + "/" + encodeURIComponent(j.job) + '">' + esc(j.job) + "</a>").join(", ") + "</td></tr>").join("");
  $("#queue-empty").hidden = live.length > 0;
}

let busy = false;
async function refresh() {
  if (busy) return;
  busy = true;
  try {
    if (route.view === "runs") await renderRuns();
    else if (route.view === "run") await renderRun();
    else if (route.view === "agents") await renderAgents();
    else if (route.view === "queue") await renderQueue();
    $("#status").dataset.state = "ok";
    $("#status").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    $("#status").dataset.state = "error";
    $("#status").textContent = String(e.message || e);
  } finally {
    busy = false;
  }
}

function onRoute() {
  const next = parseRoute();
  if (next.view !== "run" || next.id !== route.id) { selectedJob = null; selectedStep = null; stopLog(); $("#log").hidden = true; $("#log-head").hidden = true; }
  if (next.view === "run" && next.job) { selectedJob = next.job; selectedStep = next.step; }
  const wanted = next.view === "run" && next.job && next.step ? next.id + "/" + next.job + "/" + next.step : null;
  if (logStream && logStream.key !== wanted) { stopLog(); $("#log").hidden = true; $("#log-head").hidden = true; }
  route = next;
  show(route.view);
  refresh();
}

document.addEventListener("click", (ev) => {
  const row = ev.target.closest("tr[data-run]");
  if (row) { location.hash = "#/run/" + encodeURIComponent(row.dataset.run); return; }
  const job = ev.target.closest(".job[data-job]");
  if (job && route.view === "run") {
    location.hash = "#/run/" + encodeURIComponent(route.id) + "/" + encodeURIComponent(job.dataset.job);
    return;
  }
  const step = ev.target.closest(".step[data-step]");
  if (step && route.view === "run" && selectedJob) {
    location.hash = "#/run/" + encodeURIComponent(route.id) + "/" + encodeURIComponent(selectedJob) + "/" + encodeURIComponent(step.dataset.step);
  }
});

$("#login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const t = $("#login-token").value.trim();
  if (!t) return;
  sessionStorage.setItem(TOKEN_KEY, t);
  $("#login-token").value = "";
  $("#login").hidden = true;
  refresh();
});

window.addEventListener("hashchange", onRoute);
window.addEventListener("resize", () => { if (route.view === "run") refresh(); });
onRoute();
setInterval(refresh, POLL_MS);
