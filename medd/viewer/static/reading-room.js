// The reading room's image view: zoom, pan, frame scrolling, window/level and
// drawing annotations in image pixel coordinates. Pixels are rendered on the
// server (render.png); this script only asks for the frame and window it needs.
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";

  function start() {
    const viewport = document.getElementById("viewport");
    if (!viewport) return;
    const d = viewport.dataset;
    const uid = d.uid;
    const rows = Number(d.rows), columns = Number(d.columns), frames = Number(d.frames) || 1;
    const spacing = d.spacing ? d.spacing.split(",").map(Number) : null;  // [row, column] mm
    const defaults = { wc: d.wc, ww: d.ww };
    const csrf = document.querySelector('meta[name="csrf-token"]').content;
    const stage = document.getElementById("stage");
    const image = document.getElementById("image");
    const svg = document.getElementById("overlay");
    const status = document.getElementById("overlay-status");
    const $ = (id) => document.getElementById(id);

    const state = {
      frame: 1, wc: defaults.wc, ww: defaults.ww,
      zoom: 1, x: 0, y: 0, tool: "pan",
      saved: JSON.parse(d.overlays || "[]"), drawn: [],
    };

    // --- the image: frame and window --------------------------------------------------------
    let pending = null;
    function imageUrl() {
      const q = new URLSearchParams({ frame: String(state.frame) });
      if (state.wc !== "" && state.ww !== "" && state.wc !== undefined && state.ww !== undefined &&
          (state.wc !== defaults.wc || state.ww !== defaults.ww)) {
        q.set("wc", state.wc); q.set("ww", state.ww);
      }
      return "/images/" + encodeURIComponent(uid) + "/render.png?" + q.toString();
    }
    function refresh() {
      // Coalesce fast scrolling: at most one request in flight, the newest wins.
      const url = imageUrl();
      if (pending) { pending.next = url; return; }
      pending = { next: null };
      image.src = url;
    }
    // "Opened" is its own request, sent once, when the image has been shown: loading the page changes nothing.
    let opened = false;
    async function markOpened() {
      if (opened) return;
      opened = true;
      try {
        const r = await fetch("/images/" + encodeURIComponent(uid) + "/opened", {
          method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrf },
        });
        if (!r.ok) throw new Error("the viewer answered " + r.status);
        viewport.dataset.opened = "true";
      } catch (err) {
        opened = false;  // the next frame shown tries again
        say("Could not record that this image was opened: " + err.message, true);
      }
    }
    image.addEventListener("load", () => {
      markOpened();
      image.classList.remove("failed");
      const next = pending && pending.next; pending = null;
      if (next && next !== image.getAttribute("src")) { pending = { next: null }; image.src = next; }
    });
    image.addEventListener("error", () => {
      pending = null;
      image.classList.add("failed");
      say("This frame could not be rendered (see the node's log).", true);
    });

    function setFrame(n) {
      n = Math.max(1, Math.min(frames, n));
      if (n === state.frame) return;
      state.frame = n;
      if ($("frame-slider")) $("frame-slider").value = String(n);
      if ($("frame-label")) $("frame-label").textContent = n + " / " + frames;
      refresh();
      redraw();
    }
    if (frames > 1) {
      $("frame-prev").addEventListener("click", () => setFrame(state.frame - 1));
      $("frame-next").addEventListener("click", () => setFrame(state.frame + 1));
      $("frame-slider").addEventListener("input", (e) => setFrame(Number(e.target.value)));
    }

    if ($("wl-apply")) {
      const apply = () => {
        const wc = $("wc").value.trim(), ww = $("ww").value.trim();
        if (wc === "" || ww === "" || Number(ww) < 1) { say("Window width must be at least 1.", true); return; }
        state.wc = wc; state.ww = ww; refresh();
      };
      $("wl-apply").addEventListener("click", apply);
      for (const id of ["wc", "ww"]) $(id).addEventListener("keydown", (e) => { if (e.key === "Enter") apply(); });
      $("wl-preset").addEventListener("change", (e) => {
        const v = e.target.value;
        if (!v) return;
        const [wc, ww] = v === "default" ? [defaults.wc, defaults.ww] : v.split(",");
        $("wc").value = wc; $("ww").value = ww; state.wc = wc; state.ww = ww; refresh();
        e.target.value = "";
      });
    }

    // --- zoom and pan (a CSS transform of the stage: image and overlay move together) -----------
    function place() {
      stage.style.transform = "translate(" + state.x + "px," + state.y + "px) scale(" + state.zoom + ")";
      $("zoom-label").textContent = Math.round(state.zoom * 100) + "%";
    }
    function fit() {
      const box = viewport.getBoundingClientRect();
      state.zoom = Math.min(box.width / columns, box.height / rows) || 1;
      state.x = (box.width - columns * state.zoom) / 2;
      state.y = (box.height - rows * state.zoom) / 2;
      state.fitted = true;
      place();
    }
    function zoomAt(factor, cx, cy) {
      const z = Math.max(0.05, Math.min(40, state.zoom * factor));
      state.x = cx - (cx - state.x) * (z / state.zoom);
      state.y = cy - (cy - state.y) * (z / state.zoom);
      state.zoom = z; state.fitted = false; place();
    }
    const centre = () => { const b = viewport.getBoundingClientRect(); return [b.width / 2, b.height / 2]; };
    $("zoom-in").addEventListener("click", () => zoomAt(1.25, ...centre()));
    $("zoom-out").addEventListener("click", () => zoomAt(0.8, ...centre()));
    $("zoom-fit").addEventListener("click", fit);
    viewport.addEventListener("wheel", (e) => {
      e.preventDefault();
      if (e.ctrlKey || frames === 1) {
        const b = viewport.getBoundingClientRect();
        zoomAt(e.deltaY < 0 ? 1.15 : 1 / 1.15, e.clientX - b.left, e.clientY - b.top);
      } else {
        setFrame(state.frame + (e.deltaY > 0 ? 1 : -1));
      }
    }, { passive: false });
    document.addEventListener("keydown", (e) => {
      if (e.target.closest("input, textarea, select")) return;
      if (e.key === "ArrowRight" || e.key === "ArrowDown" || e.key === "PageDown") setFrame(state.frame + 1);
      else if (e.key === "ArrowLeft" || e.key === "ArrowUp" || e.key === "PageUp") setFrame(state.frame - 1);
      else return;
      e.preventDefault();
    });

    // --- drawing ---------------------------------------------------------------------------------
    function el(name, attrs, parent) {
      const node = document.createElementNS(SVG, name);
      for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
      if (parent) parent.appendChild(node);
      return node;
    }
    const unit = Math.max(rows, columns) / 512;  // strokes and text scale with the image
    const defs = el("defs", {}, svg);
    for (const kind of ["saved", "new"]) {
      const m = el("marker", { id: "head-" + kind, viewBox: "0 0 10 10", refX: "9", refY: "5",
        markerWidth: "6", markerHeight: "6", orient: "auto-start-reverse" }, defs);
      el("path", { d: "M0,0 L10,5 L0,10 z", class: "arrowhead " + kind }, m);
    }
    const layer = el("g", {}, svg);

    function lengthLabel(p) {
      const dx = p[1][0] - p[0][0], dy = p[1][1] - p[0][1];
      if (spacing) return Math.hypot(dx * spacing[1], dy * spacing[0]).toFixed(1) + " mm";
      return Math.hypot(dx, dy).toFixed(1) + " px";
    }
    function draw(a, kind) {
      const g = el("g", { class: "annotation " + kind + " " + a.type, "data-type": a.type }, layer);
      const p = a.points;
      const stroke = { "stroke-width": String(Math.max(1.5, 2 * unit)), "vector-effect": "non-scaling-stroke" };
      if (a.type === "arrow" || a.type === "line") {
        const line = el("line", { x1: p[0][0], y1: p[0][1], x2: p[1][0], y2: p[1][1], ...stroke }, g);
        if (a.type === "arrow") line.setAttribute("marker-end", "url(#head-" + kind + ")");
        // A line shows its length; a saved one comes back with it as its text.
        const label = a.type === "line" ? (a.text || lengthLabel(p)) : a.text;
        if (label) {
          const t = el("text", { x: p[1][0] + 4 * unit, y: p[1][1] - 4 * unit, "font-size": 14 * unit }, g);
          t.textContent = label;
        }
      } else if (a.type === "ellipse") {
        const [x1, y1] = p[0], [x2, y2] = p[1];
        el("ellipse", { cx: (x1 + x2) / 2, cy: (y1 + y2) / 2, rx: Math.abs(x2 - x1) / 2, ry: Math.abs(y2 - y1) / 2,
          ...stroke }, g);
        if (a.text) {
          const t = el("text", { x: Math.max(x1, x2) + 4 * unit, y: Math.min(y1, y2), "font-size": 14 * unit }, g);
          t.textContent = a.text;
        }
      } else if (a.type === "text") {
        const t = el("text", { x: p[0][0], y: p[0][1], "font-size": 16 * unit }, g);
        t.textContent = a.text || "";
      }
      return g;
    }
    function redraw() {
      layer.replaceChildren();
      // On a multi-frame image an annotation belongs to the frame it was drawn on.
      const here = (a) => frames === 1 || !a.frame || a.frame === state.frame;
      for (const a of state.saved) if (here(a)) draw(a, "saved");
      for (const a of state.drawn) if (here(a)) draw(a, "new");
      $("save-overlay").disabled = state.drawn.length === 0;
      $("undo").disabled = state.drawn.length === 0;
    }

    function toImage(e) {
      // The inverse of the SVG's screen transform undoes zoom and pan: image pixel coordinates.
      const pt = svg.createSVGPoint();
      pt.x = e.clientX; pt.y = e.clientY;
      const p = pt.matrixTransform(svg.getScreenCTM().inverse());
      return [Math.round(p.x * 10) / 10, Math.round(p.y * 10) / 10];
    }

    const onFrame = (a) => (frames > 1 ? { ...a, frame: state.frame } : a);

    function setTool(tool) {
      state.tool = tool;
      for (const b of document.querySelectorAll(".tool")) b.classList.toggle("active", b.dataset.tool === tool);
      viewport.dataset.tool = tool;
    }
    for (const b of document.querySelectorAll(".tool")) b.addEventListener("click", () => setTool(b.dataset.tool));

    let drag = null;
    viewport.addEventListener("pointerdown", (e) => {
      if (e.button !== 0 && e.button !== 1) return;
      viewport.setPointerCapture(e.pointerId);
      if (state.tool === "pan" || e.button === 1) {
        drag = { pan: true, sx: e.clientX, sy: e.clientY, x: state.x, y: state.y };
      } else if (state.tool === "text") {
        const text = $("annotation-text").value.trim();
        if (!text) { say("Type the text first, then click where it goes.", true); $("annotation-text").focus(); return; }
        state.drawn.push(onFrame({ type: "text", points: [toImage(e)], text: text }));
        redraw(); say("");
      } else {
        const p = toImage(e);
        drag = { shape: { type: state.tool, points: [p, p] } };
        drag.node = draw(drag.shape, "new");
      }
      e.preventDefault();
    });
    viewport.addEventListener("pointermove", (e) => {
      if (!drag) return;
      if (drag.pan) {
        state.x = drag.x + e.clientX - drag.sx; state.y = drag.y + e.clientY - drag.sy;
        state.fitted = false; place();
      } else {
        drag.shape.points[1] = toImage(e);
        drag.node.remove(); drag.node = draw(drag.shape, "new");
      }
    });
    const finish = () => {
      if (drag && drag.shape) {
        drag.node.remove();
        const [a, b] = drag.shape.points;
        if (Math.hypot(b[0] - a[0], b[1] - a[1]) >= 2) state.drawn.push(onFrame(drag.shape));
        redraw();
      }
      drag = null;
    };
    viewport.addEventListener("pointerup", finish);
    viewport.addEventListener("pointercancel", finish);

    $("undo").addEventListener("click", () => { state.drawn.pop(); redraw(); });

    function say(text, error) {
      status.textContent = text;
      status.classList.toggle("error", Boolean(error));
    }

    $("save-overlay").addEventListener("click", async () => {
      if (!state.drawn.length) return;
      $("save-overlay").disabled = true;
      say("Saving…");
      try {
        const r = await fetch("/images/" + encodeURIComponent(uid) + "/overlays", {
          method: "POST", credentials: "same-origin",
          headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
          body: JSON.stringify({ annotations: state.drawn }),
        });
        const answer = await r.json().catch(() => ({}));
        if (!r.ok) throw new Error(answer.error || ("the viewer answered " + r.status));
        state.saved = state.saved.concat(state.drawn);
        state.drawn = [];
        redraw();
        say("Overlay saved (" + answer.uid + ").");
        status.dataset.overlayUid = answer.uid;
      } catch (err) {
        say("Not saved: " + err.message, true);
        $("save-overlay").disabled = false;
      }
    });

    window.addEventListener("beforeunload", (e) => {
      if (state.drawn.length) { e.preventDefault(); e.returnValue = ""; }
    });

    setTool("pan");
    redraw();
    fit();
    // Until the radiologist zooms or pans, the image keeps fitting the viewport (window resized, header opened).
    new ResizeObserver(() => { if (state.fitted) fit(); }).observe(viewport);
    if (image.complete && image.naturalWidth) markOpened();  // shown before this script ran
    viewport.dataset.ready = "true";
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
