"""`cliptune test` gates on held-out images: a run ranks its test split by default, `--split` chooses,
queries that lose their relevant images in the split are reported per query (never scored), and the JSON,
console, JUnit and report say which images were ranked."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import typer
import yaml
from typer.testing import CliRunner

import cliptune.suites.run as suite_run
from cliptune.cli.report import register as register_report
from cliptune.cli.test import register as register_test
from cliptune.config import load_config
from cliptune.data.splits import load_splits, save_splits
from cliptune.data.synthetic import render_fashion
from cliptune.rundir import RunDir
from cliptune.train.run import train
from tests.tiny_models import make_tiny_clip

runner = CliRunner()
UNGATED = {"mrr": None, "precision": None, "accuracy": None, "recall": None}


def _app() -> typer.Typer:
    app = typer.Typer()
    app.callback()(lambda: None)  # keep the commands subcommands, as in the real app
    register_test(app)
    register_report(app)
    return app


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A one-epoch tiny CLIP run on a 40-image synthetic catalogue, and each split's images by hand."""
    root = tmp_path_factory.mktemp("heldout")
    fashion = render_fashion(root / "fashion", n=40, seed=0)
    cfg = load_config(
        None,
        [
            "name=tiny",
            f"data.catalogue={fashion}",
            "data.split.ratios={train: 0.6, val: 0.2, test: 0.2}",
            f"model.backbone={make_tiny_clip(root / 'clip')}",
            f"model.cache_dir={root / 'cache'}",
            "train.early_stopping=null",
            "train.epochs=1",
            "train.batch_size=8",
            "eval.bootstrap=20",
        ],
    )
    run = train(cfg, runs_root=root / "runs", quiet=True)
    meta = pd.read_csv(fashion / "metadata.csv")
    splits = load_splits(RunDir(run).splits)
    images = {name: set(meta[meta["group"].isin(groups)]["file_name"]) for name, groups in splits.items()}
    images["all"] = set(meta["file_name"])
    garments = sorted(set(meta["garment"]))
    return {
        "root": root,
        "fashion": fashion,
        "run": run,
        "splits": splits,
        "images": images,
        "garments": garments,
    }


def _suite(path: Path, **categories: list[dict[str, Any]]) -> Path:
    cats = {name: {"queries": queries} for name, queries in categories.items()}
    path.write_text(
        yaml.safe_dump({"suite": "mini", "defaults": {"thresholds": UNGATED}, "categories": cats})
    )
    return path


def _any(world: dict[str, Any]) -> dict[str, Any]:
    """Relevant: every image (every garment), so the query is scored on any split."""
    return {"id": "any", "text": "a garment", "relevant": {"garment": world["garments"]}}


