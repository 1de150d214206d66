"""Gradient caching is exact: one cached step (chunks of 2 or 3 of a batch of 8) equals one full-batch step.

The oracle is the plain step of the same model on the same batch: loss, every gradient and the parameters
after one SGD step (lr 1, so parameter changes are the gradients themselves; AdamW's first step is about
lr * sign(grad) and would hide wrong magnitudes) must agree to fp32 round-off. Tolerances: rtol 1e-4,
atol 1e-6 on the parameters (chunked matmuls sum in another order; the largest absolute difference
measured over these cases is 4e-6, within rtol on weights of order 0.1 to 1). Towers trainable (pixels + tokens) and head-only (cached tower features), CLIP,
SigLIP and a composed backbone, InfoNCE with a learned temperature and SigLIP with learned scale and bias;
in one process and in two gloo processes under Accelerate's DDP (2 x batch 4 cached == 1 x batch 8 plain).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from transformers import BertConfig, BertModel

from cliptune.config import GradCacheConfig, TrainConfig, load_config
from cliptune.losses import InfoNCELoss, SigLIPLoss
from cliptune.models.factory import load_backbone
from cliptune.train import grad_cache, loop
from cliptune.train.grad_cache import GradCache, split_batch
from cliptune.train.loop import fit
from cliptune.train.tasks.bundle import TaskBundle
from cliptune.train.tasks.retrieval import RetrievalModel
from tests.launched import free_port
from tests.tiny_models import MAX_TEXT_LEN, TINY_CORPUS, make_tiny_clip, make_tiny_siglip, make_tiny_tokenizer

BATCH = 8
TOL = {"rtol": 1e-4, "atol": 1e-6}
CASES = [  # (backbone, loss, towers trainable)
    ("clip", "info_nce", True),
    ("clip", "info_nce", False),
    ("siglip", "siglip", True),
    ("siglip", "siglip", False),
    ("composed", "info_nce", True),
    ("composed", "siglip", False),
]


def _tiny_bert(path: Path) -> Path:
    tokenizer = make_tiny_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=MAX_TEXT_LEN,
        hidden_dropout_prob=0.0,  # the plain oracle embeds all 8 rows at once: no masks to replay
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def towers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("towers")
    return {
        "clip": make_tiny_clip(root / "clip"),
        "siglip": make_tiny_siglip(root / "siglip"),
        "bert": _tiny_bert(root / "bert"),
    }


def _model(towers: dict[str, Path], kind: str, loss: str, trainable: bool) -> RetrievalModel:
    """The same model on every call (and in every process): fixed seed, deterministic loading."""
    torch.manual_seed(0)
    layers = -1 if trainable else 0
    if kind == "composed":
        backbone = load_backbone(
            "composed",
            image_tower=towers["clip"],
            text_tower=towers["bert"],
            embed_dim=16,
            trainable_layers=layers,
        )
    else:
        backbone = load_backbone(towers[kind], trainable_layers=layers)
    loss_fn = (
        InfoNCELoss(temperature=0.1, learn_temperature=True)
        if loss == "info_nce"
        else SigLIPLoss(init_logit_scale=1.0, init_logit_bias=-2.0)
    )
    return RetrievalModel(backbone, loss_fn).train()


def _batch(model: RetrievalModel, trainable: bool) -> dict[str, torch.Tensor]:
    """Pixels and tokens (towers train) or the towers' features (heads only), the same on every call."""
    pixels = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = model.backbone.tokenize(TINY_CORPUS[:BATCH])
    if trainable:
        return {"pixel_values": pixels, **tokens}
    with torch.no_grad():
        return {
            "image_features": model.backbone.image_features(pixels),
            "text_features": model.backbone.text_features(tokens["input_ids"], tokens["attention_mask"]),
        }


