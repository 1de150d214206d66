"""Fault injection: SIGKILL training and indexing at a seeded set of random points, then check recovery.

Training (tests/fault_driver.py: a toy run with plateau LR cuts and early stopping active) is killed in a
chain: mid-step, at random times (inside checkpoint and log writes as often as not), inside a folder swap,
in the middle of a metrics line; each next start resumes. The chain must end byte-identical to an
uninterrupted run (metrics.jsonl, model/, the last checkpoint), with no temporary file left.
``cliptune index`` is killed while it rebuilds an index: the old index or the new one is there, whole.
``cliptune sweep`` is killed mid-trial (at a seeded training step, then inside a checkpoint or ``model/``
swap): running it again ends with the same trial results as an uninterrupted sweep and no temporary left.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from cliptune.data.catalogue import read_catalogue
from cliptune.data.synthetic import render_fashion
from cliptune.models.factory import load_model
from cliptune.search.index import build_index, load_index
from tests.tiny_models import make_tiny_clip

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "fault_driver.py"
TEMP = re.compile(r"^\..+\.(?:[0-9a-f]{32}\.tmp|tmp-\w+|old-[0-9a-f]{32})$")  # the atomic writers' names
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}


def _temps(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if TEMP.match(p.name))


def _driver(run_dir: Path, *args: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, str(DRIVER), str(run_dir), *args]
    return subprocess.Popen(cmd, env=ENV, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)


def _plan(seed: int) -> list[tuple[str, str]]:
    """Five kill points, drawn once from ``seed``: every kind, at random places within it."""
    rng = random.Random(seed)
    return [
        ("--kill-at-step", str(rng.randint(14, 30))),  # mid-forward, after the first checkpoint
        ("--kill-after", f"{rng.uniform(0.05, 0.5):.3f}"),  # anywhere: restore, step, write, validation
        ("--kill-in-write", str(rng.randint(1, 3))),  # a checkpoint or model/ complete, not yet in place
        ("--tear-metrics", str(rng.randint(1, 3))),  # half a metrics line on disk
        ("--kill-after", f"{rng.uniform(0.05, 0.5):.3f}"),
    ]


def test_killed_training_resumes_to_the_identical_run(tmp_path: Path) -> None:
    full, run = tmp_path / "full", tmp_path / "killed"
    reference = _driver(full)  # alongside the chain: the uninterrupted run
    seen_temps: list[str] = []
    outcomes = []
    for kind, value in _plan(seed=14):
        resume = any((run / "checkpoints").glob("step-*"))
        proc = _driver(run, *(["--resume"] if resume else []), kind, value)
        _, err = proc.communicate(timeout=120)
        outcomes.append((kind, value, proc.returncode))
        assert proc.returncode in (-signal.SIGKILL, 0), err  # killed, or finished before the kill point
        if kind == "--kill-in-write" and proc.returncode == -signal.SIGKILL:
            left = _temps(run)
            assert left and all(".tmp-" in t for t in left)  # the fault was real: a whole folder left aside
            seen_temps += left
        if not any((run / "checkpoints").glob("step-*")) and run.exists():
            # killed before the first checkpoint: a resume says so, and the user removes the run to restart
            proc = _driver(run, "--resume", "--kill-after", "60")
            assert proc.communicate(timeout=120)[1].strip() == (
                f"error: nothing to resume: no checkpoint in {run / 'checkpoints'}"
            )
            shutil.rmtree(run)
    final = _driver(run, "--resume")
    err = final.communicate(timeout=120)[1]
    assert final.returncode == 0, (outcomes, err)
    assert reference.wait(timeout=120) == 0
    assert sum(code == -signal.SIGKILL for _, _, code in outcomes) >= 4, outcomes
    assert _temps(run) == [] and not any((run / t).exists() for t in seen_temps)
    # byte-identical: every record (LR cuts, early stopping's epoch), the best model, the last checkpoint
    assert (run / "metrics.jsonl").read_bytes() == (full / "metrics.jsonl").read_bytes()
    assert (run / "model" / "toy.safetensors").read_bytes() == (
        full / "model" / "toy.safetensors"
    ).read_bytes()
    last = (full / "checkpoints" / "latest").read_text()
    assert (run / "checkpoints" / "latest").read_text() == last
    ours, theirs = run / "checkpoints" / last, full / "checkpoints" / last
    assert (ours / "model.safetensors").read_bytes() == (theirs / "model.safetensors").read_bytes()
    trainer = [json.loads((d / "trainer.json").read_text()) for d in (ours, theirs)]
    for t in trainer:
        del t["loop"]["timings"]  # wall-clock seconds per phase: the only thing a kill may change
    assert trainer[0] == trainer[1]
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    lrs = [r["lr"] for r in epochs[1:]]
    assert lrs[0] > lrs[-1] and len(set(lrs)) >= 3  # the plateau schedule cut the LR twice
    assert len(epochs) - 1 < 10  # early stopping ended the run before train.epochs


@pytest.fixture(scope="module")
def index_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("index")
    return {
        "root": root,
        "clip": make_tiny_clip(root / "clip", seed=0),
        "old": render_fashion(root / "old", n=24, seed=0),
        "new": render_fashion(root / "new", n=32, seed=1),
    }


def _index_cli(s: dict[str, Path], out: Path, *patch: str) -> subprocess.Popen[str]:
    code = "import sys; from cliptune.cli.app import app; " + "".join(patch) + "app()"
    args = [
        "index",
        str(s["clip"]),
        str(out),
        "--data",
        str(s["new"]),
        "--cache-dir",
        str(s["root"] / "cache"),
    ]
    cmd = [sys.executable, "-c", code, *args, "-q"]
    return subprocess.Popen(cmd, env=ENV, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)


def _whole(out: Path, old: dict[str, bytes], new_root: Path) -> str:
    """Which index ``out`` holds, asserting it is whole: the old one byte for byte, or a new one that loads."""
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    if files == old:
        return "old"
    index = load_index(out)
    assert len(index) == 32 and index.manifest["catalogue"] == str(new_root.resolve())
    return "new"


def test_killed_index_rebuild_leaves_the_old_or_the_new_index_whole(
    tmp_path: Path, index_setup: dict[str, Path]
) -> None:
    s = index_setup
    out = tmp_path / "idx"
    build_index(
        load_model(s["clip"]), read_catalogue(s["old"]), out, cache_dir=s["root"] / "cache", progress=False
    )
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    rng = random.Random(14)
    held = []
    # a kill at a random time of the rebuild (process start, embedding, or the write), then kills inside the
    # swap itself: just before the exchange and just after it (the old folder not yet deleted)
    proc = _index_cli(s, out)
    time.sleep(rng.uniform(1.0, 4.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    held.append(_whole(out, old, s["new"]))
    die = "import os, signal; from cliptune import rundir; "
    before = die + "rundir._exchange = lambda a, b: os.kill(os.getpid(), signal.SIGKILL); "
    after = die + "x = rundir._exchange; rundir._exchange = lambda a, b: (x(a, b), os.kill(os.getpid(), 9)); "
    if held[-1] == "new":  # a finished rebuild: put the old one back so the swap kills replace it again
        build_index(
            load_model(s["clip"]),
            read_catalogue(s["old"]),
            out,
            cache_dir=s["root"] / "cache",
            progress=False,
        )
    for patch, expected in ((before, "old"), (after, "new")):
        proc = _index_cli(s, out, patch)
        assert proc.wait(timeout=120) == -signal.SIGKILL, proc.communicate()[1]
        held.append(_whole(out, old, s["new"]))
        assert held[-1] == expected
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # the kill left a temp beside
    proc = _index_cli(s, out)  # the next build cleans what the killed ones left
    assert proc.wait(timeout=120) == 0, proc.communicate()[1]
    assert [p.name for p in tmp_path.iterdir()] == ["idx"] and _whole(out, old, s["new"]) == "new"


# `cliptune sweep` in a process that SIGKILLs itself at the K-th call of one function (FAULT=step: a
# training step, mid-trial; FAULT=write: an atomic folder swap, the new checkpoint or model/ complete).
_SWEEP = """import os, signal, sys
import cliptune.train.loop as loop
from cliptune import rundir
owner, name = {"step": (loop, "_train_step"), "write": (rundir, "_swap_into_place")}[os.environ["FAULT"]]
real, k, calls = getattr(owner, name), int(os.environ["FAULT_AT"]), [0]
def wrapped(*a, **kw):
    calls[0] += 1
    if calls[0] == k:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **kw)
