"""The loop without a per-step host read: skips on the device, reads every ``log_every_steps``.

The oracle is a hand-written loop with the per-step read the loop had before (read the loss; a
non-finite one skips backward and step; a non-finite gradient norm skips the step), over the very same
batches and the same optimiser. ``fit`` must end with bit-identical weights and write the same numbers
to ``metrics.jsonl`` (step records at log steps, epoch means of the steps not skipped).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from cliptune.config import PlateauConfig, TrainConfig
from cliptune.train.batches import epoch_batches
from cliptune.train.errors import NonFiniteLossError
from cliptune.train.loop import fit
from cliptune.train.optim import SkippingAdamW, make_optimizer
from cliptune.train.tasks.bundle import TaskBundle
from tests.toy_task import make_data

_DATA = make_data(200, 0)  # 200 // 16 = 12 batches per epoch
_VAL = make_data(32, 1)


class _InfGrad(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss with a non-finite gradient norm."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("inf")


class _Linear(nn.Module):
    """Linear regression with two loss terms; call k returns a NaN loss or an infinite gradient per ``bad``."""

    def __init__(self, bad: dict[int, str]) -> None:
        super().__init__()
        self.net, self.bad, self.calls = nn.Linear(8, 1), bad, 0

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.calls += 1
        mse = ((self.net(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()
        l1 = self.net.weight.abs().mean()
        loss = mse + 0.1 * l1
        if self.bad.get(self.calls) == "nan":
            loss = loss * float("nan")
        elif self.bad.get(self.calls) == "inf-grad":
            loss = _InfGrad.apply(loss)
        return {"mse": mse, "loss": loss, "l1": l1}  # "loss" not first: terms are matched by name


def _model(bad: dict[int, str]) -> _Linear:
    torch.manual_seed(0)
    return _Linear(bad)


def _cfg(**fields: Any) -> TrainConfig:
    # a plateau schedule that never moves within the test (patience 100): the lr is cfg.lr throughout
    plateau = PlateauConfig(metric="val/loss", patience=100)
    return TrainConfig(batch_size=16, lr=0.05, early_stopping=None, plateau=plateau, **fields)


def _fit(tmp_path: Path, cfg: TrainConfig, bad: dict[int, str]) -> tuple[_Linear, list[dict[str, Any]]]:
    model = _model(bad)
    xs, ys = torch.stack([v["x"] for v in _VAL]), torch.stack([v["y"] for v in _VAL])

    def evaluate(m: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            return {"val/loss": float(((m.net(xs).squeeze(-1) - ys) ** 2).mean())}

    bundle = TaskBundle(model=model, train_data=_DATA, evaluate=evaluate, save_model=lambda m, d: None)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=cfg.grad_accum)
    fit(bundle, cfg, tmp_path, accelerator, quiet=True)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    return model, [json.loads(line) for line in lines]


def _oracle(cfg: TrainConfig, bad: dict[int, str]) -> tuple[_Linear, list[dict[str, float] | None]]:
    """The per-step-read loop: each step's terms as floats, None for a skipped step; the trained model.

    With accumulation a window with any skipped batch does not step (its other batches still count).
    """
    model = _model(bad)
    optimizer = make_optimizer(model, cfg)
    steps: list[dict[str, float] | None] = []
    window_ok = True
    for epoch in range(cfg.epochs):
        for batch in epoch_batches(_DATA, batch_size=cfg.batch_size, seed=cfg.seed, epoch=epoch):
            out = model(batch)
            values = {name: float(term.detach()) for name, term in out.items()}
            ok = math.isfinite(values["loss"])
            if ok:
                (out["loss"] / cfg.grad_accum).backward()
            window_ok &= ok
            if len(steps) % cfg.grad_accum == cfg.grad_accum - 1:  # the window's last batch: step
                if window_ok:
                    assert cfg.grad_clip is not None
                    norm = float(nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
                    ok = window_ok = math.isfinite(norm)
                if window_ok:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                window_ok = True
            steps.append(values if ok else None)
    return model, steps


def _expected_records(cfg: TrainConfig, steps: list[dict[str, float] | None]) -> tuple[list, list]:
    """Step records (step, loss) at log steps and each epoch's means of the steps not skipped."""
    logged = [(s, steps[s - 1] and steps[s - 1]["loss"]) for s in range(1, len(steps) + 1)]
    logged = [(s, loss) for s, loss in logged if s % cfg.log_every_steps == 0]
    means = []
    for epoch in range(cfg.epochs):
        good = [v for v in steps[epoch * 12 : (epoch + 1) * 12] if v is not None]
        means.append({f"train/{n}": sum(v[n] for v in good) / len(good) for n in ("loss", "l1", "mse")})
    return logged, means