def _plain_step(
    model: RetrievalModel, batch: dict[str, torch.Tensor]
) -> tuple[float, dict[str, torch.Tensor]]:
    """The oracle: one full-batch forward, backward and SGD step; the loss and the parameters after it."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    loss = model(batch)["loss"]
    loss.backward()
    optimizer.step()
    return loss.item(), _trained(model)


def _cached_step(
    model: RetrievalModel, batch: dict[str, torch.Tensor], chunk: int, accelerator: Accelerator
) -> tuple[float, dict[str, torch.Tensor]]:
    """One gradient-cached step as the loop takes it: prepared model, forward (pass 1), backward (pass 2)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    cache = GradCache(chunk, accelerator)
    loss = cache.forward(prepared, batch)["loss"]
    cache.backward(prepared)
    optimizer.step()
    return loss.item(), _trained(accelerator.unwrap_model(prepared))


def _trained(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_step(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], before: dict) -> None:
    assert got.keys() == want.keys()
    assert any(k.startswith("loss.") for k in want)  # the learned temperature / scale and bias are there
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, **TOL, msg=key)
    # ... and the step did something: the oracle is not "nothing moved"
    assert max((want[k] - before[k]).abs().max().item() for k in want) > 1e-3


@pytest.mark.parametrize(("kind", "loss", "trainable"), CASES)
@pytest.mark.parametrize("chunk", [2, 3])
def test_cached_step_equals_full_batch_step(
    towers: dict[str, Path], kind: str, loss: str, trainable: bool, chunk: int
) -> None:
    model = _model(towers, kind, loss, trainable)
    batch = _batch(model, trainable)
    before = _trained(model)
    want_loss, want = _plain_step(copy.deepcopy(model), batch)
    got_loss, got = _cached_step(model, batch, chunk, Accelerator(cpu=True))
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    _assert_same_step(got, want, before)


@pytest.fixture
def fresh_accelerate() -> Iterator[None]:
    """Accelerate keeps one process-wide state whose precision is fixed by the first Accelerator: reset it."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.mark.usefixtures("fresh_accelerate")
def test_bf16_autocast_covers_both_passes(towers: dict[str, Path]) -> None:
    """Under bf16 autocast the cached step matches the plain bf16 step to bf16 round-off."""
    model = _model(towers, "clip", "info_nce", True)
    batch = _batch(model, True)
    before = _trained(model)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    plain = copy.deepcopy(model)
    optimizer = torch.optim.SGD([p for p in plain.parameters() if p.requires_grad], lr=1.0)
    prepared, optimizer = accelerator.prepare(plain, optimizer)
    want_loss = prepared(batch)["loss"]
    accelerator.backward(want_loss)
    optimizer.step()
    want = _trained(accelerator.unwrap_model(prepared))
    got_loss, got = _cached_step(model, batch, 3, accelerator)
    assert got_loss == pytest.approx(want_loss.item(), rel=1e-2)
    for key, value in want.items():  # bf16 keeps 8 bits of mantissa: chunked matmuls round differently
        torch.testing.assert_close(got[key] - before[key], value - before[key], rtol=0.05, atol=2e-3, msg=key)
    # ... and autocast really ran: the fp32 step moves the weights differently
    _, fp32 = _plain_step(_model(towers, "clip", "info_nce", True), batch)
    assert max((fp32[k] - got[k]).abs().max().item() for k in got) > 1e-4


def _with_dropout(model: RetrievalModel, p: float) -> RetrievalModel:
    for module in model.modules():  # CLIP's attention: dropout on the attention weights in train()
        if hasattr(module, "dropout") and isinstance(module.dropout, float):
            module.dropout = p
    return model


def _chunked_oracle(
    model: RetrievalModel, batch: dict[str, torch.Tensor], chunk: int
) -> tuple[float, dict[str, torch.Tensor]]:
    """With dropout the oracle is one graph over the same chunks in the same RNG order as pass 1."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    parts = [model.embed(c) for c in split_batch(batch, chunk)]
    loss = model.loss(torch.cat([i for i, _ in parts]), torch.cat([t for _, t in parts]))["loss"]
    loss.backward()
    optimizer.step()
    return loss.item(), _trained(model)


