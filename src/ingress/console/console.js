// The retro-fleet console: reads the admin API, draws what it reads, and
// calls the same admin routes the CLI does. Data from the fleet is only
// ever put in the page as text (textContent), never as markup.
"use strict";

const WINDOW_MS = 15 * 60 * 1000;
const KEY = "retro-fleet-key";
const state = { key: sessionStorage.getItem(KEY) || "", points: [], sample: null, feed: null };

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return e;
}

const fmt = {
  num(v, digits = 1) { return v == null ? "–" : Number(v).toFixed(v >= 100 ? 0 : digits); },
  ms(v) {
    if (v == null) return "–";
    if (v >= 1000) return (v / 1000).toFixed(v >= 10000 ? 0 : 1) + " s";
    return v.toFixed(v >= 10 ? 0 : 1) + " ms";
  },
  pct(v) { return v == null ? "–" : (v * 100).toFixed(1) + " %"; },
  age(ms) {
    if (!ms) return "–";
    const s = Math.round(ms / 1000);
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  },
};

// ---- the admin API ----

function authHeaders() {
  return state.key ? { Authorization: "Bearer " + state.key } : {};
}

async function api(method, path, body) {
  const init = { method, headers: authHeaders() };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  const json = await r.json().catch(() => ({}));
  if (r.status === 401 || r.status === 403) askForKey(json);
  if (!r.ok) throw new Error((json.error && json.error.message) || r.status + " " + r.statusText);
  return json;
}

function askForKey(json) {
  $("login").hidden = false;
  const msg = json && json.error ? json.error.message : "";
  $("login-error").textContent = state.key ? msg || "this key may not use the admin API" : "";
}

function notice(text) {
  const n = $("notice");
  n.textContent = text;
  n.hidden = !text;
}

async function act(button, method, path, body, done) {
  button.disabled = true;
  try {
    const out = await api(method, path, body);
    notice("");
    if (done) await done(out);
  } catch (e) {
    notice(e.message);
  } finally {
    button.disabled = false;
  }
}

// ---- the live feed: Server-Sent Events read with fetch, which can send a key ----

function setLink(cls, text) {
  const l = $("link");
  l.className = "link " + cls;
  l.textContent = text;
}

async function follow() {
  if (document.body.dataset.auth === "on" && !state.key) {
    askForKey();
    setLink("down", "needs an admin key");
    return;
  }
  const mine = {};
  state.feed = mine;
  while (state.feed === mine) {
    let r;
    try {
      r = await fetch("/v1/admin/console/events", { headers: authHeaders() });
    } catch (e) {
      setLink("down", "ingress unreachable");
      await sleep(2000);
      continue;
    }
    if (r.status === 401 || r.status === 403) {
      askForKey(await r.json().catch(() => ({})));
      setLink("down", "needs an admin key");
      return;
    }
    if (!r.ok || !r.body) {
      setLink("down", "feed refused: " + r.status);
      await sleep(2000);
      continue;
    }
    $("login").hidden = true;
    $("signout").hidden = !state.key;
    setLink("live", "live");
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done || state.feed !== mine) break;
        buf += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          onEvent(buf.slice(0, cut));
          buf = buf.slice(cut + 2);
        }
      }
    } catch (e) {
      // the connection dropped: connect again
    }
    setLink("", "reconnecting");
    await sleep(1000);
  }
}

