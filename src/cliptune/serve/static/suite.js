/* The suite review page: every query of the server's --suite, what the index returned for it and how the
   suite flags each hit, so a reviewer sees what the gate saw. Server text only lands in textContent. */
"use strict";

(() => {
  const { el, api, fmt, badge } = cliptune;
  const $ = (id) => document.getElementById(id);
  const FLAG_TEXT = { relevant: "relevant", yellow: "yellow flag", red: "red flag", none: "neither" };
  const FLAG_MARK = { relevant: "✓", yellow: "~", red: "✗", none: "·" };  // a cue beside the colour

  function metricsText(metrics) {
    return Object.entries(metrics || {})
      .map(([name, value]) => `${name} ${typeof value === "number" ? fmt(value, 3) : value === null ? "–" : value}`)
      .join(" · ");
  }

  function thumb(hit) {
    const flag = FLAG_TEXT[hit.flag] ? hit.flag : "none";
    const label = `#${hit.rank} ${hit.caption || hit.id} (${FLAG_TEXT[flag]}, score ${fmt(hit.score, 3)})`;
    return el("figure", { class: `hit flag-${flag}`, dataset: { id: hit.id, flag }, title: `${label}\n${hit.id}` }, [
      el("img", { src: hit.image_url, alt: hit.caption || hit.id, loading: "lazy", decoding: "async" }),
      el("figcaption", {}, [
        el("span", { class: "rank", text: `#${hit.rank}` }),
        el("span", { class: "mark", text: FLAG_MARK[flag], "aria-label": FLAG_TEXT[flag] }),
        el("span", { class: "score", text: fmt(hit.score, 3) }),
      ]),
    ]);
  }

  function queryBlock(q) {
    const what = q.text !== null && q.text !== undefined
      ? el("span", { class: "qtext", text: `“${q.text}”` })
      : el("span", { class: "qimage" }, [
        q.image_url ? el("img", { src: q.image_url, alt: q.image || "query image" }) : null,
        el("span", { text: q.image ? `image ${q.image}` : "image query (not in the catalogue)" }),
      ]);
    return el("section", { class: `query ${q.passed ? "passed" : "failed"}`, dataset: { id: q.id } }, [
      el("div", { class: "qhead" }, [
        el("span", { class: `badge ${q.passed ? "pass" : "fail"}`, text: q.passed ? "pass" : "fail" }),
        el("code", { class: "qid", text: q.id }),
        what,
        el("span", { class: "muted", text: `k=${q.k}` }),
      ]),
      el("p", { class: "qmetrics", text: metricsText(q.metrics) }),
      el("div", { class: "strip" }, (q.hits || []).map(thumb)),
    ]);
  }

  /** A category's verdict: the gate's own when the server sends it, else the share of passing queries. */
  function verdict(name, queries, verdicts) {
    const passed = queries.filter((q) => q.passed).length;
    const count = `${passed} of ${queries.length} queries pass`;
    if (verdicts && typeof verdicts[name] === "boolean") return [badge("gate", verdicts[name], "the category's gate"), count];
    return [null, count];
  }

  async function start() {
    $("only-failed").addEventListener("change", (event) => $("suite").classList.toggle("hide-passed", event.target.checked));
    try {
      await cliptune.header();
    } catch (err) {
      $("status").textContent = err.message;
    }
    let results;
    try {
      results = await api("/suite/results");
    } catch (err) {
      $("status").textContent = err.message;
      $("status").className = "status error";
      return;
    }
    $("suite-title").textContent = `Suite review: ${results.name}`;
    document.title = `cliptune suite: ${results.name}`;
    const queries = results.queries || [];
    const categories = results.categories && results.categories.length
      ? results.categories : [...new Set(queries.map((q) => q.category))];
    const root = $("suite");
    for (const name of categories) {
      const mine = queries.filter((q) => q.category === name);
      const [gate, count] = verdict(name, mine, results.verdicts);
      const anchor = `cat-${name.replace(/[^A-Za-z0-9_-]/g, "_")}`;
      const gated = results.verdicts && typeof results.verdicts[name] === "boolean";
      const tone = gated ? (results.verdicts[name] ? "pass" : "fail") : "";
      const passing = mine.filter((q) => q.passed).length;
      $("toc").append(el("a", { href: `#${anchor}`, class: `toc-item ${tone}`, text: `${name} ${passing}/${mine.length}` }));
      root.append(el("section", { class: "category", id: anchor, dataset: { category: name } }, [
        el("h3", {}, [el("span", { text: name }), gate, el("span", { class: "muted count", text: count })]),
        ...mine.map(queryBlock),
      ]));
    }
    const passed = queries.filter((q) => q.passed).length;
    $("status").textContent = `${queries.length} queries in ${categories.length} categories; ${passed} pass`;
    $("status").className = "status ok";
    document.body.dataset.ready = "true";
  }

  start();
})();
