"""The model card of a real tiny run: every number equals the run's files; missing files are named.

One module fixture trains a tiny CLIP for one epoch on 48 synthetic photos, evaluates its test split,
runs the fashion suite (which the untrained-ish tiny model fails) and evaluates the tiny CLIP itself on
the run's test split as the zero-shot baseline (about 25 s in all).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from huggingface_hub import ModelCard
from typer.testing import CliRunner

from cliptune.cli.app import app
from cliptune.config import load_config
from cliptune.data.synthetic import render_fashion
from cliptune.data.synthetic.suite import write_fashion_suite
from cliptune.export.card import CardError, model_card, write_model_card
from cliptune.train.run import train
from tests.tiny_models import make_tiny_clip

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("card")
    fashion = render_fashion(root / "fashion", n=48, seed=0)
    suite = write_fashion_suite(fashion)
    clip = make_tiny_clip(root / "clip")
    cfg = load_config(
        None,
        [
            "name=tuned",
            f"data.catalogue={fashion}",
            "data.split.ratios={train: 0.6, val: 0.2, test: 0.2}",
            f"model.backbone={clip}",
            f"model.cache_dir={root / 'cache'}",
            "train.early_stopping=null",
            "train.epochs=1",
            "train.batch_size=8",
            "eval.bootstrap=50",
        ],
    )
    run = train(cfg, runs_root=root / "runs", quiet=True)
    for args in (
        ["eval", str(run), "--split", "test", "-q"],
        ["eval", str(clip), "--splits-from", str(run), "--split", "test", "--out", str(root / "base"), "-q"],
    ):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["test", str(run), "--suite", str(suite), "--split", "all", "-q"])
    assert res.exit_code == 1, res.output  # the gate fails: what the card must say at the top
    return {"root": root, "run": run, "fashion": fashion, "base": root / "base"}


def _json(path: Path) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(path.read_text())
    return value


def _front_matter(card: str) -> dict[str, Any]:
    _, front, _ = card.split("---\n", 2)
    value: dict[str, Any] = yaml.safe_load(front)
    return value


def _section(card: str, title: str) -> str:
    return card.split(f"\n## {title}")[1].split("\n## ")[0]


def _interval(m: dict[str, Any]) -> str:
    # formatted here, independently of the report's helper: mean [low, high] n, three decimals
    return f"{m['mean']:.3f} [{m['low']:.3f}, {m['high']:.3f}] n={m['n']}"


def test_test_metrics_carry_their_exact_intervals_and_n(world: dict[str, Path]) -> None:
    card = model_card(world["run"])
    test = _json(world["run"] / "eval" / "test.json")
    section = _section(card, "Test metrics")
    for key in ("t2i/recall@1", "t2i/recall@5", "t2i/mrr", "i2t/recall@10", "i2t/mrr"):
        assert f"| {key} | {_interval(test['metrics'][key])} |" in section, key
    for key, m in test["metrics"].items():  # the collapsed table holds every metric of the file
        assert f"| {key} | {_interval(m)} |" in section, key
    assert f"Test split ({test['n_rows']} rows, {test['n_images']} images)" in section
    assert f"{test['bootstrap']} resamples" in section
    assert all(m["n"] == 10 for m in test["metrics"].values())  # 10 test rows: the n the card shows


def test_front_matter_parses_with_the_expected_fields(world: dict[str, Path]) -> None:
    card = model_card(world["run"], license="mit")
    front = _front_matter(card)
    assert front["library_name"] == "cliptune" and front["license"] == "mit"
    assert front["tags"] == ["cliptune", "clip", "image-text-retrieval"]
    assert "base_model" not in front  # the backbone is a local folder, not a hub id
    loaded = ModelCard(card)
    test = _json(world["run"] / "eval" / "test.json")
    results = {r.metric_type: r.metric_value for r in loaded.data.eval_results}
    assert results["t2i/mrr"] == test["metrics"]["t2i/mrr"]["mean"]
    assert set(results) == {
        f"{d}/{m}" for d in ("t2i", "i2t") for m in ("recall@1", "recall@5", "recall@10", "mrr", "ndcg@10")
    }
    assert {r.dataset_split for r in loaded.data.eval_results} == {"test"}


def test_suite_verdicts_per_category_and_the_failed_gate_on_top(world: dict[str, Path]) -> None:
    card = model_card(world["run"])
    suite = _json(world["run"] / "suite" / "fashion-behaviour.json")
    assert not suite["passed"]
    status = _section(card, "Status")
    assert "This model FAILED its behavioural gate" in status
    assert card.index("FAILED its behavioural gate") < card.index("## Base model")
    section = _section(card, "Behavioural suites")
    for cat, c in suite["categories"].items():
        verdict = "pass" if c["passed"] else "**FAIL**"
        assert f"| {cat} | {verdict} | {c['n_queries']} | {_interval(c['metrics']['mrr'])} |" in section
        assert cat in status or c["passed"]
    assert "Suite fashion-behaviour failed in:" in _section(card, "Limitations")


def test_data_summary_equals_the_runs_files(world: dict[str, Path]) -> None:
    card = model_card(world["run"])
    splits = _json(world["run"] / "splits.json")
    meta = pd.read_csv(world["fashion"] / "metadata.csv")
    section = _section(card, "Data")
    for split, groups in splits.items():
        rows = int(meta["group"].isin(groups).sum())  # counted from the catalogue, not from the summary
        images = "10" if split == "test" else "not evaluated"
        assert f"| {split} | {len(groups)} | {rows} | {images} |" in section, split
    assert f"| total | {sum(map(len, splits.values()))} | {len(meta)} |" in section
    assert f"Catalogue: {world['fashion']}." in section
    assert "most likely a synthetic catalogue" in section  # render_fashion wrote contact_sheet.png
    assert "config.yaml (the full resolved config)" in _section(card, "Training")
    assert (world["run"] / "config.yaml").read_text().strip() in card


def test_a_passing_gate_says_so(world: dict[str, Path], tmp_path: Path) -> None:
    run = _copy_run(world["run"], tmp_path / "passed")
    path = run / "suite" / "fashion-behaviour.json"
    suite = _json(path)
    suite["passed"] = True
    for c in suite["categories"].values():
        c["passed"], c["failures"] = True, []
    path.write_text(json.dumps(suite))
    card = model_card(run)
    assert "This model passed its behavioural gate (fashion-behaviour)." in card
    assert "FAIL" not in card


def test_a_run_without_eval_and_suite_says_what_is_missing(world: dict[str, Path], tmp_path: Path) -> None:
    run = _copy_run(world["run"], tmp_path / "bare")
    shutil.rmtree(run / "eval")
    shutil.rmtree(run / "suite")
    card = model_card(run)
    assert "No eval/test.json: the test split was not evaluated (evaluated splits: none)." in card
    assert "This model was not gated: the run has no suite/*.json." in card
    assert "No suite/*.json: no behavioural suite was run." in card
    assert "No baseline comparison in this run directory." in card
    assert "The test split was not evaluated" in _section(card, "Limitations")
    assert "model-index" not in _front_matter(card)


def test_baseline_comparison_reads_both_evaluations(world: dict[str, Path]) -> None:
    card = model_card(world["run"], baseline=world["base"])
    base = _json(world["base"] / "eval" / "test.json")["metrics"]
    own = _json(world["run"] / "eval" / "test.json")["metrics"]
    section = _section(card, "Comparison with the baseline")
    for key in ("t2i/mrr", "i2t/recall@5", "loss"):
        diff = own[key]["mean"] - base[key]["mean"]
        row = f"| {key} | {base[key]['mean']:.4f} | {own[key]['mean']:.4f} | {diff:+.3f} ["
        assert row in section, key
    assert "test split" in section


@pytest.mark.parametrize("where", ["runs/compare", "compare"])  # compare's default --out; the demo's
def test_compare_json_beside_the_run_is_found(world: dict[str, Path], tmp_path: Path, where: str) -> None:
    run = _copy_run(world["run"], tmp_path / "runs" / "tuned")
    delta = {
        "metric": "t2i/mrr",
        "baseline": 0.5,
        "candidate": 0.625,
        "verdict": "not distinguishable",
        "interval": {"low": -0.1, "high": 0.3},
    }
    compared = {
        "baseline": str(tmp_path / "evals" / "base"),
        "runs": [str(tmp_path / "evals" / "base"), str(run)],
        "deltas": {"tuned": {"test": [delta, {**delta, "metric": "t2i/map", "interval": None}]}},
        "summary": {"tuned": {"sentence": "0 better, 0 worse."}},
    }
    (tmp_path / where).mkdir()
    (tmp_path / where / "compare.json").write_text(json.dumps(compared))
    section = _section(model_card(run), "Comparison with the baseline")
    assert "0 better, 0 worse." in section
    # 0.625 - 0.5 = +0.125, the interval as compare wrote it
    assert "| t2i/mrr | 0.5000 | 0.6250 | +0.125 [-0.100, +0.300] | not distinguishable |" in section
    assert "t2i/map" not in section  # not a headline metric: compare.md has it


def test_write_model_card_and_not_a_run(world: dict[str, Path], tmp_path: Path) -> None:
    path = write_model_card(world["run"], tmp_path / "export")
    assert path == tmp_path / "export" / "README.md"
    assert path.read_text() == model_card(world["run"])
    with pytest.raises(CardError, match="not a run directory"):
        model_card(tmp_path)


def _copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoints"))
    return dest


def test_limitations_name_the_test_n_and_the_widest_interval(world: dict[str, Path]) -> None:
    card = model_card(world["run"])
    metrics = _json(world["run"] / "eval" / "test.json")["metrics"]
    head = {
        f"{d}/{m}": metrics[f"{d}/{m}"]
        for d in ("t2i", "i2t")
        for m in ("recall@1", "recall@5", "recall@10", "mrr", "ndcg@10")
    }
    key = max(head, key=lambda k: head[k]["high"] - head[k]["low"])
    width = head[key]["high"] - head[key]["low"]
    assert width > 0.2  # 10 queries: wider than the report's WIDE_INTERVAL
    expected = (
        f"the widest headline interval, {key}, spans {width:.3f} ({_interval(head[key])}), wider than 0.2"
    )
    assert expected in _section(card, "Limitations")
    assert (
        "48 rows in 17 groups in all, 27 of them trained on" in card
    )  # summary.json info, see the data test


def test_the_staged_files_alone_load_as_the_runs_model(world: dict[str, Path], tmp_path: Path) -> None:
    from cliptune.export.hub import stage
    from cliptune.models.factory import load_model

    repo = tmp_path / "repo"  # what snapshot_download would give back
    for f in stage(world["run"]):
        (repo / f.path_in_repo).parent.mkdir(parents=True, exist_ok=True)
        (repo / f.path_in_repo).write_bytes(
            f.source if isinstance(f.source, bytes) else f.source.read_bytes()
        )
    assert load_model(repo).name == load_model(world["run"]).name
    assert (repo / "README.md").read_text() == model_card(world["run"])


def test_rejected_rows_and_an_untrained_best_are_stated(world: dict[str, Path], tmp_path: Path) -> None:
    run = _copy_run(world["run"], tmp_path / "untrained")
    # two rejected records, one of them a caption with a newline inside its quotes
    (run / "rejected.csv").write_text(
        'file_name,row,reason\na.png,3,"not an image\nat all"\nb.png,7,missing\n'
    )
    summary = _json(run / "summary.json")
    summary["best_epoch"] = 0
    (run / "summary.json").write_text(json.dumps(summary))
    card = model_card(run)
    assert "rejected.csv lists 2 catalogue row(s) left out of training." in _section(card, "Data")
    assert "model/ holds the untrained model (epoch 0)" in _section(card, "Status")
    assert "| best epoch (model/) | 0 |" in _section(card, "Training")
    assert "Training did not improve on the base model (best epoch 0)." in _section(card, "Limitations")


def test_push_dry_run_stages_the_card_with_its_baseline(world: dict[str, Path], tmp_path: Path) -> None:
    args = ["push", str(world["run"]), "me/tuned", "--dry-run", "--baseline"]
    result = runner.invoke(app, [*args, str(world["base"])])
    assert result.exit_code == 0, result.output
    card = model_card(world["run"], baseline=world["base"]).encode()
    assert result.output.splitlines()[0] == f"README.md  {len(card)} bytes"
    missing = runner.invoke(app, [*args, str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and "Traceback" not in missing.output
    assert f"push failed: {tmp_path / 'nowhere'}: run directory not found" in " ".join(missing.output.split())


def test_export_of_a_run_writes_its_card_beside_the_graphs(world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "onnx"
    args = ["export", str(world["run"]), str(out), "--parity-samples", "2", "--baseline", str(world["base"])]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    card = (out / "README.md").read_text(encoding="utf-8")
    assert card == model_card(world["run"], baseline=world["base"], onnx=out)
    assert "image.onnx" in _section(card, "How to use") and "## Comparison with the baseline (base)" in card


def test_export_of_a_bare_model_says_there_is_no_card(world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "plain"
    model = world["run"] / "model"
    result = runner.invoke(
        app, ["export", str(model), str(out), "--data", str(world["fashion"]), "--parity-samples", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "no model card" in result.output and not (out / "README.md").exists()
