/* finegrain search page: the "why" toggle. Listens to the page's "finegrain:search",
   "finegrain:results" and "finegrain:reset" events. While the toggle is on, a search asks for its
   explanation too (explain=1: one request, one pass of the model); turning it on after a plain search
   asks POST /api/explain for the results shown. A plain search asks for no maps. The maps (viridis,
   semi-transparent) are laid over the query and each result, with a legend. The toggle shows only
   when /api/info says the service can explain (its model gives maps). */
(function () {
  "use strict";

  const state = { file: null, ids: [], on: false, seq: 0, body: null, explainable: false };
  let toggle = null;
  let legend = null;

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
    const q = el("img", { class: "explain-overlay explain-query", alt: "Where the model looked in your image",
      src: body.query.map });
    placeQueryOverlay(q);
    for (const r of body.results) {
      const thumb = document.querySelector('.result[data-id="' + r.id + '"] .thumb');
      if (!thumb) continue;
      thumb.appendChild(el("img", { class: "explain-overlay", alt: "What made this image alike yours", src: r.map,
        title: "similarity " + r.similarity.toFixed(3) }));
    }
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
