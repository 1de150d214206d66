"""StepOps: the direct torch calls give bit-identical steps to Accelerate's wrappers, and are only taken
where those wrappers would do nothing else."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from cliptune.config import TrainConfig
from cliptune.train.batches import step_terms
from cliptune.train.optim import make_optimizer
from cliptune.train.state import UnreadSteps
from cliptune.train.stepping import StepOps, direct_steps


class _Net(nn.Module):
    """Two layers, a frozen one and a trainable parameter the loss never uses (its gradient stays None)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.frozen = nn.Linear(6, 5), nn.Linear(5, 1), nn.Linear(6, 1)
        self.frozen.requires_grad_(False)
        self.unused = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((self.b(torch.tanh(self.a(x))) + self.frozen(x)).squeeze(-1) ** 2).mean() * 50.0


def _train(ops: StepOps, model: nn.Module, batches: list[torch.Tensor], step: int) -> list[float]:
    """Micro-batch ``step`` through ``ops`` (clip at 0.5, so clipping bites); the norms of the real steps."""
    accelerator = ops.accelerator
    ops.backward(model(batches[step]))
    norms = []
    if accelerator.sync_gradients:
        norm = ops.clip(0.5)
        assert norm is not None
        norms.append(float(norm))
    ops.inner.skip_if(torch.tensor(0.0))
    ops.step()
    ops.zero_grad()
    return norms


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_direct_calls_step_exactly_like_accelerates_wrappers(grad_accum: int) -> None:
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=grad_accum)
    assert direct_steps(accelerator)
    cfg = TrainConfig(lr=0.05, early_stopping=None)
    models, all_ops = [], []
    for direct in (True, False):
        torch.manual_seed(0)
        net = _Net()
        model, optimizer = accelerator.prepare(net, make_optimizer(net, cfg, accelerator.device))
        ops = dataclasses.replace(StepOps.build(accelerator, model, optimizer), direct=direct)
        models.append(model)
        all_ops.append(ops)
    net = models[0]
    trainable = [net.unused, net.a.weight, net.a.bias, net.b.weight, net.b.bias]  # the frozen layer left out
    assert all_ops[0].foreach and [id(p) for p in all_ops[0].params] == [id(p) for p in trainable]
    batches = [torch.randn(8, 6, generator=torch.Generator().manual_seed(i)) for i in range(12)]
    norms: list[list[float]] = [[], []]
    for step in range(len(batches)):
        with accelerator.accumulate(*models):  # one window for both: the same sync_gradients
            for i in range(2):
                norms[i] += _train(all_ops[i], models[i], batches, step)
    assert len(norms[0]) == 12 // grad_accum and max(norms[0]) > 0.5  # real steps, clipped
    assert norms[0] == norms[1]  # the norms before clipping, bit for bit
    for ours, theirs in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(ours, theirs)
    opt_states = [ops.inner.state[m.a.weight] for ops, m in zip(all_ops, models, strict=True)]
    assert all(torch.equal(opt_states[0][k], opt_states[1][k]) for k in ("exp_avg", "exp_avg_sq", "step"))


def test_foreach_clip_equals_torchs_clip_grad_norm() -> None:
    torch.manual_seed(1)
    nets = [_Net(), _Net()]
    nets[1].load_state_dict(nets[0].state_dict())
    x = torch.randn(8, 6)
    for net in nets:
        net(x).backward()
    accelerator = Accelerator(cpu=True)
    cfg = TrainConfig(lr=0.05, early_stopping=None)
    ops = StepOps.build(accelerator, nets[0], make_optimizer(nets[0], cfg))
    ours, theirs = ops.clip(0.1), nn.utils.clip_grad_norm_(nets[1].parameters(), 0.1)
    assert ours is not None and torch.equal(ours, theirs) and float(ours) > 0.1
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        if a.grad is None or b.grad is None:  # frozen and unused: no gradient on either side
            assert a.grad is None and b.grad is None
        else:
            assert torch.equal(a.grad, b.grad)


def test_mixed_dtypes_fall_back_to_torchs_clipping() -> None:
    net = _Net()
    net.b.double()
    ops = StepOps.build(Accelerator(cpu=True), net, make_optimizer(net, TrainConfig(early_stopping=None)))
    assert ops.direct and not ops.foreach


def test_fit_refuses_an_optimizer_it_cannot_skip_on_the_device() -> None:
    net = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="fit needs make_optimizer's SkippingAdamW, not SGD"):
        StepOps.build(Accelerator(cpu=True), net, torch.optim.SGD(net.parameters(), lr=0.1))


def test_unread_steps_read_back_the_terms_in_order() -> None:
    accelerator = Accelerator(cpu=True)
    unread = UnreadSteps()
    for i in range(3):  # a bf16 term and a (1,)-shaped one: both read back as float
        outputs = {"mse": torch.tensor(float(i), dtype=torch.bfloat16), "loss": torch.tensor([i + 0.5])}
        terms, loss = step_terms(accelerator, outputs)
        assert torch.equal(loss, outputs["loss"]) and not loss.requires_grad
        unread.add(list(outputs), terms, torch.tensor(float(i == 1)))
    assert len(unread) == 3
    assert unread.read() == [
        ({"mse": 0.0, "loss": 0.5}, False),
        ({"mse": 1.0, "loss": 1.5}, True),
        ({"mse": 2.0, "loss": 2.5}, False),
    ]
    assert len(unread) == 0 and unread.read() == []


def test_unread_scalar_terms_of_mixed_dtypes_read_as_floats() -> None:
    unread = UnreadSteps()
    for i in range(2):  # all 0-dim (one op at the read), a bf16 term beside a float32 one
        outputs = {"loss": torch.tensor(i + 0.25), "aux": torch.tensor(-i - 0.5, dtype=torch.bfloat16)}
        unread.add(list(outputs), step_terms(Accelerator(cpu=True), outputs)[0], torch.tensor(0.0))
    assert unread.read() == [({"loss": 0.25, "aux": -0.5}, False), ({"loss": 1.25, "aux": -1.5}, False)]
