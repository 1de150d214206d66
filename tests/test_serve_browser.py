"""The `cliptune serve` web pages in a real browser against a real server: search, drop, filter, more like
this, the suite review page; no console error, no failed request, server text rendered as text.

Headless Chromium through playwright, exactly as tests/test_report_browser.py (Debian's /usr/bin/chromium;
never `playwright install`). The server is uvicorn on a free 127.0.0.1 port in a thread
(tests/serve_fixtures.py), serving `create_app` over a tiny index; every page answer is checked against the
API's own JSON for the same request, fetched here with httpx. Screenshots go to the test's tmp folder and,
when the environment variable CLIPTUNE_ARTIFACTS names a folder, are copied there (CI keeps them).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from cliptune.serve.app import create_app
from tests.serve_fixtures import Served, live_server, served_index
from tests.test_report_browser import CHROMIUM, CHROMIUM_ARGS, _browser

HOSTILE = '<script>window.__xss = 1</script><img src="x" onerror="window.__xss = 2"> a violet <b>pullover</b>'
HOSTILE_ID = "images/000000.png"
QUERY_IMAGE = "images/000017.png"  # the blue dotted t-shirt

# counts finished searches (the status line turns ok or error), so each step waits for its own answer
COUNT_ANSWERS = """
window.__answers = 0;
new MutationObserver(() => {
  const s = document.getElementById("status");
  if (s && (s.classList.contains("ok") || s.classList.contains("error"))) window.__answers++;
}).observe(document, {subtree: true, attributes: true, attributeFilter: ["class"], childList: true});
"""
DROP_FILE = """([b64, name]) => {
  const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
  const dt = new DataTransfer();
  dt.items.add(new File([bytes], name, {type: "image/png"}));
  document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
}"""
ALL_DECODED = "s => [...document.querySelectorAll(s + ' img')].every(i => i.complete && i.naturalWidth > 0)"
HIT_IDS = "hits => hits.map(h => h.dataset.id)"
TEXTS = "nodes => nodes.map(n => n.textContent)"
SUITE_HITS = (
    "qs => qs.map(q => [q.dataset.id, [...q.querySelectorAll('.hit')].map(h => [h.dataset.id, h.className])])"
)
FACETS = "ss => ss.map(s => [s.dataset.attr, [...s.options].map(o => o.value)])"


class Api:
    """The same requests the page sends, straight to the server: the oracle for what the page shows."""

    def __init__(self, client: httpx.Client, catalogue: Path) -> None:
        self.client, self.catalogue = client, catalogue

    def search(self, **body: Any) -> list[dict[str, Any]]:
        answer = self.client.post("/search", json=body)
        assert answer.status_code == 200, answer.text
        return list(answer.json()["hits"])

    def search_image(self, name: str, where: str = "{}") -> list[dict[str, Any]]:
        files = {"image": ("tee.png", (self.catalogue / name).read_bytes(), "image/png")}
        answer = self.client.post("/search", files=files, data={"k": "10", "where": where})
        assert answer.status_code == 200, answer.text
        return list(answer.json()["hits"])


def _ids(page: Any) -> list[str]:
    return list(page.eval_on_selector_all("#results .hit", HIT_IDS))


def _answered(page: Any, action: Any) -> None:
    """Do `action` and wait until the page shows the answer to the request it sent."""
    before = page.evaluate("window.__answers")
    action()
    page.wait_for_function(f"window.__answers > {before}")


def _all_images_decode(page: Any, scope: str) -> None:
    """Every image under `scope` loads and decodes (lazy ones are made eager first)."""
    page.eval_on_selector_all(f"{scope} img", "imgs => imgs.forEach(i => { i.loading = 'eager'; })")
    page.wait_for_function(ALL_DECODED, arg=scope)


def _watch(page: Any, base: str) -> list[str]:
    """Console errors, page errors, failed or refused requests, and any request off this server."""
    problems: list[str] = []

    def request(r: Any) -> None:
        if not r.url.startswith((base, "data:", "blob:")):
            problems.append(f"off-site request: {r.url}")

    def response(r: Any) -> None:
        if r.status >= 400:
            problems.append(f"{r.status}: {r.url}")

    def console(m: Any) -> None:
        if m.type == "error":
            problems.append(f"console: {m.text}")

    page.on("console", console)
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("requestfailed", lambda r: problems.append(f"failed: {r.url} {r.failure}"))
    page.on("request", request)
    page.on("response", response)
    page.add_init_script(COUNT_ANSWERS)
    return problems


def _check_header(page: Any, info: dict[str, Any]) -> None:
    assert page.text_content("#model") == info["model"]  # a short identity is shown whole
    assert page.text_content("#index-size") == f"{info['index']['n']} items · {info['index']['dim']}-d"
    mrr = info["run"]["metrics"]["test"]["t2i/mrr"]
    # the fixture's run ranks query i's own photo at i % 4 + 1: MRR (1 + 1/2 + 1/3 + 1/4) / 4 over 24
    assert mrr["n"] == 24 and mrr["mean"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    shown = f"t2i MRR {mrr['mean']:.2f} [{mrr['low']:.2f}, {mrr['high']:.2f}], n=24"
    assert shown in page.text_content("#metrics")
    badges = page.eval_on_selector_all("#verdicts .badge", "bs => bs.map(b => [b.textContent, b.className])")
    assert badges == [
        ["suite fail", "badge fail"],
        ["garments pass", "badge pass"],
        ["similar fail", "badge fail"],
    ]
    assert page.is_visible("#suite-link")  # the server has a suite
    facets = page.eval_on_selector_all("#facets select", FACETS)
    assert facets == [[a, ["", *values]] for a, values in info["attributes"].items()]


def _text_query(page: Any, api: Api) -> None:
    """Type, Enter: the grid is the API's answer in order, scores to 3 decimals, the hostile caption as text."""
    page.select_option("#k", "50")
    page.fill("#query", "ripped blue jeans")
    _answered(page, lambda: page.press("#query", "Enter"))
    expected = api.search(text="ripped blue jeans", k=50, where={})
    assert len(expected) == 24 and _ids(page) == [h["id"] for h in expected]
    assert page.eval_on_selector_all("#results .score", TEXTS) == [f"{h['score']:.3f}" for h in expected]
    assert page.text_content("#status").startswith("24 results in ")
    assert page.url.endswith("/#q=ripped+blue+jeans&k=50")  # the search is a link
    assert page.text_content(f"#results .hit[data-id='{HOSTILE_ID}'] .caption") == HOSTILE
    assert page.evaluate("window.__xss") is None  # neither the script nor the onerror ran
    assert (
        page.eval_on_selector_all("#results script, #results b, #results img[src='x']", "e => e.length") == 0
    )
    _all_images_decode(page, "#results")


