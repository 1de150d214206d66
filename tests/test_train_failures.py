"""How training fails: NaN losses, Ctrl-C, out-of-memory, images that break mid-run. Each says what to do."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from accelerate import Accelerator
from typer.testing import CliRunner

import cliptune.train.run as run_module
from cliptune.cli.app import app
from cliptune.config import Config
from cliptune.data.synthetic import render_fashion
from cliptune.train.errors import (
    MissingRunNameError,
    NonFiniteLossError,
    RunExistsError,
    TrainingError,
    TrainingOutOfMemoryError,
)
from cliptune.train.loop import fit
from cliptune.train.run import train
from cliptune.train.tasks.bundle import TaskBundle
from tests.tiny_models import make_tiny_clip
from tests.toy_task import make_bundle, toy_train_config

REPO = Path(__file__).resolve().parents[1]

# The toy task in a subprocess that pauses inside step PAUSE_AT until the test has sent its signal, so
# the interruption lands at a known step; with PAUSE_AT 0 it trains straight through.
_SCRIPT = """
import sys, time
from pathlib import Path
import torch
from accelerate import Accelerator
from cliptune.config import TrainConfig
from cliptune.train.loop import fit
from tests.toy_task import make_bundle, toy_train_config

run_dir, pause_at = Path(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(1)
bundle = make_bundle(0)
forward, calls = bundle.model.forward, [0]

def paused_forward(batch):
    calls[0] += 1
    if calls[0] == pause_at:
        (run_dir / "ready").touch()
        while not (run_dir / "go").exists():
            time.sleep(0.01)
    return forward(batch)

bundle.model.forward = paused_forward
run_dir.mkdir(parents=True, exist_ok=True)
cfg = toy_train_config(epochs=3, batch_size=16, lr=0.01, early_stopping=None, keep_last=2, log_every_steps=5)
try:
    fit(bundle, cfg, run_dir, Accelerator(cpu=True), resume="--resume" in sys.argv, quiet=True)
except KeyboardInterrupt as exc:
    print(exc, file=sys.stderr)
    print(f"{type(exc).__name__} step={exc.step} run_dir={exc.run_dir} checkpoint={exc.checkpoint}", file=sys.stderr)
    sys.exit(130)
"""


def _wrap_forward(bundle: TaskBundle, at: dict[int, str], seen: list | None = None) -> TaskBundle:
    """Make call number k of the model's forward return a NaN loss ('nan') or raise OOM ('oom')."""
    forward, calls = bundle.model.forward, [0]

    def wrapped(batch: dict) -> dict[str, torch.Tensor]:
        calls[0] += 1
        if seen is not None:
            seen.append((calls[0], [p.detach().clone() for p in bundle.model.parameters()]))
        if at.get(calls[0]) == "oom":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        out = forward(batch)
        if seen is not None:
            seen[-1] += (float(out["loss"].detach()),)
        return {"loss": out["loss"] * float("nan")} if at.get(calls[0]) == "nan" else out

    bundle.model.forward = wrapped
    return bundle


def _records(run_dir: Path, kind: str | None = None) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if kind is None or r["kind"] == kind]


def test_nan_loss_stops_naming_step_and_last_checkpoint(tmp_path: Path) -> None:
    # 200 items // 16 = 12 batches per epoch: step 15 is epoch 2, batch 3; epoch 1 was checkpointed at 12.
    # The losses are read every log_every_steps (10): step 15's is read at step 20, the skipped step's
    # weights untouched in between.
    cfg = toy_train_config(epochs=3, batch_size=16, lr=0.01, early_stopping=None)
    bundle = _wrap_forward(make_bundle(), {15: "nan"})
    pattern = (
        r"non-finite loss \(nan\) at step 15 \(epoch 2, batch 3\); read at step 20: 1 non-finite step "
        r"skipped, the first at step 15; last good checkpoint: .*step-00000012"
    )
    with pytest.raises(TrainingError, match=pattern) as info:
        fit(bundle, cfg, tmp_path, Accelerator(cpu=True), quiet=True)
    assert isinstance(info.value, NonFiniteLossError)
    assert (info.value.step, info.value.epoch, info.value.batch, info.value.max_bad_steps) == (15, 2, 3, 0)
    assert (info.value.first_bad_step, info.value.bad_steps, info.value.found_at) == (15, 1, 20)
    assert all(torch.isfinite(p).all() for p in bundle.model.parameters())  # the bad step was skipped
    assert info.value.last_checkpoint == tmp_path / "checkpoints" / "step-00000012"
    # grad_clip is on (1.0, the default): the advice is the lr or the data, not to enable clipping
    assert str(info.value).endswith(
        "Likely cause: learning rate too high (train.lr=0.01); gradients are already clipped "
        "(train.grad_clip=1), so lower train.lr, or check the data for extreme or broken values; or allow "
        "skipping with train.max_bad_steps (now 0)"
    )


