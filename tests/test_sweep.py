"""`cliptune sweep`: real trials with a tiny CLIP, a killed sweep that resumes, failed and pruned trials.

The slow pieces (a tiny CLIP on cached features, a fashion catalogue of 80 images) take about a second
per trial; the failure and pruning rules are tested with a stub ``train`` that reports crafted values.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import optuna
import pytest
import typer
import yaml
from typer.testing import CliRunner

import cliptune.sweep as sweep_module
from cliptune.cli.sweep import register
from cliptune.config import load_config
from cliptune.data.synthetic import render_fashion
from cliptune.sweep import MissingSweepNameError, StudyConfigMismatchError, SweepError, run_sweep
from tests.tiny_models import make_tiny_clip

REPO = Path(__file__).resolve().parents[1]
SPACE = {
    "train.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
    "loss.temperature": {"type": "float", "low": 0.02, "high": 0.2},
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sweep-assets")
    return {"fashion": render_fashion(root / "fashion", n=80, seed=0), "clip": make_tiny_clip(root / "clip"),
            "cache": root / "cache"}  # fmt: skip


def _write_config(path: Path, assets: dict[str, Path] | None, **sweep: Any) -> Path:
    cfg: dict[str, Any] = {
        "name": "sw",
        "train": {"epochs": 2, "batch_size": 16, "early_stopping": None},
        "sweep": {"objective": "val/t2i/mrr", "trials": 4, "space": SPACE, **sweep},
    }
    if assets is not None:  # real training: frozen towers, cached features
        cfg["data"] = {"catalogue": str(assets["fashion"]), "split": {"ratios": {"train": 0.7, "val": 0.3}}}
        cfg["model"] = {
            "backbone": str(assets["clip"]),
            "trainable_layers": 0,
            "cache_dir": str(assets["cache"]),
        }
    path.write_text(yaml.safe_dump(cfg))
    return path


def _summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def _states(storage: str) -> dict[int, str]:
    study = optuna.load_study(study_name="sw", storage=storage)
    return {t.number: t.state.name for t in study.get_trials(deepcopy=False)}


def test_four_trial_sweep_writes_runs_and_a_leaderboard(tmp_path: Path, assets: dict[str, Path]) -> None:
    app = typer.Typer()
    register(app)
    cfg = _write_config(tmp_path / "sweep.yaml", assets, pruner="none")
    runs = tmp_path / "runs"
    result = CliRunner().invoke(app, [str(cfg), "--trials", "4", "--runs", str(runs), "-q"])
    assert result.exit_code == 0, result.output
    sweep_dir = runs / "sw"
    trial_dirs = sorted(p.name for p in sweep_dir.glob("trial-*"))
    assert trial_dirs == ["trial-0000", "trial-0001", "trial-0002", "trial-0003"]

    board = json.loads((sweep_dir / "sweep.json").read_text())
    assert [t["state"] for t in board["trials"]] == ["COMPLETE"] * 4
    values = {t["number"]: _summary(Path(t["run_dir"]))["best"]["val/t2i/mrr"] for t in board["trials"]}
    assert {t["number"]: t["value"] for t in board["trials"]} == values  # the trial value is summary.json's
    assert board["best"]["value"] == max(values.values())
    assert [t["value"] for t in board["trials"]] == sorted(values.values(), reverse=True)  # best first
    for t in board["trials"]:  # the sampled values reached the run's config exactly, inside the space
        run_cfg = load_config(Path(t["run_dir"]) / "config.yaml")
        assert run_cfg.train.lr == t["params"]["train.lr"] and 1e-4 <= run_cfg.train.lr <= 1e-1
        assert run_cfg.loss.temperature == t["params"]["loss.temperature"]
        assert run_cfg.name == f"sw/trial-{t['number']:04d}"
    assert len({t["params"]["train.lr"] for t in board["trials"]}) == 4
    assert set(board["importances"]) == {"train.lr", "loss.temperature"}
    assert sum(board["importances"].values()) == pytest.approx(1.0)

    best_dir = board["best"]["run_dir"]
    assert f"run {best_dir}" in result.output.replace("\n", "")
    assert f"cliptune compare {sweep_dir}/trial-*" in result.output.replace("\n", "")
    md = (sweep_dir / "sweep.md").read_text()
    assert (
        "| rank | trial | state | val/t2i/mrr | loss.temperature | train.lr | run | note |"
    )  # space order in md
    assert md.count("| COMPLETE |") == 4 and "## Parameter importances" in md


_DRIVER = """
import os, signal, sys
from pathlib import Path
import cliptune.sweep as sweep
from cliptune.config import load_config

real_train = sweep.train

def train_then_die_in_trial_2(cfg, **kwargs):
    # The test hook: SIGKILL (no cleanup at all) once trial 2 has logged and checkpointed its first epoch.
    if cfg.name.endswith("trial-0002"):
        report = kwargs["on_epoch"]
        def on_epoch(record):
            report(record)
            os.kill(os.getpid(), signal.SIGKILL)
        kwargs["on_epoch"] = on_epoch
    return real_train(cfg, **kwargs)

