"""Catalogues with their own split column: train/test-only, train-only, test-only, and no validation.

A tiny CLIP with frozen towers (features cached) keeps each run to a few seconds. The train/test-only
catalogue must train, evaluate and gate end to end with a record of where val came from; layouts that
cannot train must fail before anything is embedded (the feature cache stays empty).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from cliptune.cli.app import app
from cliptune.data.synthetic import render_art, render_fashion
from cliptune.data.synthetic.suite import write_fashion_suite
from tests.tiny_models import make_tiny_clip

runner = CliRunner()


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("predefined")
    fashion = render_fashion(root / "fashion", n=60, seed=0)
    return {"fashion": fashion, "clip": make_tiny_clip(root / "clip")}


def _catalogue(assets: dict[str, Path], tmp_path: Path, layout: str) -> Path:
    """A copy of the fashion metadata (images in place) whose every row says train or test."""
    meta = pd.read_csv(assets["fashion"] / "metadata.csv")
    groups = sorted(meta["group"].unique())
    test = set(groups[: len(groups) // 4])  # the first quarter of the products are the test split
    meta["split"] = {
        "train/test": ["test" if g in test else "train" for g in meta["group"]],
        "train": ["train"] * len(meta),
        "test": ["test"] * len(meta),
    }[layout]
    folder = tmp_path / f"cat-{layout.replace('/', '-')}"
    folder.mkdir()
    meta.to_csv(folder / "metadata.csv", index=False)
    (folder / "catalogue.json").write_text(json.dumps({"image_root": str(assets["fashion"])}))
    return folder


def _train(assets: dict[str, Path], tmp_path: Path, catalogue: Path, *sets: str) -> tuple[int, str, Path]:
    cfg = {
        "data": {"catalogue": str(catalogue)},
        "model": {"backbone": str(assets["clip"]), "cache_dir": str(tmp_path / "cache")},
        "train": {"epochs": 2, "batch_size": 8, "lr": 1e-3},
        "eval": {"bootstrap": 50},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    args = ["train", str(path), "--name", "r", "--runs", str(tmp_path / "runs"), "-q"]
    for item in sets:
        args += ["--set", item]
    result = runner.invoke(app, args)
    return result.exit_code, result.output, tmp_path / "runs" / "r"


def test_train_test_catalogue_carves_val_then_trains_evaluates_and_gates(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    catalogue = _catalogue(assets, tmp_path, "train/test")
    code, output, run = _train(assets, tmp_path, catalogue)
    assert code == 0, output
    meta = pd.read_csv(catalogue / "metadata.csv")
    named = dict(zip(meta["group"], meta["split"], strict=False))
    splits = json.loads((run / "splits.json").read_text())
    assert set(splits) == {"train", "val", "test"}
    assert {named[g] for g in splits["val"]} == {"train"}  # val came out of the train rows
    assert splits["test"] == sorted(g for g, s in named.items() if s == "test")  # test untouched
    # 16 train products; val's share 0.1 / 0.9 is 2 products, raised to min(5, 16 // 2) = 5
    assert len(splits["val"]) == 5 and len(splits["train"]) == 11
    val_rows = int(meta["group"].isin(splits["val"]).sum())
    assert f"val: 5 group(s) ({val_rows} rows) carved from the train rows of metadata.csv" in output
    info = json.loads((run / "summary.json").read_text())["info"]["splits"]
    assert info["carved"]["val"] == {
        "groups": 5,
        "rows": val_rows,
        "from": "train",
        "share": pytest.approx(1 / 9),
    }
    assert info["validation"] is True and info["groups"] == {"test": 5, "train": 11, "val": 5}
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("val/t2i/mrr" in r for r in epochs if r["kind"] == "epoch")

    evaluated = runner.invoke(app, ["eval", str(run), "--bootstrap", "50"])
    assert evaluated.exit_code == 0, evaluated.output
    test_json = json.loads((run / "eval" / "test.json").read_text())
    assert test_json["n_rows"] == int((meta["split"] == "test").sum())

    suite = write_fashion_suite(assets["fashion"])
    gated = runner.invoke(app, ["test", str(run), "--suite", str(suite), "-q"])
    assert gated.exit_code in (0, 1), gated.output  # a verdict (pass or fail), never a crash
    verdict = json.loads((run / "suite" / "fashion-behaviour.json").read_text())
    assert isinstance(verdict["passed"], bool)


def test_train_only_catalogue_carves_val_and_test(assets: dict[str, Path], tmp_path: Path) -> None:
    code, output, run = _train(assets, tmp_path, _catalogue(assets, tmp_path, "train"))
    assert code == 0, output
    carved = json.loads((run / "summary.json").read_text())["info"]["splits"]["carved"]
    assert set(carved) == {"val", "test"}
    # 21 products at 0.8/0.1/0.1: min(5, 21 // 4) = 5 groups each for val and test
    splits = json.loads((run / "splits.json").read_text())
    assert (len(splits["val"]), len(splits["test"]), len(splits["train"])) == (5, 5, 11)


def test_test_only_catalogue_fails_before_embedding(assets: dict[str, Path], tmp_path: Path) -> None:
    code, output, run = _train(assets, tmp_path, _catalogue(assets, tmp_path, "test"))
    assert code == 1
    assert "the train split has no rows" in output and "give some rows split 'train'" in output
    assert "Traceback" not in output
    assert not (tmp_path / "cache").exists()  # nothing was embedded
    assert not (run / "metrics.jsonl").exists()
    assert not (run / "splits.json").exists()  # a rerun with the fix splits afresh


def test_no_validation_trains_and_says_so(assets: dict[str, Path], tmp_path: Path) -> None:
    catalogue = _catalogue(assets, tmp_path, "train/test")
    ratios = "data.split.ratios={train: 0.8, test: 0.2}"
    # asking to stop or schedule on a validation metric is rejected before any work, naming the fields
    code, output, _ = _train(assets, tmp_path, catalogue, ratios, "train.early_stopping.metric=val/loss")
    assert code == 2
    assert "has no 'val' share" in output and "train.early_stopping.metric='val/loss'" in output
    code, output, _ = _train(assets, tmp_path, catalogue, ratios, "train.scheduler=plateau")
    assert code == 2 and "train.scheduler='plateau'" in output and not (tmp_path / "cache").exists()

    # left at their defaults, they follow: no early stopping, a cosine schedule
    code, output, run = _train(assets, tmp_path, catalogue, ratios)
    assert code == 0, output
    assert "no validation: data.split.ratios has no val share" in output
    assert set(json.loads((run / "splits.json").read_text())) == {"train", "test"}
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r["kind"] == "epoch"]
    assert len(epochs) == 3 and not any(k.startswith("val/") for r in epochs for k in r)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["info"]["splits"]["validation"] is False and summary["best_epoch"] == 2

    from cliptune.report.diagnostics import diagnose
    from cliptune.report.rundata import load_run

    (stopping,) = [f for f in diagnose(load_run(run)) if f.rule == "stopping"]
    assert "No validation (" in stopping.message and "the kept model is epoch 2" in stopping.message
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["train"]["early_stopping"] is None and config["train"]["scheduler"] == "cosine"
    assert stopping.numbers["watched_metric"] is None


def test_siamese_val_without_triplets_fails_before_embedding(tmp_path: Path) -> None:
    art = render_art(tmp_path / "art", n=16, seed=0)  # 16 artworks of 4 images each
    cfg = {
        "data": {"catalogue": str(art), "split": {"ratios": {"train": 0.95, "val": 0.05}, "min_groups": 0}},
        "model": {"cache_dir": str(tmp_path / "cache"), "head": {"width": 32, "depth": 1, "heads": 2}},
        "loss": {"name": "triplet"},
        "train": {"task": "siamese", "epochs": 1, "batch_size": 8},
    }
    path = tmp_path / "siamese.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = runner.invoke(app, ["train", str(path), "--runs", str(tmp_path / "runs"), "-q"])
    assert result.exit_code == 1
    # 0.05 of 64 rows is one 4-image artwork: no other group in val to draw a negative from
    assert "the val split has no triplets (1 group(s))" in result.output
    assert not (tmp_path / "cache").exists()


def test_ten_product_catalogue_is_called_out_at_train_eval_and_report(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    """The issue's case: 80 photos of 10 products at 0.8/0.1/0.1 (here 60 photos regrouped into 10)."""
    meta = pd.read_csv(assets["fashion"] / "metadata.csv")
    meta["group"] = [f"p{i % 10}" for i in range(len(meta))]
    catalogue = tmp_path / "ten"
    catalogue.mkdir()
    meta.to_csv(catalogue / "metadata.csv", index=False)
    (catalogue / "catalogue.json").write_text(json.dumps({"image_root": str(assets["fashion"])}))

    code, output, run = _train(assets, tmp_path, catalogue, "data.split.min_groups=0")
    assert code == 0, output
    # ratios alone give val and test one product each: every image is relevant to every query
    assert "warning: val has 1 group: every item is relevant to every query" in output
    assert "with 10 groups only one held-out split of 5 groups fits" in output
    summary = json.loads((run / "summary.json").read_text())
    warnings = summary["info"]["splits"]["warnings"]
    assert [w.split(":")[0] for w in warnings] == ["test has 1 group", "val has 1 group"]
    evaluated = runner.invoke(app, ["eval", str(run), "--bootstrap", "20"])
    assert evaluated.exit_code == 0, evaluated.output
    assert "warning: test has 1 group: every item is relevant" in evaluated.output

    from cliptune.report.diagnostics import diagnose
    from cliptune.report.rundata import load_run

    findings = [f for f in diagnose(load_run(run)) if f.rule == "split_health"]
    assert [f.numbers["split"] for f in findings] == ["test", "val"]  # eval/test.json, then training's val
    assert all(f.numbers["classes"] == 1 and "Suggested: with 10 groups" in f.message for f in findings)

    # the default data.split.min_groups gives each held-out split min(5, 10 // 4) = 2 products: still
    # few, so the warning stays, with the chance level it implies (ln 2 = 0.69)
    shutil.rmtree(run)
    code, output, run = _train(assets, tmp_path, catalogue)
    assert code == 0, output
    splits = json.loads((run / "splits.json").read_text())
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (6, 2, 2)
    assert (
        "warning: val has 2 groups (fewer than 5): a random ranking already scores MRR about 0.69" in output
    )