function onEvent(block) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  if (!data.length) return;
  const msg = JSON.parse(data.join("\n"));
  if (name === "history") {
    state.points = msg.points;
    drawCharts();
  } else if (name === "sample") {
    state.sample = msg;
    state.points.push(msg.point);
    const since = msg.at_ms - WINDOW_MS;
    while (state.points.length && state.points[0].t < since) state.points.shift();
    render();
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Puts `fresh` nodes in `parent`, keeping the nodes that did not change: a
// button under the pointer stays the same button while the figures around
// it change at every sample. An element whose attributes changed (another
// worker, a button with another action) is replaced whole.
function patch(parent, fresh) {
  const old = [...parent.childNodes];
  fresh.forEach((n, i) => {
    const o = old[i];
    if (!o) parent.append(n);
    else if (o.nodeType === 3 && n.nodeType === 3) {
      if (o.data !== n.data) o.data = n.data;
    } else if (o.nodeType === 1 && n.nodeType === 1 && o.nodeName === n.nodeName && sameAttributes(o, n)) {
      patch(o, [...n.childNodes]);
    } else parent.replaceChild(n, o);
  });
  for (let i = fresh.length; i < old.length; i++) old[i].remove();
}

function sameAttributes(a, b) {
  if (a.attributes.length !== b.attributes.length) return false;
  for (const at of b.attributes) if (a.getAttribute(at.name) !== at.value) return false;
  return true;
}

// ---- pages ----

function render() {
  const s = state.sample;
  if (!s) return;
  const p = s.point;
  $("tile-rps").textContent = fmt.num(p.rps);
  $("tile-errors").textContent = fmt.num(p.errors_per_s, 2);
  $("tile-p95").textContent = fmt.ms(p.p95_ms);
  $("tile-hits").textContent = fmt.pct(p.hit_rate);
  $("tile-workers").textContent = s.workers.filter((w) => !w.draining).length + " / " + s.workers.length;
  $("tile-backlog").textContent = Object.values(p.models).reduce((a, m) => a + m.backlog, 0);
  drawCharts();
  renderQueues(s);
  renderModels(s);
  renderWorkers(s);
}

function renderQueues(s) {
  const out = [];
  if (s.queues_error) out.push(el("p", { class: "error" }, s.queues_error));
  for (const q of s.queues || []) {
    const paused = q.consumers.length > 0 && q.consumers.every((c) => c.paused);
    const head = el("div", { class: "queue-head" },
      el("strong", {}, q.priority),
      el("span", { class: "badge" + (paused ? " paused" : "") }, paused ? "paused" : "delivering"),
      el("span", {}, q.messages + " stored"),
      paused
        ? el("button", { type: "button", "data-action": "resume", "data-priority": q.priority,
            onclick: (e) => act(e.target, "POST", `/v1/admin/queues/${q.priority}/resume`) }, "Resume")
        : el("button", { type: "button", class: "quiet", "data-action": "pause", "data-priority": q.priority,
            onclick: (e) => act(e.target, "POST", `/v1/admin/queues/${q.priority}/pause`) }, "Pause"));
    const rows = q.consumers.map((c) => el("tr", {},
      el("td", {}, c.name), el("td", {}, c.pending), el("td", {}, c.in_flight), el("td", {}, c.redelivered),
      el("td", {}, c.paused ? "paused" + (c.pause_remaining_secs ? ` (${fmt.age(c.pause_remaining_secs * 1000)} left)` : "") : "")));
    const table = el("table", {},
      el("thead", {}, el("tr", {}, ...["Consumer", "Waiting", "In flight", "Redelivered", ""].map((h) => el("th", {}, h)))),
      el("tbody", {}, ...rows));
    out.push(el("div", { class: "queue", "data-priority": q.priority }, head, el("div", { class: "scroll" }, table)));
  }
  patch($("queue-list"), out);
}

function renderModels(s) {
  const rows = s.scaling.map((r) => {
    const oldest = Math.max(r.oldest_wait_ms.high, r.oldest_wait_ms.normal, r.oldest_wait_ms.low);
    return el("tr", {},
      el("td", {}, r.model),
      el("td", {}, `${r.backlog.high} / ${r.backlog.normal} / ${r.backlog.low}`),
      el("td", {}, fmt.age(oldest)),
      el("td", {}, fmt.num(r.arrival_rate)),
      el("td", {}, r.workers), el("td", {}, r.replicas), el("td", {}, r.reason));
  });
  if (!rows.length) rows.push(el("tr", {}, el("td", { colSpan: 7, class: "hint" }, "no scaling reports (is `retro-fleet scaler` running?)")));
  patch($("models-table").tBodies[0], rows);
}

function renderWorkers(s) {
  const now = s.at_ms;
  const rows = s.workers.map((w) => {
    const drained = w.draining;
    const button = drained
      ? el("button", { type: "button", "data-action": "resume", onclick: (e) => act(e.target, "POST", `/v1/admin/workers/${encodeURIComponent(w.id)}/resume`) }, "Resume")
      : el("button", { type: "button", class: "quiet", "data-action": "drain", onclick: (e) => act(e.target, "POST", `/v1/admin/workers/${encodeURIComponent(w.id)}/drain`) }, "Drain");
    return el("tr", { "data-id": w.id },
      el("td", {}, w.id),
      el("td", {}, el("span", { class: "badge " + (drained ? "draining" : "serving") }, drained ? "draining" : "serving")),
      el("td", {}, w.models.join(", ")),
      el("td", {}, `${w.inflight} / ${w.capacity}`),
      el("td", {}, fmt.num(w.throughput)),
      el("td", {}, w.latency_ms == null ? "–" : fmt.num(w.latency_ms)),
      el("td", {}, fmt.age(now - w.started_ms)),
      el("td", {}, button));
  });
  if (!rows.length) rows.push(el("tr", {}, el("td", { colSpan: 8, class: "hint" }, "no live workers")));
  patch($("workers-table").tBodies[0], rows);
}

async function loadDlq() {
  const q = new URLSearchParams();
  for (const [k, v] of new FormData($("dlq-filter"))) if (v) q.set(k, v);
  q.set("limit", "200");
  try {
    const out = await api("GET", "/v1/admin/dlq?" + q);
    const rows = out.letters.map((l) => el("tr", { class: "clickable", "data-seq": l.seq, onclick: () => showLetter(l.seq) },
      el("td", {}, l.seq), el("td", {}, l.time), el("td", {}, l.priority), el("td", {}, l.model),
      el("td", {}, l.id || "–"), el("td", {}, l.tenant), el("td", {}, l.code), el("td", {}, l.deliveries),
      el("td", {}, l.id
        ? el("button", { type: "button", "data-action": "replay", onclick: (e) => { e.stopPropagation(); replay(e.target, l); } }, "Replay")
        : "")));
    if (!rows.length) rows.push(el("tr", {}, el("td", { colSpan: 9, class: "hint" }, "no dead letters")));
    patch($("dlq-table").tBodies[0], rows);
    notice("");
  } catch (e) {
    notice(e.message);
  }
}

function replay(button, l) {
  const body = { filter: { id: l.id, model: l.model, tenant: l.tenant }, limit: 1 };
  act(button, "POST", "/v1/admin/dlq/replay", body, async (out) => {
    await loadDlq();
    notice(`replayed ${out.replayed}, skipped ${out.skipped}`);
  });
}

async function showLetter(seq) {
  try {
    const l = await api("GET", `/v1/admin/dlq/${seq}`);
    $("letter").hidden = false;
    $("letter-title").textContent = `Letter ${l.seq}: ${l.code} (${l.model}, ${l.priority})`;
    $("letter-message").textContent = l.message;
    const headers = l.headers.map(([k, v]) => `${k}: ${v}`).join("\n");
    const payload = typeof l.payload === "string" ? l.payload : JSON.stringify(l.payload, null, 2);
    $("letter-body").textContent = `${headers}\n\n${payload}`;
  } catch (e) {
    notice(e.message);
  }
}

async function loadBatches() {
  try {
    const out = await api("GET", "/v1/admin/batches?limit=50");
    const rows = out.data.map((b) => {
      const c = b.request_counts;
      const done = c.completed + c.failed;
      const bar = el("span", { class: "bar" }, el("span"));
      bar.firstChild.style.width = (c.total ? (100 * done) / c.total : 0) + "%";
      return el("tr", { "data-id": b.id },
        el("td", {}, b.id), el("td", {}, b.tenant), el("td", {}, b.endpoint), el("td", {}, b.priority),
        el("td", {}, new Date(b.created_at * 1000).toLocaleString()),
        el("td", {}, bar, `${done} / ${c.total}` + (c.failed ? ` (${c.failed} failed)` : "")),
        el("td", {}, b.status));
    });
    if (!rows.length) rows.push(el("tr", {}, el("td", { colSpan: 7, class: "hint" }, "no batches")));
    patch($("batches-table").tBodies[0], rows);
  } catch (e) {
    notice(e.message);
  }
}

// ---- charts: inline SVG, one polyline per series ----

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text != null) e.textContent = text;
  return e;
}

