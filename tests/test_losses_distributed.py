"""2 processes x batch 8 with gathered negatives == 1 process x batch 16: same loss, same gradients.

Two gloo processes on CPU each run half of a batch of 16 through tiny linear projections (same init),
compute InfoNCE / SigLIP with ``gather=True``, then all-reduce and average the gradients like DDP. The
mean loss over processes and the averaged gradients must equal one process on the full batch.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cliptune.losses import InfoNCELoss, SigLIPLoss
from cliptune.losses.distributed import gather_with_grad, rank_and_world_size
from tests.launched import free_port

WORLD = 2
BATCH = 16
CASES = [(name, dtype) for name in ("info_nce", "siglip") for dtype in (torch.float32, torch.float64)]


def _setup(
    name: str, dtype: torch.dtype, gather: bool = True
) -> tuple[torch.nn.ModuleDict, torch.Tensor, torch.Tensor]:
    """Same seed in every process: identical projections, loss parameters and global batch."""
    torch.manual_seed(0)
    loss = (
        InfoNCELoss(temperature=0.1, learn_temperature=True, gather=gather)
        if name == "info_nce"
        else SigLIPLoss(init_logit_scale=1.0, init_logit_bias=-2.0, gather=gather)
    )
    model = torch.nn.ModuleDict({"image": torch.nn.Linear(6, 4), "text": torch.nn.Linear(5, 4), "loss": loss})
    model = model.to(dtype)
    x_img = torch.randn(BATCH, 6, dtype=dtype)  # (16, 6)
    x_txt = torch.randn(BATCH, 5, dtype=dtype)  # (16, 5)
    return model, x_img, x_txt


def _step(
    model: torch.nn.ModuleDict, x_img: torch.Tensor, x_txt: torch.Tensor
) -> tuple[float, dict[str, torch.Tensor]]:
    out = model["loss"](model["image"](x_img), model["text"](x_txt))
    out["loss"].backward()
    return out["loss"].item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        results: dict[str, object] = {"rank_and_world": rank_and_world_size()}
        rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        for name, dtype in CASES:
            model, x_img, x_txt = _setup(name, dtype)
            loss, grads = _step(model, x_img[rows], x_txt[rows])
            loss_t = torch.tensor(loss, dtype=torch.float64)
            dist.all_reduce(loss_t)
            for g in grads.values():  # what DDP does: average gradients over processes
                dist.all_reduce(g)
                g /= WORLD
            results[f"{name}/{dtype}"] = (loss_t.item() / WORLD, grads)
            # Sensitivity check: without gathering, each process only sees 8 negatives.
            model, x_img, x_txt = _setup(name, dtype, gather=False)
            loss_local = torch.tensor(_step(model, x_img[rows], x_txt[rows])[0], dtype=torch.float64)
            dist.all_reduce(loss_local)
            results[f"{name}/{dtype}/no_gather"] = loss_local.item() / WORLD

        # The convention itself: f = sum(c * gather(x)) on every process -> grad of local x is WORLD * c[rows].
        c = torch.arange(BATCH * 3, dtype=torch.float64).reshape(BATCH, 3)
        x = torch.full((BATCH // WORLD, 3), float(rank), dtype=torch.float64, requires_grad=True)
        gathered = gather_with_grad(x)
        (c * gathered).sum().backward()
        results["gathered"] = gathered.detach()
        results["gather_grad_ok"] = torch.equal(x.grad, WORLD * c[rows])

        try:
            gather_with_grad(torch.zeros(rank + 1, 3))
            results["unequal"] = "no error"
        except ValueError as err:
            results["unequal"] = str(err)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, object]]:
    out_dir = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize(("name", "dtype"), CASES)
def test_two_processes_equal_one_full_batch(
    two_process_results: list[dict[str, object]], name: str, dtype: torch.dtype
) -> None:
    model, x_img, x_txt = _setup(name, dtype)
    full_loss, full_grads = _step(model, x_img, x_txt)  # 1 process, batch 16 (gather is the identity)
    for res in two_process_results:
        loss, grads = res[f"{name}/{dtype}"]
        assert loss == pytest.approx(full_loss, abs=1e-6)
        assert set(grads) == set(full_grads)  # projections and the loss's own scale / bias / temperature
        for key, grad in full_grads.items():
            torch.testing.assert_close(grads[key], grad, rtol=0, atol=1e-6, msg=key)
        # ... and the test is sensitive: local-only negatives give a different loss.
        assert abs(res[f"{name}/{dtype}/no_gather"] - full_loss) > 1e-3


def test_gather_with_grad_convention(two_process_results: list[dict[str, object]]) -> None:
    for rank, res in enumerate(two_process_results):
        assert res["rank_and_world"] == (rank, WORLD)
        # rows ordered by rank: 8 rows of 0.0 (rank 0) then 8 rows of 1.0 (rank 1)
        expected = torch.cat([torch.zeros(BATCH // WORLD, 3), torch.ones(BATCH // WORLD, 3)]).double()
        assert torch.equal(res["gathered"], expected)
        assert res["gather_grad_ok"] is True
        assert "local batch sizes differ across processes [1, 2]" in res["unequal"]


def test_single_process_is_identity() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    assert rank_and_world_size() == (0, 1)
    assert gather_with_grad(x) is x
