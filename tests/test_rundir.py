"""The run directory's contract (file names, is_run, readers and writers) and the atomic folder writer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cliptune.config import Config, load_config, save_config
from cliptune.data.splits import load_splits, save_splits
from cliptune.rundir import (
    RunDir,
    atomic_folder,
    is_run,
    read_json,
    read_metrics,
    read_summary,
    write_eval_json,
    write_suite_json,
    write_summary,
)


def test_paths_are_the_documented_names(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "r")
    assert run == RunDir(str(tmp_path / "r"))  # a str is accepted and stored as a Path
    got = {
        "config": run.config, "splits": run.splits, "rejected": run.rejected, "metrics": run.metrics,
        "summary": run.summary, "checkpoints": run.checkpoints, "model": run.model,
        "eval": run.eval("test"), "suite": run.suite("fashion"), "report": run.report,
        "report_md": run.report_md,
    }  # fmt: skip
    assert {k: str(v.relative_to(run.path)) for k, v in got.items()} == {
        "config": "config.yaml", "splits": "splits.json", "rejected": "rejected.csv",
        "metrics": "metrics.jsonl", "summary": "summary.json", "checkpoints": "checkpoints",
        "model": "model", "eval": "eval/test.json", "suite": "suite/fashion.json",
        "report": "report.html", "report_md": "report.md",
    }  # fmt: skip
    assert run.eval_dir == run.path / "eval" and run.suite_dir == run.path / "suite"


def test_is_run_needs_config_and_model(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert not is_run(tmp_path)
    run.config.write_text("{}\n")
    assert not is_run(tmp_path)  # a config alone: a run that has not finished training
    run.model.mkdir()
    assert is_run(tmp_path) and is_run(str(tmp_path))
    assert not is_run(tmp_path / "missing")


def test_readers_read_what_the_writers_wrote(tmp_path: Path) -> None:
    cfg = Config.model_validate({"name": "r", "train": {"epochs": 3}})
    # config.yaml and splits.json have their schemas' owners as readers/writers, at RunDir's paths
    assert save_config(cfg, RunDir(tmp_path).config) == RunDir(tmp_path).config
    assert load_config(RunDir(tmp_path).config) == cfg
    save_splits({"train": ["b", "a"], "test": ["c"]}, RunDir(tmp_path).splits)
    assert load_splits(RunDir(tmp_path).splits) == {"test": ["c"], "train": ["a", "b"]}
    write_summary(tmp_path, {"best": {"val/loss": 0.5}, "run_dir": tmp_path})
    assert read_summary(tmp_path) == {"best": {"val/loss": 0.5}, "run_dir": str(tmp_path)}
    assert read_metrics(tmp_path) == []
    RunDir(tmp_path).metrics.write_text('{"step": 1}\n\n{"step": 2}\n')
    assert read_metrics(tmp_path) == [{"step": 1}, {"step": 2}]


def test_eval_and_suite_json_go_in_their_folder_atomically(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    path = write_eval_json(run.eval_dir, {"split": "test", "metrics": {"mrr": 0.5}})
    assert path == run.eval("test") and path.read_text().endswith("\n")
    assert read_json(path) == {"split": "test", "metrics": {"mrr": 0.5}}
    with pytest.raises(ValueError):
        write_eval_json(run.eval_dir, {"split": "val", "metrics": {"mrr": float("nan")}})
    assert sorted(p.name for p in run.eval_dir.iterdir()) == ["test.json"]  # no temporary file left
    path = write_suite_json(run.suite_dir, {"suite": "fashion", "passed": True})
    assert path == run.suite("fashion")
    assert path.read_text() == json.dumps({"suite": "fashion", "passed": True}, indent=1) + "\n"


def test_atomic_folder_replaces_a_folder_or_a_file(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.write_text("a file in the way")
    with atomic_folder(final) as tmp:
        (tmp / "a.txt").write_text("new")
    assert (final / "a.txt").read_text() == "new"
    with atomic_folder(final) as tmp:
        (tmp / "b.txt").write_text("newer")
    assert [p.name for p in final.iterdir()] == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing left beside it
    with pytest.raises(RuntimeError), atomic_folder(final) as tmp:
        (tmp / "c.txt").write_text("half")
        raise RuntimeError("interrupted")
    assert [p.name for p in final.iterdir()] == ["b.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]
