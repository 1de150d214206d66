"""A toy training run (tests/toy_task.py) that kills itself with SIGKILL at a chosen kind of point.

Used by tests/test_fault_injection.py as a subprocess. The config has plateau LR cuts and early stopping
active, so a resume must restore both exactly. Each step sleeps a little so a timed kill lands inside
training, including inside checkpoint and log writes, not only between steps.

Kinds of kill (each counts from this process's start):
    --kill-at-step N     in the middle of the N-th forward pass
    --kill-after S       after S seconds, wherever the process is
    --kill-in-write K    in the K-th atomic folder swap: the new folder is complete under its temporary
                         name and not yet in place (a checkpoint or model/)
    --tear-metrics K     in the K-th metrics.jsonl append, after half the line is written
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from cliptune import rundir
from cliptune.config import EarlyStoppingConfig, PlateauConfig, TrainConfig
from cliptune.errors import CliptuneError
from cliptune.train.loop import fit
from cliptune.train.state import MetricsLog
from tests.toy_task import ToyModel, make_bundle

CONFIG = TrainConfig(
    epochs=10, batch_size=16, lr=0.05, keep_last=1, log_every_steps=5,
    plateau=PlateauConfig(metric="val/loss", patience=0, factor=0.5, min_lr=0.0),
    early_stopping=EarlyStoppingConfig(metric="val/loss", patience=2, min_delta=0.02),
)  # fmt: skip  # 12 steps an epoch; LR cut after epochs 3 and 5, early stop after epoch 6


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_on_call(owner: Any, name: str, k: int, before: Any = None) -> None:
    original, calls = getattr(owner, name), {"n": 0}

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == k:
            if before is not None:
                before(*args)
            _die()
        return original(*args, **kwargs)

    setattr(owner, name, wrapped)


def _half_line(log: MetricsLog, record: dict[str, Any]) -> None:
    import json

    line = json.dumps(record) + "\n"
    with log.path.open("a", encoding="utf-8") as fh:
        fh.write(line[: len(line) // 2])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--kill-after", type=float)
    parser.add_argument("--kill-in-write", type=int)
    parser.add_argument("--tear-metrics", type=int)
    args = parser.parse_args()
    torch.set_num_threads(1)
    forward = ToyModel.forward

    def slow_forward(self: ToyModel, batch: dict) -> dict[str, torch.Tensor]:
        time.sleep(0.01)
        return forward(self, batch)

    ToyModel.forward = slow_forward  # type: ignore[method-assign]
    if args.kill_in_write:
        _kill_on_call(rundir, "_swap_into_place", args.kill_in_write)
    if args.tear_metrics:
        _kill_on_call(MetricsLog, "write", args.tear_metrics, before=_half_line)
    if args.kill_after is not None:
        threading.Timer(args.kill_after, _die).start()
    args.run_dir.mkdir(parents=True, exist_ok=True)
    bundle = make_bundle(CONFIG.seed, kill_at=args.kill_at_step)
    try:
        fit(bundle, CONFIG, args.run_dir, Accelerator(cpu=True), resume=args.resume, quiet=True)
    except CliptuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    os._exit(0)  # a pending --kill-after timer must not kill a finished run


if __name__ == "__main__":
    sys.exit(main())
