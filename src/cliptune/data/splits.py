"""Grouped, seeded, reproducible train/val/test splits that cannot leak.

Splits are made of *groups* (a product, an original artwork and its derivatives): a group never lands in
two splits, so near-duplicates cannot leak from train into test. The result depends only on the sorted
group ids and numpy's PCG64 generator seeded with ``seed``: never on row order, Python's ``hash()`` or
dict order, so the same catalogue and seed give the same split on any machine.

Algorithm (see also ``docs/catalogues.md``):

1. Every row gets a group id: its ``group`` value as text, or its ``file_name`` when the column is absent
   or the cell is empty.
2. Groups with an explicit ``split`` value are fixed to it. The other ("free") groups are split by ratio.
3. Free groups are put in strata (one stratum, or the majority value of ``stratify`` in each group).
4. In each stratum (sorted), group ids are sorted, then shuffled with the seeded generator. Each split
   wants ``ratio * rows in stratum`` rows. Each group in turn goes to the split with the least room that
   still takes the whole group (best fit), or, when none has room, to the split furthest below its
   target (ties: split name order). No split then exceeds its target by a whole group, and best fit
   keeps the deviation small (40 heavy-tailed groups at 0.7/0.15/0.15: summed deviation from the
   targets 2% of rows, against 12% for plain "furthest below target" filling).
5. If a split with ratio > 0 got no group while another split has several, that split's smallest group
   moves over, so each such split gets at least one group whenever there are enough groups.
6. Carving: if a held-out split (ratio > 0, not ``train``) is still empty because every group was fixed
   (a catalogue whose rows say only ``train`` / ``test``), the ``train`` groups are split again, by steps
   3-5, between ``train`` and the empty splits in proportion to their ratios (0.8/0.1/0.1 with test
   fixed: val gets 0.1 / 0.9 of the train rows). :func:`carved_groups` says afterwards which groups moved.
7. Minimum groups (``min_groups`` > 0): each held-out split of the ratio split (steps 3-6) with fewer than
   ``m = min(min_groups, pool // (2 * h))`` groups takes ``train``'s smallest movable groups (ties:
   smallest id) until it has ``m``, while ``train`` keeps at least half of the pool; after that the
   smallest movable group of the held-out split with the most groups above ``m`` moves instead. ``pool``
   is the number of groups split by ratio and ``h`` the number of held-out splits, so ``m`` never needs
   more than half of them and ``train`` keeps at least half whenever it had half. A split with a handful
   of groups is what lets ranking metrics tell models apart (:mod:`cliptune.data.split_health`).

Example:
    >>> rows = pd.DataFrame({"file_name": [f"{i}.jpg" for i in range(10)], "group": list("aabbccddee")})
    >>> splits = make_splits(rows, {"train": 0.8, "test": 0.2}, seed=0)
    >>> splits
    {'test': ['c'], 'train': ['a', 'b', 'd', 'e']}
    >>> assign_rows(rows, splits).tolist()[3:7]
    ['train', 'test', 'test', 'train']
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from cliptune.rundir import write_text_atomic

__all__ = [
    "TRAIN",
    "SplitMethod",
    "assign_rows",
    "carved_groups",
    "group_ids",
    "hash_split",
    "load_splits",
    "make_splits",
    "save_splits",
]

SplitMethod = Literal["balanced", "hash"]

_EPS = 1e-6  # row counts are integers: absorbs float error in ratio * rows
TRAIN = "train"
"""The split the model trains on: held-out splits are carved from it and take its groups (steps 6-7)."""


def group_ids(rows: pd.DataFrame, group_column: str = "group") -> pd.Series:
    """The group id of every row: its group value as text, or its ``file_name`` when it has none.

    Args:
        rows: Catalogue rows with a ``file_name`` column and optionally ``group_column``.
        group_column: Column naming each row's group.

    Returns:
        A string Series aligned with ``rows``.
    """
    # Annotated: pandas-stubs types Series.rename/where as returning typing.Self, which is Any for
    # mypy's python_version 3.10 (the stubs import Self from typing, new in 3.11).
    names = rows["file_name"].map(_as_id)
    if group_column not in rows.columns:
        only_names: pd.Series = names.rename("group_id")
        return only_names
    groups = rows[group_column].map(_as_id)
    ids: pd.Series = groups.where(groups.notna(), names).rename("group_id")
    return ids


def make_splits(
    rows: pd.DataFrame,
    ratios: Mapping[str, float],
    seed: int,
    group_column: str = "group",
    stratify: str | None = None,
    split_column: str = "split",
    min_groups: int = 0,
    method: SplitMethod = "balanced",
) -> dict[str, list[str]]:
    """Split a catalogue's groups into named splits by ratio of rows.

    Args:
        rows: Catalogue rows (``file_name``, optionally ``group_column``, ``split_column``, ``stratify``).
        ratios: Split name -> share of rows, each >= 0, summing to 1 (within 1e-6), e.g.
            ``{"train": 0.7, "val": 0.15, "test": 0.15}``.
        seed: Seed of the PCG64 generator that shuffles the groups.
        group_column: Column naming each row's group (see :func:`group_ids`).
        stratify: Optional attribute column: groups are split within each value of it (a group's value is
            its most frequent one, ties to the smallest), so every split gets each value in proportion.
        split_column: Column of explicit split names; a group with a value there is fixed to that split
            (the name need not be in ``ratios``). The remaining groups are split by ``ratios``; a held-out
            split left empty because every group was fixed is carved from ``train`` (step 6).
        min_groups: Each held-out split of the ratio split gets at least this many groups while ``train``
            keeps half of them (step 7); 0 (the default here) keeps the ratios alone.
        method: ``"balanced"`` (steps 3-7 above) or ``"hash"``: each free group goes where
            :func:`hash_split` sends it, by its id and the seed alone, so a reader streaming shards can
            assign a row without a global pass and a group never moves when other rows come or go.
            Ratios then hold in expectation (on groups, not rows); ``stratify``, carving, the non-empty
            rule and ``min_groups`` need every group at once and do not apply.

    Returns:
        Split name -> sorted group ids, for every name in ``ratios`` (possibly empty) and every explicit
        split name. Each group id appears in exactly one split; use :func:`assign_rows` for row labels.

    Raises:
        ValueError: ratios that are negative, not finite or do not sum to 1, an absent ``stratify``
            column, or a group with several explicit splits (run ``cliptune data check`` first: it rejects those rows).
    """
    names = _check_ratios(ratios)
    if stratify and stratify not in rows:
        raise ValueError(
            f"stratify column '{stratify}' not found (columns: {', '.join(map(str, rows.columns))})"
        )
    # Plain arrays, not Series: nothing may depend on the caller's index or row order.
    table = pd.DataFrame({"gid": group_ids(rows, group_column).to_numpy(dtype=object)})
    table["explicit"] = (
        rows[split_column].map(_as_id).to_numpy(dtype=object) if split_column in rows else None
    )
    table["stratum"] = rows[stratify].map(_as_id).fillna("").to_numpy(dtype=object) if stratify else ""
    sizes = {str(gid): int(n) for gid, n in table["gid"].value_counts().items()}  # gids are str already

    splits: dict[str, list[str]] = {name: [] for name in names}
    fixed = table.dropna(subset=["explicit"]).drop_duplicates(["gid", "explicit"])
    conflicts = fixed[fixed.duplicated("gid", keep=False)]
    if len(conflicts):
        gid = min(conflicts["gid"])
        values = sorted(conflicts.loc[conflicts["gid"] == gid, "explicit"])
        raise ValueError(f"group '{gid}' has conflicting explicit splits: {', '.join(values)}")
    for gid, name in zip(fixed["gid"], fixed["explicit"], strict=True):
        splits.setdefault(name, []).append(gid)
    fixed_gids = set(fixed["gid"])

    if method == "hash":
        for gid in sorted(set(table["gid"]) - fixed_gids):
            splits[hash_split(gid, ratios, seed)].append(gid)
        return {name: sorted(gids) for name, gids in sorted(splits.items())}
    strata = _strata(table[~table["gid"].isin(fixed_gids)])
    rng = np.random.default_rng(seed)  # PCG64
    for stratum in sorted(strata):
        gids = sorted(strata[stratum])
        order = rng.permutation(len(gids))
        _greedy_fill([gids[i] for i in order], sizes, ratios, names, splits)
    _ensure_nonempty(splits, sizes, ratios, names, fixed_gids)
    free = set(table["gid"]) - fixed_gids
    train_before = set(splits.get(TRAIN, []))
    carved = _carve_from_train(table, splits, sizes, ratios, rng)
    pool = train_before if carved else free  # the groups split by ratio, that step 7 may move
    held_out = carved or [n for n in names if n != TRAIN and ratios[n] > 0]
    if min_groups > 0 and TRAIN in splits and held_out:
        _raise_to_minimum(splits, sizes, held_out, pool, min_groups)
    return {name: sorted(gids) for name, gids in sorted(splits.items())}


def hash_split(group_id: str, ratios: Mapping[str, float], seed: int) -> str:
    """The split of a group by a stable hash: the same id, ratios and seed give the same split anywhere.

    ``u = sha256("cliptune-split", seed, group id)`` read as a number in [0, 1) is compared with the
    cumulative ratios of the split names in sorted order (``test`` 0.1, ``train`` 0.8, ``val`` 0.1:
    ``u < 0.1`` is test, ``u < 0.9`` train, else val). SHA-256 rather than Python's ``hash()``, which is
    salted per process.

    Args:
        group_id: The group's id (:func:`group_ids`).
        ratios: Split name -> share, summing to 1.
        seed: Changes every group's ``u``: another seed is another split.

    Returns:
        The split name.

    Example:
        >>> hash_split("p0007", {"train": 0.8, "val": 0.1, "test": 0.1}, seed=0) in ("train", "val", "test")
        True
    """
    digest = hashlib.sha256(f"cliptune-split\0{seed}\0{group_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64  # 64 bits: uniform on [0, 1)
    cumulative = 0.0
    names = [n for n in sorted(ratios) if ratios[n] > 0]
    for name in names:
        cumulative += ratios[name]
        if u < cumulative:
            return name
    return names[-1]  # u within float error of 1


def carved_groups(
    rows: pd.DataFrame,
    splits: Mapping[str, list[str]],
    group_column: str = "group",
    split_column: str = "split",
) -> dict[str, list[str]]:
    """Groups whose rows name one split but that :func:`make_splits` put in another (step 6 carving).

    Derived from the rows and the splits alone, so ``eval`` and ``report`` can say where a run's val split
    came from without extra state in ``splits.json``.

    Args:
        rows: Catalogue rows with the explicit ``split_column`` (absent: nothing was carved).
        splits: Split name -> group ids.
        group_column: Column naming each row's group.
        split_column: Column of explicit split names.

    Returns:
        Split name -> sorted group ids carved into it (only splits that received any), e.g.
        ``{"val": ["p03", "p11"]}`` for a catalogue fixed to train/test.
    """
    if split_column not in rows:
        return {}
    named = [(g, _as_id(v)) for g, v in zip(group_ids(rows, group_column), rows[split_column], strict=True)]
    explicit = {g: v for g, v in named if v is not None}  # a group's rows agree (make_splits checks)
    out: dict[str, list[str]] = {}
    for name, gids in sorted(splits.items()):
        moved = sorted(g for g in gids if g in explicit and explicit[g] != name)
        if moved:
            out[name] = moved
    return out


def assign_rows(
    rows: pd.DataFrame, splits: Mapping[str, list[str]], group_column: str = "group"
) -> pd.Series:
    """Label every row with the split of its group.

    Args:
        rows: Catalogue rows (as given to :func:`make_splits`).
        splits: Split name -> group ids, from :func:`make_splits` or :func:`load_splits`.
        group_column: Column naming each row's group.

    Returns:
        A Series of split names aligned with ``rows``.

    Raises:
        ValueError: a row whose group is in no split (the splits were made from other rows), naming it.
    """
    split_of = {gid: name for name, gids in splits.items() for gid in gids}
    gids = group_ids(rows, group_column)
    labels = gids.map(split_of)
    if labels.isna().any():
        at = labels.index[labels.isna()][0]
        where = f"row {rows.at[at, 'row']!s}" if "row" in rows.columns else f"index {at}"
        raise ValueError(f"{where}: group '{gids[at]}' is in no split; were the splits made from these rows?")
    named: pd.Series = labels.rename("split")  # annotated: see group_ids
    return named


def save_splits(splits: Mapping[str, list[str]], path: Path) -> Path:
    """Write splits as JSON (``{"train": [group ids], ...}``), atomically; returns ``path``."""
    return write_text_atomic(
        Path(path), json.dumps({k: sorted(v) for k, v in sorted(splits.items())}, indent=1) + "\n"
    )


def load_splits(path: Path) -> dict[str, list[str]]:
    """Read splits written by :func:`save_splits`, checking that no group is in two splits.

    Raises:
        ValueError: not an object of string lists, or a group listed in two splits (both named).
    """
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not all(
        isinstance(v, list) and all(isinstance(g, str) for g in v) for v in data.values()
    ):
        raise ValueError(f"{path}: expected {{split name: [group id, ...]}}")
    seen: dict[str, str] = {}
    for name, gids in data.items():
        for gid in gids:
            if gid in seen:
                raise ValueError(f"{path}: group '{gid}' is in two splits ({seen[gid]}, {name})")
            seen[gid] = name
    return {str(k): list(v) for k, v in data.items()}


def _as_id(value: object) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    text = str(value)
    return text if text.strip() else None


def _check_ratios(ratios: Mapping[str, float]) -> list[str]:
    bad = {k: v for k, v in ratios.items() if not (math.isfinite(v) and v >= 0)}
    total = math.fsum(ratios.values()) if not bad else float("nan")
    if not ratios or bad or abs(total - 1.0) > 1e-6:
        raise ValueError(
            f"split ratios must be >= 0 and sum to 1 (within 1e-6), got {dict(ratios)} (sum {total:g})"
        )
    return sorted(ratios)


def _strata(free: pd.DataFrame) -> dict[str, list[str]]:
    # A group's stratum is its most frequent value; ties go to the smallest value.
    counts = free.groupby(["gid", "stratum"]).size().reset_index(name="n")
    counts = counts.sort_values(["n", "stratum"], ascending=[False, True], kind="stable").drop_duplicates(
        "gid"
    )
    return {str(k): list(v) for k, v in counts.groupby("stratum")["gid"]}


def _greedy_fill(
    gids: list[str],
    sizes: dict[str, int],
    ratios: Mapping[str, float],
    names: list[str],
    splits: dict[str, list[str]],
) -> None:
    total = sum(sizes[g] for g in gids)
    targets = [ratios[n] * total for n in names]
    filled = [0] * len(names)
    for gid in gids:
        size = sizes[gid]
        room = [t - f for t, f in zip(targets, filled, strict=True)]  # rows each split still wants
        fits = [k for k, r in enumerate(room) if r >= size - _EPS]
        # best fit: the fullest split that still takes the whole group; else the one furthest below target
        best = min(fits, key=room.__getitem__) if fits else max(range(len(names)), key=room.__getitem__)
        splits[names[best]].append(gid)
        filled[best] += size


def _carve_from_train(
    table: pd.DataFrame,
    splits: dict[str, list[str]],
    sizes: dict[str, int],
    ratios: Mapping[str, float],
    rng: np.random.Generator,
) -> list[str]:
    # Step 6: held-out splits still empty take their share of train's groups; returns their names.
    empty = sorted(n for n in ratios if n != TRAIN and ratios[n] > 0 and not splits.get(n))
    if not empty or TRAIN not in ratios or len(splits.get(TRAIN, [])) < 2:
        return []
    names = sorted([TRAIN, *empty])
    total = math.fsum(ratios[n] for n in names)
    shares = {n: ratios[n] / total for n in names}
    pool = splits[TRAIN]
    splits[TRAIN] = []
    strata = _strata(table[table["gid"].isin(set(pool))])
    for stratum in sorted(strata):
        gids = sorted(strata[stratum])
        order = rng.permutation(len(gids))
        _greedy_fill([gids[i] for i in order], sizes, shares, names, splits)
    _ensure_nonempty(splits, sizes, shares, names, set())
    return empty


def _raise_to_minimum(
    splits: dict[str, list[str]], sizes: dict[str, int], held_out: list[str], pool: set[str], min_groups: int
) -> None:
    # Step 7: each held-out split gets m groups from train's movable ones while train keeps half the pool,
    # then from the held-out split with the most groups above m (e.g. 8 groups at 0.5/0.125/0.375 with
    # m = 2: val takes one of test's three, not one of train's four). m <= pool // (2h), so the held-out
    # splits never need more than half of the pool and a donor always exists.
    m = min(min_groups, len(pool) // (2 * len(held_out)))
    for name in sorted(held_out):
        while len(splits[name]) < m:
            donor = _donor(splits, name, held_out, pool, m)
            if donor is None:
                return
            movable = [g for g in splits[donor] if g in pool]
            gid = min(movable, key=lambda g: (sizes[g], g))
            splits[donor].remove(gid)
            splits[name].append(gid)


def _donor(
    splits: dict[str, list[str]], name: str, held_out: list[str], pool: set[str], m: int
) -> str | None:
    """The split that gives ``name`` a group: train while it keeps half the pool, else the fullest surplus."""
    movable = {split: sum(g in pool for g in splits[split]) for split in [TRAIN, *sorted(held_out)]}
    if movable[TRAIN] and 2 * (movable[TRAIN] - 1) >= len(pool):
        return TRAIN
    surplus = [other for other in sorted(held_out) if other != name and movable[other] > m]
    if surplus:
        return max(surplus, key=movable.__getitem__)  # the first of equals in name order
    return TRAIN if movable[TRAIN] else None


def _ensure_nonempty(
    splits: dict[str, list[str]],
    sizes: dict[str, int],
    ratios: Mapping[str, float],
    names: list[str],
    fixed_gids: set[str],
) -> None:
    for name in names:
        if ratios[name] <= 0 or splits[name]:
            continue
        movable_in = {n: [g for g in splits[n] if g not in fixed_gids] for n in names}
        donors = [n for n in names if len(movable_in[n]) > 1]
        if not donors:
            return
        donor = max(donors, key=lambda n: (len(movable_in[n]), -names.index(n)))
        gid = min(movable_in[donor], key=lambda g: (sizes[g], g))
        splits[donor].remove(gid)
        splits[name].append(gid)
