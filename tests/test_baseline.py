"""Zero-shot baselines on a run's own queries (`eval/test --splits-from`) and a leaderboard of many models."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import typer
import yaml
from typer.testing import CliRunner

from cliptune.cli.eval import register as register_eval
from cliptune.cli.report import register as register_report
from cliptune.cli.test import register as register_test
from cliptune.config import load_config
from cliptune.data.splits import load_splits
from cliptune.data.synthetic import render_fashion
from cliptune.evaluation.errors import EvalError
from cliptune.evaluation.run import (
    evaluate_model_on_run,
    evaluate_run,
    write_eval,
    write_model_evaluation,
)
from cliptune.rundir import EVALUATION_FILE, RunDir
from cliptune.train.run import train
from tests.tiny_models import make_tiny_clip

runner = CliRunner()


def _app() -> typer.Typer:
    app = typer.Typer()
    app.callback()(lambda: None)  # keep the commands subcommands, as in the real app
    for register in (register_eval, register_test, register_report):
        register(app)
    return app


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One catalogue, one tiny CLIP (the zero-shot model) and three runs trained from it on the same splits."""
    root = tmp_path_factory.mktemp("baseline")
    fashion = render_fashion(root / "fashion", n=48, seed=0)
    clip = make_tiny_clip(root / "clip")
    runs: dict[str, Path] = {}
    for name, lr in (("a", 2e-3), ("b", 5e-3), ("c", 1e-4)):
        cfg = load_config(
            None,
            [
                f"name={name}",
                f"data.catalogue={fashion}",
                "data.split.ratios={train: 0.6, val: 0.2, test: 0.2}",
                f"model.backbone={clip}",
                f"model.cache_dir={root / 'cache'}",
                "train.early_stopping=null",
                "train.epochs=1",
                "train.batch_size=8",
                f"train.lr={lr}",
                "eval.bootstrap=50",
            ],
        )
        runs[name] = train(cfg, runs_root=root / "runs", quiet=True)
    return {"root": root, "fashion": fashion, "clip": clip, "cache": root / "cache", **runs}


def _ids(result: dict, direction: str) -> list[str]:
    return list(result["per_query"][direction]["query_ids"])


def test_baseline_queries_are_the_runs_own(world: dict[str, Path]) -> None:
    run = world["a"]
    own = evaluate_run(run, ["test"], bootstrap=20, progress=False)["test"]
    base = evaluate_model_on_run(world["clip"], run, ["test"], bootstrap=20, progress=False)["test"]
    for direction in ("t2i", "i2t", "loss"):
        assert _ids(base, direction) == _ids(own, direction), direction
    # the loss is the run's formula (its configured temperature and batch size), not blank
    assert base["loss"]["name"] == "info_nce" and base["loss"]["temperature"] == own["loss"]["temperature"]
    assert "loss" in base["metrics"]
    # the run's own model through the baseline path gives the run's own numbers (same queries, same model)
    again = evaluate_model_on_run(run / "model", run, ["test"], bootstrap=20, progress=False)["test"]
    assert again["metrics"] == own["metrics"]