def test_nan_loss_without_clipping_advises_enabling_it(tmp_path: Path) -> None:
    cfg = toy_train_config(epochs=1, batch_size=16, lr=0.01, early_stopping=None, grad_clip=None)
    with pytest.raises(NonFiniteLossError) as info:
        fit(_wrap_forward(make_bundle(), {2: "nan"}), cfg, tmp_path, Accelerator(cpu=True), quiet=True)
    assert (
        "with unclipped gradients (train.grad_clip: null): lower train.lr or enable train.grad_clip"
        in str(info.value)
    )


def test_nan_steps_are_skipped_up_to_max_bad_steps(tmp_path: Path) -> None:
    cfg = toy_train_config(
        epochs=2, batch_size=16, lr=0.01, early_stopping=None, max_bad_steps=2, log_every_steps=5
    )
    seen: list = []
    bundle = _wrap_forward(make_bundle(), {5: "nan", 15: "nan"}, seen)
    before = signal.getsignal(signal.SIGINT)
    state = fit(bundle, cfg, tmp_path, Accelerator(cpu=True), quiet=True)
    assert signal.getsignal(signal.SIGINT) is before  # the Ctrl-C handler is put back
    assert state.bad_steps == 2
    params = {call: p for call, p, _ in seen}
    # Step 5 did not move the weights (parameters before call 6 == before call 5); step 4 did.
    assert all(torch.equal(a, b) for a, b in zip(params[5], params[6], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(params[4], params[5], strict=True))
    # Step records mark the skipped steps; the epoch mean leaves them out (11 good steps in epoch 1).
    steps = {r["step"]: r["train/loss"] for r in _records(tmp_path, "step")}
    assert steps[5] is None and steps[15] is None and steps[10] is not None
    good = [loss for call, _, loss in seen if call <= 12 and call != 5]
    assert _records(tmp_path, "epoch")[1]["train/loss"] == pytest.approx(sum(good) / 11)
    assert all(torch.isfinite(p).all() for p in bundle.model.parameters())
    assert (tmp_path / "checkpoints" / "step-00000024").exists()  # the position counts skipped steps


def test_out_of_memory_names_the_settings_to_change(tmp_path: Path) -> None:
    cfg = toy_train_config(epochs=1, batch_size=16, grad_accum=2, early_stopping=None)
    with pytest.raises(TrainingError) as info:
        fit(_wrap_forward(make_bundle(), {3: "oom"}), cfg, tmp_path, Accelerator(cpu=True), quiet=True)
    message = str(info.value)
    assert "out of accelerator memory after step 2" in message
    assert "CUDA out of memory. Tried to allocate 2.00 GiB" in message
    assert "train.batch_size (now 16)" in message and "train.grad_accum (now 2)" in message
    assert "train.gradient_checkpointing: true" in message
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    assert isinstance(info.value, TrainingOutOfMemoryError)
    assert (info.value.step, info.value.batch_size, info.value.grad_accum) == (2, 16, 2)


def test_sigint_checkpoints_and_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    script = tmp_path / "toy_sigint.py"
    script.write_text(_SCRIPT)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]),
    }  # this checkout's code
    full, cut = tmp_path / "full", tmp_path / "cut"
    straight = subprocess.Popen([sys.executable, str(script), str(full), "0"], cwd=REPO, env=env)
    # Step 20 is in the middle of epoch 2 (12 batches per epoch).
    proc = subprocess.Popen([sys.executable, str(script), str(cut), "20"], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (cut / "ready").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "training never reached step 20"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGINT)
    (cut / "go").touch()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted at step 20: checkpoint saved" in stderr
    # The facts a caller needs to resume travel on the exception (the CLI turns them into a hint).
    checkpoint = cut / "checkpoints" / "step-00000020"
    assert f"TrainingInterrupted step=20 run_dir={cut} checkpoint={checkpoint}" in stderr
    assert (cut / "checkpoints" / "latest").read_text() == "step-00000020"
    assert straight.wait(timeout=120) == 0
    (cut / "ready").unlink()
    subprocess.run([sys.executable, str(script), str(cut), "0", "--resume"], cwd=REPO, env=env, check=True)
    assert (cut / "metrics.jsonl").read_text() == (full / "metrics.jsonl").read_text()


def test_a_new_run_needs_a_name_and_a_free_run_directory(tmp_path: Path) -> None:
    with pytest.raises(MissingRunNameError, match="the run has no name"):
        train(Config.model_validate({"name": None}), runs_root=tmp_path)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "metrics.jsonl").write_text("")
    with pytest.raises(RunExistsError, match="already holds a run") as info:
        train(Config.model_validate({"name": "x"}), runs_root=tmp_path)
    assert info.value.run_dir == tmp_path / "x"
    # Library messages state facts; the CLI phrases the hints (flags, commands).
    assert "--" not in str(info.value) and "--" not in str(MissingRunNameError())