def _trained(world: dict[str, Any], qid: str) -> dict[str, Any]:
    """Relevant: only training groups, so the query loses every relevant image on test or val."""
    return {"id": qid, "text": "a trained garment", "relevant": {"group": world["splits"]["train"]}}


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Records the catalogue-relative paths of every batch of images the suite embeds."""
    calls: list[list[str]] = []
    real = suite_run.embed_images_with

    def embed(model: Any, paths: list[Path], **kw: Any) -> Any:
        calls.append([f"{p.parent.name}/{p.name}" for p in paths])
        return real(model, paths, **kw)

    monkeypatch.setattr(suite_run, "embed_images_with", embed)
    return calls


@pytest.mark.parametrize("split", [None, "all", "train", "val"])
def test_a_run_ranks_its_test_split_by_default_and_split_chooses(
    world: dict[str, Any], spy: list[list[str]], tmp_path: Path, split: str | None
) -> None:
    suite = _suite(tmp_path / "s.yaml", every=[_any(world)])
    args = ["test", str(world["run"]), "--suite", str(suite), "--out", str(tmp_path / "o"), "-q"]
    res = runner.invoke(_app(), [*args, "--bootstrap", "0", *(["--split", split] if split else [])])
    assert res.exit_code == 0, res.output
    name = split or "test"
    expected = world["images"][name]
    (ranked,) = spy  # one image batch: the ranked items (the suite has no image query)
    assert set(ranked) == expected and len(ranked) == len(expected)  # each image once, no other
    result = json.loads((tmp_path / "o" / "mini.json").read_text())
    assert result["split"] == name and result["n_items"] == len(expected)
    assert result["splits_from"] == (None if name == "all" else str(world["run"].resolve()))
    assert result["skipped"] == [] and result["unmeasured"] == {}
    assert f"ranked: split {name}, {len(expected)} images" in res.output
    (query,) = result["queries"]
    assert query["n_relevant"] == len(expected) and {t["id"] for t in query["top"]} <= expected


def test_queries_whose_relevant_images_all_trained_are_reported_not_scored(
    world: dict[str, Any], tmp_path: Path
) -> None:
    suite = _suite(
        tmp_path / "s.yaml",
        every=[_any(world), _trained(world, "trained-1")],
        trained=[_trained(world, "trained-2")],
    )
    junit = tmp_path / "j.xml"
    args = ["test", str(world["run"]), "--suite", str(suite), "--out", str(tmp_path / "o"), "-q"]
    res = runner.invoke(_app(), [*args, "--bootstrap", "0", "--junit", str(junit)])
    assert res.exit_code == 0, res.output  # the one measured category passes (ungated)
    result = json.loads((tmp_path / "o" / "mini.json").read_text())
    status = "no relevant image in split test"
    assert [(q["id"], q["category"], q["status"]) for q in result["skipped"]] == [
        ("trained-1", "every", status),
        ("trained-2", "trained", status),
    ]
    assert [q["id"] for q in result["queries"]] == ["any"]  # never scored, so in no mean
    every = result["categories"]["every"]
    assert (every["n_queries"], every["n_skipped"], every["metrics"]["mrr"]["n"]) == (1, 1, 1)
    # a category with no scored query gates nothing: neither passed nor failed
    assert "trained" not in result["categories"]
    assert result["unmeasured"] == {"trained": "no query with a relevant image in split test (1 skipped)"}
    assert result["passed"] is True
    assert f"skipped in every ({status}): trained-1" in res.output
    assert "not measured trained: no query with a relevant image in split test" in res.output
    assert "PASS mini: all 1 measured categories passed (1 not measured: trained)" in res.output
    # JUnit: the lost queries and the unmeasured gate are <skipped>, not passes or failures
    root = ET.parse(junit).getroot()
    assert (root.get("tests"), root.get("failures"), root.get("skipped")) == ("5", "0", "3")
    skipped = {(s.get("name"), c.get("name")): c.find("skipped") for s in root for c in s.findall("testcase")}
    assert skipped[("every", "any")] is None and skipped[("every", "gate")] is None
    for key in (("every", "trained-1"), ("trained", "trained-2"), ("trained", "gate")):
        node = skipped[key]
        assert node is not None and "split test" in node.get("message", ""), key
    first = root.find("testsuite")
    assert first is not None
    props = {p.get("name"): p.get("value") for p in first.iter("property")}
    assert props["split"] == "test" and props["n_items"] == str(len(world["images"]["test"]))


def test_a_suite_left_with_nothing_to_score_is_an_error_naming_the_split(
    world: dict[str, Any], tmp_path: Path
) -> None:
    suite = _suite(tmp_path / "s.yaml", trained=[_trained(world, "t1"), _trained(world, "t2")])
    res = runner.invoke(_app(), ["test", str(world["run"]), "--suite", str(suite), "--out", str(tmp_path)])
    n = len(world["images"]["test"])
    assert res.exit_code == 1
    assert (
        f"suite mini on the {n} images of split test: none of its 2 queries has a relevant image"
        in res.output
    )
    assert "--split" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "mini.json").exists()


def test_a_bare_model_ranks_every_image_and_says_so(world: dict[str, Any], tmp_path: Path) -> None:
    suite = _suite(tmp_path / "s.yaml", every=[_any(world)])
    clip = str(world["root"] / "clip")
    base = ["test", clip, "--suite", str(suite), "--data", str(world["fashion"]), "-q", "--bootstrap", "0"]
    res = runner.invoke(_app(), [*base, "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    n = len(world["images"]["all"])
    assert f"ranked: split all, {n} images; no run splits: every catalogue image is ranked" in res.output
    result = json.loads((tmp_path / "o" / "mini.json").read_text())
    assert (result["split"], result["n_items"], result["splits_from"]) == ("all", n, None)
    # the same rule through --splits-from: that run's held-out split
    res = runner.invoke(_app(), [*base, "--splits-from", str(world["run"]), "--out", str(tmp_path / "e")])
    assert res.exit_code == 0, res.output
    borrowed = json.loads((tmp_path / "e" / "suite" / "mini.json").read_text())
    assert (borrowed["split"], borrowed["n_items"]) == ("test", len(world["images"]["test"]))
    # a split without any run's splits is refused, naming the fix
    res = runner.invoke(_app(), [*base, "--split", "test", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "no splits.json to take split 'test' from" in res.output
    assert "--splits-from RUN" in res.output


def test_a_run_without_a_held_out_split_is_refused(world: dict[str, Any], tmp_path: Path) -> None:
    """Every group in train: gating its images would measure training, so the default is an error."""
    run = tmp_path / "trainonly"
    run.mkdir()
    for name in ("config.yaml", "model"):
        (run / name).symlink_to(world["run"] / name)
    groups = sorted(g for gs in world["splits"].values() for g in gs)
    save_splits({"train": groups, "val": [], "test": []}, RunDir(run).splits)
    suite = _suite(tmp_path / "s.yaml", every=[_any(world)])
    res = runner.invoke(_app(), ["test", str(run), "--suite", str(suite), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "no held-out split (no test or val groups)" in res.output
    assert "choose the images with --split (train, all)" in res.output
    res = runner.invoke(_app(), ["test", str(run), "--suite", str(suite), "--split", "val", "-q"])
    assert res.exit_code == 2 and "split 'val' has no images" in res.output


def test_the_report_states_the_ranked_split(world: dict[str, Any], tmp_path: Path) -> None:
    suite = _suite(tmp_path / "s.yaml", every=[_any(world), _trained(world, "trained-1")])
    run = world["run"]
    res = runner.invoke(_app(), ["test", str(run), "--suite", str(suite), "-q", "--bootstrap", "0"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(_app(), ["report", str(run)])
    assert res.exit_code == 0, res.output
    md = (run / "report.md").read_text()
    n = len(world["images"]["test"])
    assert f"Ranked: split test, {n} images. Not scored: 1 query (no relevant image in split test)." in md