def test_a_run_without_splits_is_refused_and_never_given_one(world: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "nosplits"
    run.mkdir()
    (run / "config.yaml").write_text(RunDir(world["a"]).config.read_text())
    with pytest.raises(EvalError, match="no splits.json"):
        evaluate_model_on_run("embedded", run, ["test"], progress=False)
    assert not (run / "splits.json").exists()


def test_cli_eval_splits_from_writes_an_evaluation_folder(world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "evals" / "base"
    args = ["eval", str(world["clip"]), "--splits-from", str(world["b"]), "--bootstrap", "20", "-q"]
    res = runner.invoke(_app(), [*args, "--split", "test", "--out", str(out)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(_app(), [*args, "--split", "train", "--out", str(out)])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / EVALUATION_FILE).read_text())
    assert manifest["splits_from"] == str(world["b"].resolve())
    assert manifest["model"] == str(world["clip"].resolve())
    assert manifest["evals"] == ["test", "train"] and manifest["text_column"] == "text"
    saved = json.loads((out / "eval" / "test.json").read_text())
    own = evaluate_run(world["b"], ["test"], bootstrap=0, progress=False)["test"]
    assert _ids(saved, "t2i") == _ids(own, "t2i") and saved["n_rows"] == own["n_rows"]
    # another model into the same folder would mix two evaluations: refused
    other = runner.invoke(_app(), ["eval", "embedded", "--splits-from", str(world["b"]), "--out", str(out)])
    assert other.exit_code == 1 and "use another folder" in other.output
    with pytest.raises(EvalError, match="use another folder"):
        write_model_evaluation(out, str(world["clip"]), world["a"])


def test_text_column_works_for_bare_models(world: dict[str, Path], tmp_path: Path) -> None:
    meta = pd.read_csv(world["fashion"] / "metadata.csv")
    generic = set(meta["text_generic"].astype(str))
    # on a run's split
    out = tmp_path / "generic"
    args = ["eval", str(world["clip"]), "--splits-from", str(world["a"]), "--text-column", "text_generic"]
    res = runner.invoke(_app(), [*args, "--out", str(out), "--bootstrap", "0", "-q"])
    assert res.exit_code == 0, res.output
    saved = json.loads((out / "eval" / "test.json").read_text())
    own = evaluate_run(world["a"], ["test"], bootstrap=0, progress=False)["test"]
    assert saved["text_column"] == "text_generic" and _ids(saved, "t2i") == _ids(own, "t2i")
    assert set(saved["per_query"]["t2i"]["queries"]) <= generic
    # on a catalogue without a run
    res = runner.invoke(
        _app(),
        [
            "eval",
            str(world["clip"]),
            "--data",
            str(world["fashion"]),
            "--text-column",
            "text_generic",
            "--cache-dir",
            str(world["cache"]),
            "--out",
            str(tmp_path / "bare"),
            "--bootstrap",
            "0",
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    bare = json.loads((tmp_path / "bare" / "all.json").read_text())
    assert bare["text_column"] == "text_generic" and set(bare["per_query"]["t2i"]["queries"]) <= generic


def test_suite_on_a_runs_split_ranks_only_its_images(world: dict[str, Path], tmp_path: Path) -> None:
    run = world["a"]
    meta = pd.read_csv(world["fashion"] / "metadata.csv")
    test_groups = set(load_splits(RunDir(run).splits)["test"])
    in_test = meta[meta["group"].isin(test_groups)]
    absent = sorted(set(meta["garment"]) - set(in_test["garment"]))
    queries = [{"id": "any", "text": "a garment", "relevant": {"garment": sorted(set(meta["garment"]))}}]
    if absent:  # a query whose relevant images are all outside the split is skipped, not scored
        queries.append({"id": "gone", "text": f"a {absent[0]}", "relevant": {"garment": absent[0]}})
    suite = tmp_path / "s.yaml"
    ungated = {"mrr": None, "precision": None, "accuracy": None, "recall": None}
    suite.write_text(
        yaml.safe_dump(
            {
                "suite": "mini",
                "defaults": {"thresholds": ungated},
                "categories": {"all": {"queries": queries}},
            }
        )
    )
    out = tmp_path / "evals" / "base"
    res = runner.invoke(
        _app(),
        [
            "test",
            str(world["clip"]),
            "--suite",
            str(suite),
            "--splits-from",
            str(run),
            "--out",
            str(out),
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    result = json.loads((out / "suite" / "mini.json").read_text())
    images = set(in_test["file_name"])
    assert result["n_items"] == len(images) and result["split"] == "test"
    (scored,) = [q for q in result["queries"] if q["id"] == "any"]
    assert scored["n_relevant"] == len(images) and {t["id"] for t in scored["top"]} <= images
    assert [q["id"] for q in result["skipped"]] == (["gone"] if absent else [])
    assert json.loads((out / EVALUATION_FILE).read_text())["suites"] == ["mini"]
    # the run itself ranks the same test images by default; --split all ranks every catalogue image
    res = runner.invoke(
        _app(), ["test", str(run), "--suite", str(suite), "--out", str(tmp_path / "own"), "-q"]
    )
    assert res.exit_code == 0, res.output
    own = json.loads((tmp_path / "own" / "mini.json").read_text())
    assert (own["split"], own["n_items"]) == ("test", len(images))
    res = runner.invoke(
        _app(),
        ["test", str(run), "--suite", str(suite), "--split", "all", "--out", str(tmp_path / "all"), "-q"],
    )
    assert res.exit_code == 0, res.output
    whole = json.loads((tmp_path / "all" / "mini.json").read_text())
    assert whole["n_items"] == meta["file_name"].nunique() and whole["skipped"] == []


def test_leaderboard_of_a_zero_shot_baseline_and_three_runs(world: dict[str, Path], tmp_path: Path) -> None:
    runs = [world["a"], world["b"], world["c"]]
    for run in runs:
        for result in evaluate_run(run, ["train", "test"], bootstrap=50, progress=False).values():
            write_eval(result, run)
    base = tmp_path / "evals" / "base"
    res = runner.invoke(
        _app(),
        [
            "eval",
            str(world["clip"]),
            "--splits-from",
            str(world["b"]),
            "--all-splits",
            "--bootstrap",
            "50",
            "--out",
            str(base),
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        _app(),
        ["compare", *map(str, runs), str(base), "--baseline", str(base), "--out", str(tmp_path / "cmp")],
    )
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert data["baseline"] == str(base) and data["flags"] == []
    for run in runs:
        for split in ("train", "test"):
            deltas = {d["metric"]: d for d in data["deltas"][run.name][split]}
            assert {
                "loss",
                "t2i/recall@1",
                "t2i/recall@5",
                "t2i/recall@10",
                "t2i/mrr",
                "t2i/precision@5",
            } <= set(deltas)
            assert all(d["paired"] for d in deltas.values())  # same split seed: the same query ids
            assert all(d["verdict"] in ("better", "worse", "not distinguishable") for d in deltas.values())
    md = (tmp_path / "cmp" / "compare.md").read_text()
    board = md[md.index("Leaderboard: text → image") :]
    board = board[: board.index("\n\n", board.index("|"))]
    rows = [[c.strip().strip("*") for c in line.strip("|").split("|")] for line in board.splitlines()[2:]]
    rows = [r for r in rows if r[0] in {"base", "a", "b", "c"}]
    expected = [(n, s) for n in ("a", "b", "c") for s in ("train", "test")] + [
        ("base", s)
        for s in ("train", "val", "test")  # --all-splits: the baseline has a val row too
    ]
    assert sorted((r[0], r[1]) for r in rows) == sorted(expected)
    assert all(r[-1] and "(log)" not in r[-1] for r in rows)  # every row's loss is the eval's
    assert "base: " in md and "evaluated on the splits of b" in md


def test_the_documented_example(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # cliptune eval RUN_A/model --splits-from RUN_B --split test; cliptune compare RUN_B evals/... --baseline
    monkeypatch.chdir(tmp_path)
    run_a, run_b = world["a"], world["b"]
    write_eval(evaluate_run(run_b, ["test"], bootstrap=50, progress=False)["test"], run_b)
    res = runner.invoke(
        _app(), ["eval", str(run_a / "model"), "--splits-from", str(run_b), "--split", "test", "-q"]
    )
    assert res.exit_code == 0, res.output
    base = Path("evals") / "a-model-on-b"  # the default folder: evals/<model>-on-<run>
    assert json.loads((base / EVALUATION_FILE).read_text())["evals"] == ["test"]
    res = runner.invoke(_app(), ["compare", str(run_b), str(base), "--baseline", str(base), "--out", "cmp"])
    assert res.exit_code == 0, res.output
    data = json.loads(Path("cmp/compare.json").read_text())
    deltas = data["deltas"]["b"]["test"]
    assert data["flags"] == [] and deltas and all(d["paired"] for d in deltas)
    assert "(unpaired)" not in res.output
