"""Validation values the training loop logs each epoch: losses and retrieval metrics, namespaced ``val/...``.

Validation is the evaluator of ``cliptune eval`` with the intervals off: the same exact ranking of both
directions (:func:`cliptune.evaluation.retrieval.rank_directions`) reduced to means, plus the training
loss over batches of the validation pairs; ``cliptune eval`` adds intervals and per-query files.

Before anything is ranked the embeddings are checked (:func:`embedding_problems`): a diverged model's
embeddings can be finite yet rank nothing (every norm overflows, so every normalised vector is zero, and
the loss of all-equal logits, ln(batch), can even beat the untrained model's). Such validation raises
:class:`DegenerateEmbeddingsError` instead of returning values that would be logged and compared.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from cliptune.evaluation.errors import EvalError
from cliptune.evaluation.retrieval import DIRECTIONS, rank_directions

__all__ = [
    "MIN_SPREAD",
    "UNIT_NORM_TOLERANCE",
    "DegenerateEmbeddingsError",
    "batched_term_means",
    "embedding_problems",
    "general_validation",
    "retrieval_validation",
]

UNIT_NORM_TOLERANCE = 1e-3
"""How far from 1 a normalised embedding's norm may be. Ranking uses unit vectors; a norm below
``F.normalize``'s eps (1e-12) or one that overflows float32 (entries beyond ~1e19) normalises to a
shorter or a zero vector, whose scores are all 0. Rounding of a healthy unit vector is ~1e-7, so 1e-3
only fires when normalising failed."""

MIN_SPREAD = 1e-4
"""Smallest largest distance between normalised embeddings of distinct inputs (relative to the first row).
Two unit vectors at distance d differ in every score by at most d; with the logit scale at most 100
(``loss.temperature >= 0.01``, CLIP's clamp) their logits differ by at most 0.01, so the softmax over a
batch is uniform to 1% and the loss sits at ln(batch): the model ranks by rounding noise. A random
initialisation spreads unit vectors ~1 apart (orthogonal directions: sqrt(2))."""


class DegenerateEmbeddingsError(EvalError):
    """Validation embeddings that cannot be ranked: non-finite, not normalisable, or all identical.

    Attributes:
        problems: One sentence per tower and fault, with the counts and measured values.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


def embedding_problems(embeddings: Tensor, tower: str) -> list[str]:
    """What makes these embeddings unrankable, as sentences (empty when they are healthy).

    Args:
        embeddings: One embedding per distinct input (rows of identical inputs removed where known).
        tower: ``"image"`` or ``"text"``, named in the sentences.

    Returns:
        Non-finite entries, rows whose normalised norm is off 1 by more than :data:`UNIT_NORM_TOLERANCE`
        (zero or overflowing norms), or (two rows or more) all rows within :data:`MIN_SPREAD` of the first.

    Shapes:
        embeddings: (N, D)

    Example:
        >>> embedding_problems(torch.ones(3, 4), "text")
        ['text embeddings are identical: all 3 rows within 0 of the first (collapse threshold 0.0001)']
    """
    n = len(embeddings)
    finite = torch.isfinite(embeddings).all(dim=1)  # (N,)
    if not finite.all():
        row = int((~finite).nonzero()[0])
        return [f"{tower} embeddings are not finite in {int((~finite).sum())} of {n} rows (first: row {row})"]
    unit = nn.functional.normalize(embeddings.float(), dim=-1)  # (N, D)
    off = ~((unit.norm(dim=-1) - 1).abs() <= UNIT_NORM_TOLERANCE)  # (N,)
    if off.any():
        norms = embeddings.float().norm(dim=-1)[off]
        return [
            f"{tower} embeddings do not normalise to unit vectors in {int(off.sum())} of {n} rows "
            f"(their norms: {float(norms.min()):.3g} to {float(norms.max()):.3g}; zero or overflowing float32)"
        ]
    spread = float((unit - unit[:1]).norm(dim=-1).max()) if n > 1 else float("inf")
    if spread < MIN_SPREAD:
        return [
            f"{tower} embeddings are identical: all {n} rows within {spread:.3g} of the first "
            f"(collapse threshold {MIN_SPREAD:g})"
        ]
    return []


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

    Raises:
        DegenerateEmbeddingsError: The embeddings cannot be ranked (:func:`embedding_problems`).

    Shapes:
        image, text: (N, D)
    """
    first_row = _rankable_rows(image, text, files, "")

    sums: dict[str, float] = {}
    n_batches = 0
    with _no_gather(loss_fn):
        for start in range(0, len(image), batch_size):
            terms = loss_fn(image[start : start + batch_size], text[start : start + batch_size])
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            n_batches += 1
    out = {f"val/{k}": v / max(1, n_batches) for k, v in sums.items()}

    return out | _ranking_means(image, text, first_row, groups, files, ks, relevant, "val")


def general_validation(
    image: Tensor,
    text: Tensor,
    *,
    groups: Sequence[str],
    files: Sequence[str],
    ks: Sequence[int],
    relevant: str,
) -> dict[str, float]:
    """The forgetting guard's values: t2i / i2t ranking means over a general catalogue, as ``general/...``.

    The same ranking as :func:`retrieval_validation` (and ``cliptune eval``) on a catalogue the model is not
    fine-tuned on; no loss (the general catalogue is not a training objective). Rows are paired as there.

    Args:
        image: Image embeddings per row.
        text: Text embeddings per row.
        groups: Group id per row.
        files: Image file per row.
        ks: Cut-offs for the @k metrics.
        relevant: ``"group"`` or ``"item"``.

    Returns:
        ``general/t2i/...`` and ``general/i2t/...`` means.

    Raises:
        DegenerateEmbeddingsError: The embeddings cannot be ranked.

    Shapes:
        image, text: (N, D)
    """
    first_row = _rankable_rows(image, text, files, "general ")
    return _ranking_means(image, text, first_row, groups, files, ks, relevant, "general")


def _rankable_rows(image: Tensor, text: Tensor, files: Sequence[str], label: str) -> dict[str, int]:
    """Each image file's first row, after checking the distinct images and every text can be ranked.

    One row per image file: the captions of one image share its row. ``label`` prefixes the modality in
    the problems (``"general "`` for the forgetting guard's catalogue).
    """
    first_row: dict[str, int] = {}
    for i, f in enumerate(files):
        first_row.setdefault(f, i)
    problems = embedding_problems(image[list(first_row.values())], f"{label}image") + embedding_problems(
        text, f"{label}text"
    )
    if problems:
        raise DegenerateEmbeddingsError(problems)
    return first_row


def _ranking_means(
    image: Tensor,
    text: Tensor,
    first_row: dict[str, int],
    groups: Sequence[str],
    files: Sequence[str],
    ks: Sequence[int],
    relevant: str,
    prefix: str,
) -> dict[str, float]:
    img = nn.functional.normalize(image[list(first_row.values())], dim=-1)  # (M, D) one row per image file
    txt = nn.functional.normalize(text, dim=-1)  # (N, D)
    keys = list(groups) if relevant == "group" else list(files)
    ranked = rank_directions(txt, img, files=files, keys=keys, images=list(first_row), ks=ks)
    return {
        f"{prefix}/{name}/{key}": float(values.float().mean())
        for name in DIRECTIONS
        for key, values in ranked[name].values.items()
    }


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