// series: [{name, get(point) -> number|null, dashed}]. The time axis spans
// the points there are, from one minute up to the 15 minutes kept.
function chart(target, points, series, format) {
  const W = 600, H = 180, L = 48, R = 8, T = 18, B = 20;
  const end = points.length ? points[points.length - 1].t : Date.now();
  const span = Math.min(WINDOW_MS, Math.max(60000, points.length ? end - points[0].t : 0));
  const start = end - span;
  let max = 0;
  for (const p of points) for (const s of series) { const v = s.get(p); if (v != null && v > max) max = v; }
  max = niceMax(max);
  const x = (t) => L + ((t - start) / span) * (W - L - R);
  const y = (v) => H - B - (v / max) * (H - T - B);
  const nodes = [];
  for (const f of [0, 0.5, 1]) {
    nodes.push(svg("line", { class: "grid", x1: L, x2: W - R, y1: y(max * f), y2: y(max * f) }));
    nodes.push(svg("text", { class: "axis", x: L - 6, y: y(max * f) + 4, "text-anchor": "end" }, format(max * f)));
  }
  for (const f of [1, 2 / 3, 1 / 3, 0]) {
    const ago = Math.round((span * f) / 1000);
    const label = f === 0 ? "now" : ago >= 60 ? `-${Math.round(ago / 60)} min` : `-${ago} s`;
    const anchor = f === 1 ? "start" : f === 0 ? "end" : "middle";
    nodes.push(svg("text", { class: "axis", x: x(end - span * f), y: H - 4, "text-anchor": anchor }, label));
  }
  let lx = L + 4;
  series.forEach((s, i) => {
    const pts = points.map((p) => [p.t, s.get(p)]).filter(([, v]) => v != null);
    const cls = `line s${i % 4}` + (s.dashed ? " dashed" : "");
    if (pts.length) nodes.push(svg("polyline", { class: cls, points: pts.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" ") }));
    nodes.push(svg("rect", { class: `s${i % 4}`, x: lx, y: 4, width: 10, height: 4 }));
    nodes.push(svg("text", { class: "legend", x: lx + 14, y: 10 }, s.name));
    lx += 30 + s.name.length * 6.5;
  });
  target.replaceChildren(...nodes);
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

