"""Is a split big enough for its ranking metrics to tell models apart? One judgement, used everywhere.

A query's relevant items are those of its group (``eval.relevant: group``) or its own image (``item``).
When a split has few such *relevance classes*, or most of its items are relevant to most queries, a random
ranking already scores near the top and every model looks alike: an 80-image catalogue of 10 products
split 0.8/0.1/0.1 gave val and test one product each, so every image was relevant to every query and
``val/t2i/mrr`` was 1 from the untrained model on. The rules are derived from counts, not tuned on runs:

- **Fewer than** :data:`MIN_GROUPS` **classes.** With ``g`` equally sized classes a random ranking puts a
  relevant item first with probability ``1/g`` and has expected MRR about ``ln(g) / (g - 1)`` (many items
  per class): 1 at g = 1, 0.69 at 2, 0.55 at 3, 0.46 at 4, 0.40 at 5. Below five classes chance alone
  scores above 0.4, so differences between models are squeezed into what little room is left.
- **Most queries have most items relevant**: more than half of the queries find more than half of the
  gallery relevant (one dominant group does this even when there are many small ones).

:func:`judge_split` returns a :class:`SplitHealth` whose ``warning`` is a sentence for a person (or None);
:func:`suggest_split` proposes a split that would work from the catalogue's group count. ``train`` prints
them, ``summary.json`` keeps them (``info.split_health``), ``eval`` prints them under its table and the
report lists them as the ``split_health`` finding.

Example:
    >>> judge_split("val", [["a.png", "b.png"]] * 4, gallery=2).warning
    'val has 1 group: every item is relevant to every query; these metrics cannot tell models apart'
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd

from cliptune.data.splits import TRAIN, group_ids
from cliptune.errors import CliptuneError

__all__ = [
    "MIN_GROUPS",
    "SplitError",
    "SplitHealth",
    "check_trainable",
    "judge_eval",
    "judge_rows",
    "judge_split",
    "suggest_split",
]

MIN_GROUPS = 5
"""Fewest relevance classes (groups, or images with ``relevant: item``) a held-out split should have:
with 5 equal classes a random ranking's expected MRR is about 0.40; with fewer, above 0.46."""
MOST = 0.5
""""Most": more than this share (of queries, and of the gallery relevant to each of them)."""


