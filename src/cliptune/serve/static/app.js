/* The search page: text, image and "more like this" queries against POST /search, facets from
   GET /info's attributes, a results grid. Server text only ever lands in textContent (common.js el). */
"use strict";

(() => {
  const { el, api, ApiError, fmt } = cliptune;
  const $ = (id) => document.getElementById(id);
  const K_CHOICES = [5, 10, 20, 50, 100];

  let current = null; // the last query: {text} | {like} | {image: File}; facets and k re-run it
  let sequence = 0;   // answers to superseded requests are dropped, so a slow one never overwrites a newer one
  let previewUrl = null;
  let maxUpload = 0;  // bytes, from /info's limits: a larger file is refused here, before it is uploaded

  function setStatus(text, kind = "") {
    const status = $("status");
    status.textContent = text;
    status.className = `status ${kind}`;
  }

  function where() {
    const filters = {};
    for (const select of $("facets").querySelectorAll("select[data-attr]")) {
      if (select.value !== "") filters[select.dataset.attr] = select.value;
    }
    return filters;
  }

  function k() {
    return Number($("k").value);
  }

  function request(query) {
    if (query.image) {
      const form = new FormData();
      form.append("image", query.image, query.image.name || "query.png");
      form.append("k", String(k()));
      form.append("where", JSON.stringify(where()));
      return { method: "POST", body: form };
    }
    const body = { ...query, k: k(), where: where() };
    return { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  }

  function describe(query) {
    if (query.image) return `image ${query.image.name || ""}`.trim();
    if (query.like) return `more like ${query.like}`;
    return `“${query.text}”`;
  }

  /** A text or "more like this" search lives in the address (#q=...&k=...&colour=...): a link re-runs it.
      An image cannot travel in a link, so an image search clears it. */
  function remember(query) {
    const params = new URLSearchParams();
    if (query.text !== undefined) params.set("q", query.text);
    else if (query.like !== undefined) params.set("like", query.like);
    if ([...params].length) {
      params.set("k", String(k()));
      for (const [attr, value] of Object.entries(where())) params.set(`where.${attr}`, value);
    }
    const hash = [...params].length ? `#${params}` : "";
    history.replaceState(null, "", `${location.pathname}${location.search}${hash}`);
  }

  function recall() {
    const params = new URLSearchParams(location.hash.slice(1));
    const choose = (select, value) => {
      if ([...select.options].some((o) => o.value === value)) select.value = value;
      return select.value === value;
    };
    if (params.has("k")) choose($("k"), params.get("k"));
    for (const [key, value] of params) {
      const select = key.startsWith("where.") && $("facets").querySelector(`select[data-attr="${CSS.escape(key.slice(6))}"]`);
      if (select && choose(select, value)) select.classList.add("active");
    }
    $("clear-filters").hidden = !Object.keys(where()).length;
    if (params.get("q")) {
      $("query").value = params.get("q");
      return { text: params.get("q") };
    }
    if (params.get("like")) {
      const id = params.get("like");
      showQueryImage(`/images/${id.split("/").map(encodeURIComponent).join("/")}`, `more like: ${id}`);
      return { like: id };
    }
    return null;
  }

  async function run(query) {
    current = query;
    remember(query);
    const mine = ++sequence;
    setStatus(`Searching ${describe(query)} …`, "busy");
    $("results").setAttribute("aria-busy", "true");
    try {
      const answer = await api("/search", request(query));
      if (mine !== sequence) return;
      render(answer.hits || []);
      const n = (answer.hits || []).length;
      setStatus(`${n} result${n === 1 ? "" : "s"} in ${fmt(answer.took_ms, 1)} ms · ${describe(query)}`, "ok");
    } catch (err) {
      if (mine !== sequence) return;
      if (!(err instanceof ApiError)) throw err;
      setStatus(err.message, "error");
    } finally {
      if (mine === sequence) $("results").removeAttribute("aria-busy");
    }
  }

  function attributeText(attributes) {
    return Object.entries(attributes || {}).map(([a, v]) => `${a}: ${v}`).join(" · ");
  }

  function hitCard(hit) {
    const attrs = attributeText(hit.attributes);
    return el("article", { class: "hit", dataset: { id: hit.id, rank: hit.rank }, title: `${hit.id}\n${attrs}` }, [
      el("div", { class: "thumb" }, [
        el("img", { src: hit.image_url, alt: hit.caption || hit.id, loading: "lazy", decoding: "async" }),
        el("span", { class: "rank", text: `#${hit.rank}` }),
      ]),
      el("div", { class: "meta" }, [
        el("p", { class: "caption", text: hit.caption || hit.id }),
        el("p", { class: "attrs", text: attrs }),
        el("div", { class: "row" }, [
          el("span", { class: "score", text: fmt(hit.score, 3), title: "cosine similarity to the query" }),
          el("button", {
            class: "like", type: "button", text: "more like this",
            onclick: () => {
              showQueryImage(hit.image_url, `more like: ${hit.caption || hit.id}`);
              $("query").value = "";
              run({ like: hit.id });
            },
          }),
        ]),
      ]),
    ]);
  }

  function render(hits) {
    const results = $("results");
    results.replaceChildren(...hits.map(hitCard));
    if (!hits.length) results.append(el("p", { class: "empty", text: "Nothing matches: loosen a filter or rephrase." }));
  }

  function clearImage() {
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = null;
    $("drop-preview").hidden = true;
    $("drop-preview").removeAttribute("src");
    $("drop").classList.remove("has-image");
    $("drop-text").textContent = "Drop an image here, or click to choose one: search by image";
  }

  /** The drop zone shows the image being searched with: a dropped file or the item of "more like this". */
  function showQueryImage(src, label) {
    clearImage();
    const preview = $("drop-preview");
    preview.src = src;
    preview.hidden = false;
    $("drop").classList.add("has-image");
    $("drop-text").textContent = label;
  }

  function megabytes(bytes) {
    return `${(bytes / (1 << 20)).toFixed(1)} MB`;
  }

  function searchImage(file) {
    if (!file) return;
    if (maxUpload && file.size > maxUpload) {
      sequence++;  // an answer still in flight must not overwrite this message
      const bytes = (n) => n.toLocaleString("en");
      setStatus(`${file.name || "The image"} is too large (${bytes(file.size)} bytes); this server takes images up to ${megabytes(maxUpload)} (${bytes(maxUpload)} bytes).`, "error");
      $("file").value = "";
      return;
    }
    $("file").value = "";  // choosing the same file again searches again
    const url = URL.createObjectURL(file);
    showQueryImage(url, file.name || "query image");
    previewUrl = url;
    $("query").value = "";
    run({ image: file });
  }

  function facets(attributes) {
    const box = $("facets");
    const names = Object.keys(attributes || {});
    if (!names.length) box.append(el("span", { class: "muted", text: "this index has no attributes" }));
    for (const name of names) {
      const select = el("select", { dataset: { attr: name }, "aria-label": `filter by ${name}` }, [
        el("option", { value: "", text: "any" }),
        ...attributes[name].map((v) => el("option", { value: String(v), text: String(v) })),
      ]);
      select.addEventListener("change", () => {
        select.classList.toggle("active", select.value !== "");
        $("clear-filters").hidden = !Object.keys(where()).length;
        if (current) run(current);
      });
      box.append(el("label", { class: "facet" }, [el("span", { text: name }), select]));
    }
    box.append(el("button", {
      id: "clear-filters", type: "button", text: "clear filters", hidden: true,
      onclick: () => {
        for (const select of box.querySelectorAll("select[data-attr]")) {
          select.value = "";
          select.classList.remove("active");
        }
        $("clear-filters").hidden = true;
        if (current) run(current);
      },
    }));
  }

  function kChoices(maxK) {
    const select = $("k");
    const choices = K_CHOICES.filter((n) => !maxK || n <= maxK);
    for (const n of choices.length ? choices : [maxK]) select.append(el("option", { value: n, text: n }));
    select.value = choices.includes(10) ? "10" : select.options[0].value;
    select.addEventListener("change", () => current && run(current));
  }

  function wire() {
    $("search-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const text = $("query").value.trim();
      if (!text) {
        setStatus("Type a few words to search, or drop an image.", "error");
        return;
      }
      clearImage();
      $("file").value = "";
      run({ text });
    });
    $("file").addEventListener("change", () => searchImage($("file").files[0]));
    document.addEventListener("keydown", (event) => {
      const typing = event.target instanceof HTMLInputElement || event.target instanceof HTMLSelectElement;
      if (event.key === "/" && !typing) {
        event.preventDefault();
        $("query").focus();
      }
    });
    const drop = $("drop");
    for (const type of ["dragenter", "dragover"]) {
      drop.addEventListener(type, (event) => {
        event.preventDefault();
        drop.classList.add("over");
      });
    }
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (event) => {
      event.preventDefault();
      drop.classList.remove("over");
      const files = event.dataTransfer && event.dataTransfer.files;
      if (files && files.length) searchImage(files[0]);
    });
    // keyboard: Enter or Space on the focused drop zone opens the file chooser
    drop.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        $("file").click();
      }
    });
  }

  async function start() {
    wire();
    try {
      const info = await cliptune.header();
      facets(info.attributes);
      kChoices(info.limits && info.limits.max_k);
      if (info.limits && info.limits.max_query_chars) $("query").maxLength = info.limits.max_query_chars;
      if (info.limits && info.limits.max_upload_bytes) maxUpload = info.limits.max_upload_bytes;
      document.body.dataset.ready = "true";
      const linked = recall();
      if (linked) run(linked);
    } catch (err) {
      setStatus(err.message, "error");
    }
  }

  start();
})();
