// The rollout page's charts (inline SVG from the page's embedded JSON) and its refresh loop.
// Vanilla, no dependencies: the controller may run on a machine with no internet access.
// Every string from the data goes in through textContent, never as markup.
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const HEIGHT = 240;
  const M = { l: 62, r: 18, t: 34, b: 32 };
  const ROLES = ["stable", "canary"];

  function el(name, attrs, parent) {
    const node = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    if (parent) parent.appendChild(node);
    return node;
  }

  function label(parent, x, y, words, cls, anchor) {
    const node = el("text", { x: x, y: y, class: cls || "", "text-anchor": anchor || "start" }, parent);
    node.textContent = words;
    return node;
  }

  function niceStep(span, ticks) {
    const raw = span / ticks;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * mag >= raw) return m * mag;
    return 10 * mag;
  }

  function timeStep(spanMs) {
    const seconds = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600];
    for (const s of seconds) if (spanMs / 1000 / s <= 8) return s * 1000;
    return 86400000 * Math.ceil(spanMs / 86400000 / 8);
  }

  function clock(ms, seconds) {
    const d = new Date(ms);
    const two = (n) => String(n).padStart(2, "0");
    const hm = two(d.getUTCHours()) + ":" + two(d.getUTCMinutes());
    return seconds ? hm + ":" + two(d.getUTCSeconds()) : hm;
  }

  function value(point, metric) {
    const v = point[metric];
    if (v === null || v === undefined) return null;
    return metric === "error_rate" ? v * 100 : v;
  }

  function format(v, metric, digits) {
    if (digits === undefined) digits = v < 10 ? 2 : v < 100 ? 1 : 0;
    return v.toFixed(digits) + (metric === "error_rate" ? "%" : " ms");
  }

  function draw(figure, data) {
    const metric = figure.dataset.metric;
    for (const old of figure.querySelectorAll("svg")) old.remove();
    const style = getComputedStyle(figure);
    const inner = figure.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
    const width = Math.max(480, Math.floor(inner || 960));
    const svg = el("svg", {
      width: width, height: HEIGHT, viewBox: "0 0 " + width + " " + HEIGHT,
      class: "chart-svg", role: "img", "aria-label": figure.dataset.metric,
    });
    const x0 = data.range.from_ms;
    const x1 = data.range.to_ms;
    const half = (data.range.bucket_s * 1000) / 2;
    const X = (t) => M.l + ((t - x0) / (x1 - x0)) * (width - M.l - M.r);
    const byRole = { canary: [], stable: [] };
    for (const p of data.series) if (byRole[p.role]) byRole[p.role].push(p);

    // The p95 charts (latency, time to first token) draw the limit: stable's p95 x (1 + increase).
    const increases = { p95_ms: data.thresholds.max_p95_increase, ttft_p95_ms: data.thresholds.max_ttft_p95_increase };
    const increase = increases[metric];
    const relative = increase !== undefined && increase !== null;
    const flat = metric === "error_rate" ? data.thresholds.max_error_rate * 100 : null;
    const limit = relative
      ? byRole.stable.filter((p) => p[metric] !== null && p[metric] !== undefined)
        .map((p) => ({ t: p.t_ms, v: p[metric] * (1 + increase) }))
      : [];

    let top = flat || 0;
    for (const role of ROLES) for (const p of byRole[role]) top = Math.max(top, value(p, metric) || 0);
    for (const p of limit) top = Math.max(top, p.v);
    if (top <= 0) top = metric === "error_rate" ? 2 : 10;
    const yStep = niceStep(top * 1.1, 4);
    const yMax = Math.ceil((top * 1.1) / yStep) * yStep;
    const Y = (v) => M.t + (1 - v / yMax) * (HEIGHT - M.t - M.b);
    const bottom = HEIGHT - M.b;

    const clipId = "clip-" + figure.id;
    const clip = el("clipPath", { id: clipId }, el("defs", {}, svg));
    el("rect", { x: M.l, y: M.t, width: width - M.l - M.r, height: bottom - M.t }, clip);

    // Steps as bands, each start as a marker.
    const bands = el("g", { class: "bands", "clip-path": "url(#" + clipId + ")" }, svg);
    const bandLabels = el("g", { class: "band-labels" }, svg);
    data.steps.forEach((step, i) => {
      if (step.start_ms === null) return;
      const end = step.end_ms === null ? x1 : step.end_ms;
      if (step.start_ms > x1 || end < x0) return;
      const a = X(Math.max(step.start_ms, x0));
      const b = X(Math.min(end, x1));
      el("rect", {
        x: a, y: M.t, width: Math.max(0, b - a), height: bottom - M.t,
        class: "band band-" + (i % 2) + " band-" + step.status, "data-step": step.index,
      }, bands);
      if (step.start_ms >= x0) {
        el("line", { x1: a, x2: a, y1: M.t, y2: bottom, class: "step-marker", "data-step": step.index }, bands);
      }
      const name = step.kind === "bake" ? "bake" : "step " + (step.index + 1);
      if (b - a > 44) label(bandLabels, a + 4, M.t + 12, name + " · " + step.weight + "%", "step-label");
    });

    // Grid and axes.
    const grid = el("g", { class: "grid" }, svg);
    let digits = 0;  // as many as the step needs: 2.5 -> 1, 0.25 -> 2, 50 -> 0
    while (digits < 4 && Math.abs(yStep * 10 ** digits - Math.round(yStep * 10 ** digits)) > 1e-6) digits++;
    for (let i = 0; i * yStep <= yMax + yStep / 1000; i++) {
      const v = i * yStep;
      el("line", { x1: M.l, x2: width - M.r, y1: Y(v), y2: Y(v), class: "gridline" }, grid);
      label(grid, M.l - 6, Y(v) + 4, format(v, metric, digits), "tick", "end");
    }
    const tStep = timeStep(x1 - x0);
    for (let t = Math.ceil(x0 / tStep) * tStep; t <= x1; t += tStep) {
      el("line", { x1: X(t), x2: X(t), y1: bottom, y2: bottom + 4, class: "axis" }, grid);
      label(grid, X(t), bottom + 16, clock(t, tStep < 60000), "tick", "middle");
    }
    el("line", { x1: M.l, x2: width - M.r, y1: bottom, y2: bottom, class: "axis" }, grid);

    // Thresholds.
    const plot = el("g", { class: "plot", "clip-path": "url(#" + clipId + ")" }, svg);
    if (flat !== null) {
      el("line", { x1: M.l, x2: width - M.r, y1: Y(flat), y2: Y(flat), class: "threshold" }, plot);
    }
    if (limit.length) {
      el("path", { d: limit.map((p, i) => (i ? "L" : "M") + X(p.t + half).toFixed(1) + " " + Y(p.v).toFixed(1)).join(" "), class: "threshold" }, plot);
    }

    // The two roles: a line with gaps where a bucket had no requests, and a point per bucket.
    for (const role of ROLES) {
      let d = "";
      let pen = "M";
      const points = el("g", { class: "points points-" + role }, plot);
      for (const p of byRole[role]) {
        const v = value(p, metric);
        if (v === null) { pen = "M"; continue; }
        const x = X(p.t_ms + half);
        const y = Y(v);
        d += pen + x.toFixed(1) + " " + y.toFixed(1) + " ";
        pen = "L";
        const dot = el("circle", { cx: x.toFixed(1), cy: y.toFixed(1), r: 2.6, class: "pt pt-" + role }, points);
        el("title", {}, dot).textContent =
          role + " " + clock(p.t_ms, true) + " UTC: " + format(v, metric) + " (" + p.requests + " requests, " + p.errors + " errors)";
      }
      if (d) el("path", { d: d.trim(), class: "line line-" + role, "data-role": role }, plot);
    }

    // The outcome, or now.
    const marks = el("g", { class: "marks" }, svg);
    const outcome = data.outcome;
    if (outcome && outcome.at_ms !== null && outcome.at_ms >= x0 && outcome.at_ms <= x1) {
      const x = X(outcome.at_ms);
      el("line", { x1: x, x2: x, y1: M.t - 4, y2: bottom, class: "outcome-marker outcome-" + outcome.kind }, marks);
      label(marks, x - 4, M.t - 8, outcome.kind.replace("_", " "), "outcome-label outcome-" + outcome.kind, "end");
    } else if (!outcome && data.range.now_ms >= x0 && data.range.now_ms <= x1) {
      const x = X(data.range.now_ms);
      el("line", { x1: x, x2: x, y1: M.t, y2: bottom, class: "now-marker" }, marks);
      label(marks, x + 3, bottom - 4, "now", "now-label");
    }

    // Legend.
    const legend = el("g", { class: "legend" }, svg);
    const entries = [["canary", "line-canary"], ["stable", "line-stable"]];
    if (metric === "error_rate") entries.push(["max " + format(flat, metric), "threshold"]);
    else if (relative) {
      entries.push([(metric === "ttft_p95_ms" ? "stable TTFT p95 × " : "stable p95 × ") + (1 + increase), "threshold"]);
    }
    for (const [words, cls] of entries) {
      el("line", { x1: 0, x2: 18, y1: 12, y2: 12, class: cls }, legend);
      label(legend, 24, 16, words, "legend-label");
    }

    if (!data.series.length) {
      const why = data.metrics.available ? "no requests in this range yet" : "metrics unavailable";
      label(svg, (M.l + width - M.r) / 2, (M.t + bottom) / 2, why, "chart-empty", "middle");
    }
    figure.appendChild(svg);
    // Measured after insertion: getComputedTextLength needs a rendered node.
    let lx = M.l;
    for (const node of legend.querySelectorAll("line")) {
      const text = node.nextSibling;
      node.setAttribute("x1", lx);
      node.setAttribute("x2", lx + 18);
      text.setAttribute("x", lx + 24);
      lx += 24 + text.getComputedTextLength() + 16;
    }
  }

  function pageData() {
    const node = document.getElementById("page-data");
    if (!node) return null;
    try {
      return JSON.parse(node.textContent);
    } catch (err) {
      return null;
    }
  }

  function render() {
    const data = pageData();
    if (data && data.series) {
      for (const figure of document.querySelectorAll("figure.chart")) draw(figure, data);
    }
    return data;
  }

  let last = null;
  let timer = null;

  function schedule(data, seconds) {
    if (timer) clearTimeout(timer);
    timer = null;
    const every = seconds || (data && data.refresh_s);
    if (every) timer = setTimeout(refresh, every * 1000);
  }

  async function refresh() {
    const status = document.getElementById("refresh-status");
    try {
      const response = await fetch(location.href, { cache: "no-store", headers: { Accept: "text/html" } });
      if (!response.ok && response.status !== 404) throw new Error("HTTP " + response.status);
      const doc = new DOMParser().parseFromString(await response.text(), "text/html");
      const fresh = doc.getElementById("page");
      if (!fresh) throw new Error("no page in the answer");
      document.getElementById("page").replaceWith(document.importNode(fresh, true));
      if (status) status.textContent = "";
    } catch (err) {
      if (status) status.textContent = "refresh failed (" + err.message + "); retrying";
      schedule(last, (last && last.refresh_s) || 5);
      return;
    }
    last = render();
    schedule(last);
  }

  let resizing = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizing);
    resizing = setTimeout(render, 150);
  });

  last = render();
  schedule(last);
})();
