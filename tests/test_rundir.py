"""The run directory's contract (file names, is_run, readers and writers) and the atomic folder writer."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from cliptune.config import Config, load_config, save_config
from cliptune.data.splits import load_splits, save_splits
from cliptune.rundir import (
    RunDir,
    atomic_folder,
    clean_stale_temps,
    is_run,
    read_json,
    read_metrics,
    read_summary,
    write_eval_json,
    write_suite_json,
    write_summary,
    write_text_atomic,
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


def test_atomic_folder_follows_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with atomic_folder(tmp_path / "model") as tmp:
            (tmp / "w.bin").write_bytes(b"x")
            (tmp / "sub").mkdir()
        with atomic_folder(tmp_path / "other") as tmp:
            write_text_atomic(tmp / "t.json", "{}")
    finally:
        os.umask(old)
    mode = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [*tmp_path.rglob("*"), tmp_path / "model"]}
    # mkdtemp made 0700 folders (and the 0600 files some writers copy its mode to); a run is shared
    assert mode == {"model": 0o755, "w.bin": 0o644, "sub": 0o755, "other": 0o755, "t.json": 0o644}


def test_clean_stale_temps_removes_only_our_temporary_names(tmp_path: Path) -> None:
    hexa = "0123456789abcdef" * 2
    ours = [
        f".model.tmp-{hexa}",  # an atomic_folder killed mid-build (a folder)
        ".model.tmp-k2_x9abc",  # the same, named by the mkdtemp of earlier versions
        f".index.old-{hexa}",  # killed between the two renames of a swap
        f".summary.json.{hexa}.tmp",  # write_bytes_atomic killed mid-write
        f"checkpoints/.step-00000004.tmp-{hexa}",
        f"checkpoints/step-00000004/.trainer.json.{hexa}.tmp",
    ]
    kept = [
        ".gitignore", ".model.tmp-short", "model.tmp-" + hexa, f".a.{hexa}.tmp.bak", "notes.tmp",
        "checkpoints/step-00000004/state.pt", "model/weights.safetensors",
    ]  # fmt: skip
    for name in ours + kept:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name in (ours[0], ours[1], ours[4]):
            path.mkdir()
            (path / "big.bin").write_bytes(b"0" * 100)
        else:
            path.write_text("x")
    removed = clean_stale_temps(tmp_path)
    assert removed == sorted(tmp_path / n for n in ours)
    left = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    assert left == {*kept, "index"}  # `index` never came back from its swap: the old one is put back
    assert clean_stale_temps(tmp_path / "missing") == []


def test_a_swap_killed_between_its_renames_gets_the_old_folder_back(tmp_path: Path) -> None:
    hexa = "ab" * 16
    (tmp_path / f".index.old-{hexa}").mkdir()  # `index` renamed aside, the new one never arrived
    (tmp_path / f".index.old-{hexa}" / "items.jsonl").write_text("old")
    (tmp_path / f".index.tmp-{hexa}").mkdir()  # the new one, maybe half-written
    (tmp_path / f".model.old-{hexa}").mkdir()  # `model` was replaced: this old one is garbage
    (tmp_path / "model").mkdir()
    (tmp_path / f".notes.txt.{hexa}.tmp").write_text("x")
    assert clean_stale_temps(tmp_path, name="index") == [
        tmp_path / f".index.old-{hexa}",
        tmp_path / f".index.tmp-{hexa}",
    ]
    assert (tmp_path / "index" / "items.jsonl").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["index", "model", f".model.old-{hexa}", f".notes.txt.{hexa}.tmp"]
    )  # other names are not this call's business
    clean_stale_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index", "model"]


def test_replacing_a_folder_never_leaves_its_name_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cliptune import rundir

    final = tmp_path / "index"
    with atomic_folder(final) as tmp:
        (tmp / "v").write_text("1")
    seen: list[bool] = []
    real_exchange = rundir._exchange

    def watch(a: Path, b: Path) -> bool:
        swapped = real_exchange(a, b)
        seen.append(swapped and (b / "v").read_text() == "2" and (a / "v").read_text() == "1")
        return swapped

    monkeypatch.setattr(rundir, "_exchange", watch)
    with atomic_folder(final) as tmp:
        (tmp / "v").write_text("2")
    assert seen == [True]  # one atomic exchange: `index` was the old folder, then the new one
    assert (final / "v").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["index"]
