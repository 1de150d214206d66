"""Row-index triplets (anchor, positive, negative) per split, shared by Siamese training and evaluation.

Triplets come from the catalogue's ``triplets.csv`` when it has one, else from groups (the first item
of a group is the anchor, every other item a positive). Triplets never cross splits: a negative from
another split is replaced by a seeded draw from this split, and the count is reported. Training and
``cliptune eval`` call the same function with the same seed, so eval scores the training triplets.
"""

from __future__ import annotations

import numpy as np

from cliptune.data.prepare import PreparedData
from cliptune.data.splits import group_ids

__all__ = ["ROLES", "make_triplets"]

ROLES = ("anchor", "positive", "negative")


def make_triplets(
    data: PreparedData, group_column: str, seed: int
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Row-index triplets per split, shape (T, 3) each, and how many negatives were redrawn.

    Args:
        data: Checked rows with their split.
        group_column: The group column (originals and their derivatives share a group).
        seed: Seed of negative draws.

    Returns:
        ``({split: (T, 3) int array of row indices}, {split: negatives redrawn})``.
    """
    rows = data.rows
    rng = np.random.default_rng(seed)
    split = rows["split"].to_numpy()
    gids = group_ids(rows, group_column).to_numpy()
    index_of = {f: i for i, f in enumerate(rows["file_name"])}
    explicit = data.check.good_triplets
    if explicit is not None and len(explicit):
        raw = np.array([[index_of[f] for f in explicit[role]] for role in ROLES]).T  # (T, 3)
    else:
        first: dict[str, int] = {}
        for i, g in enumerate(gids):
            first.setdefault(g, i)
        raw = np.array([[first[g], i, -1] for i, g in enumerate(gids) if first[g] != i]).reshape(-1, 3)
    out, redrawn = {}, {}
    for name in sorted(data.splits):
        members = np.flatnonzero(split == name)
        keep = raw[(split[raw[:, 0]] == name) & (split[raw[:, 1]] == name)]
        keep = keep.copy()
        bad = (keep[:, 2] < 0) | (split[np.maximum(keep[:, 2], 0)] != name)
        for t in np.flatnonzero(bad):
            others = members[gids[members] != gids[keep[t, 0]]]
            keep[t, 2] = rng.choice(others) if len(others) else -1
        out[name] = keep[keep[:, 2] >= 0]
        redrawn[name] = int(bad.sum()) if explicit is not None and len(explicit) else 0
    return out, redrawn
