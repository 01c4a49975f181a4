// HSCR token-level reward viewer. No framework, no network except the API's own endpoints.
// Data arrives as "view rows" (hscr_client/viewer/_dataset.py documents the shape); marks carry
// character offsets placed in Python, so this file only slices text. All text goes in through
// textContent, never innerHTML.
(() => {
  "use strict";
  const config = JSON.parse(document.getElementById("hscr-config").textContent);
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "hscr-api-key";

  // ---- filters: the same rules as Filters.accepts in _dataset.py -------------------------------
  function haystack(item) {
    if ("error" in item) return (item.id + "\n" + item.error).toLowerCase();
    const parts = [item.id, item.question, item.chosen, item.own, item.corrupted || ""];
    return parts.concat(item.levels.map((lv) => lv.text)).join("\n").toLowerCase();
  }
  function hasWarning(row) {
    return row.shortfall || row.unplaced > 0 || row.levels.some((lv) => lv.unfired > 0);
  }
  function accepts(item, f) {
    const terms = f.q.toLowerCase().split(/\s+/).filter(Boolean);
    if (terms.length) {
      const h = haystack(item);
      if (!terms.every((t) => h.includes(t))) return false;
    }
    if ("error" in item) return (f.status === "errors" || f.status === "all") && f.level === null && f.modality === null;
    if (f.status === "errors" || (f.status === "warnings" && !hasWarning(item))) return false;
    if (f.level !== null && !item.levels.some((lv) => lv.level === f.level)) return false;
    return f.modality === null || item.modalities.includes(f.modality);
  }
  const unfiltered = (f) => f.status === "ranked" && !f.q.trim() && f.level === null && f.modality === null;

  // ---- data sources ----------------------------------------------------------------------------
  // Static file: rows and thumbnails are embedded per chunk of `chunkRows` rows, each chunk in its own
  // <script type="application/json">, parsed only when a page needs it (thumbnails: the page's chunks).
  class StaticSource {
    constructor() {
      this.rowChunks = new Map();
      this.imageChunks = new Map();
      this.chunkRows = config.chunkRows;
    }
    async summary() { return config.summary; }
    rowsOf(k) {
      if (!this.rowChunks.has(k)) {
        this.rowChunks.set(k, JSON.parse($("hscr-rows-" + k).textContent));
        document.body.dataset.rowChunksParsed = String(this.rowChunks.size);  // for tests: parsing is lazy
      }
      return this.rowChunks.get(k);
    }
    imagesOf(k) {
      if (!this.imageChunks.has(k)) {
        if (this.imageChunks.size >= 4) this.imageChunks.delete(this.imageChunks.keys().next().value);
        const node = $("hscr-img-" + k);
        this.imageChunks.set(k, node ? JSON.parse(node.textContent) : []);
        this.imageParses = (this.imageParses || 0) + 1;
        document.body.dataset.imageChunksParsed = String(this.imageParses);
      }
      return this.imageChunks.get(k);
    }
    row(i) { return this.rowsOf(Math.floor(i / this.chunkRows))[i % this.chunkRows]; }
    allRows() {
      const rows = [];
      for (let k = 0; k < config.nChunks; k++) rows.push(...this.rowsOf(k));
      return rows;
    }
    async page(f, offset, limit) {
      let total, items;
      if (unfiltered(f)) {
        total = config.summary.rows;
        items = [];
        for (let i = offset; i < Math.min(total, offset + limit); i++) items.push(this.row(i));
      } else {
        const pool = f.status === "errors" ? [] : this.allRows();
        const errors = f.status === "errors" || f.status === "all" ? config.errors : [];
        const selected = pool.concat(errors).filter((item) => accepts(item, f));
        total = selected.length;
        items = selected.slice(offset, offset + limit);
      }
      items = items.map((item) => ("i" in item
        ? Object.assign({}, item, {image: this.imagesOf(Math.floor(item.i / this.chunkRows))[item.i % this.chunkRows]})
        : item));
      return {total, offset, limit, items};
    }
  }

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  // Service: the same filters, applied by the server, one page of rows (with thumbnails) per request.
  class ApiSource {
    async get(url) {
      const headers = {Accept: "application/json"};
      const key = sessionStorage.getItem(KEY_STORE);
      if (key) headers.Authorization = "Bearer " + key;
      const response = await fetch(url, {headers, credentials: "same-origin"});
      if (!response.ok) {
        let detail = response.statusText;
        try { const body = await response.json(); detail = body.detail || body.error?.message || detail; } catch (e) { /* not JSON */ }
        throw new ApiError(response.status, typeof detail === "string" ? detail : JSON.stringify(detail));
      }
      return response.json();
    }
    async summary() { return config.summary || this.get(config.summaryUrl); }
    async page(f, offset, limit) {
      const params = new URLSearchParams({offset, limit, status: f.status});
      if (f.q.trim()) params.set("q", f.q);
      if (f.level !== null) params.set("level", f.level);
      if (f.modality !== null) params.set("modality", f.modality);
      return this.get(config.rowsUrl + "?" + params);
    }
  }

  const source = config.mode === "api" ? new ApiSource() : new StaticSource();
  const state = {q: "", level: null, modality: null, status: "ranked", page: 0, pageSize: 25};
  let summary = null;
  let renders = 0;

  // ---- small DOM helpers -----------------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else if (name === "style") node.setAttribute("style", value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }
  const fmt = (x, digits = 3) => (x === null || x === undefined ? "n/a" : Number(x).toFixed(digits));
  const plural = (n, word) => n + " " + word + (n === 1 ? "" : "s");

  // Text with spans: [{start, end, node(text) -> Node}], non-overlapping; unplaced ones skipped.
  function annotated(text, spans) {
    const p = el("p");
    const placed = spans.filter((s) => s.start >= 0).sort((a, b) => a.start - b.start);
    let at = 0;
    for (const s of placed) {
      if (s.start < at) continue;
      if (s.start > at) p.append(text.slice(at, s.start));
      p.append(s.node(text.slice(s.start, s.end)));
      at = s.end;
    }
    if (at < text.length) p.append(text.slice(at));
    return p;
  }

  function coupledText(text, coupled) {
    const top = Math.max(1e-9, ...coupled.map((c) => Math.abs(c.shift || 0)));
    return annotated(text, coupled.map((c) => ({
      start: c.start, end: c.end,
      node: (t) => el("span", {
        class: "cpl" + (c.how === "match" ? " match" : ""), tabindex: 0, style: "--s:" + (Math.abs(c.shift || 0) / top).toFixed(3),
        "data-token": c.token, "data-shift": c.shift, "data-position": c.position, "data-how": c.how,
        "data-tip": "modality-coupled token \u201c" + c.token + "\u201d\nshift " + fmt(c.shift) + " (token " + c.position + ", placed by " + c.how + ")",
      }, t),
    })));
  }

  function levelText(lv) {
    return annotated(lv.text, lv.marks.map((m) => ({
      start: m.start, end: m.end,
      node: (t) => el("span", {class: "swap"},
        el("del", {class: "orig", "aria-label": "original"}, m.original),
        el("mark", {
          class: "rep" + (m.how === "match" ? " match" : ""), tabindex: 0,
          "data-original": m.original, "data-replacement": m.replacement, "data-reward": m.reward,
          "data-shift": m.shift, "data-position": m.position, "data-how": m.how,
          "data-tip": "\u201c" + m.original + "\u201d \u2192 \u201c" + m.replacement + "\u201d\nreward " + fmt(m.reward) +
            " \u00b7 shift " + fmt(m.shift) + "\ntoken " + m.position + ", placed by " + m.how,
        }, t)),
    })));
  }

  function field(cls, label, content) {
    return el("div", {class: "field " + cls}, el("span", {class: "label"}, label), content);
  }

  function renderLevel(lv) {
    const sim = lv.similarity === null ? 0 : Math.max(0, Math.min(1, lv.similarity));
    const li = el("li", {class: "level", "data-level": lv.level},
      el("div", {class: "level-head"},
        el("span", {class: "name"}, "Level " + lv.level),
        el("span", {class: "sim", "data-similarity": lv.similarity},
          "similarity " + fmt(lv.similarity),
          el("span", {class: "simbar", role: "img", "aria-label": "similarity " + fmt(lv.similarity)},
            el("span", {style: "width:" + (sim * 100).toFixed(1) + "%"}))),
        el("span", {}, plural(lv.n_replacements, "replacement")),
        lv.unfired ? el("span", {class: "badge warn"}, lv.unfired + " unfired") : null),
      levelText(lv));
    const missing = lv.marks.filter((m) => m.start < 0);
    if (missing.length) {
      li.append(el("p", {class: "unplaced"}, "Not found in the text: " + missing.map((m) =>
        "\u201c" + m.original + "\u201d \u2192 \u201c" + m.replacement + "\u201d (token " + m.position + ", reward " + fmt(m.reward) + ")").join("; ")));
    }
    return li;
  }

  function renderRow(row) {
    const thumb = row.image
      ? el("img", {src: "data:image/png;base64," + row.image, alt: "image of " + row.id, width: 128, height: 128})
      : el("div", {class: "noimg"}, "no image");
    const badges = el("span", {class: "badges"},
      ...row.modalities.map((m) => el("span", {class: "badge"}, m)),
      el("span", {class: "badge"}, plural(row.levels.length, "level") + " of " + plural(row.n_candidates, "candidate")),
      row.shortfall ? el("span", {class: "badge warn", title: "fewer levels met the similarity gap than asked"}, "shortfall") : null,
      row.unplaced ? el("span", {class: "badge warn"}, plural(row.unplaced, "unplaced mark")) : null);
    const levels = row.levels.filter((lv) => state.level === null || lv.level === state.level);
    const basis = row.corrupted === null ? row.own : row.corrupted;
    return el("article", {class: "item", "data-id": row.id, "data-index": row.i},
      el("div", {class: "thumb"}, thumb, el("div", {class: "idx"}, "row " + row.i)),
      el("div", {class: "body"},
        el("div", {class: "head"}, el("h2", {}, row.id), badges),
        field("question", "Question", el("p", {}, row.question)),
        field("chosen", "Preferred answer", el("p", {}, row.chosen)),
        row.corrupted === null
          ? field("own", "Model's own answer (coupled tokens shaded)", coupledText(basis, row.coupled))
          : [field("own", "Model's own answer", el("p", {}, row.own)),
            field("corrupted", "Corrupted response (coupled tokens shaded)", coupledText(basis, row.coupled))],
        el("ol", {class: "levels", "aria-label": "dispreferred levels"}, ...levels.map(renderLevel))));
  }

  function renderError(item) {
    return el("article", {class: "error-item", "data-id": item.id},
      el("h2", {}, item.id), el("p", {}, item.error));
  }

  // ---- header and controls ---------------------------------------------------------------------
  function renderSummary() {
    $("source").textContent = summary.source || "";
    const counts = summary.request_counts;
    const stats = [["ranked rows", summary.rows], ["failed items", summary.errors], ["rows with warnings", summary.warnings]];
    if (counts) stats.unshift(["items", counts.total]);
    const model = summary.model && (summary.model.name || summary.model.path);
    $("stats").replaceChildren(...stats.map(([label, n]) => el("li", {}, el("b", {}, n), " " + label)),
      ...[summary.finished === false ? el("li", {}, "still being written") : null,
        model ? el("li", {}, "model " + String(model).split("/").slice(-2).join("/")) : null].filter(Boolean));
    $("level").replaceChildren(el("option", {value: ""}, "all levels"),
      ...summary.levels.map((l) => el("option", {value: l}, "level " + l)));
    const chips = $("modalities");
    const chip = (name, count) => el("button", {type: "button", class: "chip", "data-modality": name || "",
      "aria-pressed": String(state.modality === name)}, name || "all modalities", count === null ? null : el("span", {class: "count"}, count));
    chips.replaceChildren(chip(null, null), ...Object.entries(summary.modalities).map(([n, c]) => chip(n, c)));
  }

  function syncControls() {
    $("q").value = state.q;
    $("level").value = state.level === null ? "" : String(state.level);
    $("status").value = state.status;
    $("pagesize").value = String(state.pageSize);
    for (const b of $("modalities").querySelectorAll(".chip")) {
      b.setAttribute("aria-pressed", String((b.dataset.modality || null) === state.modality));
    }
  }

  function readHash() {
    const h = new URLSearchParams(location.hash.slice(1));
    state.q = h.get("q") || "";
    state.level = h.get("level") ? Number(h.get("level")) : null;
    state.modality = h.get("modality") || null;
    state.status = ["ranked", "errors", "warnings", "all"].includes(h.get("status")) ? h.get("status") : "ranked";
    state.page = Math.max(0, Number(h.get("page") || 1) - 1) || 0;
    state.pageSize = [10, 25, 50, 100].includes(Number(h.get("size"))) ? Number(h.get("size")) : 25;
  }
  function writeHash() {
    const h = new URLSearchParams();
    if (state.q) h.set("q", state.q);
    if (state.level !== null) h.set("level", state.level);
    if (state.modality !== null) h.set("modality", state.modality);
    if (state.status !== "ranked") h.set("status", state.status);
    if (state.page) h.set("page", state.page + 1);
    if (state.pageSize !== 25) h.set("size", state.pageSize);
    history.replaceState(null, "", "#" + h.toString());
  }

  // ---- the page --------------------------------------------------------------------------------
  let pending = 0;
  async function refresh() {
    const ticket = ++pending;
    document.body.dataset.state = "loading";
    writeHash();
    let result;
    try {
      result = await source.page(state, state.page * state.pageSize, state.pageSize);
    } catch (error) {
      if (ticket === pending) showError(error);
      return;
    }
    if (ticket !== pending) return; // a newer request superseded this one
    const pages = Math.max(1, Math.ceil(result.total / state.pageSize));
    if (state.page >= pages && result.total > 0) { state.page = pages - 1; refresh(); return; }
    $("items").replaceChildren(...(result.items.length
      ? result.items.map((item) => ("error" in item ? renderError(item) : renderRow(item)))
      : [el("div", {class: "notice"}, "Nothing matches these filters.")]));
    const first = result.total ? result.offset + 1 : 0;
    $("results").textContent = "Showing " + first + "\u2013" + (result.offset + result.items.length) + " of " + result.total;
    $("results").dataset.total = result.total;
    $("page-info").textContent = "Page " + (state.page + 1) + " of " + pages;
    $("prev").disabled = state.page === 0;
    $("next").disabled = state.page + 1 >= pages;
    document.body.dataset.render = String(++renders);
    document.body.dataset.state = "ready";
  }

  function showError(error) {
    if (error instanceof ApiError && error.status === 401) {
      $("keyform").classList.add("shown");
      $("keymsg").textContent = sessionStorage.getItem(KEY_STORE) ? "That key was not accepted." : "This API needs a key.";
    }
    $("items").replaceChildren(el("div", {class: "notice", role: "alert"}, "Could not load rows: " + error.message));
    document.body.dataset.state = "error";
  }

  function onFilter(change) {
    return () => { change(); state.page = 0; refresh(); };
  }
  let typing = null;
  $("q").addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(onFilter(() => { state.q = $("q").value; }), 200);
  });
  $("q").addEventListener("keydown", (e) => {
    if (e.key === "Enter") { clearTimeout(typing); onFilter(() => { state.q = $("q").value; })(); }
  });
  $("level").addEventListener("change", onFilter(() => { state.level = $("level").value === "" ? null : Number($("level").value); }));
  $("status").addEventListener("change", onFilter(() => { state.status = $("status").value; }));
  $("pagesize").addEventListener("change", onFilter(() => { state.pageSize = Number($("pagesize").value); }));
  $("modalities").addEventListener("click", (e) => {
    const b = e.target.closest(".chip");
    if (b) onFilter(() => { state.modality = b.dataset.modality || null; syncControls(); })();
  });
  $("prev").addEventListener("click", () => { if (state.page > 0) { state.page--; refresh(); window.scrollTo(0, 0); } });
  $("next").addEventListener("click", () => { state.page++; refresh(); window.scrollTo(0, 0); });
  $("keyform").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY_STORE, $("apikey").value.trim());
    $("apikey").value = "";
    start();
  });

  // One tooltip for every [data-tip]: on hover and on keyboard focus.
  const tip = $("hscr-tip");
  function showTip(target) {
    tip.textContent = target.dataset.tip;
    tip.hidden = false;
    target.setAttribute("aria-describedby", "hscr-tip");
    const box = target.getBoundingClientRect();
    const top = box.bottom + 6 + tip.offsetHeight > innerHeight ? box.top - tip.offsetHeight - 6 : box.bottom + 6;
    tip.style.left = Math.max(4, Math.min(innerWidth - tip.offsetWidth - 4, box.left)) + "px";
    tip.style.top = top + "px";
  }
  function hideTip(target) { tip.hidden = true; if (target) target.removeAttribute("aria-describedby"); }
  for (const [on, off] of [["mouseover", "mouseout"], ["focusin", "focusout"]]) {
    document.addEventListener(on, (e) => { const t = e.target.closest && e.target.closest("[data-tip]"); if (t) showTip(t); });
    document.addEventListener(off, (e) => { const t = e.target.closest && e.target.closest("[data-tip]"); if (t) hideTip(t); });
  }

  // A link or an edited address with another fragment (#q=...&page=3) re-runs the query.
  window.addEventListener("hashchange", () => { if (summary) { readHash(); syncControls(); refresh(); } });

  async function start() {
    try {
      summary = await source.summary();
    } catch (error) {
      showError(error);
      return;
    }
    $("keyform").classList.remove("shown");
    renderSummary();
    readHash();
    syncControls();
    refresh();
  }
  start();
})();
