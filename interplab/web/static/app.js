// interplab feature explorer: charts (Plotly, bundled locally), label editing, steering, attention views.
"use strict";
window.interplab = (function () {
  const cfg = { displayModeBar: false, responsive: true };
  const margin = { l: 50, r: 10, t: 10, b: 40 };

  function data(id) {
    const el = document.getElementById(id);
    return el ? JSON.parse(el.textContent) : null;
  }

  async function postJSON(url, body) {
    const r = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    const out = await r.json();
    if (!r.ok) throw new Error(out.error || r.statusText);
    return out;
  }

  // Plotly reads <b>, <a href>, <br> ... in labels as markup: token strings are text, so escape them
  function plotText(s) { return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;"); }

  function featurePage() {
    const d = data("feature-data");
    if (window.Plotly && d) {
      Plotly.newPlot("hist-chart", [{ type: "bar", x: d.hist.x, y: d.hist.y, marker: { color: "#d4580a" } }],
        { margin, xaxis: { type: "log", title: "activation" }, yaxis: { title: "count" }, bargap: 0.05 }, cfg);
      const pos = d.logits.pos.slice().reverse(), neg = d.logits.neg;
      Plotly.newPlot("logit-chart", [
        { type: "bar", orientation: "h", name: "promoted", y: pos.map((p, i) => plotText(p[0]) + " \u200b".repeat(i + 1)), x: pos.map(p => p[1]), marker: { color: "#2a7ab8" } },
        { type: "bar", orientation: "h", name: "suppressed", y: neg.map((p, i) => plotText(p[0]) + " \u200c".repeat(i + 1)), x: neg.map(p => p[1]), marker: { color: "#b83a2a" } },
      ], { margin: { l: 110, r: 10, t: 10, b: 30 }, showlegend: false, bargap: 0.15,
           height: Math.max(260, 15 * (pos.length + neg.length) + 50),
           yaxis: { automargin: true, dtick: 1, tickfont: { size: 10 } } }, cfg);
    }
    addToList();
    const form = document.getElementById("label-form");
    if (form) form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const status = document.getElementById("label-status");
      const text = document.getElementById("label-input").value;
      try {
        const out = await postJSON(form.dataset.url, { explanation: text });
        document.getElementById("label-text").textContent = out.explanation || "none yet";
        status.textContent = "saved";
      } catch (err) { status.textContent = "error: " + err.message; }
    });
    const steer = document.getElementById("steer-form");
    const strength = document.getElementById("steer-strength");
    if (strength) strength.addEventListener("input", () => {  // show the activation the strength means
      const v = parseFloat(strength.value) * parseFloat(steer.dataset.maxAct);
      document.getElementById("steer-scale").textContent = Number.isFinite(v) ? v.toPrecision(3) : "?";
    });
    if (steer) steer.addEventListener("submit", async (e) => {
      e.preventDefault();
      const out = document.getElementById("steer-out");
      out.textContent = "generating\u2026";
      const body = { prompt: document.getElementById("steer-prompt").value, mode: document.getElementById("steer-mode").value,
                     max_new_tokens: parseInt(document.getElementById("steer-n").value, 10) };
      if (strength) body.strength = parseFloat(strength.value);
      else body.value = parseFloat(document.getElementById("steer-value").value);
      try {
        const r = await postJSON(steer.dataset.url, body);
        out.innerHTML = "";
        for (const [name, text] of [["baseline", r.baseline_text], [r.description, r.steered_text]]) {
          const row = document.createElement("div"); row.className = "steer-row";
          const b = document.createElement("b"); b.textContent = name + ": "; row.appendChild(b);
          row.appendChild(document.createTextNode(text)); out.appendChild(row);
        }
      } catch (err) { out.textContent = "error: " + err.message; }
    });
  }

  function lines(container, curves) {
    const box = document.getElementById(container);
    if (!box || !window.Plotly) return;
    for (const [name, c] of Object.entries(curves)) {
      const div = document.createElement("div"); box.appendChild(div);
      Plotly.newPlot(div, [{ x: c.x, y: c.y, mode: "lines+markers", marker: { size: 3 } }],
        { margin: { l: 50, r: 10, t: 28, b: 30 }, title: { text: plotText(name), font: { size: 13 } } }, cfg);
    }
  }

  // the run's formation on one step axis: one stacked panel per series group (training loss, mechanism
  // scores, LLC total, LLC per component), the formation step dotted and the attribution window shaded
  // an LLC series' points by whether their chains mixed: filled where R-hat < the threshold, a larger hollow
  // crossed circle where not, plain where unknown (a report written before the diagnostics); the hover gives
  // R-hat and the bulk / tail ESS of each point
  function llcMarkers(tr, s, threshold) {
    const f = (v, d) => v === null ? "n/a" : v.toFixed(d);
    tr.marker = { size: s.mixed.map(m => m === false ? 9 : 4),
      symbol: s.mixed.map(m => m === false ? "circle-x-open" : "circle"),
      line: { width: s.mixed.map(m => m === false ? 1.5 : 0) } };
    tr.text = s.mixed.map((m, i) => "R-hat " + f(s.rhat[i], 3) + (m === false ? " \u2265 " + threshold + ": NOT mixed"
      : m ? " (mixed)" : "") + "<br>ESS bulk " + f(s.ess_bulk[i], 0) + " / tail " + f(s.ess_tail[i], 0));
    tr.hovertemplate = "step %{x}<br>LLC %{y:.4g}<br>%{text}<extra>" + plotText(s.name) + "</extra>";
  }

  function timeline(id, t) {
    const box = document.getElementById(id);
    if (!box || !window.Plotly || !t) return;
    const n = t.panels.length, gap = 0.04, h = (1 - gap * (n - 1)) / n;
    const traces = [], layout = { margin: { l: 60, r: 10, t: 10, b: 40 }, height: 180 * n + 60, shapes: [],
      annotations: [], legend: { font: { size: 10 } }, xaxis: { title: "step", anchor: "y" + (n > 1 ? n : "") } };
    t.panels.forEach((p, i) => {
      const ax = i === 0 ? "y" : "y" + (i + 1), top = 1 - i * (h + gap);
      layout["yaxis" + (i === 0 ? "" : i + 1)] = { domain: [top - h, top], title: { text: plotText(p.title), font: { size: 11 } } };
      for (const s of p.series) {
        const tr = { x: s.x, y: s.y, name: plotText(s.name), mode: "lines+markers", marker: { size: 3 }, xaxis: "x", yaxis: ax };
        if (s.err) tr.error_y = { type: "data", array: s.err.map(e => e === null ? 0 : e), visible: true, thickness: 1 };
        if (s.mixed) llcMarkers(tr, s, t.rhat_threshold);
        traces.push(tr);
      }
    });
    if (t.window) layout.shapes.push({ type: "rect", xref: "x", yref: "paper", x0: t.window[0], x1: t.window[1], y0: 0, y1: 1,
      fillcolor: "orange", opacity: 0.15, line: { width: 0 } });
    if (t.formation_step !== null) layout.shapes.push({ type: "line", xref: "x", yref: "paper", x0: t.formation_step,
      x1: t.formation_step, y0: 0, y1: 1, line: { dash: "dot", color: "gray" } });
    Plotly.newPlot(box, traces, layout, cfg);
  }

  function runPage() {
    const d = data("run-data");
    for (const c of d.charts) lines(c.id, c.curves);
    timeline("timeline-chart", d.timeline);
  }

  function attentionPage() {
    let result = null;
    const layerSel = document.getElementById("attn-layer"), headSel = document.getElementById("attn-head");
    const status = document.getElementById("attn-status");
    function draw() {
      if (!result) return;
      const z = result.patterns[+layerSel.value][+headSel.value];
      const labels = result.tokens.map((t, i) => i + ":" + plotText(t));
      Plotly.newPlot("attn-chart", [{ type: "heatmap", z, x: labels, y: labels, colorscale: "Oranges", zmin: 0, zmax: 1 }],
        { margin: { l: 90, r: 10, t: 10, b: 90 }, yaxis: { autorange: "reversed", title: "query" }, xaxis: { title: "key" } }, cfg);
    }
    function fill(sel, n) { sel.innerHTML = ""; for (let i = 0; i < n; i++) sel.add(new Option(String(i), String(i))); }
    layerSel.addEventListener("change", draw); headSel.addEventListener("change", draw);
    document.getElementById("attn-form").addEventListener("submit", async (e) => {
      e.preventDefault(); status.textContent = "running\u2026";
      try {
        result = await postJSON("/api/attention", { prompt: document.getElementById("attn-prompt").value });
        fill(layerSel, result.patterns.length); fill(headSel, result.patterns[0].length);
        status.textContent = result.tokens.length + " tokens"; draw();
      } catch (err) { status.textContent = "error: " + err.message; }
    });
  }

  // a decision-transformer run: the calibration curve and the trajectory player (one step at a time)
  function dtPage() {
    const d = data("dt-data");
    if (!d) return;
    const c = d.calibration;
    if (c && c.points.length && window.Plotly && document.getElementById("dt-calibration")) {
      const xs = c.points.map(p => p.target), ys = c.points.map(p => p.mean);
      const hasCI = c.points.every(p => p.ci_low !== null);
      const lo = Math.min(0, ...xs, ...ys), hi = Math.max(...xs, ...ys, 1e-9);
      const traces = [
        { x: [lo, hi], y: [lo, hi], mode: "lines", name: "achieved = target", line: { dash: "dot", color: "#999" } },
        { x: xs, y: ys, mode: "lines+markers", name: "mean achieved return", marker: { color: "#d4580a" },
          text: c.points.map(p => p.episodes + " episodes"),
          error_y: hasCI ? { type: "data", symmetric: false, array: c.points.map(p => p.ci_high - p.mean),
                              arrayminus: c.points.map(p => p.mean - p.ci_low) } : undefined },
      ];
      const shapes = c.data_range ? [{ type: "rect", xref: "x", yref: "paper", x0: c.data_range[0], x1: c.data_range[1],
        y0: 0, y1: 1, fillcolor: "#2a7ab8", opacity: 0.08, line: { width: 0 } }] : [];
      Plotly.newPlot("dt-calibration", traces, { margin, shapes, xaxis: { title: "target return" },
        yaxis: { title: "achieved return" }, legend: { orientation: "h" } }, cfg);
    }
    const pl = d.player;
    const epSel = document.getElementById("dt-episode"), slider = document.getElementById("dt-step");
    if (!pl || !epSel || !slider) return;
    const img = document.getElementById("dt-frame"), note = document.getElementById("dt-frame-note");
    img.addEventListener("error", () => { note.textContent = "no picture (the server needs the rl extra: minigrid)"; });
    img.addEventListener("load", () => { note.textContent = ""; });
    function show() {
      const ep = pl.episodes[+epSel.value], t = +slider.value;
      document.getElementById("dt-step-label").textContent = t + " / " + (ep.length - 1);
      img.src = "/run/" + d.index + "/dt/frame/" + ep.episode + "/" + t + ".png";
      document.getElementById("dt-action").textContent = ep.actions[t];
      document.getElementById("dt-reward").textContent = ep.rewards[t].toFixed(3);
      document.getElementById("dt-rtg").textContent = ep.rtg[t].toFixed(3);
      const probes = document.getElementById("dt-probes"), pr = ep.probes ? ep.probes[t] : null;
      if (probes) {
        probes.hidden = !(pr && pr.length);
        const body = probes.querySelector("tbody"); body.textContent = "";
        for (const [name, pred, p, truth] of pr || []) {
          const tr = document.createElement("tr");
          for (const v of [name, pred, p.toFixed(2), truth]) { const td = document.createElement("td"); td.textContent = v; tr.appendChild(td); }
          if (pred !== truth) tr.className = "wrong";
          body.appendChild(tr);
        }
      }
      const fbox = document.getElementById("dt-features-box"), fl = document.getElementById("dt-features");
      const fs = ep.features ? ep.features[t] : null;
      if (fbox && fl) {
        fbox.hidden = !ep.features; fl.textContent = "";
        for (const [f, a] of fs || []) {
          const el = document.createElement(pl.features_db ? "a" : "span");
          if (pl.features_db) el.href = "/db/" + encodeURIComponent(pl.features_db) + "/feature/" + f;
          el.className = "dt-feature"; el.textContent = f + " (" + a.toFixed(2) + ")";
          fl.appendChild(el); fl.appendChild(document.createTextNode(" "));
        }
        if (ep.features && !(fs && fs.length)) fl.textContent = "none fire";
      }
      const box = document.getElementById("dt-attention"), anote = document.getElementById("dt-attention-note");
      const row = ep.attention ? ep.attention[t] : null;
      if (row && window.Plotly) {
        const labels = (pl.attention_tokens && pl.attention_tokens.length === row.length) ? pl.attention_tokens : row.map((_, i) => String(i));
        Plotly.newPlot(box, [{ type: "bar", x: labels.map((l, i) => plotText(l) + "\u200b".repeat(i)), y: row, marker: { color: "#2a7ab8" } }],
          { margin, yaxis: { title: "attention", range: [0, 1] }, xaxis: { title: "token" } }, cfg);
        anote.textContent = "attention of the decision (state) token" + (pl.attention_site ? " · " + pl.attention_site : "");
      } else {
        if (window.Plotly) Plotly.purge(box);
        box.textContent = ""; anote.textContent = ep.attention ? "" : "no attention recorded for this episode (interplab dt analyze)";
      }
    }
    function episode() { slider.max = String(pl.episodes[+epSel.value].length - 1); slider.value = "0"; show(); }
    epSel.addEventListener("change", episode); slider.addEventListener("input", show);
    episode();
  }

  function staticFilter() {
    const box = document.getElementById("filter");
    if (!box) return;
    box.addEventListener("input", () => {
      const q = box.value.toLowerCase();
      for (const row of document.querySelectorAll("#feature-list tr.row"))
        row.style.display = row.textContent.toLowerCase().includes(q) ? "" : "none";
    });
  }
  document.addEventListener("DOMContentLoaded", staticFilter);

  // contexts: a tooltip with the token's activation (and loss effect), a click expands the whole window
  function contexts() {
    let tip = null;
    for (const ctx of document.querySelectorAll(".ctx")) {
      if (ctx.querySelector(".tok.far")) {
        ctx.classList.add("expandable"); ctx.title = "click to show the whole window";
        ctx.addEventListener("click", () => ctx.classList.toggle("expanded"));
      }
    }
    document.addEventListener("mouseover", (e) => {
      const t = e.target.closest ? e.target.closest(".tok") : null;
      if (!t) { if (tip) tip.hidden = true; return; }
      if (!tip) { tip = document.createElement("div"); tip.id = "tok-tip"; document.body.appendChild(tip); }
      let text = t.textContent + "\nactivation " + t.dataset.act;
      if (t.dataset.loss !== undefined) text += "\nloss effect " + t.dataset.loss + " nats (feature removed)";
      tip.textContent = text; tip.hidden = false;
      const r = t.getBoundingClientRect();
      tip.style.left = r.left + "px"; tip.style.top = (r.bottom + 4) + "px";
    });
  }
  document.addEventListener("DOMContentLoaded", contexts);

  function addToList() {
    const form = document.getElementById("add-to-list");
    if (!form) return;
    const sel = document.getElementById("list-select"), name = document.getElementById("list-new-name");
    sel.addEventListener("change", () => { name.hidden = sel.value !== "new"; });
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const status = document.getElementById("list-status"), db = encodeURIComponent(form.dataset.db);
      try {
        let id = sel.value;
        if (id === "new") {
          id = String((await postJSON("/api/db/" + db + "/lists", { name: name.value })).id);
          sel.add(new Option(name.value, id), sel.options.length - 1); sel.value = id; name.hidden = true;
        }
        const out = await postJSON("/api/db/" + db + "/lists/" + id + "/items",
          { feature: parseInt(form.dataset.feature, 10), note: document.getElementById("list-note").value });
        status.textContent = "added to " + out.name + " (" + out.items.length + ")";
      } catch (err) { status.textContent = "error: " + err.message; }
    });
  }

  function mapPage() {
    const d = data("map-data");
    if (!d || !window.Plotly) return;
    const hover = p => "feature " + p[0] + (p[4] ? "<br>" + plotText(p[4]) : "") +
      (p[5] !== null && d.clusters && d.clusters[p[5]] ? "<br>cluster: " + plotText(d.clusters[p[5]].name) : "");
    const trace = (name, pts, marker) => ({ type: "scattergl", mode: "markers", name: name, x: pts.map(p => p[1]), y: pts.map(p => p[2]),
      customdata: pts.map(p => p[0]), text: pts.map(hover), hoverinfo: "text", marker: marker });
    const palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#393b79", "#ad494a", "#637939"];
    function densityTraces() {
      const alive = d.points.filter(p => p[3] !== null), dead = d.points.filter(p => p[3] === null);
      return [trace("fired", alive, { size: 7, color: alive.map(p => p[3]), colorscale: "Viridis", colorbar: { title: "log10 density" } }),
              trace("never fired", dead, { size: 6, color: "#bbb" })];
    }
    function clusterTraces() {
      const out = d.clusters.map((c, i) => trace(plotText(c.name) + " (" + c.size + ")", d.points.filter(p => p[5] === i),
        { size: 7, color: palette[i % palette.length] }));
      out.push(trace("no explanation", d.points.filter(p => p[5] === null), { size: 6, color: "#bbb" }));
      return out;
    }
    const el = document.getElementById("map-chart");
    function draw(by) {
      const legend = by === "cluster" ? { orientation: "v", x: 1.02, y: 1, title: { text: "explanation cluster (top words)" } } : { orientation: "h" };
      el.dataset.colour = by;
      return Plotly.react(el, by === "cluster" ? clusterTraces() : densityTraces(),
        { margin: by === "cluster" ? { l: 50, r: 10, t: 10, b: 40 } : margin, xaxis: { title: { text: "PC 1" } }, yaxis: { title: { text: "PC 2" } }, legend: legend, showlegend: true }, cfg);
    }
    const checked = document.querySelector("input[name=colour]:checked");
    draw(checked && checked.value === "cluster" && d.clusters ? "cluster" : "density");
    for (const r of document.querySelectorAll("input[name=colour]")) {
      r.addEventListener("change", () => {
        const u = new URL(window.location.href); u.searchParams.set("colour", r.value);
        if (r.value === "cluster" && !d.clusters) { window.location.href = u.toString(); return; }  // clustered on the server
        draw(r.value);
        history.replaceState(null, "", u);
      });
    }
    el.on("plotly_click", (ev) => {
      const f = ev.points[0].customdata;
      window.location.href = "/db/" + encodeURIComponent(d.db) + "/feature/" + f;
    });
  }

  function listsPage() {
    const form = document.getElementById("list-create");
    if (!form) return;
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      try {
        const out = await postJSON(form.dataset.url, { name: document.getElementById("list-name").value,
                                                       description: document.getElementById("list-description").value });
        window.location.href = window.location.pathname.replace(/\/$/, "") + "/" + out.id;
      } catch (err) { document.getElementById("list-create-status").textContent = "error: " + err.message; }
    });
  }

  function listPage() {
    const table = document.getElementById("list-items");
    if (!table || table.dataset.writable !== "1") return;
    const base = table.dataset.base, status = document.getElementById("list-status");
    const rows = () => Array.from(table.querySelectorAll("tr.item"));
    async function act(fn) {
      try { await fn(); window.location.reload(); } catch (err) { status.textContent = "error: " + err.message; }
    }
    for (const row of rows()) {
      const f = parseInt(row.dataset.feature, 10);
      row.querySelector(".item-remove").addEventListener("click", () => act(() => postJSON(base + "/remove", { feature: f })));
      row.querySelector(".item-save").addEventListener("click", async () => {
        try { await postJSON(base + "/items", { feature: f, note: row.querySelector(".item-note").value }); status.textContent = "note saved"; }
        catch (err) { status.textContent = "error: " + err.message; }
      });
      for (const [cls, step] of [[".item-up", -1], [".item-down", 1]]) {
        row.querySelector(cls).addEventListener("click", () => {
          const order = rows().map(r => parseInt(r.dataset.feature, 10)), i = order.indexOf(f), j = i + step;
          if (j < 0 || j >= order.length) return;
          [order[i], order[j]] = [order[j], order[i]];
          act(() => postJSON(base + "/order", { features: order }));
        });
      }
    }
  }

  return { featurePage, runPage, attentionPage, dtPage, mapPage, listsPage, listPage };
})();
