// PWFL live dashboard: state from GET /events (Server-Sent Events), drawn with uPlot and a canvas.
// A snapshot replaces the whole state (on connect and reconnect); a delta adds points and lease
// segments and replaces the summary (/status and busy times). A snapshot marked final is the
// run's end: the page closes the stream and keeps showing it after the server has gone.
// Accuracy comes in two kinds, drawn and labelled apart: "test" (the coordinator's central
// evaluation on the test set, evaluation_finished) and "validation" (the clients' held-out
// validation splits, validation_finished). Busy fractions come computed by the server, each
// of its own capacity (the evaluation thread apart from the round work), so none passes 100%.
"use strict";

const COLORS = ["#58a6ff", "#f0883e", "#3fb950", "#bc8cff", "#ff7b72", "#39c5cf", "#d29922",
                "#f778ba", "#a5d6ff", "#7ee787"];
const MAX_POINTS = 2000, MAX_SEGMENTS = 400, TIMELINE_WINDOW_S = 600;
const KNOWN_SLOT_KEYS = new Set(["slot_id", "round", "rounds", "rounds_done", "state", "clients",
  "last_accuracy", "best_accuracy", "evaluations", "accuracies", "config", "rounds_aggregated",
  "last_test_accuracy", "best_test_accuracy", "evaluated_round", "evaluation_lag_rounds",
  "last_validation_accuracy", "best_validation_accuracy", "validation_accuracies"]);

let S = null;                 // the run as last received
let receivedAt = 0;           // performance.now() at the last message: "now" advances from there
let connection = "connecting"; // connecting | live | lost | finished
let source = null, chart = null, chartKey = "", drawPending = false;

const $ = (id) => document.getElementById(id);
const esc = (v) => String(v).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
const pct = (v) => (v === null || v === undefined) ? "–" : `${(100 * v).toFixed(1)}%`;
const secs = (v) => v < 120 ? `${v.toFixed(1)} s` : `${Math.floor(v / 60)} min ${Math.round(v % 60)} s`;
const bytes = (n) => n >= 1 << 20 ? `${(n / (1 << 20)).toFixed(1)} MiB` : n >= 1024 ? `${(n / 1024).toFixed(1)} KiB` : `${n} B`;
const slotIds = () => (S.status.slots || []).map((s) => String(s.slot_id));
const pointsOf = (kind, slot) => ((kind === "test" ? S.accuracy : S.validation) || {})[slot] || [];
function slotColor(slot) {
  const ids = slotIds(), i = ids.indexOf(String(slot));
  return COLORS[(i < 0 ? ids.length : i) % COLORS.length];
}

function nowT() {
  if (!S) return 0;
  const live = connection === "live" && !S.final;
  return S.now_t + (live ? (performance.now() - receivedAt) / 1000 : 0);
}

// --- the stream -----------------------------------------------------------------------------

function connect() {
  source = new EventSource("/events");
  source.addEventListener("snapshot", (e) => {
    S = JSON.parse(e.data);
    S.validation = S.validation || {};
    received();
  });
  source.addEventListener("delta", (e) => {
    if (!S) return;
    const d = JSON.parse(e.data);
    for (const op of d.ops) apply(op);
    delete d.ops;
    Object.assign(S, d);
    received();
  });
  source.onerror = () => {  // EventSource reconnects by itself; a snapshot then resets the state
    if (connection !== "finished") { connection = "lost"; schedule(); }
  };
}

function received() {
  receivedAt = performance.now();
  connection = S.final ? "finished" : "live";
  if (S.final) source.close();
  schedule();
}

function apply(op) {
  const [seq, kind, ...rest] = op;
  if (seq <= S.seq) return;  // already in the snapshot this page started from
  S.seq = seq;
  if (kind === "run") S.run = rest[0];
  else if (kind === "acc" || kind === "val") {
    const [slot, ...point] = rest;  // [t, accuracy, round(, during_round)]
    const all = kind === "acc" ? S.accuracy : S.validation;
    const points = (all[slot] = all[slot] || []);
    points.push(point);
    if (points.length > MAX_POINTS) points.shift();
  } else if (kind === "seg") {
    const [client, seg] = rest;
    const segs = (S.timeline[client] = S.timeline[client] || []);
    const i = segs.findIndex((s) => s.slot === seg.slot && s.start === seg.start);
    if (i >= 0) segs[i] = seg; else segs.push(seg);
    if (segs.length > MAX_SEGMENTS) segs.shift();
  }
}

function schedule() {
  if (!drawPending) { drawPending = true; requestAnimationFrame(() => { drawPending = false; draw(); }); }
}

// --- drawing ----------------------------------------------------------------------------------

