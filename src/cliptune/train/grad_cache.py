"""Gradient caching (Gao et al. 2021): a contrastive batch far larger than memory fits, in two passes.

InfoNCE and SigLIP want large batches (every other pair is a negative), but a batch's activations grow
with its size. The loss itself only needs the (B, D) embeddings, so the step is split at them:

* pass 1 (:meth:`GradCache.forward`) embeds the batch chunk by chunk without a graph, saving each chunk's
  RNG state, and computes the loss on the whole (B, D) embeddings, which require grad; with several
  processes the loss gathers every process's embeddings as usual (``gather=True``);
* :meth:`GradCache.backward` takes d loss / d embeddings (and the loss's own parameters' gradients: a
  learnable temperature, SigLIP's scale and bias) from that small graph, then pass 2 re-embeds each
  chunk with a graph, replaying its RNG state so dropout draws the same masks, and backpropagates the
  cached gradient into the towers: ``backward(sum(embedding * cached_grad))``.

Peak memory is then one chunk's activations plus the (B, D) embeddings and the (B, B) logits, at the cost
of a second forward pass. Gradients are exact: the chain rule splits at the embeddings, so parameters
after a step equal those of a full-batch step (tests/test_grad_cache.py checks it, in one and two processes).

Pass 2 runs through the prepared (possibly DDP-wrapped) model, one chunk per call, via the
:data:`REPLAY_KEY` entry of the batch that the task's ``forward`` hands to :func:`replay_objective`; all
chunks but the last are under ``accelerator.no_sync``, so DDP averages gradients once, and the last chunk
also carries the loss parameters' cached gradients, so every trainable parameter is reached in the synced
backward. ``accelerator.backward`` scales (fp16) and divides (accumulation) exactly as for a plain step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from torch import Tensor, nn

__all__ = ["REPLAY_KEY", "GradCache", "Replay", "replay_objective", "split_batch"]

REPLAY_KEY = "grad_cache_replay"
"""Batch key under which pass 2 hands one chunk's :class:`Replay` to the task model's ``forward``."""


class _Embedder(Protocol):
    """What gradient caching needs from a task model (``RetrievalModel``): embed a batch, and its loss."""

    loss: nn.Module

    def embed(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]: ...


@dataclass
class _RngState:
    """The CPU generator's state, and the accelerator's when the chunk ran on one."""

    cpu: Tensor
    device: torch.device
    accel: Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> _RngState:
        accel = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), device, accel)

    @contextlib.contextmanager
    def replayed(self) -> Any:
        """Run the block from this state; the RNG streams are restored afterwards (pass 2 draws nothing)."""
        devices = [self.device] if self.accel is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.accel is not None:
                torch.cuda.set_rng_state(self.accel, self.device)
            yield


@dataclass
class Replay:
    """One chunk of pass 2: the cached embedding gradients of its rows, its RNG state, loss-param grads."""

    image_grad: Tensor  # (c, D)
    text_grad: Tensor  # (c, D)
    rng: _RngState
    loss_grads: dict[str, Tensor]  # parameter name in model.loss -> cached gradient (last chunk only)


@dataclass
class _Pending:
    """Pass 1's results, kept from :meth:`GradCache.forward` until :meth:`GradCache.backward`."""

    chunks: list[dict[str, Any]]
    rngs: list[_RngState]
    image: Tensor  # (B, D) leaf, requires grad
    text: Tensor  # (B, D) leaf, requires grad
    loss: Tensor  # the full-batch loss, its graph reaching image, text and the loss parameters


def split_batch(batch: dict[str, Any], chunk_size: int) -> list[dict[str, Any]]:
    """The batch as consecutive chunks of at most ``chunk_size`` rows (every tensor split along dim 0)."""
    n = len(next(v for v in batch.values() if isinstance(v, Tensor)))
    return [
        {k: v[s : s + chunk_size] if isinstance(v, Tensor) else v for k, v in batch.items()}
        for s in range(0, n, chunk_size)
    ]