def _image_filter_like(page: Any, api: Api, served: Served, shot: Path) -> None:
    """Drop a photo, filter by colour, "more like this", clear the filter: each grid is the API's answer."""
    _answered(page, lambda: page.select_option("#k", "10"))  # k re-runs the text query: wait for it
    assert len(_ids(page)) == 10
    data = base64.b64encode((served.catalogue / QUERY_IMAGE).read_bytes()).decode()
    _answered(page, lambda: page.evaluate(DROP_FILE, [data, "tee.png"]))
    by_image = [h["id"] for h in api.search_image(QUERY_IMAGE)]
    assert _ids(page) == by_image and by_image[0] == QUERY_IMAGE  # the photo itself is nearest
    assert "tee.png" in page.text_content("#status")
    assert "#" not in page.url  # an image cannot travel in a link: the text query's link is gone
    assert page.evaluate("document.getElementById('drop-preview').naturalWidth") == 128  # the dropped photo

    _answered(page, lambda: page.select_option("#facets select[data-attr='colour']", "blue"))
    blue = api.search_image(QUERY_IMAGE, where='{"colour": "blue"}')
    assert blue and all(h["attributes"]["colour"] == "blue" for h in blue)
    assert _ids(page) == [h["id"] for h in blue]
    assert all("colour: blue" in a for a in page.eval_on_selector_all("#results .attrs", TEXTS))

    second = _ids(page)[1]
    _answered(page, lambda: page.click(f"#results .hit[data-id='{second}'] .like"))
    like = api.search(like=second, k=10, where={"colour": "blue"})  # the filter stays on
    assert _ids(page) == [h["id"] for h in like] and second in _ids(page)
    assert page.text_content("#status").endswith(f"more like {second}")
    assert page.url.endswith("#" + urlencode({"like": second, "k": 10, "where.colour": "blue"}))
    caption = next(h["caption"] for h in blue if h["id"] == second)
    assert page.text_content("#drop-text") == f"more like: {caption}"  # the liked item is the query shown
    assert page.get_attribute("#drop-preview", "src") == next(
        h["image_url"] for h in blue if h["id"] == second
    )
    page.screenshot(path=str(shot), full_page=True)

    # clearing the filters re-runs "more like this" over every item
    _answered(page, lambda: page.click("#clear-filters"))
    assert _ids(page) == [h["id"] for h in api.search(like=second, k=10, where={})]
    assert page.is_hidden("#clear-filters")
    assert page.eval_on_selector_all("#facets select", "ss => ss.map(s => s.value)") == [""] * 6


