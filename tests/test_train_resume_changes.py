"""`cliptune train --resume` with changes: safe ones applied and recorded, others refused by name;
a fresh start that fails before training leaves nothing that changes the next start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cliptune.cli.app import app
from cliptune.config import Config, load_config, save_config
from cliptune.data.splits import load_splits
from cliptune.data.synthetic import render_fashion
from cliptune.train.run import ResumeChangeError, resume_changes

runner = CliRunner()


@pytest.fixture(scope="module")
def fashion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render_fashion(tmp_path_factory.mktemp("cat") / "fashion", n=60, seed=0)


def _config(tmp_path: Path, fashion: Path, name: str = "run.yaml", **train: object) -> Path:
    cfg = {
        "data": {"catalogue": str(fashion), "split": {"ratios": {"train": 0.7, "val": 0.3}}},
        "model": {"cache_dir": str(tmp_path / "cache")},
        "train": {"epochs": 2, "batch_size": 16, "lr": 2e-3, "early_stopping": None, **train},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(tmp_path: Path, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["train", *args, "--runs", str(tmp_path / "runs"), "-q"])
    return result.exit_code, result.output


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_more_epochs_on_resume_train_them_and_are_recorded(tmp_path: Path, fashion: Path) -> None:
    cfg = _config(tmp_path, fashion)
    assert _train(tmp_path, str(cfg), "--name", "x")[0] == 0
    assert _train(tmp_path, str(cfg), "--name", "straight", "--set", "train.epochs=3")[0] == 0
    run = tmp_path / "runs" / "x"
    code, out = _train(tmp_path, "--resume", str(run), "--set", "train.epochs=3")
    assert code == 0, out
    assert "with train.epochs 2 -> 3" in out
    assert load_config(run / "config.yaml").train.epochs == 3
    resumed = _records(run)
    note = [r for r in resumed if r["kind"] == "resume"]
    assert note == [{"kind": "resume", "epoch": 2, "step": 4, "changes": {"train.epochs": [2, 3]}}]
    # the plateau schedule does not depend on the planned epochs: the resumed run is the 3-epoch run
    assert [r for r in resumed if r["kind"] != "resume"] == _records(tmp_path / "runs" / "straight")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_trained"] == 3
    assert summary["resume_changes"] == [{"epoch": 2, "step": 4, "changes": {"train.epochs": [2, 3]}}]
    # a finished run resumed without changes trains nothing more and records nothing
    assert _train(tmp_path, "--resume", str(run))[0] == 0
    assert _records(run) == resumed


def test_unsafe_changes_are_refused_with_every_field(tmp_path: Path, fashion: Path) -> None:
    cfg = _config(tmp_path, fashion)
    assert _train(tmp_path, str(cfg), "--name", "x")[0] == 0
    run = tmp_path / "runs" / "x"
    before = (run / "metrics.jsonl").read_bytes(), (run / "config.yaml").read_bytes()
    code, out = _train(tmp_path, "--resume", str(run), "--set", "train.lr=0.1", "--set", "train.epochs=3")
    assert code == 2
    assert f"cannot resume {run} with these changes to its config.yaml: train.lr: 0.002 -> 0.1." in out
    assert "train.epochs" not in out.split("A resume may change")[0]  # the safe one is not blamed
    assert "Traceback" not in out
    # a config file given with --resume is compared whole
    other = _config(tmp_path, fashion, "other.yaml", batch_size=8, seed=3)
    code, out = _train(tmp_path, str(other), "--resume", str(run))
    assert code == 2
    assert "train.batch_size: 16 -> 8; train.seed: 0 -> 3." in out
    code, out = _train(tmp_path, "--resume", str(run), "--set", "train.epochs=1")
    assert code == 2 and "train.epochs: 2 -> 1 (fewer epochs than planned" in out
    assert ((run / "metrics.jsonl").read_bytes(), (run / "config.yaml").read_bytes()) == before
    code, out = _train(tmp_path, str(cfg), "--resume", str(run))  # the same file: nothing changes
    assert code == 0, out


def test_resume_changes_rules() -> None:
    base = Config.model_validate({"train": {"epochs": 2, "early_stopping": {"patience": 1}}})
    new = base.model_copy(deep=True)
    new.train.epochs, new.train.keep_last, new.name = 5, 4, "renamed"
    assert new.train.early_stopping is not None
    new.train.early_stopping.patience = 6
    assert resume_changes(Path("r"), base, new) == {
        "train.early_stopping.patience": (1, 6),
        "train.epochs": (2, 5),
        "train.keep_last": (2, 4),
    }
    cosine = Config.model_validate({"train": {"epochs": 2, "scheduler": "cosine"}})
    with pytest.raises(ResumeChangeError, match="train.epochs: 2 -> 3 \\(the cosine schedule") as info:
        resume_changes(
            Path("r"), cosine, Config.model_validate({"train": {"epochs": 3, "scheduler": "cosine"}})
        )
    assert info.value.refused == {"train.epochs": (2, 3)}
    off = Config.model_validate({"train": {"early_stopping": None}})
    with pytest.raises(ResumeChangeError) as info:
        resume_changes(Path("r"), Config(), off)
    assert set(info.value.refused) == {
        f"train.early_stopping.{k}" for k in ("metric", "min_delta", "mode", "patience")
    } | {"train.early_stopping"}


def test_a_run_saved_with_num_workers_0_resumes_under_the_auto_default() -> None:
    # a run from before "auto" saved data.num_workers: 0; its YAML given again on resume now defaults to
    # "auto": how many processes decode changes no pixel, feature or order, so the resume goes on
    old = Config.model_validate({"data": {"num_workers": 0}})
    assert resume_changes(Path("r"), old, Config()) == {"data.num_workers": (0, "auto")}


def test_a_start_that_fails_before_training_leaves_no_run_behind(tmp_path: Path, fashion: Path) -> None:
    # batch larger than the train split: fails after config.yaml and splits.json were written
    cfg = _config(tmp_path, fashion, batch_size=500)
    code, out = _train(tmp_path, str(cfg), "--name", "x")
    assert code == 1 and "fewer than one global batch" in out
    assert not (tmp_path / "runs" / "x").exists()
    # the next start is a fresh one: its own split seed decides the splits, no stale splits.json is reused
    fixed = [str(_config(tmp_path, fashion, "fixed.yaml", epochs=1)), "--set", "data.split.seed=7"]
    code, out = _train(tmp_path, *fixed, "--name", "x")
    assert code == 0, out
    assert _train(tmp_path, *fixed, "--name", "y")[0] == 0
    runs = tmp_path / "runs"
    assert load_splits(runs / "x" / "splits.json") == load_splits(runs / "y" / "splits.json")
    # a folder that was there before the failed start keeps what it held
    keep = runs / "z"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    assert _train(tmp_path, str(cfg), "--name", "z")[0] == 1
    assert [p.name for p in keep.iterdir()] == ["notes.txt"]


def test_a_run_killed_before_its_first_checkpoint_says_what_to_do(tmp_path: Path, fashion: Path) -> None:
    cfg = [str(_config(tmp_path, fashion, epochs=1)), "--name", "x"]
    run = tmp_path / "runs" / "x"
    (run / "model").mkdir(parents=True)  # what a kill during epoch 1 leaves: the baseline, no checkpoint
    (run / "metrics.jsonl").write_text('{"kind": "epoch", "epoch": 0, "step": 0, "val/loss": 9.0}\n')
    save_config(load_config(cfg[0], ["name=x"]), run / "config.yaml")
    code, out = _train(tmp_path, "--resume", str(run))
    assert code == 1 and f"nothing to resume: no checkpoint in {run / 'checkpoints'}" in out
    code, out = _train(tmp_path, *cfg)
    assert code == 1
    assert out.replace("\n", "") == (
        f"{run} already holds a run, stopped before its first checkpoint, so it cannot be resumed; remove "
        f"{run} to start it again, or pass another --name"
    )
    assert (run / "metrics.jsonl").exists()  # nothing deleted behind the user's back


def test_cli_resume_past_a_damaged_checkpoint_warns_and_names_files(tmp_path: Path, fashion: Path) -> None:
    assert _train(tmp_path, str(_config(tmp_path, fashion)), "--name", "x")[0] == 0
    ckpts = tmp_path / "runs" / "x" / "checkpoints"
    older, newest = sorted(p for p in ckpts.iterdir() if p.is_dir())
    state = newest / "state.pt"
    size = state.stat().st_size
    state.write_bytes(state.read_bytes()[:100])
    code, out = _train(tmp_path, "--resume", str(ckpts.parent), "--set", "train.epochs=3")
    assert code == 0, out
    flat = out.replace("\n", "")
    assert (
        f"warning: damaged checkpoint(s) skipped: {state} has 100 bytes, {size} written; resuming from {older}"
        in flat
    )
    epochs = [r["epoch"] for r in _records(ckpts.parent) if r["kind"] == "epoch"]
    assert epochs == [0, 1, 2, 3]  # epoch 2 trained again from the older checkpoint, then epoch 3
    for folder in ckpts.iterdir():
        if folder.is_dir():
            (folder / "model.safetensors").unlink()
    code, out = _train(tmp_path, "--resume", str(ckpts.parent), "--set", "train.epochs=4")
    assert code == 1 and "Traceback" not in out
    assert out.replace("\n", "").startswith(f"no intact checkpoint in {ckpts} to resume from: ")
    assert "model.safetensors is missing" in out
