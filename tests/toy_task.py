"""A tiny regression task for testing the training loop on its own (no backbone, no catalogue).

Run as a script it trains into a run directory; ``--kill-at-step N`` makes the process SIGKILL itself
in the middle of step N, the way an OOM killer or a pre-empted machine would.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from torch import nn

from cliptune.config import EarlyStoppingConfig, PlateauConfig, TrainConfig
from cliptune.train.loop import fit
from cliptune.train.tasks.bundle import TaskBundle


class ToyModel(nn.Module):
    def __init__(self, kill_at: int | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.1), nn.Linear(16, 1))
        self.calls, self.kill_at = 0, kill_at

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.kill_at is not None and self.calls == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        pred = self.net(batch["x"]).squeeze(-1)  # (B,)
        return {"loss": ((pred - batch["y"]) ** 2).mean()}


def toy_train_config(**fields: Any) -> TrainConfig:
    """A TrainConfig for the toy task, which logs only ``val/loss``: the watched metrics default to it.

    (The library's defaults watch the retrieval task's ``val/t2i/mrr``, which the toy task has not.)
    """
    if fields.get("early_stopping", ...) is ...:
        fields["early_stopping"] = EarlyStoppingConfig(metric="val/loss")
    fields.setdefault("plateau", PlateauConfig(metric="val/loss"))
    return TrainConfig(**fields)


def make_data(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = x @ torch.linspace(-1, 1, 8) + 0.05 * torch.randn(n, generator=g)
    return [{"x": x[i], "y": y[i]} for i in range(n)]


def make_bundle(
    seed: int = 0, kill_at: int | None = None, val_values: list[float] | None = None
) -> TaskBundle:
    torch.manual_seed(seed)
    model = ToyModel(kill_at)
    val = make_data(64, seed + 1)
    xs, ys = torch.stack([v["x"] for v in val]), torch.stack([v["y"] for v in val])
    calls = {"n": 0}

    def evaluate(m: nn.Module) -> dict[str, float]:
        loss = float(((m.net(xs).squeeze(-1) - ys) ** 2).mean())
        calls["n"] += 1
        if val_values is not None:  # a crafted metric sequence for scheduler / early-stopping tests
            return {"val/loss": val_values[min(calls["n"], len(val_values)) - 1], "val/real_loss": loss}
        return {"val/loss": loss}

    def save_model(m: nn.Module, directory: Path) -> None:
        save_file(m.net.state_dict(), directory / "toy.safetensors")

    return TaskBundle(model=model, train_data=make_data(200, seed), evaluate=evaluate, save_model=save_model)


def run(run_dir: Path, cfg: TrainConfig, resume: bool = False, kill_at: int | None = None):
    run_dir.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(cpu=True)
    return fit(make_bundle(cfg.seed, kill_at), cfg, run_dir, accelerator, resume=resume, quiet=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-at-step", type=int)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = toy_train_config(epochs=4, batch_size=16, lr=0.01, early_stopping=None, keep_last=2)
    run(args.run_dir, config, resume=args.resume, kill_at=args.kill_at_step)