def _narrow_screen(page: Any, shot: Path) -> None:
    """On a phone-sized screen the grid reflows to 2 columns and nothing scrolls sideways."""
    page.set_viewport_size({"width": 390, "height": 844})
    columns = page.eval_on_selector(
        "#results", "g => getComputedStyle(g).gridTemplateColumns.split(' ').length"
    )
    assert columns == 2
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.screenshot(path=str(shot), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 900})


def _suite_page(page: Any, api: Api) -> None:
    """Each query's hits carry the flags of /suite/results, one section per category."""
    page.click("#suite-link")
    page.wait_for_selector("body[data-ready='true']")
    results = api.client.get("/suite/results").json()
    expected = [
        [q["id"], [[h["id"], f"hit flag-{h['flag']}"] for h in q["hits"]]] for q in results["queries"]
    ]
    assert page.eval_on_selector_all("#suite .query", SUITE_HITS) == expected
    assert {"relevant", "red"} <= {h["flag"] for q in results["queries"] for h in q["hits"]}
    marks = {"relevant": "✓", "yellow": "~", "red": "✗", "none": "·"}  # the cue beside the colour
    shown = page.eval_on_selector_all("#suite .hit .mark", TEXTS)
    assert shown == [marks[h["flag"]] for q in results["queries"] for h in q["hits"]]
    sections = page.eval_on_selector_all("#suite .category", "cs => cs.map(c => c.dataset.category)")
    assert sections == results["categories"] == ["garments", "similar"]
    verdicts = page.eval_on_selector_all("#suite .qhead .badge", TEXTS)
    assert verdicts == ["pass" if q["passed"] else "fail" for q in results["queries"]]
    _all_images_decode(page, "#suite")
    page.check("#only-failed")  # a reviewer's filter: the passing queries hide, the failing stay
    visible = page.eval_on_selector_all(
        "#suite .query", "qs => qs.filter(q => q.offsetParent).map(q => q.dataset.id)"
    )
    assert visible == [q["id"] for q in results["queries"] if not q["passed"]]
    page.uncheck("#only-failed")


def _linked_search(page: Any, api: Api) -> None:
    """A link with a query, k and a filter opens the page with them set and their answer shown."""
    page.goto(f"{api.client.base_url}#q=ripped+jeans&k=5&where.colour=blue")
    page.wait_for_function("window.__answers > 0")
    assert _ids(page) == [h["id"] for h in api.search(text="ripped jeans", k=5, where={"colour": "blue"})]
    assert page.input_value("#query") == "ripped jeans" and page.input_value("#k") == "5"
    assert page.input_value("#facets select[data-attr='colour']") == "blue" and page.is_visible(
        "#clear-filters"
    )