def test_dropout_replays_the_same_masks(towers: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    model = _with_dropout(_model(towers, "clip", "info_nce", True), 0.3)
    batch = _batch(model, True)
    before = _trained(model)
    torch.manual_seed(5)
    want_loss, want = _chunked_oracle(copy.deepcopy(model), batch, 3)
    torch.manual_seed(5)
    got_loss, got = _cached_step(copy.deepcopy(model), batch, 3, Accelerator(cpu=True))
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    _assert_same_step(got, want, before)

    # dropout is really drawing: another seed gives another loss ...
    torch.manual_seed(6)
    assert abs(_chunked_oracle(copy.deepcopy(model), batch, 3)[0] - want_loss) > 1e-4

    # ... and without the replay pass 2 draws other masks than pass 1, and the step is wrong
    monkeypatch.setattr(grad_cache._RngState, "replayed", lambda self: contextlib.nullcontext())
    torch.manual_seed(5)
    _, wrong = _cached_step(copy.deepcopy(model), batch, 3, Accelerator(cpu=True))
    tower = "backbone.model.vision_model.encoder.layers.0.self_attn.q_proj.weight"
    assert (wrong[tower] - want[tower]).abs().max() > 1e-4


def test_config_refuses_grad_cache_outside_contrastive_retrieval() -> None:
    on = ["train.grad_cache={chunk_size: 16}"]
    assert load_config(None, on).train.grad_cache.chunk_size == 16
    assert load_config(None, [*on, "loss.name=siglip"]).train.grad_cache is not None
    assert load_config(None).train.grad_cache is None  # off by default
    with pytest.raises(
        ValueError,
        match=r"train.grad_cache applies only to loss.name info_nce or siglip, "
        r"got loss.name='triplet'.*train.grad_accum",
    ):
        load_config(None, [*on, "loss.name=triplet"])
    with pytest.raises(
        ValueError,
        match=r"train.grad_cache applies only to train.task='retrieval', got "
        r"train.task='siamese'",
    ):
        load_config(None, [*on, "train.task=siamese", "loss.name=triplet"])
    with pytest.raises(ValueError, match=r"train.grad_cache.chunk_size=64 is not below train.batch_size=64"):
        load_config(None, ["train.grad_cache={chunk_size: 64}"])
    with pytest.raises(ValueError, match=r"chunk_size"):
        load_config(None, ["train.grad_cache={chunk_size: 0}"])
    # the cache embeds (image, text) pairs only: mined negatives would be dropped without a word
    with pytest.raises(ValueError, match=r"train.grad_cache and train.hard_negatives cannot be combined yet"):
        load_config(None, [*on, "train.hard_negatives={file: mined.parquet}"])


@pytest.mark.usefixtures("fresh_accelerate")
@pytest.mark.parametrize("accum", [1, 2])
def test_the_loop_trains_with_grad_cache(
    towers: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, accum: int
) -> None:
    """fit with train.grad_cache takes the two passes (with accumulation, clipping, AdamW) as a plain fit."""
    calls = {"forward": 0, "backward": 0}
    for name in calls:
        original = getattr(GradCache, name)

        def counted(self: GradCache, *args: Any, _name: str = name, _f: Any = original) -> Any:
            calls[_name] += 1
            return _f(self, *args)

        monkeypatch.setattr(GradCache, name, counted)
    # the gradients each optimiser step gets (AdamW would hide a wrongly scaled one): recorded before clipping
    stepped: dict[str, list[dict[str, torch.Tensor]]] = {"plain": [], "cached": []}
    clip_and_step = loop._clip_and_step

    def recording(run: Any, loss: torch.Tensor) -> torch.Tensor:
        if run.accelerator.sync_gradients:
            grads = {n: p.grad.clone() for n, p in run.parts.model.named_parameters() if p.grad is not None}
            stepped["cached" if run.grad_cache else "plain"].append(grads)
        return clip_and_step(run, loss)

    monkeypatch.setattr(loop, "_clip_and_step", recording)

    def run(name: str, cache: GradCacheConfig | None) -> tuple[list[dict], dict[str, torch.Tensor]]:
        model = _model(towers, "clip", "info_nce", True)
        batch = _batch(model, True)
        items = [{k: v[i] for k, v in batch.items()} for i in range(BATCH)] * 2  # 2 steps of 8

        def evaluate(m: torch.nn.Module) -> dict[str, float]:
            return {"val/loss": float(m(batch)["loss"])}

        bundle = TaskBundle(model, items, evaluate, save_model=lambda m, d: None)
        cfg = TrainConfig(
            epochs=1,
            batch_size=BATCH,
            lr=1e-3,
            early_stopping=None,
            scheduler="cosine",
            log_every_steps=1,
            grad_cache=cache,
            grad_accum=accum,
        )
        (tmp_path / name).mkdir()
        fit(
            bundle, cfg, tmp_path / name, Accelerator(cpu=True, gradient_accumulation_steps=accum), quiet=True
        )
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["kind"] == "step"], _trained(model)

    plain_steps, plain = run("plain", None)
    assert calls == {"forward": 0, "backward": 0}
    cached_steps, cached = run("cached", GradCacheConfig(chunk_size=3))
    assert calls == {"forward": 2, "backward": 2}
    assert [r["step"] for r in cached_steps] == [1, 2]
    assert len(stepped["cached"]) == len(stepped["plain"]) == 2 // accum
    for got_grads, want_grads in zip(stepped["cached"], stepped["plain"], strict=True):
        assert got_grads.keys() == want_grads.keys()
        for key, value in want_grads.items():
            torch.testing.assert_close(got_grads[key], value, **TOL, msg=key)
    for got, want in zip(cached_steps, plain_steps, strict=True):
        assert got["train/loss"] == pytest.approx(want["train/loss"], rel=1e-6)
    # AdamW's first steps are about lr * sign(grad), so round-off on a zero gradient becomes an lr-sized
    # step: the attention key biases' gradient is exactly zero in exact arithmetic (softmax ignores a shift
    # shared by all keys), so they are left out; every other weight must agree.
    for key, value in plain.items():
        if key.endswith("k_proj.bias"):
            continue
        torch.testing.assert_close(cached[key], value, rtol=1e-4, atol=1e-5, msg=key)


