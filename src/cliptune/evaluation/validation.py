"""Validation values the training loop logs each epoch: losses and retrieval metrics, namespaced ``val/...``.

Validation is the evaluator of ``cliptune eval`` with the intervals off: the same exact ranking of both
directions (:func:`cliptune.evaluation.retrieval.rank_directions`) reduced to means, plus the training
loss over batches of the validation pairs; ``cliptune eval`` adds intervals and per-query files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from cliptune.evaluation.retrieval import DIRECTIONS, rank_directions

__all__ = ["batched_term_means", "retrieval_validation"]


@contextmanager
def _no_gather(loss_fn: nn.Module) -> Iterator[None]:
    # Every process holds the whole gathered validation set: gathering again would duplicate negatives.
    previous = getattr(loss_fn, "gather", None)
    if previous is not None:
        loss_fn.gather = False  # type: ignore[assignment]
    try:
        yield
    finally:
        if previous is not None:
            loss_fn.gather = previous


def retrieval_validation(
    image: Tensor,
    text: Tensor,
    *,
    groups: Sequence[str],
    files: Sequence[str],
    ks: Sequence[int],
    relevant: str,
    loss_fn: nn.Module,
    batch_size: int,
) -> dict[str, float]:
    """Loss and t2i / i2t ranking metrics of paired validation embeddings.

    Row i of ``image`` and ``text`` is the pair (image file ``files[i]``, its caption). Images that appear
    in several rows (several captions) are ranked once. A text's relevant images, and an image's relevant
    texts, are those of the same group (``relevant="group"``) or the same file (``"item"``).

    Args:
        image: Image embeddings per row.
        text: Text embeddings per row.
        groups: Group id per row.
        files: Image file per row.
        ks: Cut-offs for the @k metrics.
        relevant: ``"group"`` or ``"item"``.
        loss_fn: The training loss module, called on batches of pairs in row order.
        batch_size: Pairs per loss batch (the global training batch, so the loss is comparable).

    Returns:
        ``val/loss`` (and the loss's other terms), ``val/t2i/...`` and ``val/i2t/...`` means.

    Shapes:
        image, text: (N, D)
    """
    sums: dict[str, float] = {}
    n_batches = 0
    with _no_gather(loss_fn):
        for start in range(0, len(image), batch_size):
            terms = loss_fn(image[start : start + batch_size], text[start : start + batch_size])
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            n_batches += 1
    out = {f"val/{k}": v / max(1, n_batches) for k, v in sums.items()}

    first_row: dict[str, int] = {}
    for i, f in enumerate(files):
        first_row.setdefault(f, i)
    img = nn.functional.normalize(image[list(first_row.values())], dim=-1)  # (M, D) one row per image file
    txt = nn.functional.normalize(text, dim=-1)  # (N, D)
    keys = list(groups) if relevant == "group" else list(files)
    ranked = rank_directions(txt, img, files=files, keys=keys, images=list(first_row), ks=ks)
    for name in DIRECTIONS:
        for key, values in ranked[name].values.items():
            out[f"val/{name}/{key}"] = float(values.float().mean())
    return out


def batched_term_means(
    forward: Callable[[dict[str, Tensor]], dict[str, Tensor]],
    inputs: dict[str, Tensor],
    batch_size: int,
    device: torch.device,
) -> dict[str, float]:
    """Means over all items of a model's named terms, computed batch by batch, as ``val/<term>``.

    Each batch's terms are batch means; weighting them by batch size makes the result the mean over
    items whatever the last batch's size.

    Args:
        forward: The model's forward, returning 0-d terms for a batch.
        inputs: Stacked validation inputs, one row per item.
        batch_size: Items per batch.
        device: Where batches run.

    Returns:
        ``{"val/<term>": mean over items}``.

    Shapes:
        inputs: each (T, ...)
    """
    sums: dict[str, float] = {}
    n = len(next(iter(inputs.values())))
    for start in range(0, n, batch_size):
        batch = {k: v[start : start + batch_size].to(device) for k, v in inputs.items()}
        size = len(next(iter(batch.values())))
        for key, value in forward(batch).items():
            sums[key] = sums.get(key, 0.0) + float(value) * size
    return {f"val/{k}": v / n for k, v in sums.items()}
