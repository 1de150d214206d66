/* Shared by the search page and the suite review page: DOM building that never parses server text as
   HTML (every string lands in textContent or an attribute), JSON calls that turn an error response into
   the server's own sentence, and the header (model, index size, run metrics, suite verdicts). */
"use strict";

const cliptune = (() => {
  /** Build an element; `text` goes to textContent, so a caption with <script> stays text. */
  function el(tag, props = {}, children = []) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "text") node.textContent = String(value);
      else if (key === "class") node.className = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) if (child) node.append(child);
    return node;
  }

  /** The one sentence a failed response carries: {"detail": str} or FastAPI's list of validation errors. */
  function detailOf(status, body) {
    const detail = body && body.detail;
    if (typeof detail === "string" && detail) return detail;
    if (Array.isArray(detail) && detail.length) {
      return detail.map((d) => {
        const where = Array.isArray(d.loc) ? d.loc.filter((p) => p !== "body").join(".") : "";
        return where ? `${where}: ${d.msg}` : String(d.msg || d);
      }).join("; ");
    }
    const plain = {
      404: "Not found.", 413: "The upload is too large.", 415: "That file is not an image this server can read.",
      422: "The request was not valid.", 500: "The server failed to answer this request.",
    };
    return plain[status] || `The server answered with status ${status}.`;
  }

  class ApiError extends Error {}

  /** fetch + JSON; a non-2xx answer throws ApiError whose message is the server's detail sentence. */
  async function api(url, options = {}) {
    let response;
    try {
      response = await fetch(url, options);
    } catch (err) {
      throw new ApiError("The server cannot be reached; is `cliptune serve` still running?");
    }
    let body = null;
    try {
      body = await response.json();
    } catch (err) {
      body = null;
    }
    if (!response.ok) throw new ApiError(detailOf(response.status, body));
    return body;
  }

  function fmt(x, digits = 3) {
    return typeof x === "number" && Number.isFinite(x) ? x.toFixed(digits) : "–";
  }

  const SHORT = { mrr: "MRR", ndcg: "nDCG", map: "mAP", precision: "P", recall: "R", accuracy: "acc" };

  /** "t2i/recall@5" -> "t2i R@5", "t2i/mrr" -> "t2i MRR". */
  function metricLabel(key) {
    const parts = key.split("/");
    const last = parts.pop();
    const [name, at] = last.split("@");
    const short = (SHORT[name] || name) + (at ? `@${at}` : "");
    return [...parts, short].join(" ");
  }

  /** "t2i MRR 0.62 [0.55, 0.69], n=120" for {mean, low, high, n}; a plain number prints alone. */
  function metricText(key, value) {
    if (typeof value === "number") return `${metricLabel(key)} ${fmt(value, 2)}`;
    const interval = value && value.low !== undefined && value.high !== undefined
      ? ` [${fmt(value.low, 2)}, ${fmt(value.high, 2)}]` : "";
    const n = value && value.n !== undefined ? `, n=${value.n}` : "";
    return `${metricLabel(key)} ${fmt(value && value.mean, 2)}${interval}${n}`;
  }

  // the headline metrics shown first; the rest stay one click away
  const HEADLINE = ["t2i/mrr", "i2t/mrr", "t2i/recall@1", "t2i/recall@5", "i2t/recall@5"];

  function shortModel(identity) {
    const text = String(identity || "");
    if (text.length <= 36) return text;
    return `${text.slice(0, 16)}…${text.slice(-16)}`;
  }

  function badge(label, passed, title) {
    return el("span", { class: `badge ${passed ? "pass" : "fail"}`, text: `${label} ${passed ? "pass" : "fail"}`, title });
  }

  /** Fill the shared header from GET /info; returns the info object. */
  async function header() {
    const info = await api("/info");
    const model = document.getElementById("model");
    model.textContent = shortModel(info.model);
    model.title = `${info.model}${info.model_source ? ` (from ${info.model_source})` : ""}`;
    const index = info.index || {};
    const size = document.getElementById("index-size");
    size.textContent = `${index.n} items · ${index.dim}-d`;
    size.title = index.path || "";
    if (info.suite) document.getElementById("suite-link").hidden = false;
    const run = info.run;
    if (run) {
      document.getElementById("run").hidden = false;
      const metrics = document.getElementById("metrics");
      const test = (run.metrics && run.metrics.test) || {};
      const keys = Object.keys(test);
      const first = HEADLINE.filter((k) => k in test);
      const shown = first.length ? first : keys.slice(0, 3);
      metrics.append(el("span", { class: "run-name", text: run.name, title: run.path }));
      if (!keys.length) metrics.append(el("span", { class: "muted", text: "no test metrics recorded" }));
      for (const key of shown) metrics.append(el("span", { class: "metric", text: metricText(key, test[key]) }));
      const rest = keys.filter((k) => !shown.includes(k));
      if (rest.length) {
        metrics.append(el("details", { class: "more-metrics" }, [
          el("summary", { text: `${rest.length} more` }),
          el("ul", {}, rest.map((k) => el("li", { text: metricText(k, test[k]) }))),
        ]));
      }
      const verdicts = document.getElementById("verdicts");
      for (const suite of run.suites || []) {
        const group = el("span", { class: "suite-verdict" }, [
          el("span", { class: "suite-name", text: suite.name }),
          badge("suite", suite.passed, `${suite.name}: ${suite.passed ? "every measured category passed" : "a category failed"}`),
        ]);
        for (const [cat, ok] of Object.entries(suite.categories || {})) group.append(badge(cat, ok, `${suite.name} / ${cat}`));
        verdicts.append(group);
      }
    }
    return info;
  }

  return { el, api, ApiError, fmt, header, metricText, badge };
})();