@pytest.fixture(scope="module")
def fashion(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("failures")
    return render_fashion(root / "fashion", n=40, seed=0), make_tiny_clip(root / "clip")


def _cfg(tmp_path: Path, fashion: tuple[Path, Path], name: str, **data: str) -> Config:
    catalogue, clip = fashion
    return Config.model_validate(
        {
            "name": name,
            "data": {"catalogue": str(catalogue), "split": {"ratios": {"train": 0.7, "val": 0.3}}, **data},
            "model": {"backbone": str(clip), "cache_dir": str(tmp_path / "cache")},
            "train": {"epochs": 2, "batch_size": 8, "precision": "fp32", "early_stopping": None},
        }
    )


def test_cli_ctrl_c_exits_130_and_resume_finishes_the_run(
    tmp_path: Path, fashion: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    runner, runs = CliRunner(), tmp_path / "runs"
    config = tmp_path / "run.yaml"
    config.write_text(_cfg(tmp_path, fashion, "x").model_dump_json())  # JSON is YAML
    args = ["train", str(config), "--runs", str(runs), "-q"]
    assert runner.invoke(app, [*args, "--name", "full"]).exit_code == 0

    real_fit = run_module.fit

    def fit_with_ctrl_c(bundle, *a, **kw):  # Ctrl-C arrives during step 3 of the first run
        forward, calls = bundle.model.forward, [0]

        def forward_then_sigint(batch):
            calls[0] += 1
            if calls[0] == 3 and not kw.get("resume"):
                os.kill(os.getpid(), signal.SIGINT)
            return forward(batch)

        bundle.model.forward = forward_then_sigint
        return real_fit(bundle, *a, **kw)

    monkeypatch.setattr(run_module, "fit", fit_with_ctrl_c)
    result = runner.invoke(app, [*args, "--name", "cut"])
    assert result.exit_code == 130, result.output
    assert "interrupted at step 3" in result.output and "--resume" in result.output
    resumed = runner.invoke(app, ["train", "--resume", str(runs / "cut"), "-q"])
    assert resumed.exit_code == 0, resumed.output
    assert (runs / "cut" / "metrics.jsonl").read_text() == (runs / "full" / "metrics.jsonl").read_text()


def _break_image_after_the_check(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The catalogue passes the up-front check, then one training image is truncated (a file that
    changes under a running job, a flaky network disk)."""
    real_prepare, broken = run_module.prepare_data, []

    def prepare_then_break(cfg, run_dir, **kw):
        data = real_prepare(cfg, run_dir, **kw)
        row = data.rows[data.rows["split"] == "train"].iloc[0]
        path = data.catalogue.image_path(row["file_name"])
        path.write_bytes(path.read_bytes()[:60])
        broken[:] = [row["file_name"], str(row["row"])]
        return data

    monkeypatch.setattr(run_module, "prepare_data", prepare_then_break)
    return broken


def test_image_failing_mid_training_stops_naming_the_file(
    tmp_path: Path, fashion: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    catalogue, clip = render_fashion(tmp_path / "own", n=40, seed=0), fashion[1]  # this test breaks a file
    broken = _break_image_after_the_check(monkeypatch)
    cfg = _cfg(tmp_path, (catalogue, clip), "err")
    cfg.model.trainable_layers = 1  # raw pixels: images are decoded while training
    with pytest.raises(TrainingError, match="failed to load during training") as info:
        train(cfg, runs_root=tmp_path / "runs", quiet=True)
    file_name, row = broken
    assert file_name in str(info.value) and f"row {row} of metadata.csv" in str(info.value)
    assert "data.on_bad_row=skip" in str(info.value)


def test_image_failing_mid_training_is_skipped_and_listed(
    tmp_path: Path, fashion: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    catalogue, clip = render_fashion(tmp_path / "own", n=40, seed=0), fashion[1]
    broken = _break_image_after_the_check(monkeypatch)
    cfg = _cfg(tmp_path, (catalogue, clip), "skip", on_bad_row="skip")
    cfg.model.trainable_layers = 1
    run_dir = train(cfg, runs_root=tmp_path / "runs", quiet=True)
    rejected = pd.read_csv(run_dir / "rejected.csv")
    # Listed once although the item comes back every epoch; the run went on without it.
    assert rejected.columns.tolist() == ["file_name", "row", "reason", "source"]
    assert rejected[["file_name", "row"]].astype(str).values.tolist() == [broken]
    assert rejected["reason"][0].startswith("failed during training:")
    assert rejected["source"][0] == "metadata.csv"
    assert len(_records(run_dir, "epoch")) == 3
