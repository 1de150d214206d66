"""report.html and compare.html in a real browser: no console error, every image decodes, screenshots.

Needs Chromium and the playwright package (no browser download):
    apt-get install -y chromium && pip install playwright
Never `playwright install`: it downloads a browser, which fails offline. The test fails (never skips)
when either is missing, saying how to install it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cliptune.report import build_report, compare_runs
from tests.test_report import _fashion_images, full_run

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
INSTALL = (
    "install them with: apt-get install -y chromium && pip install playwright (never `playwright install`)"
)


def _browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"the playwright package is missing; {INSTALL}")
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.fail(f"{CHROMIUM} is missing; {INSTALL}")
    return sync_playwright()


def _check_page(page, path: Path, shot: Path) -> int:
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("request", lambda req: errors.append(f"network request {req.url}") if not req.url.startswith(("file:", "data:")) else None)  # fmt: skip
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.alt, i.complete, i.naturalWidth])")
    broken = [alt for alt, complete, width in widths if not complete or width <= 0]
    page.screenshot(path=str(shot), full_page=True)
    assert errors == [], errors
    assert broken == [], f"images that did not decode: {broken}"
    return len(widths)


def test_report_and_compare_render_in_chromium(tmp_path: Path) -> None:
    catalogue = _fashion_images(tmp_path, n=12)
    a = full_run(tmp_path, catalogue, name="base", shift=0)
    b = full_run(tmp_path, catalogue, name="tuned", shift=3)
    report_html, _ = build_report(b)
    compare_html, _ = compare_runs([a, b], baseline=a, out=tmp_path / "compare")
    with _browser() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            n_report = _check_page(page, report_html, tmp_path / "report.png")
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            n_compare = _check_page(page, compare_html, tmp_path / "compare.png")
        finally:
            browser.close()
    # report: 3 plots + 6 t2i rows x 5 + 2 triplet rows x 3 (one missing: a div, not an img) + 4 suite tiles
    assert n_report == 3 + 30 + 5 + 4
    assert n_compare > 2  # overlay plots and the movers' thumbnails
    assert (tmp_path / "report.png").stat().st_size > 0 and (tmp_path / "compare.png").stat().st_size > 0