@dataclass(frozen=True)
class SplitHealth:
    """How well a split's ranking metrics can separate models.

    Attributes:
        split: Split name.
        classes: Distinct relevant sets among the queries: groups (``relevant: group``) or images (``item``).
        queries: Number of queries (captions ranking images).
        gallery: Number of ranked items (images).
        mostly_relevant: Share of queries to which more than half of the gallery is relevant.
        chance_mrr: Expected MRR of a random ranking with ``classes`` equal classes (``ln g / (g - 1)``).
        warning: A sentence for a person when the split cannot tell models apart, else None.
    """

    split: str
    classes: int
    queries: int
    gallery: int
    mostly_relevant: float
    chance_mrr: float
    warning: str | None

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON types, for ``summary.json``."""
        return asdict(self)


def judge_split(
    split: str, relevant: Sequence[Collection[str]], gallery: int, unit: str = "group"
) -> SplitHealth:
    """Judge one split from each query's relevant items.

    Args:
        split: Split name (quoted in the warning).
        relevant: Per query, the ids of its relevant items (``per_query.t2i.relevant`` of an eval JSON).
        gallery: Number of items ranked (images in the split).
        unit: What a relevance class is, for the sentence: ``group`` or ``image``.

    Returns:
        The :class:`SplitHealth`; ``warning`` names the count and why it matters.

    Example:
        >>> judge_split("test", [["a"], ["b"], ["c"]], gallery=3).classes
        3
    """
    classes = len({frozenset(r) for r in relevant})
    n = len(relevant)
    mostly = sum(len(r) > MOST * gallery for r in relevant) / n if n else 0.0
    chance = 1.0 if classes <= 1 else math.log(classes) / (classes - 1)
    warning = None
    plural = unit if classes == 1 else f"{unit}s"
    if n == 0 or gallery == 0:
        warning = f"{split} is empty: it has no queries to rank"
    elif classes <= 1:
        warning = (
            f"{split} has 1 {unit}: every item is relevant to every query; these metrics cannot tell "
            "models apart"
        )
    elif classes < MIN_GROUPS:
        warning = (
            f"{split} has {classes} {plural} (fewer than {MIN_GROUPS}): a random ranking already scores "
            f"MRR about {chance:.2f}; these metrics can hardly tell models apart"
        )
    elif mostly > MOST:
        warning = (
            f"{split}: {mostly:.0%} of queries find most items relevant (one {unit} dominates); these "
            "metrics can hardly tell models apart"
        )
    return SplitHealth(split, classes, n, gallery, mostly, chance, warning)


def judge_rows(
    rows: pd.DataFrame, split: str, relevant: str = "group", group_column: str = "group"
) -> SplitHealth:
    """:func:`judge_split` of one split of prepared rows (a ``split`` column), as training sees it.

    Each row is a caption query; its relevant images are its group's (``relevant="group"``) or its own.
    """
    mine = rows[rows["split"] == split]
    files = mine["file_name"].astype(str).tolist()
    gids = group_ids(mine, group_column).astype(str).tolist()
    by_group: dict[str, set[str]] = {}
    for g, f in zip(gids, files, strict=True):
        by_group.setdefault(g, set()).add(f)
    sets = [by_group[g] for g in gids] if relevant == "group" else [{f} for f in files]
    return judge_split(split, sets, len(set(files)), "group" if relevant == "group" else "image")


def judge_eval(result: Mapping[str, Any]) -> SplitHealth | None:
    """:func:`judge_split` of an ``eval/<split>.json`` object (its t2i queries' relevant images).

    Returns None when the object has no per-query t2i relevant lists (an older or foreign file).
    """
    t2i = result.get("per_query", {}).get("t2i", {})
    relevant = t2i.get("relevant")
    if not relevant or not all(relevant):  # no record of what was relevant: nothing to judge from
        return None
    unit = "group" if result.get("relevant", "group") == "group" else "image"
    gallery = int(result.get("n_images") or len({i for r in relevant for i in r}))
    return judge_split(str(result.get("split", "?")), relevant, gallery, unit)


def suggest_split(n_groups: int, held_out: Sequence[str], n_images: int = 0, fixed: str | None = None) -> str:
    """A split that would give every held-out split :data:`MIN_GROUPS` groups, from the catalogue's size.

    Train keeps at least half of the groups, so ``h`` held-out splits need ``2 * MIN_GROUPS * h`` groups.

    Args:
        n_groups: Groups in the catalogue.
        held_out: Names of the held-out splits wanted (``["val", "test"]``).
        n_images: Images in the catalogue (for the ``relevant: item`` fallback).
        fixed: The split being judged, when the catalogue's ``split`` column fixes it (ratios cannot help).

    Returns:
        One sentence naming config values.

    Example:
        >>> suggest_split(30, ["val", "test"])
        'with 30 groups, data.split.ratios {train: 0.66, val: 0.17, test: 0.17} gives val and test 5 groups each'
    """
    h = max(1, len(held_out))
    if fixed is not None:
        return (
            f"{fixed} is fixed by the catalogue's split column: give it at least {MIN_GROUPS} groups, or set "
            "eval.relevant: item so that each of its images counts on its own"
        )
    if n_groups >= 2 * MIN_GROUPS * h:
        share = math.ceil(100 * MIN_GROUPS / n_groups) / 100
        parts = ", ".join(f"{name}: {share:g}" for name in held_out)
        train = round(1 - share * h, 2)
        names = " and ".join(held_out)
        each = " each" if h > 1 else ""
        return (
            f"with {n_groups} groups, data.split.ratios {{train: {train:g}, {parts}}} gives {names} "
            f"{MIN_GROUPS} groups{each}"
        )
    if n_groups >= 2 * MIN_GROUPS:
        share = math.ceil(100 * MIN_GROUPS / n_groups) / 100
        return (
            f"with {n_groups} groups only one held-out split of {MIN_GROUPS} groups fits: data.split.ratios "
            f"{{train: {1 - share:g}, test: {share:g}}} (no validation: train.early_stopping null, "
            "train.scheduler cosine), or keep the split and set eval.relevant: item so that each image counts "
            "on its own"
        )
    per_item = f" ({n_images} images)" if n_images else ""
    return (
        f"with {n_groups} groups no grouped split can hold out {MIN_GROUPS} groups; set eval.relevant: item "
        f"so that each image{per_item} counts on its own, or add groups"
    )


class SplitError(CliptuneError):
    """The split cannot train: an empty train split, or a val split asked for that got no group.

    Raised before any embedding, naming the config fields or catalogue rows that fix it.

    Attributes:
        split: The split at fault (``train`` or ``val``).
        counts: Groups per split as made.
    """

    def __init__(self, message: str, split: str, counts: dict[str, int]) -> None:
        super().__init__(message)
        self.split, self.counts = split, counts

    def __reduce__(self) -> tuple[type[SplitError], tuple[str, str, dict[str, int]]]:
        return type(self), (str(self), self.split, self.counts)


def check_trainable(
    splits: dict[str, list[str]], ratios: dict[str, float], source: str = "the catalogue"
) -> None:
    """Fail before any work when the split cannot train: no train groups, or an asked-for val left empty.

    Args:
        splits: Split name -> group ids (from :func:`cliptune.data.splits.make_splits`).
        ratios: ``data.split.ratios``: a ``val`` share asks for validation.
        source: The metadata file, for the message.

    Raises:
        SplitError: Naming the split, its group counts and the fix.
    """
    counts = {name: len(gids) for name, gids in sorted(splits.items())}
    listing = ", ".join(f"{name} {n}" for name, n in counts.items())
    if not splits.get(TRAIN):
        raise SplitError(
            f"the train split has no rows (groups per split: {listing}): every row of {source} names another "
            "split; give some rows split 'train', or leave their split empty so data.split.ratios assigns them",
            TRAIN,
            counts,
        )
    if "val" in ratios and not splits.get("val"):
        raise SplitError(
            f"data.split.ratios has a val share but val got no group (groups per split: {listing}): "
            f"{source} fixes every group and train has too few groups to carve val from; add groups, give "
            "some rows split 'val', or drop 'val' from data.split.ratios to train without validation "
            "(train.early_stopping null, train.scheduler cosine)",
            "val",
            counts,
        )
