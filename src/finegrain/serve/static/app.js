/* finegrain search page: plain JS, fetch + FormData, no dependencies. */
(function () {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const els = {
    info: $("info"), error: $("error"), errorTitle: $("error-title"), errorMessage: $("error-message"),
    errorClose: $("error-close"), dropzone: $("dropzone"), file: $("file"), dzEmpty: $("dz-empty"),
    dzPreview: $("dz-preview"), dzLimit: $("dz-limit"), preview: $("preview"), spinner: $("spinner"),
    k: $("k"), choose: $("choose"), fileName: $("file-name"), predict: $("predict"), topLabel: $("top-label"),
    topProb: $("top-prob"), bars: $("bars"), results: $("results"), resultsTitle: $("results-title"),
    resultsMeta: $("results-meta"), placeholder: $("placeholder"), lightbox: $("lightbox"), lbImg: $("lb-img"),
    lbRank: $("lb-rank"), lbLabel: $("lb-label"), lbScore: $("lb-score"), lbClose: $("lb-close"),
    lbPrev: $("lb-prev"), lbNext: $("lb-next"),
  };

  const state = {
    info: null, file: null, previewUrl: null, controller: null, seq: 0, results: [], lbIndex: 0,
    maxUpload: null, metric: null,
  };

  // ------------------------------------------------------------------ helpers
  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key === "style") Object.assign(node.style, value);  // CSSOM: allowed by the page's CSP
      else node.setAttribute(key, value);
    }
    for (const child of children || []) if (child) node.appendChild(child);
    return node;
  }

  function humanBytes(n) {
    if (n >= 1048576) return (n / 1048576).toFixed(n % 1048576 ? 1 : 0) + " MB";
    if (n >= 1024) return Math.round(n / 1024) + " KB";
    return n + " bytes";
  }

  function pct(p) {
    const v = p * 100;
    return (v >= 10 || v === 0 ? v.toFixed(0) : v >= 1 ? v.toFixed(1) : v.toFixed(2)) + "%";
  }

  function scoreText(s) { return s.toFixed(3); }
  function labelText(label) { return label || "unlabelled"; }  // a gallery image without a class

  /** Similarity in [0, 1] for the score bar: cosine/inner product in [-1, 1], L2 distances shrink. */
  function scoreFraction(s) {
    if (state.metric === "l2") return 1 / (1 + Math.max(0, s));
    return Math.max(0, Math.min(1, s));
  }

  function showError(message, title) {
    els.errorTitle.textContent = title || "That didn't work";
    els.errorMessage.textContent = message;
    els.error.hidden = false;
  }

  function hideError() { els.error.hidden = true; }

  // ------------------------------------------------------------------ model info
  async function loadInfo() {
    try {
      const res = await fetch("/api/info", { headers: { Accept: "application/json" } });
      if (!res.ok) throw new Error("HTTP " + res.status);
      const info = await res.json();
      state.info = info;
      state.metric = info.metric;
      state.maxUpload = info.max_upload_bytes || null;
      const chips = [];
      chips.push(el("li", { class: "chip chip-accent", title: "Backbone" }, [el("b", { text: info.model })]));
      chips.push(el("li", { class: "chip", id: "gallery-size", title: "Gallery images in the index" },
        [el("b", { text: Number(info.gallery_size).toLocaleString() }), document.createTextNode(" gallery images")]));
      if (info.dataset) {
        const base = String(info.dataset).replace(/[\\/]+$/, "").split(/[\\/]/).pop() || info.dataset;
        chips.push(el("li", { class: "chip", title: "Dataset: " + info.dataset + " · task: " + info.task },
          [document.createTextNode("dataset "), el("b", { text: base })]));
      }
      if (info.embedding_dim) {
        chips.push(el("li", { class: "chip chip-extra", title: "Embedding dimension, metric and index kind" },
          [document.createTextNode(info.embedding_dim + "-d · " + (info.metric || "")),
            document.createTextNode(info.index_kind ? " · " + info.index_kind : "")]));
      }
      if (info.engine) {
        chips.push(el("li", { class: "chip chip-extra", title: "What runs the model (torch or ONNX Runtime)" },
          [document.createTextNode("engine "), el("b", { text: info.engine })]));
      }
      chips.push(el("li", { class: "chip chip-extra", title: "Run" + (info.created_at ? " · index built " + info.created_at : "") },
        [document.createTextNode("run "), el("b", { text: info.run })]));
      els.info.replaceChildren(...chips);
      document.title = "finegrain · " + info.run;
      if (state.maxUpload) els.dzLimit.textContent = "Up to " + humanBytes(state.maxUpload) + " · searches " +
        Number(info.gallery_size).toLocaleString() + " images";
      const upper = Math.min(info.max_k || 50, info.gallery_size);
      const values = [4, 8, 12, 16, 24].filter((v) => v < upper);
      values.push(Math.min(upper, 32));
      els.k.replaceChildren(...values.map((v) => el("option", { value: String(v), text: String(v) })));
      els.k.value = values.includes(8) ? "8" : String(values[values.length - 1]);
    } catch (err) {
      els.info.replaceChildren(el("li", { class: "chip chip-muted", text: "model info unavailable" }));
    }
  }

  // ------------------------------------------------------------------ choosing a file
  function setPreview(file) {
    if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
    state.previewUrl = URL.createObjectURL(file);
    els.preview.src = state.previewUrl;
    els.dzEmpty.hidden = true;
    els.dzPreview.hidden = false;
    els.dropzone.classList.add("has-image");
    els.fileName.textContent = file.name + " · " + humanBytes(file.size);
    els.fileName.title = file.name;
    els.choose.textContent = "Choose another";
    els.fileName.hidden = false;
  }

  function clearPreview() {
    if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
    state.previewUrl = null;
    state.file = null;
    els.preview.removeAttribute("src");
    els.dzEmpty.hidden = false;
    els.dzPreview.hidden = true;
    els.dropzone.classList.remove("has-image");
    els.fileName.hidden = true;
    els.choose.textContent = "Choose image";
  }

  function pick(file) {
    if (!file) return;
    hideError();
    if (state.maxUpload && file.size > state.maxUpload) {
      showError("“" + file.name + "” is " + humanBytes(file.size) + "; the limit is " + humanBytes(state.maxUpload) + ".",
        "File too large");
      return;
    }
    state.file = file;
    setPreview(file);
    search();
  }

  // ------------------------------------------------------------------ searching
  function setLoading(on) {
    els.spinner.hidden = !on;
    els.dropzone.setAttribute("aria-busy", on ? "true" : "false");
    document.body.classList.toggle("loading", on);
    if (on) {
      const n = Number(els.k.value) || 8;
      els.placeholder.hidden = true;
      els.resultsTitle.textContent = "Searching…";
      els.resultsMeta.textContent = "";
      const cards = [];
      for (let i = 0; i < n; i++) {
        cards.push(el("li", { class: "result skeleton", "aria-hidden": "true" }, [
          el("div", { class: "thumb" }),
          el("div", { class: "result-body" }, [el("div", { class: "sk-line" }), el("div", { class: "sk-line short" })]),
        ]));
      }
      els.results.replaceChildren(...cards);
    }
  }

  async function search() {
    if (!state.file) return;
    if (state.controller) state.controller.abort();
    const controller = new AbortController();
    state.controller = controller;
    const seq = ++state.seq;
    const form = new FormData();
    form.append("image", state.file, state.file.name || "image");
    form.append("k", els.k.value);
    // explain.js adds explain=1 while "Why?" is on: the maps come with the results, from one pass
    document.dispatchEvent(new CustomEvent("finegrain:search", { detail: { form } }));
    setLoading(true);
    let res, body;
    try {
      res = await fetch("/api/search", { method: "POST", body: form, signal: controller.signal,
        headers: { Accept: "application/json" } });
      body = await res.json().catch(() => null);
    } catch (err) {
      if (err.name === "AbortError") return;
      if (seq !== state.seq) return;
      setLoading(false);
      resetResults();
      showError("The server could not be reached. Check that it is still running and try again.", "Connection problem");
      return;
    }
    if (seq !== state.seq) return;
    setLoading(false);
    if (!res.ok || !body) {
      const message = (body && body.error) || ("The server answered with HTTP " + res.status + ".");
      const name = state.file && state.file.name ? "“" + state.file.name + "”" : "this file";
      const titles = { 400: "Can't use " + name, 413: name.charAt(0).toUpperCase() + name.slice(1) + " is too large",
        422: "Invalid request" };
      resetResults();
      if (res.status === 400 || res.status === 413) clearPreview();
      showError(message, titles[res.status] || "Search failed");
      return;
    }
    hideError();
    renderPrediction(body.prediction, body.prediction_source);
    renderResults(body);
  }

  function resetResults() {
    els.results.replaceChildren();
    els.predict.hidden = true;
    els.placeholder.hidden = false;
    els.resultsTitle.textContent = "Similar images";
    els.resultsMeta.textContent = "";
    state.results = [];
    document.dispatchEvent(new CustomEvent("finegrain:reset"));  // explain.js
  }

  function renderPrediction(pred, source) {
    if (!pred || !pred.length) { els.predict.hidden = true; return; }
    const top = pred[0];
    els.topLabel.textContent = top.label;
    els.topProb.replaceChildren(el("b", { text: pct(top.probability) }), document.createTextNode(
      source === "neighbours" ? " of the most similar images" : " confidence"));
    const rows = pred.map((p) => {
      const fill = el("div", { class: "bar-fill" });
      const row = el("li", { class: "bar-row" }, [
        el("span", { class: "bar-name", text: p.label, title: p.label }),
        el("span", { class: "bar-val", text: pct(p.probability) }),
        el("div", { class: "bar-track", role: "meter", "aria-valuemin": "0", "aria-valuemax": "100",
          "aria-valuenow": (p.probability * 100).toFixed(1), "aria-label": p.label }, [fill]),
      ]);
      requestAnimationFrame(() => { fill.style.width = Math.max(0.5, p.probability * 100).toFixed(2) + "%"; });
      return row;
    });
    els.bars.replaceChildren(...rows);
    els.predict.hidden = false;
  }

  function renderResults(body) {
    const results = body.results || [];
    state.results = results;
    els.placeholder.hidden = results.length > 0;
    els.resultsTitle.textContent = results.length ? "Most similar images" : "No similar images found";
    const copies = results.filter((r) => r.same_image).map((r) => "#" + r.rank);
    els.resultsMeta.textContent = results.length + " result" + (results.length === 1 ? "" : "s") + " · " +
      Math.round(body.query_ms) + " ms" + (copies.length ? " · " + copies.join(", ") +
      (copies.length === 1 ? " is" : " are") + " this image itself, not counted as a neighbour" : "");
    const cards = results.map((r, i) => {
      const img = el("img", { src: r.url, alt: labelText(r.label), loading: "lazy", decoding: "async" });
      const frac = scoreFraction(r.score);
      const button = el("button", { type: "button", "aria-label": "Enlarge #" + r.rank + ": " + labelText(r.label) }, [
        el("div", { class: "thumb" }, [img, el("span", { class: "rank", text: "#" + r.rank }),
          ...(r.same_image ? [el("span", { class: "same", text: "same image" })] : [])]),
        el("div", { class: "result-body" }, [
          el("div", { class: "result-label" + (r.label ? "" : " unlabelled"), text: labelText(r.label), title: labelText(r.label) }),
          el("div", { class: "result-score", title: (state.metric || "score") + " " + r.score }, [
            el("div", { class: "score-track" }, [el("div", { class: "score-fill", style: { width: (frac * 100).toFixed(1) + "%" } })]),
            el("span", { class: "score-val", text: scoreText(r.score) }),
          ]),
        ]),
      ]);
      button.addEventListener("click", () => openLightbox(i));
      return el("li", { class: "result", "data-id": String(r.id) }, [button]);
    });
    els.results.replaceChildren(...cards);
    // explain.js lays its maps over the cards; gallery.js adds each hit's metadata
    document.dispatchEvent(new CustomEvent("finegrain:results",
      { detail: { file: state.file, results, explanation: body.explanation || null } }));
  }

  // ------------------------------------------------------------------ lightbox
  function showLightboxItem(i) {
    const n = state.results.length;
    if (!n) return;
    state.lbIndex = (i + n) % n;
    const r = state.results[state.lbIndex];
    els.lbImg.src = r.url;
    els.lbImg.alt = labelText(r.label);
    els.lbRank.textContent = "#" + r.rank;
    els.lbLabel.textContent = labelText(r.label);
    els.lbScore.textContent = (state.metric || "score") + " " + scoreText(r.score);
    els.lbPrev.hidden = els.lbNext.hidden = n < 2;
  }

  function openLightbox(i) {
    showLightboxItem(i);
    if (typeof els.lightbox.showModal === "function") els.lightbox.showModal();
    else els.lightbox.setAttribute("open", "");
  }

  function closeLightbox() {
    if (typeof els.lightbox.close === "function") els.lightbox.close();
    else els.lightbox.removeAttribute("open");
  }

  // ------------------------------------------------------------------ wiring
  els.file.addEventListener("change", () => {
    const file = els.file.files && els.file.files[0];
    els.file.value = "";
    pick(file);
  });
  els.choose.addEventListener("click", () => els.file.click());
  els.dropzone.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); els.file.click(); }
  });
  ["dragenter", "dragover"].forEach((type) => els.dropzone.addEventListener(type, (e) => {
    e.preventDefault();
    els.dropzone.classList.add("dragging");
  }));
  ["dragleave", "dragend"].forEach((type) => els.dropzone.addEventListener(type, (e) => {
    if (e.target === els.dropzone) els.dropzone.classList.remove("dragging");
  }));
  els.dropzone.addEventListener("drop", (e) => {
    e.preventDefault();
    els.dropzone.classList.remove("dragging");
    const file = e.dataTransfer && e.dataTransfer.files && e.dataTransfer.files[0];
    if (file) pick(file);
  });
  // A file dropped anywhere else on the page should not navigate away from it.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => {
    e.preventDefault();
    const file = e.dataTransfer && e.dataTransfer.files && e.dataTransfer.files[0];
    if (file) pick(file);
  });
  window.addEventListener("paste", (e) => {
    const items = (e.clipboardData && e.clipboardData.files) || [];
    if (items.length) pick(items[0]);
  });
  els.k.addEventListener("change", () => { if (state.file) search(); });
  els.errorClose.addEventListener("click", hideError);
  els.preview.addEventListener("error", () => {
    // The browser cannot show it; the server's answer says whether it is usable.
    els.preview.alt = "Preview not available for this file";
  });

  els.lbClose.addEventListener("click", closeLightbox);
  els.lbPrev.addEventListener("click", (e) => { e.stopPropagation(); showLightboxItem(state.lbIndex - 1); });
  els.lbNext.addEventListener("click", (e) => { e.stopPropagation(); showLightboxItem(state.lbIndex + 1); });
  els.lightbox.addEventListener("click", (e) => { if (e.target === els.lightbox) closeLightbox(); });
  els.lightbox.addEventListener("keydown", (e) => {
    if (e.key === "ArrowLeft") showLightboxItem(state.lbIndex - 1);
    else if (e.key === "ArrowRight") showLightboxItem(state.lbIndex + 1);
  });

  loadInfo();
})();