class GradCache:
    """The two passes of one gradient-cached step; the loop calls ``forward`` then (if finite) ``backward``.

    Args:
        chunk_size: Rows embedded at once (``train.grad_cache.chunk_size``).
        accelerator: Autocast for pass 1, ``no_sync`` and ``backward`` for pass 2.
    """

    def __init__(self, chunk_size: int, accelerator: Accelerator) -> None:
        if chunk_size <= 0:
            raise ValueError(f"GradCache: chunk_size must be > 0, got {chunk_size}")
        self.chunk_size, self.accelerator = chunk_size, accelerator
        self._pending: _Pending | None = None

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Pass 1: the batch's loss terms, as ``model(batch)`` returns them, with tower activations freed.

        Args:
            model: The prepared task model (its unwrapped module has ``embed`` and ``loss``).
            batch: This process's batch, on the device.

        Returns:
            The loss's named terms (total under ``"loss"``), computed on the whole batch.
        """
        inner: _Embedder = self.accelerator.unwrap_model(model)
        chunks = split_batch(batch, self.chunk_size)
        rngs, images, texts = [], [], []
        with torch.no_grad(), self.accelerator.autocast():
            for chunk in chunks:
                rngs.append(_RngState.capture(self.accelerator.device))
                image, text = inner.embed(chunk)
                images.append(image)
                texts.append(text)
        image_all = torch.cat(images).requires_grad_()
        text_all = torch.cat(texts).requires_grad_()
        with self.accelerator.autocast():
            terms: dict[str, Tensor] = inner.loss(image_all, text_all)
        self._pending = _Pending(chunks, rngs, image_all, text_all, terms["loss"])
        return terms

    def backward(self, model: nn.Module) -> None:
        """d loss / d embeddings from pass 1's graph, then pass 2: each chunk re-embedded and backpropagated.

        Every process must call it (the gathered loss's backward all-reduces), as with a plain backward.
        """
        pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError("GradCache.backward called without a forward pass before it")
        inner: _Embedder = self.accelerator.unwrap_model(model)
        named = [(n, p) for n, p in inner.loss.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(
            pending.loss, [pending.image, pending.text, *(p for _, p in named)], allow_unused=True
        )
        image_grad, text_grad = grads[0], grads[1]
        loss_grads = {n: g for (n, _), g in zip(named, grads[2:], strict=True) if g is not None}
        start = 0
        for i, (chunk, rng) in enumerate(zip(pending.chunks, pending.rngs, strict=True)):
            last = i == len(pending.chunks) - 1
            rows = slice(start, start + len(next(v for v in chunk.values() if isinstance(v, Tensor))))
            start = rows.stop
            replay = Replay(image_grad[rows], text_grad[rows], rng, loss_grads if last else {})
            # DDP all-reduces gradients once, in the last chunk's backward, over the accumulated sum
            sync = contextlib.nullcontext() if last else self.accelerator.no_sync(model)
            with sync:
                outputs = model({**chunk, REPLAY_KEY: replay})
                self.accelerator.backward(outputs["loss"])


def replay_objective(model: _Embedder, batch: dict[str, Any]) -> Tensor:
    """Pass 2 for one chunk: a scalar whose gradient is the cached one, ``sum(embedding * cached_grad)``.

    The task model's ``forward`` returns ``{"loss": replay_objective(self, batch)}`` when the batch holds
    :data:`REPLAY_KEY`. The chunk is embedded from its saved RNG state (same dropout masks as pass 1); the
    loss parameters enter as ``sum(param * cached_grad)`` so they get exactly pass 1's gradient.

    Args:
        model: The unwrapped task model.
        batch: One chunk's inputs plus its :class:`Replay` under :data:`REPLAY_KEY`.

    Returns:
        A 0-d float32 tensor (its value means nothing; its gradient is the point).
    """
    replay: Replay = batch[REPLAY_KEY]
    inputs = {k: v for k, v in batch.items() if k != REPLAY_KEY}
    with replay.rng.replayed():
        image, text = model.embed(inputs)
    total = (image.float() * replay.image_grad.float()).sum() + (
        text.float() * replay.text_grad.float()
    ).sum()
    for name, param in model.loss.named_parameters():
        if name in replay.loss_grads:
            total = total + (param.float() * replay.loss_grads[name].float()).sum()
    return total