function draw() {
  if (!S) return;
  drawHeader();
  drawSlots();
  drawAccuracy();
  drawTimeline();
  drawBusy();
  drawUpdates();
  drawClients();
}

function drawHeader() {
  $("run-id").textContent = `run ${S.run_id}`;
  const r = S.run || {};
  const chips = [["task", r.task], ["strategy", r.strategy], ["policy", r.policy],
    ["quorum", r.quorum], ["clients/round", r.clients_per_round], ["deadline", r.deadline_s && `${r.deadline_s} s`],
    ["late", r.late_policy], ["model", r.model_nbytes && bytes(r.model_nbytes)], ["seed", r.seed],
    ["signed updates", r.signing === undefined ? undefined : (r.signing ? "yes" : "no")]];
  $("run-settings").innerHTML = chips.filter(([, v]) => v !== undefined && v !== null && v !== "")
    .map(([k, v]) => `<span class="chip">${esc(k)} <b>${esc(v)}</b></span>`).join("");
  const state = connection === "lost" ? "connection lost" : S.status.state;
  const badge = $("state");
  badge.textContent = state;
  badge.className = "badge " + (connection === "lost" ? "lost" : state.split(" ")[0]);
  $("elapsed").textContent = `${secs(nowT())} elapsed`;
  const banner = $("banner");
  banner.hidden = !(connection === "lost" || S.final);
  banner.className = "banner" + (connection === "lost" ? " lost" : "");
  banner.textContent = connection === "lost"
    ? "Connection to the coordinator lost: showing the last state received; reconnecting…"
    : `Run ${S.status.state}: final state after ${secs(S.now_t)} (the coordinator has stopped serving)`;
  document.title = `PWFL ${S.run_id}: ${state}`;
}

function slotConfig(slot) {
  const entries = Object.entries(slot.config || {});
  for (const [k, v] of Object.entries(slot)) {
    if (!KNOWN_SLOT_KEYS.has(k) && (typeof v !== "object" || v === null)) entries.push([k, v]);
  }
  if (!entries.length && S.run) {  // no per-slot configuration: the run's applies to every slot
    if (S.run.strategy) entries.push(["strategy", S.run.strategy]);
    if (S.run.clients_per_round) entries.push(["clients/round", S.run.clients_per_round]);
  }
  return entries;
}

function drawSlots() {
  $("slots").innerHTML = S.status.slots.map((slot) => {
    const aggregated = slot.rounds_aggregated ?? slot.rounds_done;
    const done = slot.rounds ? aggregated / slot.rounds : 0;
    const lag = slot.evaluation_lag_rounds;
    const lagText = lag === undefined ? "" : ` · evaluation lag <span class="lag${lag > 1 ? " behind" : ""}">${esc(lag)}</span> round${lag === 1 ? "" : "s"}`;
    const config = slotConfig(slot).map(([k, v]) =>
      `<dt>${esc(k)}</dt><dd title="${esc(v)}">${esc(typeof v === "number" ? +v.toPrecision(6) : v)}</dd>`).join("");
    const clients = slot.state === "training" && slot.clients.length ? slot.clients.join(", ") : "–";
    return `<div class="slot" style="--slot:${slotColor(slot.slot_id)}">
      <div class="slot-head"><span class="slot-name">slot ${esc(slot.slot_id)}</span>
        <span class="slot-state">${esc(slot.state)}</span></div>
      <div class="acc">
        <div class="kind validation"><div class="big">${pct(slot.last_validation_accuracy)}</div>
          <div class="label">validation · best ${pct(slot.best_validation_accuracy)}</div></div>
        <div class="kind test"><div class="big">${pct(slot.last_test_accuracy ?? slot.last_accuracy)}</div>
          <div class="label">test · best ${pct(slot.best_test_accuracy ?? slot.best_accuracy)}</div></div></div>
      <div class="progress"><div style="width:${(100 * done).toFixed(1)}%"></div></div>
      <div class="progress-text"><span class="rounds">${esc(aggregated)} of ${esc(slot.rounds)} rounds aggregated</span>${lagText}</div>
      <div class="progress-text">training: ${esc(clients)}</div>
      <dl class="config">${config}</dl></div>`;
  }).join("");
}

// One series per slot and kind that has points: [kind, slot id]; a test series for every slot.
function accuracySeries() {
  const out = [];
  for (const id of slotIds()) {
    out.push(["test", id]);
    if (pointsOf("validation", id).length) out.push(["validation", id]);
  }
  return out;
}

function accuracyData(series) {
  const xs = new Set();
  for (const [kind, id] of series) for (const p of pointsOf(kind, id)) xs.add(p[0]);
  const x = [...xs].sort((a, b) => a - b), index = new Map(x.map((t, i) => [t, i]));
  return [x, ...series.map(([kind, id]) => {
    const ys = new Array(x.length).fill(null);
    for (const p of pointsOf(kind, id)) ys[index.get(p[0])] = p[1];
    return ys;
  })];
}