# --- two processes -------------------------------------------------------------------------------------

DIST_CASES = [("clip", "info_nce", True), ("siglip", "siglip", True), ("composed", "info_nce", False)]


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _worker(rank: int, port: int, towers: dict[str, Path], out_dir: str) -> None:
    torch.set_num_threads(1)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank)}
    # a forked worker inherits the parent's single-process Accelerate state (a shared singleton): start afresh
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    with _env(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", **env):
        accelerator = Accelerator(cpu=True)  # gloo, and the model wrapped in DDP by prepare
        results: dict[str, object] = {"distributed": accelerator.distributed_type.value}
        rows = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
        for kind, loss, trainable in DIST_CASES:
            model = _model(towers, kind, loss, trainable)
            local = {k: v[rows] for k, v in _batch(model, trainable).items()}
            results[kind] = _cached_step(model, local, 3, accelerator)  # chunks of 3 and 1 rows
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        accelerator.wait_for_everyone()
        torch.distributed.destroy_process_group()


def test_two_processes_cached_equal_one_process_full_batch(towers: dict[str, Path], tmp_path: Path) -> None:
    # fork: the workers start from this process's imports (spawn would re-import torch and transformers)
    mp.start_processes(
        _worker, args=(free_port(), towers, str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for kind, loss, trainable in DIST_CASES:
        model = _model(towers, kind, loss, trainable)
        before = _trained(model)
        want_loss, want = _plain_step(model, _batch(model, trainable))  # 1 process, batch 8, no cache
        for res in results:
            assert res["distributed"] == "MULTI_CPU"  # two processes, gradients averaged by DDP
            _assert_same_step(res[kind][1], want, before)
        # each process's loss is its rows against the gathered batch; their mean is the full-batch loss
        mean_loss = sum(res[kind][0] for res in results) / 2
        assert mean_loss == pytest.approx(want_loss, rel=1e-5)