@pytest.mark.parametrize(
    ("grad_accum", "bad"),
    [
        (1, {}),  # no bad step: the device-side flag must not change a normal step by a bit
        (1, {5: "nan", 9: "inf-grad", 16: "nan"}),  # a NaN loss; a finite loss with an infinite gradient
        (2, {3: "nan", 10: "inf-grad"}),  # accumulation: batch 3 skips window (3, 4); 10 skips (9, 10)
    ],
)
def test_fit_matches_the_per_step_read_loop(tmp_path: Path, grad_accum: int, bad: dict[int, str]) -> None:
    cfg = _cfg(epochs=2, grad_accum=grad_accum, max_bad_steps=3, log_every_steps=5)
    model, records = _fit(tmp_path, cfg, bad)
    reference, steps = _oracle(cfg, bad)
    # bit-identical weights: skipped steps left parameters and AdamW's state exactly as they were
    for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(ours, theirs)
    assert sum(v is None for v in steps) == len(bad)  # the oracle skipped exactly the injected steps
    logged, means = _expected_records(cfg, steps)
    assert [(r["step"], r["train/loss"]) for r in records if r["kind"] == "step"] == logged
    assert all(r["lr"] == cfg.lr for r in records)
    epochs = [r for r in records if r["kind"] == "epoch"][1:]  # after the untrained baseline
    assert [{k: r[k] for k in ("train/loss", "train/l1", "train/mse")} for r in epochs] == means  # exact


def test_too_many_bad_steps_raise_at_the_read_naming_the_first(tmp_path: Path) -> None:
    # allowance 1; bad steps 3, 5, 7 are skipped on the device and found at the read of step 10:
    # step 5 is the one beyond the allowance, step 3 the first, 3 were skipped in all
    cfg = _cfg(epochs=1, max_bad_steps=1, log_every_steps=10)
    bad = {3: "nan", 5: "inf-grad", 7: "nan"}
    with pytest.raises(NonFiniteLossError) as info:
        _fit(tmp_path, cfg, bad)
    error = info.value
    assert (error.step, error.epoch, error.batch) == (5, 1, 5)
    assert (error.first_bad_step, error.bad_steps, error.found_at, error.max_bad_steps) == (3, 3, 10, 1)
    assert math.isfinite(error.loss)  # step 5's loss was finite, its gradient norm was not
    assert str(error).startswith(
        f"non-finite gradient norm (loss {error.loss}) at step 5 (epoch 1, batch 5); read at step 10: "
        "3 non-finite steps skipped, the first at step 3; last good checkpoint: none. "
    )
    assert str(error).endswith("or allow skipping with train.max_bad_steps (now 1)")


def test_the_skip_flag_leaves_parameters_and_optimizer_state_untouched() -> None:
    for fused in (True, False):  # the fused kernels, and the host-read fallback without them
        torch.manual_seed(0)
        layer = nn.Linear(4, 3)
        optimizer = SkippingAdamW(layer.parameters(), lr=0.1, fused=fused)
        x = torch.randn(5, 4)
        layer(x).square().mean().backward()
        optimizer.step()
        before = [p.detach().clone() for p in layer.parameters()]
        state = {k: v.clone() for k, v in optimizer.state[layer.weight].items()}
        layer(x).square().mean().backward()
        optimizer.skip_if(torch.tensor(0.0))  # flags of one accumulation window combine: 0 then 1 skips
        optimizer.skip_if(torch.tensor(1.0))
        optimizer.step()
        assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters(), strict=True))
        assert all(torch.equal(v, optimizer.state[layer.weight][k]) for k, v in state.items())
        assert optimizer.pending is None and not hasattr(optimizer, "found_inf")
        optimizer.skip_if(torch.tensor(0.0))
        optimizer.step()  # a 0.0 flag steps (step count 2)
        assert not torch.equal(before[0], layer.weight) and float(optimizer.state[layer.weight]["step"]) == 2


def test_an_unfused_checkpoint_loads_into_the_fused_optimizer() -> None:
    layer = nn.Linear(2, 2)
    plain = torch.optim.AdamW(layer.parameters(), lr=0.1)
    layer(torch.ones(1, 2)).sum().backward()
    plain.step()
    fused = SkippingAdamW(layer.parameters(), lr=0.1, fused=True)
    fused.load_state_dict(plain.state_dict())
    assert all(group["fused"] for group in fused.param_groups)
    assert float(fused.state[layer.weight]["step"]) == 1