function drawAccuracy() {
  const series = accuracySeries(), key = series.map((s) => s.join(":")).join(","), el = $("accuracy");
  if (chart && key !== chartKey) { chart.destroy(); chart = null; }
  if (!chart) {
    chartKey = key;
    const axis = { stroke: "#8a97a8", grid: { stroke: "#222c38" }, ticks: { stroke: "#263140" } };
    chart = new uPlot({
      width: el.clientWidth, height: 260,
      scales: { x: { time: false }, y: { range: (u, min, max) => [Math.max(0, Math.min(min, 1) - 0.05), Math.min(1, Math.max(max, 0) + 0.02)] } },
      axes: [{ ...axis, label: "seconds since start", labelSize: 18 },
             { ...axis, values: (u, v) => v.map((x) => `${Math.round(100 * x)}%`), size: 50 }],
      series: [{ label: "t", value: (u, v) => v === null ? "–" : `${v.toFixed(1)} s` },
        ...series.map(([kind, id]) => kind === "test"
          ? { label: `slot ${id} test`, stroke: slotColor(id), width: 2, spanGaps: true,
              points: { show: true, size: 5, fill: slotColor(id) }, value: (u, v) => pct(v) }
          : { label: `slot ${id} validation`, stroke: slotColor(id), width: 1.5, dash: [6, 4],
              spanGaps: true, points: { show: true, size: 4, fill: "#0f1419", stroke: slotColor(id) },
              value: (u, v) => pct(v) })],
      legend: { live: false },  // labels only: live values read "–" whenever the cursor is off
    }, accuracyData(series), el);
  } else {
    chart.setData(accuracyData(series));
  }
}

function drawTimeline() {
  const canvas = $("timeline"), ctx = canvas.getContext("2d"), dpr = window.devicePixelRatio || 1;
  const clients = Object.keys(S.timeline).concat((S.status.clients || []).map((c) => c.client_id))
    .filter((c, i, a) => a.indexOf(c) === i).sort((a, b) => (+a - +b) || a.localeCompare(b));
  const rowH = 24, top = 8, axisH = 22, left = 78, width = canvas.clientWidth;
  const height = top + clients.length * rowH + axisH;
  canvas.width = width * dpr; canvas.height = height * dpr; canvas.style.height = `${height}px`;
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const now = nowT(), first = S.active_t ?? 0;
  const t0 = Math.max(first - 0.02 * (now - first), now - TIMELINE_WINDOW_S, 0);
  const span = Math.max(now - t0, 1);
  const plotW = width - left - 10, x = (t) => left + ((t - t0) / span) * plotW;
  $("timeline-hint").textContent = now > TIMELINE_WINDOW_S ? `(last ${TIMELINE_WINDOW_S / 60} min)` : "";
  ctx.font = "12px system-ui, sans-serif";
  clients.forEach((client, row) => {
    const y = top + row * rowH;
    ctx.fillStyle = row % 2 ? "#151c24" : "#19212b";
    ctx.fillRect(left, y, plotW, rowH);
    ctx.fillStyle = "#d8dee9";
    ctx.textBaseline = "middle";
    ctx.fillText(`client ${client}`, 6, y + rowH / 2);
    for (const seg of S.timeline[client] || []) {
      const end = seg.end === null ? now : seg.end;
      if (end < t0) continue;
      const x0 = x(Math.max(seg.start, t0)), x1 = Math.max(x(end), x0 + 2);
      ctx.fillStyle = slotColor(seg.slot);
      ctx.globalAlpha = seg.end === null ? 1 : 0.8;
      ctx.fillRect(x0, y + 3, x1 - x0, rowH - 6);
      ctx.globalAlpha = 1;
      if (seg.outcome === "failed" || seg.outcome === "lost") {
        ctx.strokeStyle = "#f85149"; ctx.lineWidth = 2; ctx.strokeRect(x0, y + 3, x1 - x0, rowH - 6);
      }
      if (x1 - x0 > 44) {
        ctx.fillStyle = "#0f1419";
        ctx.fillText(`s${seg.slot} r${seg.round}`, x0 + 4, y + rowH / 2);
      }
    }
  });
  const bottom = top + clients.length * rowH;
  ctx.strokeStyle = "#8a97a8"; ctx.fillStyle = "#8a97a8"; ctx.lineWidth = 1;
  const step = niceStep(span / 8);
  for (let t = Math.ceil(t0 / step) * step; t <= now; t += step) {
    ctx.beginPath(); ctx.moveTo(x(t), bottom); ctx.lineTo(x(t), bottom + 4); ctx.stroke();
    ctx.textBaseline = "top"; ctx.fillText(`${+t.toFixed(1)} s`, x(t) - 10, bottom + 6);
  }
  if (!S.final) {
    ctx.strokeStyle = "#d8dee9"; ctx.setLineDash([3, 3]);
    ctx.beginPath(); ctx.moveTo(x(now), top); ctx.lineTo(x(now), bottom); ctx.stroke();
    ctx.setLineDash([]);
  }
}