sweep.train = train_then_die_in_trial_2
sweep.run_sweep(load_config(sys.argv[1]), runs_root=Path(sys.argv[2]), quiet=True)
"""


def test_killed_sweep_resumes_from_its_storage(tmp_path: Path, assets: dict[str, Path]) -> None:
    cfg_path = _write_config(tmp_path / "sweep.yaml", assets, pruner="none")
    runs, driver = tmp_path / "runs", tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(_DRIVER))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    proc = subprocess.run([sys.executable, str(driver), str(cfg_path), str(runs)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    storage = sweep_module.default_storage(runs, "sw")
    assert _states(storage) == {0: "COMPLETE", 1: "COMPLETE", 2: "RUNNING"}  # what a kill leaves
    assert (runs / "sw" / "trial-0002" / "checkpoints").is_dir()

    result = run_sweep(load_config(cfg_path), runs_root=runs, quiet=True)
    states = _states(storage)
    # Trial 2 failed on resume, re-run once as trial 3 with its parameters, then trial 4: 4 finished.
    assert states == {0: "COMPLETE", 1: "COMPLETE", 2: "FAIL", 3: "COMPLETE", 4: "COMPLETE"}
    by_number = {r.number: r for r in result.trials}
    assert by_number[3].retry_of == 2 and by_number[3].params == by_number[2].params
    assert "interrupted: process" in by_number[2].error and by_number[3].note == "re-run of trial 2"
    assert not (runs / "sw" / "trial-0002").exists()  # out of the trial-* glob that compare reads
    assert by_number[2].run_dir == str(runs / "sw" / "failed" / "trial-0002")
    assert (runs / "sw" / "failed" / "trial-0002" / "metrics.jsonl").is_file()
    assert sorted(p.name for p in (runs / "sw").glob("trial-*")) == [f"trial-{i:04d}" for i in (0, 1, 3, 4)]
    complete = [r for r in result.trials if r.state == "COMPLETE"]
    assert result.best.value == max(_summary(Path(r.run_dir))["best"]["val/t2i/mrr"] for r in complete)
    assert json.loads(result.json_path.read_text())["best"]["number"] == result.best.number
    # A third call has nothing left to do.
    again = run_sweep(load_config(cfg_path), runs_root=runs, quiet=True)
    assert len(again.trials) == 5


class _StubTrain:
    """Stands in for cliptune.train.run.train: reports crafted per-epoch values, writes summary.json."""

    def __init__(self, values: dict[int, list[float]]) -> None:
        self.values, self.configs, self.epochs_run = values, {}, {}

    def __call__(self, cfg, *, runs_root: Path, quiet: bool, on_epoch) -> Path:
        number = int(cfg.name.rsplit("-", 1)[1])
        self.configs[number] = cfg
        run_dir = runs_root / cfg.name
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text("")
        values = self.values.get(number, [0.5, 0.5, 0.5])
        for epoch, value in enumerate(values, 1):
            self.epochs_run[number] = epoch
            on_epoch({"kind": "epoch", "epoch": epoch, "val/loss": 1.0, "val/t2i/mrr": value})
        best = max(range(len(values)), key=values.__getitem__)
        summary = {"best_epoch": best + 1, "best": {"epoch": best + 1, "val/t2i/mrr": values[best]}}
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return run_dir


def test_a_bad_trial_is_pruned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Trials 0 and 1 complete; at epoch 1 trial 2 reports 0.1 < median(0.5, 0.4) = 0.45 of the others at
    # epoch 1 (the median pruner starts after n_startup_trials = 2): pruned after its first epoch.
    stub = _StubTrain({0: [0.5, 0.6, 0.7], 1: [0.4, 0.5, 0.6], 2: [0.1, 0.9, 0.9], 3: [0.6, 0.6, 0.8]})
    monkeypatch.setattr(sweep_module, "train", stub)
    cfg = load_config(_write_config(tmp_path / "s.yaml", None))
    result = run_sweep(cfg, runs_root=tmp_path / "runs")
    by_number = {r.number: r for r in result.trials}
    assert by_number[2].state == "PRUNED" and stub.epochs_run[2] == 1
    assert by_number[2].value == 0.1 and by_number[2].note == "pruned after epoch 1"
    assert [by_number[i].state for i in (0, 1, 3)] == ["COMPLETE"] * 3 and stub.epochs_run[3] == 3
    assert [r.number for r in result.trials] == [3, 0, 1, 2]  # 0.8, 0.7, 0.6, then the pruned one
    assert result.best.number == 3 and result.best.best_epoch == 3

    # Without a pruner the same values run to the end: trial 2's best epoch (0.9) even wins.
    stub = _StubTrain({0: [0.5, 0.6, 0.7], 1: [0.4, 0.5, 0.6], 2: [0.1, 0.9, 0.9], 3: [0.6, 0.6, 0.8]})
    monkeypatch.setattr(sweep_module, "train", stub)
    cfg = load_config(_write_config(tmp_path / "n.yaml", None, pruner="none"), ["name=nop"])
    result = run_sweep(cfg, runs_root=tmp_path / "runs")
    assert {r.state for r in result.trials} == {"COMPLETE"} and result.best.number == 2
    assert result.best.value == 0.9 and result.best.best_epoch == 2


def test_invalid_sampled_value_fails_only_that_trial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stub = _StubTrain({})
    monkeypatch.setattr(sweep_module, "train", stub)
    space = {
        "train.scheduler": {"type": "categorical", "choices": ["plateau", "sometimes"]},  # "sometimes": invalid
        "data.split.ratios": {"type": "categorical", "choices": [{"train": 0.8, "val": 0.2}, {"train": 0.6, "val": 0.4}]},
    }  # fmt: skip
    cfg = load_config(_write_config(tmp_path / "s.yaml", None, space=space, trials=6))
    result = run_sweep(cfg, runs_root=tmp_path / "runs")
    assert len(result.trials) == 6  # one call runs at most `trials` trials, failed ones included
    failed = [r for r in result.trials if r.state == "FAIL"]
    complete = [r for r in result.trials if r.state == "COMPLETE"]
    assert failed and complete
    for r in failed:
        assert r.params["train.scheduler"] == "sometimes" and r.run_dir is None  # nothing was trained
        assert "train.scheduler: Input should be 'plateau' or 'cosine' (got 'sometimes')" in r.error
    for r in complete:  # a dict choice is searched as its YAML text and reaches the config as the dict
        assert r.params["train.scheduler"] == "plateau"
        assert stub.configs[r.number].data.split.ratios == yaml.safe_load(r.params["data.split.ratios"])
    assert {r.params["data.split.ratios"] for r in result.trials} <= {
        "{train: 0.8, val: 0.2}",
        "{train: 0.6, val: 0.4}",
    }
    # Failed trials do not count: the next call runs as many trials as were missing to reach 6 finished.
    again = run_sweep(cfg, runs_root=tmp_path / "runs")
    assert len(again.trials) == 6 + (6 - len(complete))


def test_sweep_level_errors_stop_before_or_at_the_first_trial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr(sweep_module, "train", _StubTrain({}))
    runs = tmp_path / "runs"
    with pytest.raises(SweepError, match=r"sweep.space.train.learning_rate is not a config field"):
        run_sweep(load_config(None, ["name=a", "sweep.space={train.learning_rate: {type: float, low: 0.1, high: 1}}"]), runs_root=runs)  # fmt: skip
    with pytest.raises(SweepError, match="sweep.space is empty"):
        run_sweep(load_config(None, ["name=a"]), runs_root=runs)
    with pytest.raises(MissingSweepNameError, match="no name"):
        run_sweep(load_config(_write_config(tmp_path / "s.yaml", None), ["name=null"]), runs_root=runs)
    # The objective must be logged: the message lists what is.
    cfg = load_config(_write_config(tmp_path / "s.yaml", None, objective="val/t2i/recall@5"))
    with pytest.raises(
        SweepError, match=r"'val/t2i/recall@5' is not in .*logged values: val/loss, val/t2i/mrr"
    ):
        run_sweep(cfg, runs_root=runs)
    # Resuming a study with another config would mix incomparable trials.
    cfg = load_config(_write_config(tmp_path / "s.yaml", None), ["name=b"])
    run_sweep(cfg, runs_root=runs, trials=1)
    changed = load_config(_write_config(tmp_path / "s.yaml", None), ["name=b", "train.epochs=5"])
    with pytest.raises(SweepError, match=r"another config \(train.epochs: 2 -> 5\)") as info:
        run_sweep(changed, runs_root=runs, trials=2)
    assert isinstance(info.value, StudyConfigMismatchError)
    assert info.value.study == "b" and info.value.differences == {"train.epochs": (2, 5)}
    assert "--name" not in str(info.value)
    assert load_config(runs / "b" / "sweep-config.yaml").train.epochs == 2  # the rejected one is not saved
    assert not list((runs / "b").glob(".sweep-config-*"))
    assert len(run_sweep(cfg, runs_root=runs, trials=2).trials) == 2  # the target may change


def test_yaml_text_round_trips_what_pyyaml_would_misread() -> None:
    # PyYAML reads "1e-05" as a string (YAML 1.1 floats need a dot): the override text must be "1.0e-05".
    assert yaml.safe_load("1e-05") == "1e-05"
    for value in (1e-05, 0.1 + 0.2, 3, "plateau", "1", None, True, {"train": 0.8, "val": 0.2}, [1, 2]):
        text = sweep_module._yaml_text(value)
        assert yaml.safe_load(text) == value and "\n" not in text
    assert sweep_module._redact("postgresql://user:s3cret@db/sweeps") == "postgresql://user:***@db/sweeps"
