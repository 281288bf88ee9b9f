/* finegrain search page: the "why" toggle. Listens to the page's "finegrain:search",
   "finegrain:results" and "finegrain:reset" events. While the toggle is on, a search asks for its
   explanation too (explain=1: one request, one pass of the model); turning it on after a plain search
   asks POST /api/explain for the results shown. A plain search asks for no maps. The maps (viridis,
   semi-transparent) are laid over the query and each result, with a legend. The server sends each map
   as its few cells on the model's grid (numbers in [0, 1]) and the image's size; the page stretches
   it bilinearly to the image's shape and colours it with the legend's stops, as the CLI's sheet does.
   The toggle shows only when /api/info says the service can explain (its model gives maps). */
(function () {
  "use strict";

  const state = { file: null, ids: [], on: false, seq: 0, body: null, explainable: false };
  const MAP_SIDE = 96;  // pixels along a drawn map's longer side: the browser smooths it further
  let toggle = null;
  let legend = null;
  let palette = { key: null, rgb: null };

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value);
    }
    for (const child of children || []) node.appendChild(child);
    return node;
  }

  function clearOverlays() {
    document.querySelectorAll(".explain-overlay").forEach((n) => n.remove());
    if (legend) legend.hidden = true;
  }

  /** 256 colours from the legend's evenly spaced stops ("#rrggbb"), linear between them. */
  function colours(stops) {
    const key = stops.join();
    if (palette.key === key) return palette.rgb;
    const rgb = stops.map((hex) => [1, 3, 5].map((j) => parseInt(hex.slice(j, j + 2), 16)));
    const out = new Uint8ClampedArray(256 * 3);
    for (let i = 0; i < 256; i++) {
      const t = (i / 255) * (rgb.length - 1);
      const a = Math.min(Math.floor(t), rgb.length - 2);
      for (let c = 0; c < 3; c++) out[i * 3 + c] = Math.round(rgb[a][c] + (rgb[a + 1][c] - rgb[a][c]) * (t - a));
    }
    palette = { key, rgb: out };
    return out;
  }

  /** A map (rows of cells in [0, 1]) drawn as a PNG data URL shaped as its image (size: [height, width]):
      each pixel the bilinear mix of the four nearest cell centres (edges clamped), coloured by level. */
  function mapUrl(cells, size, stops) {
    const gh = cells.length, gw = cells[0].length;
    const scale = MAP_SIDE / Math.max(size[0], size[1], 1);
    const h = Math.max(1, Math.round(size[0] * scale)), w = Math.max(1, Math.round(size[1] * scale));
    const lut = colours(stops);
    const canvas = document.createElement("canvas");
    canvas.width = w;
    canvas.height = h;
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(w, h);
    const along = (p, n, cellsN) => {
      const s = Math.min(Math.max((p + 0.5) * cellsN / n - 0.5, 0), cellsN - 1);
      const i = Math.min(Math.floor(s), Math.max(cellsN - 2, 0));
      return [i, Math.min(i + 1, cellsN - 1), s - i];
    };
    for (let y = 0; y < h; y++) {
      const [y0, y1, fy] = along(y, h, gh);
      for (let x = 0; x < w; x++) {
        const [x0, x1, fx] = along(x, w, gw);
        const top = cells[y0][x0] + (cells[y0][x1] - cells[y0][x0]) * fx;
        const bottom = cells[y1][x0] + (cells[y1][x1] - cells[y1][x0]) * fx;
        const v = Math.min(Math.max(top + (bottom - top) * fy, 0), 1);
        const level = Math.round(v * 255), o = (y * w + x) * 4;
        img.data[o] = lut[level * 3];
        img.data[o + 1] = lut[level * 3 + 1];
        img.data[o + 2] = lut[level * 3 + 2];
        img.data[o + 3] = 255;
      }
    }
    ctx.putImageData(img, 0, 0);
    return canvas.toDataURL("image/png");
  }

  /** The query's overlay sits exactly over the preview image (object-fit: contain inside its box). */
  function placeQueryOverlay(overlay) {
    const preview = document.getElementById("preview");
    if (!preview || !preview.parentElement) return;
    const box = preview.parentElement;
    overlay.style.left = preview.offsetLeft + "px";
    overlay.style.top = preview.offsetTop + "px";
    overlay.style.width = preview.offsetWidth + "px";
    overlay.style.height = preview.offsetHeight + "px";
    box.appendChild(overlay);
  }

  function draw(body) {
    clearOverlays();
    const stops = body.legend.colors;
    const q = el("img", { class: "explain-overlay explain-query", alt: "Where the model looked in your image",
      src: mapUrl(body.query.map, body.query.size, stops) });
    placeQueryOverlay(q);
    for (const r of body.results) {
      const thumb = document.querySelector('.result[data-id="' + r.id + '"] .thumb');
      if (!thumb) continue;
      thumb.appendChild(el("img", { class: "explain-overlay", alt: "What made this image alike yours",
        src: mapUrl(r.map, r.size, stops), title: "similarity " + r.similarity.toFixed(3) }));
    }
    legend.querySelector(".explain-bar").style.background = "linear-gradient(90deg, " + stops.join(", ") + ")";
    legend.querySelector(".explain-what").textContent = body.kind === "class"
      ? "Evidence for “" + body.explains + "”; on each result, what made it alike your image"
      : "What made your image and each result alike";
    legend.hidden = false;
  }

  async function explain() {
    if (!state.file || !state.ids.length) return;
    const seq = ++state.seq;
    toggle.setAttribute("aria-busy", "true");
    const form = new FormData();
    form.append("image", state.file, state.file.name || "image");
    let res, body;
    try {
      res = await fetch("/api/explain?ids=" + state.ids.join(","), { method: "POST", body: form,
        headers: { Accept: "application/json" } });
      body = await res.json().catch(() => null);
    } catch (err) {
      body = { error: "The server could not be reached." };
    }
    if (seq !== state.seq) return;
    toggle.removeAttribute("aria-busy");
    if (!res || !res.ok || !body || body.error) {
      legend.querySelector(".explain-what").textContent = "Cannot explain: " +
        ((body && body.error) || "HTTP " + (res && res.status));
      legend.hidden = false;
      return;
    }
    state.body = body;
    if (state.on) draw(body);
  }

  function setOn(on) {
    state.on = on;
    toggle.setAttribute("aria-pressed", on ? "true" : "false");
    if (!on) { clearOverlays(); return; }
    if (state.body) draw(state.body); else explain();
  }

  function build() {
    const head = document.querySelector(".results-head");
    if (!head) return;
    toggle = el("button", { type: "button", class: "btn explain-toggle", id: "explain-toggle",
      "aria-pressed": "false", title: "Show what the model looked at", text: "Why?" });
    toggle.hidden = true;
    toggle.addEventListener("click", () => setOn(!state.on));
    head.appendChild(toggle);
    legend = el("div", { class: "explain-legend", id: "explain-legend", role: "note" }, [
      el("span", { class: "explain-what" }),
      el("span", { class: "explain-scale" }, [el("span", { text: "least" }),
        el("span", { class: "explain-bar", "aria-hidden": "true" }), el("span", { text: "most" })]),
    ]);
    legend.hidden = true;
    head.after(legend);
  }

  /** Show the toggle when there are results to explain and the service can explain them. */
  function showToggle() {
    if (toggle) toggle.hidden = !(state.explainable && state.ids.length);
  }

  async function readInfo() {
    try {
      const res = await fetch("/api/info", { headers: { Accept: "application/json" } });
      const info = res.ok ? await res.json() : null;
      state.explainable = Boolean(info && info.explain && info.explain.available);
    } catch (err) {
      state.explainable = false;
    }
    showToggle();
  }

  document.addEventListener("finegrain:search", (ev) => {
    if (state.on && state.explainable) ev.detail.form.append("explain", "1");
  });
  document.addEventListener("finegrain:results", (ev) => {
    state.file = ev.detail.file;
    state.ids = (ev.detail.results || []).map((r) => r.id);
    state.body = ev.detail.explanation || null;
    state.seq++;
    if (toggle) toggle.removeAttribute("aria-busy");
    clearOverlays();
    showToggle();
    if (!state.on || !state.explainable || !state.ids.length) return;
    if (state.body) draw(state.body); else explain();
  });
  document.addEventListener("finegrain:reset", () => {
    state.file = null; state.ids = []; state.body = null; state.seq++;
    clearOverlays();
    if (toggle) toggle.hidden = true;
  });
  build();
  readInfo();
})();
