// The living gallery on the search page: an "add to gallery" panel when the server accepts writes
// (the token is typed once and kept in this page's memory only, never stored), and each hit's
// label and metadata under its picture. app.js announces results with a "finegrain:results" event.
(function () {
  "use strict";
  let token = "";  // in memory only: gone when the page is closed or reloaded

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") node.textContent = v; else node.setAttribute(k, v);
    }
    for (const c of children || []) node.append(c);
    return node;
  }

  function metadataText(meta) {
    return Object.entries(meta || {}).map(([k, v]) => k + ": " + String(v)).join(" · ");
  }

  document.addEventListener("finegrain:results", (event) => {
    const byId = new Map((event.detail.results || []).map((r) => [String(r.id), r]));
    for (const li of document.querySelectorAll("#results li.result")) {
      const r = byId.get(li.getAttribute("data-id"));
      const body = li.querySelector(".result-body");
      if (!r || !body || !r.metadata || !Object.keys(r.metadata).length) continue;
      body.append(el("div", { class: "result-meta", text: metadataText(r.metadata), title: JSON.stringify(r.metadata) }));
    }
  });

  function panel() {
    const files = el("input", { type: "file", id: "gallery-files", accept: "image/*", multiple: "" });
    const label = el("input", { type: "text", id: "gallery-label", maxlength: "200", autocomplete: "off" });
    const meta = el("input", { type: "text", id: "gallery-metadata", placeholder: '{"sku": "A-12"}', autocomplete: "off" });
    const secret = el("input", { type: "password", id: "gallery-token", autocomplete: "off" });
    const button = el("button", { type: "button", class: "btn", id: "gallery-submit", text: "Add to gallery" });
    const status = el("p", { class: "gallery-status", id: "gallery-status", role: "status" });
    const tokenRow = el("label", {}, ["Write token", secret]);

    button.addEventListener("click", async () => {
      if (secret.value) { token = secret.value; secret.value = ""; tokenRow.hidden = true; }
      if (!files.files.length) { status.textContent = "Choose one or more images first."; return; }
      const form = new FormData();
      for (const f of files.files) form.append("image", f, f.name || "image");
      form.append("label", label.value);
      if (meta.value.trim()) form.append("metadata", meta.value.trim());
      status.className = "gallery-status";
      status.textContent = "Adding…";
      let res, body;
      try {
        res = await fetch("/api/gallery", { method: "POST", body: form,
          headers: { Accept: "application/json", Authorization: "Bearer " + token } });
        body = await res.json().catch(() => null);
      } catch (err) {
        status.className = "gallery-status bad";
        status.textContent = "The server could not be reached.";
        return;
      }
      if (!res.ok || !body) {
        if (res.status === 401) { token = ""; tokenRow.hidden = false; }
        status.className = "gallery-status bad";
        status.textContent = (body && body.error) || ("HTTP " + res.status);
        return;
      }
      status.textContent = "Added as #" + body.ids.join(", #") + " · the gallery holds " + body.size + " images.";
      const count = document.querySelector("#gallery-size b");  // the header's chip, read at page load
      if (count) count.textContent = Number(body.size).toLocaleString();
      files.value = "";
    });

    return [el("h2", { class: "card-title", text: "Add to gallery" }),
      el("label", {}, ["Images", files]), el("label", {}, ["Label", label]),
      el("label", {}, ["Metadata (JSON, optional)", meta]), tokenRow, button, status];
  }

  async function init() {
    const host = document.getElementById("gallery-add");
    if (!host) return;
    try {
      const res = await fetch("/api/info", { headers: { Accept: "application/json" } });
      const info = res.ok ? await res.json() : null;
      if (!info || !info.gallery_writes) return;
    } catch (err) {
      return;
    }
    host.replaceChildren(...panel());
    host.hidden = false;
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