function niceStep(raw) {
  const p = Math.pow(10, Math.floor(Math.log10(Math.max(raw, 1e-3))));
  return [1, 2, 5, 10].map((m) => m * p).find((s) => s >= raw);
}

function bar(label, fraction, cls = "") {
  const f = Math.max(0, Math.min(1, fraction || 0));
  return `<div class="bar ${cls}"><span>${esc(label)}</span><div class="track"><div class="fill"
    style="width:${(100 * f).toFixed(1)}%"></div></div><span class="num">${pct(fraction)}</span></div>`;
}

// Each bar is a share of its own capacity: the round work (publish, fold, aggregate,
// checkpoint: the union of their intervals) of the elapsed time, the evaluation thread(s) of
// elapsed x threads (evaluations run there beside the rounds), each client of the elapsed time.
function drawBusy() {
  const f = S.busy_fractions || { kinds: {}, clients: {} };
  let html = bar("coordinator: rounds", f.round_work);
  for (const kind of ["publish", "fold", "aggregate", "checkpoint"]) {
    if (S.coordinator_busy_s[kind]) html += bar(kind, f.kinds[kind], "sub");
  }
  const workers = S.eval_workers || 1;
  html += bar(workers > 1 ? `evaluation (${workers} threads)` : "evaluation thread", f.evaluation);
  const clients = Object.keys(f.clients).sort((a, b) => (+a - +b) || a.localeCompare(b));
  const busy = clients.map((c) => f.clients[c]);
  if (clients.length) html += bar("clients (mean)", busy.reduce((a, b) => a + b, 0) / clients.length);
  clients.forEach((c, i) => { html += bar(`client ${c}`, busy[i], "sub"); });
  $("busy").innerHTML = html;
}

function drawUpdates() {
  const c = S.status.counters || {}, rejected = S.status.rejected || {}, late = S.late || {};
  const rows = [["jobs published", c.jobs_published || 0, ""], ["updates folded", c.updates_folded || 0, ""],
    ["jobs failed", c.jobs_failed || 0, c.jobs_failed ? "warn" : ""],
    ["rounds failed (no quorum)", c.rounds_failed || 0, c.rounds_failed ? "bad" : ""], ["sep"],
    ["late: folded", late.folded || 0, ""], ["late: dropped", late.dropped || 0, late.dropped ? "warn" : ""], ["sep"],
    ["rejected", S.status.rejected_total || 0, S.status.rejected_total ? "bad" : ""],
    ...Object.entries(rejected).sort().map(([k, v]) => [k, v, "bad sub"]), ["sep"],
    ["bytes up (updates)", bytes(c.bytes_received || 0), ""], ["bytes published (models)", bytes(c.bytes_published || 0), ""]];
  $("updates").innerHTML = `<div class="kv">${rows.map(([k, v, cls]) => k === "sep" ? '<div class="sep"></div>'
    : `<span class="${cls.includes("sub") ? "sub" : ""}">${esc(k)}</span><span class="n ${cls}">${esc(v)}</span>`).join("")}</div>`;
}

function drawClients() {
  const busy = (S.busy_fractions || {}).clients || {};
  const rows = (S.status.clients || []).map((c) => {
    const lease = c.lease === null || c.lease === undefined ? "–"
      : `<span class="dot" style="background:${slotColor(c.lease)}"></span>slot ${esc(c.lease)}`;
    const alive = `<span class="dot" style="background:${c.alive ? "#3fb950" : "#f85149"}"></span>${c.alive ? "alive" : "lost"}`;
    return `<tr><td>${esc(c.client_id)}</td><td>${esc(c.agent_id || "")}</td><td>${alive}</td><td>${lease}</td>
      <td>${pct(busy[c.client_id] || 0)}</td></tr>`;
  }).join("");
  $("clients").innerHTML = `<tr><th>client</th><th>agent</th><th></th><th>training for</th><th>busy</th></tr>${rows}`;
}

window.addEventListener("resize", () => {
  if (chart) chart.setSize({ width: $("accuracy").clientWidth, height: 260 });
  schedule();
});
setInterval(() => { if (connection === "live") schedule(); }, 500);  // the timeline's "now" moves
connect();
