"""The demo's plan: every step is a real command of the CLI, its configs validate."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from cliptune.cli.app import app
from cliptune.cli.demo import SHIPPED_TO_GENERATED, _run_step, _summary, suite_comparison
from cliptune.cli.demo_steps import PHRASES, demo_steps, write_demo_configs
from cliptune.config import load_config
from cliptune.data.synthetic import render_fashion
from cliptune.suites import load_suite
from cliptune.train.run import train
from tests.tiny_models import make_tiny_clip


def test_demo_configs_validate_and_steps_are_cli_commands(tmp_path: Path) -> None:
    paths = write_demo_configs(tmp_path, fast=True)
    assert paths.pop("phrases").name == "fashion-phrases.yaml"  # the generated suite's wording, not a config
    for path in paths.values():
        cfg = load_config(path)
        assert cfg.model.image_size == 160  # the catalogues are rendered at 160 px
    base, tuned = load_config(paths["base"]), load_config(paths["finetuned"])
    # the base and fine-tuned runs differ only in the caption column they train on
    assert base.data.text_column == "text_generic" and tuned.data.text_column == "text"
    assert base.data.split == tuned.data.split and base.train == tuned.train
    names = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    for step in demo_steps(tmp_path, fast=True):
        assert step.args[0] in names, step.command
    evals = [s for s in demo_steps(tmp_path) if s.args[0] == "eval" and "fashion" in s.args[1]]
    # both fashion models are evaluated on the same rich-caption queries
    assert evals[0].args[-2:] == ["--text-column", "text"]


def _result(categories: dict[str, bool], queries: list[tuple[str, int]], **extra: Any) -> dict[str, Any]:
    """A suite result with the given categories' verdicts and (category, n_yellow) scored queries."""
    return {
        "categories": {
            name: {"passed": ok, "failures": [] if ok else [f"precision@5 0.500 < 0.7 ({name})"]}
            for name, ok in categories.items()
        },
        "queries": [{"category": c, "n_yellow": y} for c, y in queries],
        **extra,
    }


def test_suite_comparison_names_both_verdicts_and_explains_a_difference() -> None:
    shipped = _result(
        {"rips": True, "colours": True, "combinations": False},
        [("rips", 10), ("colours", 30), ("colours", 50), ("combinations", 4)],
        unmeasured={"styles": "no query with a relevant image in split test"},
    )
    generated = _result(
        {"rips": True, "colour": False, "rips+style": True, "garment+colour": False, "style": True},
        [("rips", 0), ("colour", 0), ("rips+style", 6), ("garment+colour", 2)],
    )
    descriptions = {"colours": "Colour: neighbouring colours are yellow; every other colour is red."}
    lines = suite_comparison(shipped, generated, descriptions)
    assert lines == [
        "rips: shipped PASS; generated (rips) PASS (same verdict)",
        "colours: shipped PASS; generated (colour) FAIL (precision@5 0.500 < 0.7 (colour)). They DIFFER: the "
        "shipped rule is 'Colour: neighbouring colours are yellow; every other colour is red.' (40 yellow "
        "images per query); the generated suite knows no neighbouring values (0 yellow per query)",
        "combinations: shipped FAIL (precision@5 0.500 < 0.7 (combinations)); generated (2 combination "
        "categories) FAIL (1 of 2 categories: garment+colour) (same verdict)",
        "styles: shipped not measured; generated (style) PASS",
    ]


@pytest.fixture(scope="module")
def demo_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's folder after its fashion steps, in miniature: a small catalogue and a one-epoch tiny run."""
    out = tmp_path_factory.mktemp("demo")
    render_fashion(out / "data" / "fashion", n=80, seed=0, size=128)
    write_demo_configs(out, fast=True)
    cfg = load_config(
        None,
        [
            "name=fashion-finetuned",
            f"data.catalogue={out / 'data' / 'fashion'}",
            "data.split.ratios={train: 0.5, val: 0.2, test: 0.3}",
            f"model.backbone={make_tiny_clip(out / 'clip')}",
            f"model.cache_dir={out / 'cache'}",
            "train.early_stopping=null",
            "train.epochs=1",
            "train.batch_size=16",
            "eval.bootstrap=10",
        ],
    )
    train(cfg, runs_root=out / "runs", quiet=True)
    return out


def test_the_generated_suite_and_audit_steps_run_and_the_summary_compares(
    demo_world: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = demo_world
    tuned = str(out / "runs" / "fashion-finetuned")
    steps = [
        s
        for s in demo_steps(out, fast=True)
        if (s.args[0] == "test" and s.args[1] == tuned)
        or s.args[0] == "suite"
        or s.args[:2] == ["data", "audit"]
    ]
    assert [s.args[:2] for s in steps] == [
        ["test", tuned],
        ["suite", "generate"],
        ["test", tuned],
        ["data", "audit"],
    ]
    for step in steps:
        code = _run_step(app, step.args)
        assert code == 0 or (step.may_fail and code == 1), (step.command, code)
    generated_file = out / "data" / "fashion" / "generated-suite.yaml"
    generated = load_suite(generated_file)
    # the phrases file the demo writes words the queries: "ripped", never the default "with rips"
    texts = [q.text for c in generated.categories.values() for q in c.queries]
    assert "ripped" in texts and not any("with rips" in (t or "") for t in texts)
    assert list(generated.categories)[:5] == ["rips", "style", "garment", "colour", "pattern"]
    suite_dir = out / "runs" / "fashion-finetuned" / "suite"
    shipped_json = json.loads((suite_dir / "fashion-behaviour.json").read_text())
    generated_json = json.loads((suite_dir / f"{generated.suite}.json").read_text())
    assert (out / "audit" / "audit.csv").is_file() and (out / "audit" / "audit.html").is_file()

    capsys.readouterr()
    lines = _summary(out)
    for cat in [*shipped_json["categories"], *shipped_json.get("unmeasured", {})]:
        line = next(li for li in lines if li.startswith(f"  {cat}: shipped "))
        shipped_words, _, generated_words = line.partition("; generated (")
        if cat in shipped_json["categories"]:
            verdict = "PASS" if shipped_json["categories"][cat]["passed"] else "FAIL"
            assert shipped_words.startswith(f"  {cat}: shipped {verdict}")
        target = SHIPPED_TO_GENERATED[cat]
        if target in generated_json["categories"]:
            verdict = "PASS" if generated_json["categories"][target]["passed"] else "FAIL"
            assert generated_words.startswith(f"{target}) {verdict}")
    pairs = pd.read_csv(out / "audit" / "audit.csv")
    leaks = int((pairs["finding"] == "leak").sum()) if len(pairs) else 0
    assert f"data audit: {leaks} leak(s) across the fine-tuned run's splits among {len(pairs)}" in lines[-1]
    printed = capsys.readouterr().out
    assert (
        str(generated_file) in printed and "(not written)" not in printed.split(str(generated_file))[1][:20]
    )


def test_the_demo_phrases_are_the_ones_docs_suites_md_measured_with() -> None:
    docs = (Path(__file__).resolve().parents[1] / "docs" / "suites.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", docs, re.S) if b.startswith("order:")]
    assert len(blocks) == 1
    assert yaml.safe_load(blocks[0]) == PHRASES  # the demo's summary and the doc's table use one wording