def _refused_upload(page: Any, api: Api, tmp_path: Path) -> None:
    """An HTML file named .jpg: the status line is the server's sentence, not a code; a file over the
    server's limit is refused by the page before any upload."""
    page.goto(str(api.client.base_url))
    page.wait_for_selector("body[data-ready='true']")
    limit = api.client.get("/info").json()["limits"]["max_upload_bytes"]
    assert limit == 10 * 2**20  # the default: 10,485,760 bytes
    big = """n => document.getElementById("drop").dispatchEvent(new DragEvent("drop", {bubbles: true, cancelable: true,
        dataTransfer: (() => { const d = new DataTransfer(); d.items.add(new File([new Uint8Array(n)], "huge.png")); return d; })()}))"""
    _answered(page, lambda: page.evaluate(big, limit + 1))
    expected = (
        "huge.png is too large (10,485,761 bytes); this server takes images up to 10.0 MB (10,485,760 bytes)."
    )
    assert page.text_content("#status") == expected
    fake = tmp_path / "page.jpg"
    fake.write_text("<html><body>not an image</body></html>")
    refused = api.client.post("/search", files={"image": ("page.jpg", fake.read_bytes(), "image/jpeg")})
    assert refused.status_code == 415
    _answered(page, lambda: page.set_input_files("#file", str(fake)))
    assert page.text_content("#status") == refused.json()["detail"]
    assert page.get_attribute("#status", "class") == "status error"


def _save(shots: list[Path]) -> None:
    target = os.environ.get("CLIPTUNE_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        for shot in shots:
            shutil.copy2(shot, Path(target) / f"serve-{shot.name}")


def test_search_and_suite_pages_in_chromium(tmp_path: Path) -> None:
    served = served_index(tmp_path, captions={HOSTILE_ID: HOSTILE})
    shots = [tmp_path / "search.png", tmp_path / "suite.png", tmp_path / "search-phone.png"]
    with (
        live_server(create_app(served.index, suite=served.suite)) as base,
        httpx.Client(base_url=base, timeout=30) as client,
        _browser() as p,
    ):
        api = Api(client, served.catalogue)
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            problems = _watch(page, base)
            page.goto(base + "/")
            page.wait_for_selector("body[data-ready='true']")
            _check_header(page, client.get("/info").json())
            _text_query(page, api)
            _image_filter_like(page, api, served, shots[0])
            _narrow_screen(page, shots[2])
            _suite_page(page, api)
            page.screenshot(path=str(shots[1]), full_page=True)
            _linked_search(page, api)
            assert problems == [], problems
            _refused_upload(page, api, tmp_path)
        finally:
            browser.close()
    # the refusal is the only thing that went wrong: its response and Chromium's console line about it
    assert len(problems) == 2 and all("415" in p for p in problems), problems
    _save(shots)
    assert all(shot.stat().st_size > 10_000 for shot in shots)


STATIC = Path(__file__).resolve().parents[1] / "src" / "cliptune" / "serve" / "static"


def test_static_assets_are_offline_and_never_parse_server_text_as_html() -> None:
    files = {p.name: p.read_text() for p in STATIC.iterdir()}
    assert set(files) == {"index.html", "suite.html", "common.js", "app.js", "suite.js", "style.css"}
    for name, text in files.items():
        # no URL with a host (http:, https: or protocol-relative), no @import, no font file
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), name
        assert "@import" not in text and "@font-face" not in text, name
    for page in ("index.html", "suite.html"):
        refs = re.findall(r'(?:src|href)="([^"#]+)"', files[page])
        local = [r for r in refs if r.startswith("/static/")]
        assert local and all(r.removeprefix("/static/") in files for r in local), refs
        assert set(refs) - set(local) <= {"/", "/suite", "data:,"}, refs
    for name in ("common.js", "app.js", "suite.js"):
        # text from the server lands in textContent or attributes only
        assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(", files[name]), (
            name
        )
