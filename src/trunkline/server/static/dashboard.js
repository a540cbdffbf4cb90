// trunkline dashboard: vanilla JS, no build step, nothing fetched from elsewhere.
// Feed: server-sent events from /dashboard/stream (history, snapshot, sample).
// Every string from the server goes into the page as text, never as HTML.
"use strict";

(() => {
  const MAX_WINDOW_S = 300; // chart time window: grows from 1 to 5 minutes
  const TERMINAL = new Set(["succeeded", "failed", "rejected", "no_capacity", "worker_lost", "cancelled"]);
  const ANSWERS = {
    accepted: "accepted: assignment sent",
    rejected: "rejected (terminate=true: the job ends)",
    refused: "refused (terminate=false: re-placed)",
    offer_timeout: "no answer: offer withdrawn",
    offer_withdrawn: "offer withdrawn",
  };

  const $ = (sel) => document.querySelector(sel);
  let samples = [];
  let lastSnapshot = null;
  let traceJobId = null;
  let traceState = null;

  // ------------------------------------------------------------------ DOM helper
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k === "style") Object.assign(node.style, v); // CSSOM: allowed by the page's CSP
      else if (k.startsWith("data-")) node.setAttribute(k, String(v));
      else node[k] = v;
    }
    for (const c of children) {
      if (c !== null && c !== undefined) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function clock(unix) {
    if (!unix) return "-";
    const d = new Date(unix * 1000);
    return d.toLocaleTimeString([], { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
  }

  function ms(x) {
    if (x === null || x === undefined) return "-";
    if (x < 10) return x.toFixed(2) + " ms";
    if (x < 10000) return Math.round(x) + " ms";
    return (x / 1000).toFixed(1) + " s";
  }

  // ------------------------------------------------------------------ feed
  function connect() {
    const conn = $("#conn");
    const es = new EventSource("/dashboard/stream");
    es.addEventListener("open", () => { conn.textContent = "live"; conn.className = "conn live"; });
    es.addEventListener("error", () => {
      const closed = es.readyState === EventSource.CLOSED;
      conn.textContent = closed ? "disconnected: reload (a fresh link if access expired)" : "reconnecting";
      conn.className = "conn lost";
    });
    es.addEventListener("history", (e) => { samples = JSON.parse(e.data); drawChart(); });
    es.addEventListener("sample", (e) => {
      samples.push(JSON.parse(e.data));
      if (samples.length > 2000) samples.splice(0, samples.length - 2000);
      drawChart();
    });
    es.addEventListener("snapshot", (e) => render(JSON.parse(e.data)));
    es.addEventListener("expired", () => {
      es.close();
      conn.textContent = "access expired: open a fresh link";
      conn.className = "conn lost";
    });
  }

  // ------------------------------------------------------------------ snapshot
  function render(s) {
    lastSnapshot = s;
    renderTotals(s);
    renderPools(s);
    renderScaleEvents(s);
    renderJobs(s);
    if (traceJobId) {
      const row = s.jobs.find((j) => j.job_id === traceJobId);
      if (row && row.state !== traceState && traceState && !TERMINAL.has(traceState)) openTrace(traceJobId);
    }
  }

  function renderTotals(s) {
    const t = $("#totals");
    const running = s.workers.reduce((a, w) => a + w.running, 0);
    const queued = s.pools.reduce((a, p) => a + p.queued, 0);
    const ended = s.totals.ended || {};
    const parts = [
      ["workers", s.workers_total],
      ["running", running],
      ["queued", queued],
      ["requested", s.totals.requested],
      ["succeeded", ended.succeeded || 0],
      ["no capacity", ended.no_capacity || 0],
    ];
    t.replaceChildren(...parts.map(([k, v]) => el("span", {}, k + " ", el("b", { text: String(v) }))));
  }

  function slotCells(container, running, reserved, capacity) {
    const known = capacity !== null && capacity !== undefined;
    const n = known ? Math.max(capacity, running + reserved) : running + reserved + 1;
    while (container.children.length < n) container.append(el("i", { class: "slot free" }));
    while (container.children.length > n) container.lastChild.remove();
    for (let i = 0; i < n; i++) {
      let cls = "slot free";
      if (i < running) cls = "slot running";
      else if (i < running + reserved) cls = "slot reserved";
      else if (!known) cls = "slot unknown";
      const cell = container.children[i];
      if (cell.className !== cls) cell.className = cls;
    }
  }

  function renderPools(s) {
    const root = $("#pools");
    if (!s.pools.length) {
      root.replaceChildren(el("p", { class: "empty", text: "no pools yet: a worker registering creates its pool" }));
      return;
    }
    root.classList.add("pools");
    root.querySelector(".empty")?.remove();
    const byPool = new Map();
    for (const w of s.workers) {
      if (!byPool.has(w.agent_name)) byPool.set(w.agent_name, []);
      byPool.get(w.agent_name).push(w);
    }
    const seen = new Set();
    for (const p of s.pools) {
      seen.add(p.agent_name);
      let card = root.querySelector(`.pool[data-pool="${CSS.escape(p.agent_name)}"]`);
      if (!card) {
        card = el("div", { class: "pool", "data-pool": p.agent_name },
          el("div", { class: "pool-head" }), el("div", { class: "workers" }), el("div", { class: "replicas" }));
        root.append(card);
      }
      card.setAttribute("data-queued", String(p.queued));
      renderPoolHead(card.querySelector(".pool-head"), p);
      renderWorkers(card.querySelector(".workers"), byPool.get(p.agent_name) || []);
      renderReplicas(card.querySelector(".replicas"), p.replicas);
    }
    for (const card of root.querySelectorAll(".pool")) {
      if (!seen.has(card.getAttribute("data-pool"))) card.remove();
    }
  }

  function renderPoolHead(head, p) {
    const c = p.config;
    const quota = c.max_concurrent_jobs ? "/" + c.max_concurrent_jobs : "";
    const facts = [`active ${p.active_jobs}${quota}`, `free slots ${p.slots_free}`, `${p.workers} workers`, c.placement];
    if (c.max_jobs_per_worker) facts.push(`cap ${c.max_jobs_per_worker}/worker`);
    facts.push(`max wait ${c.queue_max_wait_s} s`);
    // Cluster mode: which member owns the pool (docs/cluster.md, "Visibility").
    if (p.owner) facts.push(`owner ${p.owner}${p.owner_unreachable ? " (unreachable: its numbers are this member's)" : ""}`);
    const ro = p.rollout;
    if (ro && ro.phase) {
      const pct = ro.phase === "canary" ? ` ${ro.canary_percent} %` : "";
      facts.push(`rollout ${ro.from || "?"} → ${ro.to}: ${ro.phase}${pct}${ro.reason ? " (" + ro.reason + ")" : ""}`);
    }
    head.replaceChildren(
      el("h3", { text: p.agent_name || "(default)" }),
      el("span", { class: "badge queue" + (p.queued ? " hot" : ""), "data-queue": p.queued, text: `queue ${p.queued}` }),
      ...facts.map((f) => el("span", { class: "fact", text: f })),
    );
  }

  function renderWorkers(box, workers) {
    const seen = new Set();
    if (!workers.length) {
      if (!box.querySelector(".empty")) box.replaceChildren(el("p", { class: "empty", text: "no workers connected" }));
      return;
    }
    box.querySelector(".empty")?.remove();
    for (const w of workers) {
      seen.add(w.worker_id);
      let row = box.querySelector(`.worker[data-worker-id="${CSS.escape(w.worker_id)}"]`);
      if (!row) {
        row = el("div", { class: "worker", "data-worker-id": w.worker_id },
          el("span", { class: "wid", text: w.worker_id }), el("span", { class: "wstate" }),
          el("span", { class: "slots" }), el("span", { class: "count" }));
        box.append(row);
      }
      row.setAttribute("data-running", String(w.running));
      row.setAttribute("data-reserved", String(w.reserved));
      row.setAttribute("data-state", w.state);
      const st = row.querySelector(".wstate");
      st.textContent = w.state;
      st.className = "wstate " + w.state;
      row.title = w.jobs.length ? "jobs: " + w.jobs.join(", ") : "no jobs";
      slotCells(row.querySelector(".slots"), w.running, w.reserved, w.capacity);
      const cap = w.capacity === null ? "?" : w.capacity;
      row.querySelector(".count").textContent = `${w.running + w.reserved}/${cap}`;
    }
    for (const row of box.querySelectorAll(".worker")) {
      if (!seen.has(row.getAttribute("data-worker-id"))) row.remove();
    }
  }

  function renderReplicas(box, replicas) {
    if (!Array.isArray(replicas) || !replicas.length) { box.replaceChildren(); return; }
    const rows = replicas.map((r) => {
      const id = r.replica_id ?? r.id ?? r.name ?? "?";
      const used = r.slots_used ?? r.used ?? r.running ?? 0;
      const cap = r.slots_cap ?? r.slots ?? r.capacity ?? r.max_jobs ?? null;
      const slots = el("span", { class: "slots" });
      slotCells(slots, Number(used) || 0, 0, typeof cap === "number" ? cap : null);
      return el("div", { class: "replica", "data-replica-id": id },
        el("span", { class: "wid", text: String(id) }), el("span", { class: "wstate", text: String(r.state ?? "?") }),
        slots, el("span", { class: "count", text: `${used}/${cap ?? "?"}` }),
        el("span", { class: "version", title: "version", text: r.version ? String(r.version) : "" }));
    });
    box.replaceChildren(el("div", { class: "replicas-title", text: "replicas" }), ...rows);
  }

  function renderScaleEvents(s) {
    const events = [];
    for (const p of s.pools) {
      for (const e of p.scale_events || []) events.push([p.agent_name, e]);
      for (const e of (p.rollout && p.rollout.events) || []) {
        events.push([p.agent_name, { at: e.at, rollout: `rollout ${e.kind}: ${e.detail}` }]);
      }
    }
    const card = $("#scale-card");
    card.hidden = events.length === 0;
    if (!events.length) return;
    events.sort((a, b) => (b[1].at || 0) - (a[1].at || 0));
    $("#scale-events").replaceChildren(...events.slice(0, 30).map(([pool, e]) => {
      let rest;
      if (e.rollout !== undefined) {
        rest = e.rollout;
      } else if (e.kind !== undefined && e.from !== undefined && e.to !== undefined) {
        const demand = e.demand && typeof e.demand === "object"
          ? ` demand ${e.demand.total ?? "?"} (running ${e.demand.running ?? 0}, queued ${e.demand.queued ?? 0}, refused ${e.demand.refused ?? 0})`
          : "";
        rest = `${e.kind} ${e.from} → ${e.to} replicas${demand}${e.reason ? ": " + e.reason : ""}`;
      } else {
        rest = Object.entries(e).filter(([k, v]) => k !== "at" && v !== null && v !== "")
          .map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ");
      }
      return el("li", {}, el("span", { class: "t", text: typeof e.at === "number" ? clock(e.at) : "" }),
        `${pool || "(default)"}: ${rest}`);
    }));
  }

  // Rows are keyed by job id and reused, so a click is never lost to a re-render.
  const jobRows = new Map();

  function renderJobs(s) {
    const body = $("#jobs tbody");
    if (!s.jobs.length) {
      jobRows.clear();
      body.replaceChildren(el("tr", {}, el("td", { colSpan: 6, class: "empty", text: "no jobs yet" })));
      return;
    }
    const keep = new Map();
    const rows = s.jobs.map((j) => {
      let tr = jobRows.get(j.job_id);
      if (!tr) {
        tr = el("tr", { "data-job-id": j.job_id }, ...Array.from({ length: 6 }, () => el("td")));
        tr.cells[0].textContent = j.job_id;
      }
      keep.set(j.job_id, tr);
      tr.setAttribute("data-state", j.state);
      tr.classList.toggle("selected", j.job_id === traceJobId);
      const texts = [j.job_id, j.agent_name || "(default)", j.state, j.worker_id || "-", clock(j.created_at), j.reason || ""];
      texts.forEach((text, i) => { if (tr.cells[i].textContent !== text) tr.cells[i].textContent = text; });
      tr.cells[2].className = "st-" + j.state;
      tr.cells[5].className = "reason";
      return tr;
    });
    jobRows.clear();
    for (const [k, v] of keep) jobRows.set(k, v);
    const current = Array.from(body.children);
    if (current.length !== rows.length || current.some((tr, i) => tr !== rows[i])) body.replaceChildren(...rows);
  }

  // ------------------------------------------------------------------ chart
  function drawChart() {
    const canvas = $("#chart");
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth, h = canvas.clientHeight;
    if (!w || !h) return;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const css = getComputedStyle(document.documentElement);
    const color = (n) => css.getPropertyValue(n).trim();
    const pad = { l: 34, r: 8, t: 8, b: 20 };
    const pw = w - pad.l - pad.r, ph = h - pad.t - pad.b;
    const now = samples.length ? samples[samples.length - 1].t : Date.now() / 1000;
    const span = samples.length ? now - samples[0].t : 0;
    const WINDOW_S = span > 60 ? MAX_WINDOW_S : 60;
    $("#chart-span").textContent = WINDOW_S === 60 ? "1 min" : "5 min";
    const t0 = now - WINDOW_S;
    const pts = samples.filter((s) => s.t >= t0);
    let max = 4;
    for (const s of pts) max = Math.max(max, s.running, s.queued, s.refused, s.replicas);
    const step = niceStep(max / 4);
    max = Math.ceil(max / step) * step;
    const x = (t) => pad.l + ((t - t0) / WINDOW_S) * pw;
    const y = (v) => pad.t + ph - (v / max) * ph;

    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = color("--dim");
    ctx.strokeStyle = color("--line");
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let v = 0; v <= max; v += step) {
      ctx.beginPath(); ctx.moveTo(pad.l, y(v) + 0.5); ctx.lineTo(w - pad.r, y(v) + 0.5); ctx.stroke();
      ctx.fillText(String(v), pad.l - 5, y(v));
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    const tick = WINDOW_S === 60 ? 15 : 60;
    for (let m = 0; m <= WINDOW_S / tick; m++) {
      const t = now - m * tick;
      const label = m === 0 ? "now" : tick === 60 ? `-${m}m` : `-${m * tick}s`;
      ctx.fillText(label, Math.min(Math.max(x(t), pad.l + 10), w - pad.r - 12), h - pad.b + 5);
    }
    if (!pts.length) return;
    // refused: bars per sample
    ctx.fillStyle = color("--refused");
    const bw = Math.max(2, pw / (WINDOW_S / 0.5) - 1);
    for (const s of pts) if (s.refused > 0) ctx.fillRect(x(s.t) - bw / 2, y(s.refused), bw, y(0) - y(s.refused));
    line(ctx, pts, x, y, "replicas", color("--replicas"), [5, 3], true);
    line(ctx, pts, x, y, "queued", color("--queued"), [], false);
    line(ctx, pts, x, y, "running", color("--running"), [], false);
  }

  function line(ctx, pts, x, y, key, stroke, dash, stepped) {
    ctx.save();
    ctx.strokeStyle = stroke;
    ctx.lineWidth = 2;
    ctx.setLineDash(dash);
    ctx.beginPath();
    pts.forEach((s, i) => {
      if (i === 0) ctx.moveTo(x(s.t), y(s[key]));
      else {
        if (stepped) ctx.lineTo(x(s.t), y(pts[i - 1][key]));
        ctx.lineTo(x(s.t), y(s[key]));
      }
    });
    ctx.stroke();
    ctx.restore();
  }

  function niceStep(raw) {
    const p = Math.pow(10, Math.floor(Math.log10(Math.max(raw, 1))));
    for (const m of [1, 2, 5, 10]) if (m * p >= raw) return m * p;
    return 10 * p;
  }

  // ------------------------------------------------------------------ trace
  async function openTrace(jobId) {
    traceJobId = jobId;
    for (const tr of document.querySelectorAll("#jobs tbody tr")) {
      tr.classList.toggle("selected", tr.getAttribute("data-job-id") === jobId);
    }
    const card = $("#trace-card");
    card.hidden = false;
    $("#trace-title").textContent = jobId;
    let job;
    try {
      const resp = await fetch(`/dashboard/jobs/${encodeURIComponent(jobId)}`, { credentials: "same-origin" });
      job = await resp.json();
      if (!resp.ok) throw new Error(job.message || resp.statusText);
    } catch (err) {
      $("#trace").replaceChildren(el("p", { class: "empty", text: "cannot load the trace: " + err.message }));
      return;
    }
    if (traceJobId !== jobId) return;
    traceState = job.state;
    renderTrace(job);
  }

  function traceRows(trace) {
    const rows = [];
    let open = null, n = 0;
    for (const ev of trace) {
      const t = ev.t_ms, wid = ev.worker_id || "";
      if (ev.event === "offered") {
        n += 1;
        open = { n, wid, t };
        rows.push({ t, name: `offer #${n}`, wid, detail: `offered to ${wid}`, cls: "offer" });
      } else if (ANSWERS[ev.event] && open && open.wid === wid) {
        let detail = `${ANSWERS[ev.event]}; after ${(t - open.t).toFixed(2)} ms`;
        if (ev.detail && !ev.detail.startsWith("terminate=")) detail += "; " + ev.detail;
        const cls = "answer " + (ev.event === "accepted" ? "good" : "bad");
        rows.push({ t, name: `answer #${open.n}: ${ev.event}`, wid, detail, cls });
        open = null;
      } else {
        if (TERMINAL.has(ev.event)) open = null;
        const cls = TERMINAL.has(ev.event) ? (ev.event === "succeeded" ? "good" : "bad") : "";
        rows.push({ t, name: ev.event, wid, detail: ev.detail || "", cls });
      }
    }
    return rows;
  }

  function renderTrace(job) {
    const trace = job.trace || [];
    const ended = job.ended_at ? (job.ended_at - job.created_at) * 1000 : (Date.now() / 1000 - job.created_at) * 1000;
    const total = Math.max(ended, trace.length ? trace[trace.length - 1].t_ms : 0, 1);
    const facts = [["state", job.state], ["queued", ms(job.queue_wait_s * 1000)]];
    if (job.placed_at) facts.push(["placed after", ms((job.placed_at - job.created_at) * 1000)], ["on", job.worker_id]);
    if (job.running_at && job.ended_at) facts.push(["ran", ms((job.ended_at - job.running_at) * 1000)]);
    if (job.reason) facts.push(["reason", job.reason]);

    // Phases: waiting (requested/queued → offer), offer (→ answer), starting (accepted → running), running (→ end).
    const bar = el("div", { class: "trace-bar" });
    let phase = "wait", from = 0;
    const close = (to) => {
      if (phase && to > from) {
        bar.append(el("div", { class: "seg " + phase, title: `${phase} ${ms(to - from)}`,
          style: { left: `${(from / total) * 100}%`, width: `${((to - from) / total) * 100}%` } }));
      }
    };
    for (const ev of trace) {
      const next = { offered: "offer", accepted: "starting", running: "run", migrated: "run", queued: "wait",
        refused: "wait", offer_timeout: "wait", offer_withdrawn: "wait", orphaned: "wait", redispatched: "wait" }[ev.event];
      if (next !== undefined || TERMINAL.has(ev.event)) {
        close(ev.t_ms);
        phase = TERMINAL.has(ev.event) ? null : next;
        from = ev.t_ms;
      }
      bar.append(el("div", { class: "mark", title: `+${ev.t_ms.toFixed(3)} ms ${ev.event}`,
        style: { left: `calc(${(ev.t_ms / total) * 100}% - 1px)` } }));
    }
    if (phase) close(total);

    const list = el("ul", { class: "trace-events" }, ...traceRows(trace).map((r) =>
      el("li", { class: "trace-event " + r.cls, "data-event": r.name },
        el("span", { class: "ev-t", text: `+${r.t.toFixed(3)} ms` }), el("span", { class: "ev-name", text: r.name }),
        el("span", { class: "wid", text: r.wid }), el("span", { class: "ev-detail", text: r.detail }))));
    $("#trace").replaceChildren(
      el("div", { class: "trace-facts" }, ...facts.map(([k, v]) => el("span", {}, k + " ", el("b", { text: String(v) })))),
      bar,
      el("div", { class: "trace-scale" }, el("span", { text: "+0 ms" }), el("span", { text: `+${ms(total)}` })),
      list,
    );
  }

  // The history view (history.js) opens traces of the rows it lists.
  window.trunkline = { openTrace };

  document.addEventListener("DOMContentLoaded", () => {
    $("#trace-close").addEventListener("click", () => {
      traceJobId = null;
      $("#trace-card").hidden = true;
      for (const tr of document.querySelectorAll("#jobs tbody tr.selected")) tr.classList.remove("selected");
    });
    window.addEventListener("resize", drawChart);
    $("#jobs tbody").addEventListener("click", (e) => {
      const tr = e.target.closest("tr[data-job-id]");
      if (tr) openTrace(tr.getAttribute("data-job-id"));
    });
    connect();
  });
})();
