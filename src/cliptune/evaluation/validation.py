"""Validation values the loop logs each epoch: losses and retrieval metrics, namespaced ``val/...``.

These are means over the validation split; ``cliptune eval`` adds intervals and per-query files.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from cliptune.ranking.metrics import retrieval_metrics

__all__ = ["retrieval_validation", "pair_relevance"]


def pair_relevance(query_keys: Sequence[str], item_keys: Sequence[str]) -> Tensor:
    """Boolean (Q, N) relevance: query q is relevant to item n when their keys (group or file) match."""
    ids = {k: i for i, k in enumerate(sorted(set(query_keys) | set(item_keys)))}
    q = torch.tensor([ids[k] for k in query_keys])
    n = torch.tensor([ids[k] for k in item_keys])
    return q[:, None] == n[None, :]


@contextmanager
def _no_gather(loss_fn: nn.Module) -> Iterator[None]:
    # Every process holds the whole gathered validation set: gathering again would duplicate negatives.
    previous = getattr(loss_fn, "gather", None)
    if previous is not None:
        loss_fn.gather = False
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
    unique = list(first_row.values())
    keys = list(groups) if relevant == "group" else list(files)
    img = nn.functional.normalize(image[unique], dim=-1)  # (M, D) one row per image file
    txt = nn.functional.normalize(text, dim=-1)  # (N, D)
    img_keys = [keys[i] for i in unique]
    scores = txt @ img.T  # (N, M)
    for prefix, s, rel in (
        ("t2i", scores, pair_relevance(keys, img_keys)),
        ("i2t", scores.T, pair_relevance(img_keys, keys)),
    ):
        for key, values in retrieval_metrics(s, rel, ks=ks, prefix=prefix).items():
            out[f"val/{key}"] = float(values.float().mean())
    return out
