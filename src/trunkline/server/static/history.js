// trunkline dashboard, history view: the usage report as SVG charts and a
// filterable job list, both read from the server's history store
// (/dashboard/usage and /dashboard/jobs: GET /v1/usage and GET /v1/jobs under
// the dashboard's cookie), so they survive restarts. Vanilla JS, no build
// step, nothing from elsewhere; every string from the server goes in as text.
"use strict";

(() => {
  const $ = (sel) => document.querySelector(sel);
  const SPANS = { "1h": 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400 };
  const POOL_COLORS = 8; // .p0 .. .p7 in history.css
  const SHORT = { month: "numeric", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false };
  let loaded = false;
  let jobsCursor = null;
  let jobsQuery = "";

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("data-")) node.setAttribute(k, String(v));
      else node[k] = v;
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
    return node;
  }

  // SVG nodes in the namespace of the page's own <svg> elements.
  function svgEl(svg, tag, attrs, text) {
    const node = document.createElementNS(svg.namespaceURI, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // Buckets are UTC hours or days (docs/api.md), so their labels are UTC too
  // (a local date would name a UTC day by the evening before it, west of
  // UTC); the tooltips say "UTC".
  function when(unix, bucket) {
    const d = new Date(unix * 1000);
    const date = `${d.getUTCMonth() + 1}/${d.getUTCDate()}`;
    if (bucket === "day") return date;
    return `${date} ${String(d.getUTCHours()).padStart(2, "0")}:00`;
  }

  function niceMax(v) {
    if (v <= 0) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  // ------------------------------------------------------------------ fetch
  async function getJson(path) {
    const resp = await fetch(path, { credentials: "same-origin" });
    let body = null;
    try { body = await resp.json(); } catch (_) { /* not JSON */ }
    if (!resp.ok) throw new Error((body && body.message) || `${resp.status} ${resp.statusText}`);
    return body;
  }

  function filters() {
    const span = $("#h-span").value;
    const since = Math.floor(Date.now() / 1000 - (SPANS[span] || 86400));
    return {
      since,
      bucket: $("#h-bucket").value,
      pool: $("#h-pool").value.trim(),
      state: $("#h-state").value,
      caller: $("#h-caller").value.trim(),
    };
  }

  function qs(pairs) {
    return pairs.filter(([, v]) => v !== "" && v !== null && v !== undefined)
      .map(([k, v]) => `${encodeURIComponent(k)}=${encodeURIComponent(v)}`).join("&");
  }

  async function refresh() {
    const f = filters();
    await Promise.all([loadUsage(f), loadJobs(f, false)]);
  }

  // ------------------------------------------------------------------ usage
  async function loadUsage(f) {
    const status = $("#h-usage-status");
    status.textContent = "loading";
    let report;
    try {
      report = await getJson("/dashboard/usage?" + qs([["since", f.since], ["bucket", f.bucket], ["pool", f.pool], ["events", 50]]));
    } catch (err) {
      status.textContent = "cannot load the usage report: " + err.message;
      return;
    }
    status.textContent = "";
    renderUsage(report);
  }

  function renderUsage(report) {
    const width = report.bucket_s;
    const first = Math.floor(report.since / width) * width;
    const starts = [];
    for (let t = first; t < report.until; t += width) starts.push(t);
    const pools = [...new Set(report.rows.map((r) => r.pool))].sort();
    const at = new Map(report.rows.map((r) => [`${r.pool}|${r.start}`, r]));
    const sum = (key) => starts.map((t) => pools.reduce((a, p) => a + ((at.get(`${p}|${t}`) || {})[key] || 0), 0));
    const perPool = (fn) => pools.map((p, i) => ({
      name: p || "(default)", cls: "p" + (i % POOL_COLORS),
      values: starts.map((t) => { const r = at.get(`${p}|${t}`); return r ? fn(r) : null; }),
    }));
    const ctx = { starts, bucket: report.bucket };
    bars($("#h-calls"), ctx, [
      { name: "requested", cls: "requested", values: sum("requested") },
      { name: "placed", cls: "placed", values: sum("placed") },
      { name: "refused", cls: "refused", values: sum("refused_total") },
    ]);
    bars($("#h-minutes"), ctx, [{ name: "agent minutes", cls: "minutes", values: sum("agent_minutes") }]);
    lines($("#h-peak"), ctx, perPool((r) => r.peak_concurrent), scaleMarks(report, starts));
    lines($("#h-wait"), ctx, [
      ...perPool((r) => r.queue_wait_s.p95).map((s) => ({ ...s, name: s.name + " p95" })),
      ...perPool((r) => r.queue_wait_s.p50).map((s) => ({ ...s, name: s.name + " p50", dash: true })),
    ]);
    renderUsageTable(report, pools);
    renderScaleList(report.scale_events || []);
    $("#history-view").setAttribute("data-loaded", String(report.rows.length));
  }

  function scaleMarks(report, starts) {
    const marks = [];
    for (const r of report.rows) {
      const n = Object.values(r.scale_events || {}).reduce((a, b) => a + b, 0);
      if (!n) continue;
      const up = (r.scale_events.up || 0) + (r.scale_events.replace || 0);
      marks.push({ i: starts.indexOf(r.start), up: up >= n - up, title: `${r.pool}: ` +
        Object.entries(r.scale_events).map(([k, v]) => `${k} ${v}`).join(", ") });
    }
    return marks.filter((m) => m.i >= 0);
  }

  function frame(svg, ctx, max, legend) {
    const w = svg.clientWidth || 600, h = svg.clientHeight || 180;
    svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
    svg.replaceChildren();
    const pad = { l: 40, r: 8, t: 18, b: 20 };
    const pw = w - pad.l - pad.r, ph = h - pad.t - pad.b;
    const n = Math.max(ctx.starts.length, 1);
    const x = (i) => pad.l + (i + 0.5) * (pw / n);
    const y = (v) => pad.t + ph - (v / max) * ph;
    for (let k = 0; k <= 4; k++) {
      const v = (max * k) / 4;
      svg.append(svgEl(svg, "line", { class: "grid", x1: pad.l, x2: w - pad.r, y1: y(v), y2: y(v) }));
      svg.append(svgEl(svg, "text", { class: "axis", x: pad.l - 4, y: y(v) + 4, "text-anchor": "end" },
        Number.isInteger(v) ? String(v) : v.toFixed(1)));
    }
    const every = Math.max(1, Math.ceil(n / 6));
    ctx.starts.forEach((t, i) => {
      if (i % every === 0) svg.append(svgEl(svg, "text", { class: "axis", x: x(i), y: h - 5, "text-anchor": "middle" }, when(t, ctx.bucket)));
    });
    let lx = pad.l;
    for (const s of legend) {
      svg.append(svgEl(svg, "rect", { class: "key " + s.cls, x: lx, y: 4, width: 10, height: 8 }));
      const label = svgEl(svg, "text", { class: "axis", x: lx + 13, y: 12 }, s.name);
      svg.append(label);
      lx += 20 + s.name.length * 6.5;
    }
    return { x, y, slot: pw / n, pad, h };
  }

  function bars(svg, ctx, series) {
    const max = niceMax(Math.max(0, ...series.flatMap((s) => s.values)));
    const f = frame(svg, ctx, max, series);
    const bw = Math.max(1, (f.slot * 0.8) / series.length);
    series.forEach((s, k) => {
      s.values.forEach((v, i) => {
        if (!v) return;
        const rect = svgEl(svg, "rect", { class: "bar " + s.cls, x: f.x(i) - (bw * series.length) / 2 + k * bw,
          y: f.y(v), width: bw, height: f.y(0) - f.y(v), "data-series": s.name, "data-value": v });
        rect.append(svgEl(svg, "title", {}, `${when(ctx.starts[i], ctx.bucket)} UTC ${s.name}: ${Math.round(v * 10) / 10}`));
        svg.append(rect);
      });
    });
    svg.setAttribute("data-points", String(series.reduce((a, s) => a + s.values.filter((v) => v).length, 0)));
  }

  function lines(svg, ctx, series, marks) {
    const all = series.flatMap((s) => s.values.filter((v) => v !== null));
    const max = niceMax(Math.max(0, ...all));
    const f = frame(svg, ctx, max, series);
    let points = 0;
    for (const s of series) {
      let d = "";
      s.values.forEach((v, i) => {
        if (v === null) return;
        d += (d ? " L" : "M") + f.x(i).toFixed(1) + " " + f.y(v).toFixed(1);
        const dot = svgEl(svg, "circle", { class: "dot " + s.cls, cx: f.x(i), cy: f.y(v), r: 2.5, "data-series": s.name, "data-value": v });
        dot.append(svgEl(svg, "title", {}, `${when(ctx.starts[i], ctx.bucket)} UTC ${s.name}: ${v}`));
        svg.append(dot);
        points += 1;
      });
      if (d) svg.append(svgEl(svg, "path", { class: "series " + s.cls + (s.dash ? " dash" : ""), d }));
    }
    for (const m of marks || []) {
      const cx = f.x(m.i), top = f.pad.t;
      const tri = svgEl(svg, "path", { class: "scale-mark " + (m.up ? "up" : "down"),
        d: m.up ? `M${cx - 5} ${top + 8} L${cx} ${top} L${cx + 5} ${top + 8} Z` : `M${cx - 5} ${top} L${cx} ${top + 8} L${cx + 5} ${top} Z` });
      tri.append(svgEl(svg, "title", {}, m.title));
      svg.append(tri);
    }
    svg.setAttribute("data-points", String(points));
    svg.setAttribute("data-marks", String((marks || []).length));
  }

  function renderUsageTable(report, pools) {
    const body = $("#h-usage tbody");
    if (!pools.length) {
      body.replaceChildren(el("tr", {}, el("td", { colSpan: 9, class: "empty", text: "no calls or scale events in this range" })));
      return;
    }
    body.replaceChildren(...pools.map((p) => {
      const rows = report.rows.filter((r) => r.pool === p);
      const total = (k) => rows.reduce((a, r) => a + r[k], 0);
      const refused = {};
      for (const r of rows) for (const [k, v] of Object.entries(r.refused)) refused[k] = (refused[k] || 0) + v;
      const scale = {};
      for (const r of rows) for (const [k, v] of Object.entries(r.scale_events)) scale[k] = (scale[k] || 0) + v;
      const maxOf = (fn) => rows.reduce((a, r) => (fn(r) === null ? a : Math.max(a, fn(r))), null);
      const fmt = (v) => (v === null ? "-" : v.toFixed(2));
      const cells = [p || "(default)", total("requested"), total("placed"),
        Object.entries(refused).map(([k, v]) => `${k} ${v}`).join(", ") || "0",
        total("agent_minutes").toFixed(1), maxOf((r) => r.peak_concurrent) ?? 0,
        fmt(maxOf((r) => r.queue_wait_s.p95)), fmt(maxOf((r) => r.queue_wait_s.max)),
        Object.entries(scale).map(([k, v]) => `${k} ${v}`).join(", ") || "-"];
      return el("tr", { "data-pool": p, "data-requested": total("requested") }, ...cells.map((c) => el("td", { text: String(c) })));
    }));
  }

  function renderScaleList(events) {
    const list = $("#h-scale");
    if (!events.length) { list.replaceChildren(el("li", { class: "empty", text: "no scale events in this range" })); return; }
    list.replaceChildren(...events.map((e) => el("li", { "data-kind": e.kind },
      el("span", { class: "t", text: new Date(e.at * 1000).toLocaleString([], { hour12: false }) }),
      `${e.pool}: ${e.kind} ${e.from} → ${e.to} replicas (demand: running ${e.demand.running}, queued ${e.demand.queued}, refused ${e.demand.refused})${e.reason ? ": " + e.reason : ""}`)));
  }

  // ------------------------------------------------------------------ jobs
  async function loadJobs(f, more) {
    const status = $("#h-jobs-status");
    if (!more) {
      jobsQuery = qs([["since", f.since], ["pool", f.pool], ["state", f.state], ["caller", f.caller], ["limit", 50]]);
      jobsCursor = null;
    }
    const q = jobsQuery + (more && jobsCursor ? "&cursor=" + encodeURIComponent(jobsCursor) : "");
    let page;
    try {
      page = await getJson("/dashboard/jobs?" + q);
    } catch (err) {
      status.textContent = "cannot list jobs: " + err.message;
      if (!more) $("#h-jobs tbody").replaceChildren();
      return;
    }
    jobsCursor = page.next_cursor || null;
    status.textContent = "";
    const rows = page.jobs.map((j) => {
      const tr = el("tr", { "data-job-id": j.job_id, "data-state": j.state },
        ...[j.job_id, j.agent_name || "(default)", j.state, j.sip ? j.sip.from : "-",
          new Date(j.created_at * 1000).toLocaleString([], SHORT),
          j.queue_wait_s.toFixed(2) + " s", j.reason || ""].map((t) => el("td", { text: String(t) })));
      tr.cells[2].className = "st-" + j.state;
      return tr;
    });
    const body = $("#h-jobs tbody");
    if (more) body.append(...rows);
    else body.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colSpan: 7, class: "empty", text: "no jobs match" }))]));
    $("#h-jobs-more").hidden = !jobsCursor;
  }

  // ------------------------------------------------------------------ view
  function show(view) {
    const past = view === "history";
    $("#live-view").hidden = past;
    $("#history-view").hidden = !past;
    $("#view-live").classList.toggle("on", !past);
    $("#view-history").classList.toggle("on", past);
    if (past && !loaded) { loaded = true; refresh(); }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("#view-live").addEventListener("click", () => { history.replaceState(null, "", "#"); show("live"); });
    $("#view-history").addEventListener("click", () => { history.replaceState(null, "", "#history"); show("history"); });
    $("#h-form").addEventListener("submit", (e) => { e.preventDefault(); refresh(); });
    $("#h-jobs-more").addEventListener("click", () => loadJobs(filters(), true));
    $("#h-jobs tbody").addEventListener("click", (e) => {
      const tr = e.target.closest("tr[data-job-id]");
      if (tr && window.trunkline) window.trunkline.openTrace(tr.getAttribute("data-job-id"));
    });
    if (location.hash === "#history") show("history");
  });
})();
