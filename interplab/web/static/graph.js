// interplab attribution-graph viewer (templates/_graph.html, data from interplab.web.graph_page.graph_view).
// The pruned graph laid out by layer (y) and prompt position (x): the prompt's tokens along the bottom, the
// target logits on top, links drawn with width by |weight| and colour by sign. Hover shows a node's details,
// click selects it (and opens its feature page when the graph links a served feature database), shift-click
// pins it; pinned nodes are grouped into labelled supernodes and saved into graph.json's qParams
// (POST /api/run/<i>/graph). The subgraph view shows the pinned nodes only (each supernode merged into one)
// and the links among them (summed between supernodes).
// Every string from the graph is written with textContent or setAttribute: nothing is parsed as markup.
"use strict";
window.interplabGraph = (function () {
  const NS = "http://www.w3.org/2000/svg";
  const POS = "#2a7ab8", NEG = "#b83a2a";
  const ROW_H = 64, GAP = 18, LOGIT_GAP = 46, SUB_GAP = 120, MIN_COL = 56, LEFT = 64, TOP = 40, BOTTOM = 44, MIN_H = 440;
  const KIND = { feature: "feature", error: "MLP reconstruction error", embedding: "token embedding",
                 logit: "output logit", group: "supernode" };
  const DRAW_LINKS = 4000;  // links drawn at first (the strongest): SVG paints tens of thousands slowly
  const LARGE = 2500;  // more links drawn than this: no dimming on hover, links take no pointer events
  const ORDER = { embedding: 0, feature: 1, error: 2, logit: 3, group: 4 };

  function svg(tag, attrs, parent) {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    if (parent) parent.appendChild(e);
    return e;
  }
  function html(tag, text, cls, parent) {
    const e = document.createElement(tag);
    if (text !== null && text !== undefined) e.textContent = text;
    if (cls) e.className = cls;
    if (parent) parent.appendChild(e);
    return e;
  }
  function fmt(v) {
    if (v === null || v === undefined) return "\u2014";
    if (typeof v !== "number") return String(v);
    if (v === 0) return "0";
    const a = Math.abs(v);
    return a >= 1e5 || a < 1e-3 ? v.toExponential(2) : String(Number(v.toPrecision(4)));
  }
  function clip(s, n) { s = String(s); return s.length > n ? s.slice(0, n - 1) + "\u2026" : s; }
  function showToken(t) { return t === "" ? "\u2205" : t.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5"); }

  function start() {
    const holder = document.getElementById("graph-data");
    const canvas = document.getElementById("graph-canvas");
    if (!holder || !canvas) return null;
    const d = JSON.parse(holder.textContent);
    const g = d.graph;
    const nodes = new Map(g.nodes.map(n => [n.id, n]));
    const st = {
      pinned: new Set(g.pinned.filter(id => nodes.has(id))),
      groups: g.supernodes.map(s => ({ label: s.label, members: s.members.filter(m => nodes.has(m)) })),
      view: "full", selected: null, saved: true, allLinks: false,
    };
    for (const gr of st.groups) for (const m of gr.members) st.pinned.add(m);

    // rows: embeddings (0), each layer present, logits (top); columns: the prompt's positions
    const layers = [...new Set(g.nodes.filter(n => n.layer !== null).map(n => n.layer))].sort((a, b) => a - b);
    const layerRow = new Map(layers.map((l, i) => [l, i + 1]));
    const topRow = layers.length + 1;
    const rowOf = n => n.kind === "embedding" ? 0 : n.kind === "logit" ? topRow : layerRow.get(n.layer);
    const rowName = r => r === 0 ? "emb" : r === topRow ? "logits" : "L" + layers[r - 1];
    const positions = new Set(g.nodes.map(n => n.position));
    if (g.tokens.length <= 256) g.tokens.forEach((_, i) => positions.add(i));
    const cols = [...positions].sort((a, b) => a - b);
    const colOf = new Map(cols.map((p, i) => [p, i]));
    const tokenAt = p => p < g.tokens.length ? showToken(g.tokens[p]) : null;

    function name(n) {
      if (n.kind === "feature") return "L" + n.layer + " #" + fmt(n.feature) + " @" + n.position;
      if (n.kind === "error") return "error L" + n.layer + " @" + n.position;
      if (n.kind === "embedding") return "token " + JSON.stringify(tokenAt(n.position) ?? "?") + " @" + n.position;
      return n.label || "logit " + fmt(n.token_id);
    }
    function logitText(n) {  // circuit-tracer's clerp is 'Output "<token>" (p=0.262)': the token, quoted
      const m = /^Output (".*") \(p=[^)]*\)$/s.exec(n.label);
      return m ? showToken(m[1]) : n.label || fmt(n.token_id);
    }
    function groupOf(id) { return st.groups.find(gr => gr.members.includes(id)) || null; }
    function details(n) {  // [label, value] rows of a node
      const rows = [["node", n.id], ["kind", KIND[n.kind]]];
      if (n.layer !== null) rows.push(["layer", n.layer]);
      const tok = tokenAt(n.position);
      rows.push(["position", n.position + (tok !== null ? " (" + tok + ")" : "")]);
      if (n.kind === "feature") rows.push(["feature", fmt(n.feature)]);
      if (n.kind === "logit") rows.push(["token id", fmt(n.token_id)], ["probability", fmt(n.probability)]);
      if (n.kind === "feature" || n.kind === "error" || n.activation !== null) rows.push(["activation", fmt(n.activation)]);
      rows.push(["influence", fmt(n.influence)]);
      if (n.label) rows.push(["label", n.label]);
      const gr = groupOf(n.id);
      if (gr) rows.push(["supernode", gr.label]);
      if (st.pinned.has(n.id)) rows.push(["pinned", "yes"]);
      return rows;
    }

    // the units drawn: every node (full view), or the pinned ones with each supernode as one (subgraph)
    function units() {
      const one = n => ({ key: "n:" + n.id, id: n.id, kind: n.kind, node: n, members: [n.id], row: rowOf(n), col: colOf.get(n.position) });
      if (st.view === "full") return g.nodes.map(one);
      const out = [];
      for (const [i, gr] of st.groups.entries()) {
        if (!gr.members.length) continue;
        const ms = gr.members.map(m => nodes.get(m));
        const mean = f => Math.round(ms.reduce((s, n) => s + f(n), 0) / ms.length);
        out.push({ key: "g:" + i, id: null, kind: "group", group: gr, members: gr.members.slice(), row: mean(rowOf), col: mean(n => colOf.get(n.position)) });
      }
      for (const id of st.pinned) {
        if (!groupOf(id)) out.push(one(nodes.get(id)));
      }
      return out;
    }
    function edges(us) {
      if (st.view === "full") return g.links.map(e => ({ source: "n:" + e.source, target: "n:" + e.target, weight: e.weight, title: e.source + " \u2192 " + e.target }));
      const owner = new Map();
      for (const u of us) for (const m of u.members) owner.set(m, u);
      const sum = new Map();
      for (const e of g.links) {
        const s = owner.get(e.source), t = owner.get(e.target);
        if (s === undefined || t === undefined || s === t) continue;
        const k = s.key + "\u0000" + t.key;
        if (!sum.has(k)) sum.set(k, { source: s.key, target: t.key, weight: 0, title: uname(s) + " \u2192 " + uname(t) });
        sum.get(k).weight += e.weight;
      }
      return [...sum.values()];
    }

    function layout(us) {
      const sub = st.view !== "full";
      const gap = sub ? SUB_GAP : GAP;
      const shownCols = sub ? [...new Set(us.map(u => u.col))].sort((a, b) => a - b) : cols.map((_, i) => i);
      const shownRows = sub ? [...new Set(us.map(u => u.row))].sort((a, b) => b - a) : [...Array(topRow + 1).keys()].reverse();
      const cells = new Map();
      for (const u of us) {
        const k = u.row + ":" + u.col;
        if (!cells.has(k)) cells.set(k, []);
        cells.get(k).push(u);
      }
      const gapOf = row => !sub && row === topRow ? LOGIT_GAP : gap;
      const width = new Map(shownCols.map(c => [c, sub ? SUB_GAP : MIN_COL]));
      for (const [k, cell] of cells) { const [r, c] = k.split(":").map(Number); width.set(c, Math.max(width.get(c), cell.length * gapOf(r) + 12)); }
      const natural = [...width.values()].reduce((a, b) => a + b, 0);
      const room = canvas.clientWidth - LEFT - 30;
      if (natural < room) for (const c of shownCols) width.set(c, width.get(c) * room / natural);  // fill the canvas
      const x0 = new Map();
      let x = LEFT;
      for (const c of shownCols) { x0.set(c, x); x += width.get(c); }
      const rowH = Math.min(2 * ROW_H, Math.max(ROW_H, (MIN_H - TOP - BOTTOM) / shownRows.length));  // few rows: taller
      const y = new Map(shownRows.map((r, i) => [r, TOP + i * rowH + rowH / 2]));
      const at = new Map();
      for (const [k, cell] of cells) {
        const [r, c] = k.split(":").map(Number);
        const gc = gapOf(r);
        cell.sort((a, b) => ORDER[a.kind] - ORDER[b.kind] || ((a.node && a.node.feature) || 0) - ((b.node && b.node.feature) || 0) || (a.key < b.key ? -1 : 1));
        const left = x0.get(c) + (width.get(c) - cell.length * gc) / 2;
        cell.forEach((u, i) => at.set(u.key, { x: left + gc * (i + 0.5), y: y.get(u.row) }));
      }
      return { at, shownCols, shownRows, x0, width, y, w: x + 24, h: TOP + shownRows.length * rowH + BOTTOM };
    }

    const tip = document.getElementById("graph-tooltip");
    function showTip(ev, rows) {
      tip.textContent = rows.map(([k, v]) => k + ": " + v).join("\n");
      tip.hidden = false;
      moveTip(ev);
    }
    function moveTip(ev) {
      const w = tip.offsetWidth, h = tip.offsetHeight;
      tip.style.left = Math.min(ev.clientX + 14, window.innerWidth - w - 4) + "px";
      tip.style.top = Math.min(ev.clientY + 14, window.innerHeight - h - 4) + "px";
    }

    function uname(u) { return u.node ? name(u.node) : u.group.label; }
    function unitRows(u) {
      if (u.node) return details(u.node);
      const rows = [["supernode", u.group.label], ["members", String(u.members.length)]];
      for (const m of u.members.slice(0, 12)) rows.push(["", name(nodes.get(m))]);
      if (u.members.length > 12) rows.push(["", "\u2026 " + (u.members.length - 12) + " more"]);
      return rows;
    }

    const drawn = new Map();  // unit key -> its element, to restyle without drawing again
    function restyle() {  // pins and the selection changed: in the full graph only classes change
      if (st.view !== "full" || !drawn.size) { render(); return; }
      for (const [key, el] of drawn) {
        el.classList.toggle("pinned", st.pinned.has(key.slice(2)));
        el.classList.toggle("selected", st.selected === key);
      }
    }
    const linksNote = document.getElementById("graph-links-note"), linksAll = document.getElementById("graph-links-all");
    function render() {
      drawn.clear();
      const us = units();
      let es = edges(us);
      const total = es.length;
      if (!st.allLinks && total > DRAW_LINKS) es = es.slice().sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, DRAW_LINKS);
      linksNote.textContent = es.length < total ? "drawing the " + DRAW_LINKS.toLocaleString("en") + " strongest of " + total.toLocaleString("en") + " links" : "";
      linksAll.hidden = es.length === total && !st.allLinks;
      linksAll.textContent = st.allLinks ? "draw the strongest only" : "draw all links";
      const L = layout(us);
      canvas.textContent = "";
      tip.hidden = true;
      const root = svg("svg", { width: L.w, height: L.h, id: "graph-svg", "data-view": st.view }, canvas);
      const large = es.length > LARGE;
      if (large) root.classList.add("graph-large");
      if (!us.length) {
        svg("text", { x: 20, y: 40, class: "graph-empty" }, root).textContent =
          "no pinned nodes: shift-click nodes in the full graph (or use pin in a node's details) to pin them";
        root.setAttribute("height", 80); root.setAttribute("width", 760);
        return;
      }
      const axis = svg("g", { class: "graph-axes" }, root);
      for (const r of L.shownRows) {
        const t = svg("text", { x: 8, y: L.y.get(r) + 4, class: "graph-axis" }, axis);
        t.textContent = rowName(r);
        svg("line", { x1: LEFT - 4, x2: L.w - 10, y1: L.y.get(r), y2: L.y.get(r), stroke: "#f0f1f4" }, axis);
      }
      for (const c of L.shownCols) {
        const tok = tokenAt(cols[c]);
        const box = svg("g", { class: "graph-token-box" }, axis);
        const t = svg("text", { x: L.x0.get(c) + L.width.get(c) / 2, y: L.h - BOTTOM + 20, "text-anchor": "middle", class: "graph-token" }, box);
        t.textContent = clip(tok ?? "@" + cols[c], Math.max(4, Math.floor(L.width.get(c) / 7)));
        svg("title", {}, box).textContent = (tok ?? "") + " (position " + cols[c] + ")";
      }
      const maxW = es.reduce((m, e) => Math.max(m, Math.abs(e.weight)), 1e-30);
      const eg = svg("g", { class: "graph-edges" }, root);
      const incident = new Map();
      for (const e of es) {
        const a = L.at.get(e.source), b = L.at.get(e.target);
        if (!a || !b) continue;
        const my = (a.y + b.y) / 2;
        const p = svg("path", {
          d: `M${a.x},${a.y} C${a.x},${my} ${b.x},${my} ${b.x},${b.y}`, class: "graph-edge",
          stroke: e.weight >= 0 ? POS : NEG, "stroke-width": (0.4 + 4 * Math.sqrt(Math.abs(e.weight) / maxW)).toFixed(2),
          "data-weight": e.weight,
        }, eg);
        svg("title", {}, p).textContent = e.title + ": " + fmt(e.weight);
        for (const id of [e.source, e.target]) { if (!incident.has(id)) incident.set(id, []); incident.get(id).push(p); }
      }
      const ng = svg("g", { class: "graph-nodes" }, root);
      for (const u of us) {
        const { x, y } = L.at.get(u.key);
        const cls = ["graph-node", u.kind];
        if (u.node && st.pinned.has(u.id) && st.view === "full") cls.push("pinned");
        if (st.selected === u.key) cls.push("selected");
        const el = svg("g", { class: cls.join(" "), transform: `translate(${x},${y})`, "data-kind": u.kind }, ng);
        if (u.node) el.setAttribute("data-id", u.id); else el.setAttribute("data-label", u.group.label);
        drawn.set(u.key, el);
        if (u.kind === "feature") svg("circle", { r: 7, class: "shape" }, el);
        else if (u.kind === "group") svg("rect", { x: -16, y: -9, width: 32, height: 18, rx: 6, class: "shape" }, el);
        else if (u.kind === "error") svg("rect", { x: -6, y: -6, width: 12, height: 12, class: "shape" }, el);
        else svg("rect", { x: -8, y: -6, width: 16, height: 12, rx: u.kind === "logit" ? 3 : 0, class: "shape" }, el);
        if (u.kind === "logit") {
          const t = svg("text", { x: 0, y: -12, "text-anchor": "middle", class: "graph-logit-label" }, el);
          t.textContent = clip(logitText(u.node), 7);
        } else if (st.view !== "full") {
          const t = svg("text", { x: 0, y: 24, "text-anchor": "middle", class: "graph-group-label" }, el);
          t.textContent = clip(u.group ? u.group.label : (u.node.label || name(u.node)), 18);
        }
        el.addEventListener("mouseenter", ev => {
          if (!large) root.classList.add("graph-hover");
          for (const p of incident.get(u.key) || []) p.classList.add("hl");
          showTip(ev, unitRows(u));
        });
        el.addEventListener("mousemove", moveTip);
        el.addEventListener("mouseleave", () => {
          root.classList.remove("graph-hover");
          for (const p of incident.get(u.key) || []) p.classList.remove("hl");
          tip.hidden = true;
        });
        el.addEventListener("click", ev => {
          if (ev.shiftKey && u.node) togglePin(u.id); else select(u);
        });
      }
    }

    // --- selection, pins, supernodes ---------------------------------------------------------------------
    const box = document.getElementById("graph-details");
    function select(u) {
      st.selected = u.key;
      box.textContent = "";
      const table = html("table", null, "graph-details-table", box);
      for (const [k, v] of unitRows(u)) {
        const tr = html("tr", null, null, table);
        html("td", k, "muted", tr); html("td", String(v), null, tr);
      }
      if (u.node) {
        const row = html("div", null, "graph-row", box);
        const pin = html("button", st.pinned.has(u.id) ? "unpin" : "pin", null, row);
        pin.type = "button"; pin.id = "graph-pin-selected";
        pin.addEventListener("click", () => togglePin(u.id));
        const page = u.node.page;
        if (page && page.db !== null) {
          const url = "/db/" + encodeURIComponent(page.db) + "/feature/" + encodeURIComponent(page.index);
          const a = html("a", "open the feature page", null, row);
          a.href = url; a.target = "_blank"; a.rel = "noopener"; a.id = "graph-feature-link";
          const frame = html("iframe", null, "graph-frame", box);
          frame.id = "graph-feature-frame"; frame.title = "feature page"; frame.src = url;
        } else if (page) {
          html("p", "its feature database " + page.path + " is not served here (add --db " + page.path + ")", "small muted", box);
        }
      }
      restyle();
    }
    function dirty() { st.saved = false; status.textContent = "unsaved changes"; }
    function togglePin(id) {
      if (st.pinned.has(id)) unpin([id]); else { st.pinned.add(id); dirty(); }
      const b = document.getElementById("graph-pin-selected");
      if (b && st.selected === "n:" + id) b.textContent = st.pinned.has(id) ? "unpin" : "pin";
      refresh();
    }
    function unpin(ids) {
      for (const id of ids) st.pinned.delete(id);
      for (const gr of st.groups) gr.members = gr.members.filter(m => !ids.includes(m));
      st.groups = st.groups.filter(gr => gr.members.length);
      dirty();
    }
    const pinList = document.getElementById("graph-pin-list"), groupList = document.getElementById("graph-group-list");
    const status = document.getElementById("graph-save-status");
    function refresh() {
      document.getElementById("graph-pin-count").textContent = String(st.pinned.size);
      document.getElementById("graph-group-count").textContent = String(st.groups.length);
      pinList.textContent = "";
      if (!st.pinned.size) html("li", "none yet: shift-click nodes (or pin in a node's details)", "muted", pinList);
      for (const id of st.pinned) {
        const n = nodes.get(id);
        const li = html("li", null, null, pinList);
        const cb = html("input", null, null, li);
        cb.type = "checkbox"; cb.value = id; cb.className = "graph-pin-check";
        const label = html("a", name(n), null, li);
        label.href = "#"; label.addEventListener("click", ev => { ev.preventDefault(); select({ key: "n:" + id, id, kind: n.kind, node: n, members: [id] }); });
        const gr = groupOf(id);
        if (gr) html("span", "\u2208 " + gr.label, "graph-members", li);
      }
      groupList.textContent = "";
      st.groups.forEach((gr, i) => {
        const li = html("li", null, "graph-group-item", groupList);
        const input = html("input", null, "graph-label-edit", li);
        input.value = gr.label; input.maxLength = 200;
        input.addEventListener("change", () => { if (input.value.trim()) { gr.label = input.value.trim(); dirty(); render(); } else input.value = gr.label; });
        html("span", gr.members.length + ": " + gr.members.map(m => name(nodes.get(m))).join(", "), "graph-members", li);
        const b = html("button", "ungroup", null, li);
        b.type = "button";
        b.addEventListener("click", () => { st.groups.splice(i, 1); dirty(); refresh(); });
      });
      restyle();
    }
    function checked() { return [...pinList.querySelectorAll("input.graph-pin-check:checked")].map(cb => cb.value); }
    document.getElementById("graph-group").addEventListener("click", () => {
      const labelBox = document.getElementById("graph-group-label");
      const label = labelBox.value.trim(), ids = checked();
      if (!ids.length) { status.textContent = "check the pinned nodes to group first"; return; }
      if (!label) { status.textContent = "give the supernode a label"; return; }
      for (const gr of st.groups) gr.members = gr.members.filter(m => !ids.includes(m));
      st.groups = st.groups.filter(gr => gr.members.length);
      st.groups.push({ label, members: ids });
      labelBox.value = "";
      dirty(); refresh();
    });
    document.getElementById("graph-unpin").addEventListener("click", () => { const ids = checked(); if (ids.length) { unpin(ids); refresh(); } });
    document.getElementById("graph-save").addEventListener("click", async () => {
      status.textContent = "saving\u2026";
      const body = { at: d.at, pinnedIds: [...st.pinned], supernodes: st.groups.map(gr => [gr.label, ...gr.members]) };
      try {
        const r = await fetch("/api/run/" + d.index + "/graph", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
        const out = await r.json();
        if (!r.ok) throw new Error(out.error || r.statusText);
        st.saved = true;
        status.textContent = "saved: " + out.pinnedIds.length + " pinned, " + out.supernodes.length + " supernodes";
      } catch (err) { status.textContent = "error: " + err.message; }
    });
    linksAll.addEventListener("click", () => { st.allLinks = !st.allLinks; render(); });
    for (const [id, view] of [["graph-show-full", "full"], ["graph-show-sub", "sub"]]) {
      document.getElementById(id).addEventListener("click", () => {
        st.view = view;
        document.getElementById("graph-show-full").classList.toggle("on", view === "full");
        document.getElementById("graph-show-sub").classList.toggle("on", view === "sub");
        render();
      });
    }
    let resizing = null;
    let width = canvas.clientWidth;
    window.addEventListener("resize", () => {  // a wider or narrower canvas: lay out again
      if (canvas.clientWidth === width) return;
      width = canvas.clientWidth;
      clearTimeout(resizing); resizing = setTimeout(render, 150);
    });
    window.addEventListener("beforeunload", ev => { if (!st.saved) { ev.preventDefault(); ev.returnValue = ""; } });
    refresh();
    return { state: st, render };
  }

  const api = { viewer: null };
  function boot() { if (document.getElementById("graph-data") && !api.viewer) api.viewer = start(); }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", boot); else boot();
  return api;
})();