function drawCharts() {
  const pts = state.points;
  chart($("chart-rps"), pts, [
    { name: "requests/s", get: (p) => p.rps },
    { name: "errors/s", get: (p) => p.errors_per_s },
  ], (v) => fmt.num(v, v < 10 ? 1 : 0));
  chart($("chart-latency"), pts, [
    { name: "p50", get: (p) => p.p50_ms },
    { name: "p95", get: (p) => p.p95_ms },
    { name: "p99", get: (p) => p.p99_ms },
  ], fmt.ms);
  chart($("chart-hits"), pts, [{ name: "hit rate", get: (p) => p.hit_rate }], (v) => Math.round(v * 100) + "%");
  const models = [...new Set(pts.flatMap((p) => Object.keys(p.models)))].slice(0, 2);
  const series = models.flatMap((m) => [
    { name: `${m} recommended`, get: (p) => p.models[m] ? p.models[m].recommended : null, dashed: true },
    { name: `${m} live`, get: (p) => p.models[m] ? p.models[m].live : null },
  ]);
  chart($("chart-scaling"), pts, series, (v) => fmt.num(v, 0));
  // the backlog shares the chart as text: it is another scale
  const backlog = models.map((m) => `${m}: ${state.sample && state.sample.point.models[m] ? state.sample.point.models[m].backlog : 0} waiting`).join("   ");
  $("chart-scaling").append(svg("text", { class: "axis", x: 594, y: 30, "text-anchor": "end" }, backlog));
}

// ---- navigation ----

function show() {
  const tab = (location.hash || "#overview").slice(1);
  for (const s of document.querySelectorAll("section.page")) s.hidden = s.id !== tab;
  for (const a of document.querySelectorAll("#tabs a")) a.classList.toggle("active", a.dataset.tab === tab);
  const ready = document.body.dataset.auth !== "on" || state.key;
  if (ready && tab === "dlq") loadDlq();
  if (ready && tab === "batches") loadBatches();
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = $("key").value.trim();
    sessionStorage.setItem(KEY, state.key);
    $("login-error").textContent = "";
    follow();
    show();
  });
  $("signout").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    state.key = "";
    state.feed = null;
    location.reload();
  });
  $("dlq-filter").addEventListener("submit", (e) => { e.preventDefault(); loadDlq(); });
  window.addEventListener("hashchange", show);
  show();
  drawCharts();
  follow();
  // lists that are not in the feed are read again while their page is open
  setInterval(() => {
    if (document.hidden) return;
    if (location.hash === "#batches") loadBatches();
  }, 5000);
});