setattr(owner, name, wrapped)
from cliptune.cli.app import app
app()
"""
_LRS = (0.003, 0.1)  # enqueued, so both sweeps train the same two trials (see below)


def _sweep_cli(cfg: Path, runs: Path, fault: tuple[str, int] | None = None) -> subprocess.Popen[str]:
    env = {**ENV, "HF_HUB_OFFLINE": "1"}
    if fault is not None:
        env.update(FAULT=fault[0], FAULT_AT=str(fault[1]))
    code = _SWEEP if fault is not None else "from cliptune.cli.app import app; app()"
    cmd = [sys.executable, "-c", code, "sweep", str(cfg), "--runs", str(runs), "-q"]
    return subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)


def _results(runs: Path) -> dict[float, tuple[float | None, float]]:
    """Each complete trial by its learning rate: its objective value, and summary.json's best value."""
    study = optuna.load_study(study_name="sw", storage=f"sqlite:///{runs / 'sw' / 'sweep.db'}")
    out = {}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        summary = json.loads((runs / "sw" / f"trial-{t.number:04d}" / "summary.json").read_text())
        out[t.params["train.lr"]] = (t.value, summary["best"]["val/t2i/mrr"])
    return out


def test_killed_sweep_resumes_to_the_same_trial_results(tmp_path: Path, index_setup: dict[str, Path]) -> None:
    s = index_setup
    fashion = render_fashion(tmp_path / "fashion", n=80, seed=0)
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "sw",
        "data": {"catalogue": str(fashion), "split": {"ratios": {"train": 0.7, "val": 0.3}}},
        "model": {"backbone": str(s["clip"]), "trainable_layers": 0, "cache_dir": str(tmp_path / "cache")},
        "train": {"epochs": 2, "batch_size": 16, "early_stopping": None},  # 4 steps an epoch, 8 a trial, 16 in all
        "sweep": {"objective": "val/t2i/mrr", "trials": 2, "pruner": "none",
                  "space": {"train.lr": {"type": "float", "low": 1e-3, "high": 0.2, "log": True}}},
    }))  # fmt: skip
    full, killed = tmp_path / "full", tmp_path / "killed"
    # The sampler is seeded with sweep.seed + the trials already in the study, so a sweep resumed after a
    # kill samples new points; with the trials enqueued both sweeps train the same two, so their results
    # can be compared one for one (the sweep's own recovery still fails and re-runs the killed trial).
    for runs in (full, killed):
        (runs / "sw").mkdir(parents=True)
        study = optuna.create_study(study_name="sw", storage=f"sqlite:///{runs / 'sw' / 'sweep.db'}",
                                    direction="maximize")  # fmt: skip
        for lr in _LRS:
            study.enqueue_trial({"train.lr": lr})
    reference = _sweep_cli(cfg, full)
    rng = random.Random(14)
    plan = [("step", rng.randint(2, 15)), ("write", rng.randint(1, 4))]  # 16 steps in all; 2+ swaps a trial
    codes = []
    for fault in plan:
        proc = _sweep_cli(cfg, killed, fault)
        err = proc.communicate(timeout=300)[1]
        codes.append(proc.returncode)
        assert proc.returncode in (-signal.SIGKILL, 0), err[-3000:]
    assert codes[0] == -signal.SIGKILL  # step N < 16 always lands inside a trial
    final = _sweep_cli(cfg, killed)
    err = final.communicate(timeout=300)[1]
    assert final.returncode == 0, (plan, codes, err[-3000:])
    assert reference.wait(timeout=300) == 0, reference.communicate()[1][-3000:]

    ours, theirs = _results(killed), _results(full)
    assert set(theirs) == set(_LRS) and ours == theirs  # the same two trials, the same values
    for value, best in theirs.values():
        assert value == best  # the trial's value is its run's best epoch (summary.json)
    board = json.loads((killed / "sw" / "sweep.json").read_text())
    failed = [t for t in board["trials"] if t["state"] == "FAIL"]
    assert len(failed) == sum(c == -signal.SIGKILL for c in codes)  # each kill failed one trial ...
    for t in failed:  # ... moved aside and re-run with its parameters
        assert t["error"].startswith("interrupted: process") and "/failed/trial-" in t["run_dir"]
        assert t["params"]["train.lr"] in ours
    assert len(list((killed / "sw").glob("trial-*"))) == 2  # what `compare RUNS/sw/trial-*` reads
    # nothing half-written is left anywhere, the parked failed trials included
    assert _temps(killed) == [] and not list(killed.rglob(".sweep-config-*"))
