"""Hard-negative mining: for each training caption, the images the model ranks high that are NOT its match.

A hard negative is an image the current model scores close to a caption although it does not show the
caption's item; training against it teaches what the in-batch random negatives rarely do. The selection
is sentence-transformers' ``mine_hard_negatives`` with ``sampling_strategy="top"``, the false negatives
below in the role of its positives: rank every image for the caption; the candidates are the first
``range_max`` images that are not excluded; drop those too close to the positive's score (``margin``:
``score <= positive - margin``; ``relative_margin``: ``score <= positive - |positive| * relative_margin``);
skip the ``range_min`` best of the rest and keep the next ``per_caption``.

Mined "negatives" that are really positives poison training, so two kinds of candidates are never kept
(false negatives): images of the caption's own group (the same product photographed again) and images
whose value matches the caption's own image on every filter attribute that image has (``Catalogue.attributes``:
an identical garment in another group, same colour, same pattern...). An image with no attribute values
is excluded by its group alone.

This module sits in ``train`` (not ``evaluation``): it ranks with a loaded model and writes training data
that the retrieval task reads back; ``train`` is the lowest layer that may import the model loading
(``models``), the exact top-k (``ranking``) and the catalogue preparation of a bare model (``evaluation``),
and the only one the training task and the CLI both reach.

Example:
    >>> t, x = torch.eye(2), torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    >>> mined = select_hard_negatives(t, x, [0, 2], ["a", "b", "c"], np.full((3, 0), -1), MiningWindow(1))
    >>> mined.negatives, mined.ranks  # caption 0 ranks 0, 1, 2; caption 1 ranks 2, 1, 0: image 1 second
    ([[1], [1]], [[2], [2]])
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from cliptune.data.prepare import PreparedData
from cliptune.data.splits import group_ids
from cliptune.errors import CliptuneError
from cliptune.models.cache import Precision
from cliptune.models.embed import Workers, catalogue_paths, embed_images_with, embed_texts_with
from cliptune.models.factory import LoadedModel
from cliptune.ranking.topk import Ranked, rank_chunked
from cliptune.rundir import write_bytes_atomic, write_text_atomic

__all__ = [
    "MINED_COLUMNS",
    "Mined",
    "MiningError",
    "MiningWindow",
    "attribute_codes",
    "mine_hard_negatives",
    "mining_data",
    "negatives_of_rows",
    "read_mined",
    "select_hard_negatives",
    "write_mined",
]

MINED_COLUMNS = (
    "row",
    "file_name",
    "caption",
    "positive_score",
    "positive_rank",
    "negatives",
    "scores",
    "ranks",
)
"""Columns of a mined file: the caption's catalogue ``row``, its own image (``file_name``) and text, the
positive's score and rank, and per negative (best first) its ``file_name``, score and 1-based rank."""

_QUERY_CHUNK = 1024  # captions ranked at a time: bounds the (captions x window) lists held
_EXCLUSION_PAD = 16  # room for a caption's excluded images (its group's photos) beyond range_max


class MiningError(CliptuneError, ValueError):
    """Mining cannot run or its file cannot be used: the message names the setting, file, row or value."""


@dataclass(frozen=True)
class MiningWindow:
    """Which ranked candidates count as hard negatives (sentence-transformers' ``mine_hard_negatives``).

    Attributes:
        per_caption: Negatives kept per caption, the highest-ranked that pass.
        range_min: Skip the ``range_min`` best candidates that pass the margin (the likeliest unlabelled
            positives).
        range_max: Candidates are the ``range_max`` best-ranked images that are not excluded; None: all.
        margin: Keep a candidate only if ``score <= positive_score - margin`` (absolute margin).
        relative_margin: Keep it only if ``score <= positive_score - |positive_score| * relative_margin``; at
            most one of the two margins.
    """

    per_caption: int = 3
    range_min: int = 0
    range_max: int | None = None
    margin: float | None = None
    relative_margin: float | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.per_caption < 1:
            problems.append(f"per_caption must be >= 1, got {self.per_caption}")
        if self.range_min < 0:
            problems.append(f"range_min must be >= 0, got {self.range_min}")
        if self.range_max is not None and self.range_max <= self.range_min:
            problems.append(f"range_max ({self.range_max}) must exceed range_min ({self.range_min})")
        if self.margin is not None and self.relative_margin is not None:
            problems.append("give margin or relative_margin, not both")
        if self.relative_margin is not None and not 0.0 <= self.relative_margin < 1.0:
            problems.append(f"relative_margin must be in [0, 1), got {self.relative_margin}")
        if problems:
            raise MiningError("mining window: " + "; ".join(problems))

    def max_score(self, positive: Tensor) -> Tensor:
        """The highest score a negative may have, per caption (+inf without a margin)."""
        if self.margin is not None:
            return positive - self.margin
        if self.relative_margin is not None:  # |positive|: a negative positive score lowers the bar too
            return positive - positive.abs() * self.relative_margin
        return torch.full_like(positive, float("inf"))


@dataclass(frozen=True)
class Mined:
    """Result of :func:`select_hard_negatives`, one list per caption, best-ranked first.

    Attributes:
        negatives: Indices of the kept images.
        scores: Their scores.
        ranks: Their 1-based ranks in the caption's full ranking.
        positive_scores: Score of each caption's own image.
        positive_ranks: Its 1-based rank.
    """

    negatives: list[list[int]]
    scores: list[list[float]]
    ranks: list[list[int]]
    positive_scores: list[float]
    positive_ranks: list[int]


def attribute_codes(table: pd.DataFrame, attributes: Sequence[str]) -> np.ndarray:
    """Each row's attribute values as integer codes per column (equal values, equal codes; -1: missing).

    Shapes:
        table (N rows), attributes (A,) -> (N, A) int64
    """
    codes = [pd.factorize(table[a].map(_as_key), use_na_sentinel=True)[0] for a in attributes]
    return np.stack(codes, axis=1).astype(np.int64) if codes else np.full((len(table), 0), -1, np.int64)


def _as_key(value: Any) -> Any:
    """A cell as a comparable key: missing stays missing (factorize's -1), every value its text."""
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def _false_negatives(cand: Tensor, pos: Tensor, groups: Tensor, codes: Tensor) -> Tensor:
    """(q, k) True where candidate image ``cand`` is the positive's group or its attribute twin."""
    same_group = groups[cand] == groups[pos][:, None]  # (q, k)
    pos_codes = codes[pos][:, None, :]  # (q, 1, A)
    known = pos_codes >= 0  # the positive's attributes with a value
    twin = ((codes[cand] == pos_codes) | ~known).all(-1) & known.any(-1)  # (q, k)
    return same_group | twin


def _ranked_beyond_exclusions(
    queries: Tensor,
    images: Tensor,
    pos: Tensor,
    groups: Tensor,
    codes: Tensor,
    range_max: int | None,
    progress: bool,
) -> tuple[Ranked, Tensor]:
    """Top-k lists long enough to hold ``range_max`` non-excluded images per query (all without a window).

    How many images a caption excludes (its group, its attribute twins) is only known once ranked, so the
    list grows (doubling) until every query has ``range_max`` eligible candidates or holds every image.
    """
    n = images.shape[0]
    k = n if range_max is None else min(n, range_max + _EXCLUSION_PAD)
    while True:
        ranked = rank_chunked(queries, images, k, pos[:, None], progress=progress)
        excluded = _false_negatives(ranked.indices, pos, groups, codes)  # (q, k)
        if k == n or range_max is None or bool(((~excluded).sum(1) >= range_max).all()):
            return ranked, excluded
        k = min(n, 2 * k)


@torch.no_grad()
def select_hard_negatives(
    text_emb: Tensor,
    image_emb: Tensor,
    positives: Sequence[int],
    image_groups: Sequence[str],
    image_attributes: np.ndarray,
    window: MiningWindow,
    *,
    progress: bool = False,
) -> Mined:
    """Rank every image for every caption and keep the hard negatives the window allows.

    Ranking is the exact top-k of :mod:`cliptune.ranking.topk` (inner product, ties by lower image index).
    In rank order: the images that are no false negative (not the positive's group, not its attribute
    twin: see the module docstring), the first ``range_max`` of them, those scoring at most
    ``window.max_score(positive_score)``, minus the first ``range_min`` of those; the next ``per_caption``
    are returned with their ranks in the caption's full ranking.

    Args:
        text_emb: Caption embeddings (normalised for cosine scores).
        image_emb: Candidate image embeddings, same dtype and D.
        positives: Per caption, the index of its own image in ``image_emb``.
        image_groups: Group id of each image.
        image_attributes: :func:`attribute_codes` of each image (-1: no value).
        window: Rank window, margin and count.
        progress: Progress bar while ranking.

    Returns:
        The :class:`Mined` lists.

    Shapes:
        text_emb (Q, D), image_emb (N, D), positives (Q,), image_groups (N,), image_attributes (N, A)
    """
    n_images = image_emb.shape[0]
    if (
        len(positives) != text_emb.shape[0]
        or len(image_groups) != n_images
        or len(image_attributes) != n_images
    ):
        raise MiningError(
            f"select_hard_negatives: {text_emb.shape[0]} captions with {len(positives)} positives, "
            f"{n_images} images with {len(image_groups)} groups and {len(image_attributes)} attribute rows"
        )
    pos = torch.as_tensor(list(positives), dtype=torch.long)
    groups = torch.as_tensor(pd.factorize(pd.Series(list(image_groups), dtype=str))[0], dtype=torch.long)
    codes = torch.as_tensor(image_attributes, dtype=torch.long)
    out = Mined([], [], [], [], [])
    for q0 in range(0, len(pos), _QUERY_CHUNK):
        p, queries = pos[q0 : q0 + _QUERY_CHUNK], text_emb[q0 : q0 + _QUERY_CHUNK]  # (q,), (q, D)
        ranked, excluded = _ranked_beyond_exclusions(
            queries, image_emb, p, groups, codes, window.range_max, progress
        )
        positive = (queries * image_emb[p]).sum(-1)  # (q,)
        eligible = ~excluded  # (q, k), in rank order
        if window.range_max is not None:  # the window: the first range_max eligible candidates only
            eligible &= eligible.cumsum(1) <= window.range_max
        eligible &= ranked.scores <= window.max_score(positive)[:, None]  # the margin
        eligible &= eligible.cumsum(1) > window.range_min  # skip the best range_min that pass
        for i in range(len(p)):
            cols = eligible[i].nonzero()[:, 0][: window.per_caption]
            out.negatives.append(ranked.indices[i, cols].tolist())
            out.scores.append(ranked.scores[i, cols].float().tolist())
            out.ranks.append((cols + 1).tolist())
        out.positive_scores.extend(positive.float().tolist())
        out.positive_ranks.extend(ranked.ranks[:, 0].tolist())
    return out


def mine_hard_negatives(
    model: LoadedModel,
    data: PreparedData,
    split: str,
    window: MiningWindow,
    *,
    group_column: str = "group",
    cache_dir: Path | None = None,
    precision: Precision = "auto",
    num_workers: Workers = "auto",
    progress: bool = True,
) -> pd.DataFrame:
    """Mine hard negatives for every caption of one split among that split's images.

    Candidates are the split's own images only, so negatives mined on ``train`` never leak held-out
    images into training. Each image's group and attributes are those of its first row.

    Args:
        model: From :func:`cliptune.models.factory.load_model` (a run's best model or a bare model).
        data: Prepared catalogue rows with their ``split``.
        split: The split whose captions and images are mined (``train`` for training).
        window: Rank window, margin and count.
        group_column: Column of groups (same-group images are never negatives).
        cache_dir: Feature cache folder.
        precision: Tower precision.
        num_workers: Image-decoding workers (``data.num_workers``; see
            :func:`cliptune.models.embed.decode_workers`).
        progress: Progress bars (embedding, ranking).

    Returns:
        One row per caption of the split, columns :data:`MINED_COLUMNS`.

    Raises:
        MiningError: Unknown split (the known ones named) or a split without images to rank.
    """
    if split not in data.splits:
        raise MiningError(f"no split {split!r} to mine; the data has {', '.join(sorted(data.splits))}")
    rows = data.split_rows(split)
    files = list(dict.fromkeys(rows["file_name"].astype(str)))
    if len(files) < 2:
        raise MiningError(f"split {split!r} has {len(files)} image(s): nothing to mine negatives from")
    firsts = rows.assign(_g=group_ids(rows, group_column).to_numpy()).drop_duplicates("file_name")
    captions = rows[data.catalogue.text_column].astype(str).tolist()
    images = embed_images_with(
        model,
        catalogue_paths(data.catalogue, files),
        cache_dir=cache_dir,
        precision=precision,
        num_workers=num_workers,
        progress=progress,
    )
    texts = embed_texts_with(model, captions, cache_dir=cache_dir, precision=precision, progress=progress)
    index = {f: i for i, f in enumerate(files)}
    mined = select_hard_negatives(
        texts,
        images,
        [index[f] for f in rows["file_name"].astype(str)],
        firsts["_g"].astype(str).tolist(),
        attribute_codes(firsts, data.catalogue.attributes),
        window,
        progress=progress,
    )
    table: pd.DataFrame = pd.DataFrame(
        {
            "row": rows["row"].astype(int).to_numpy(),
            "file_name": rows["file_name"].astype(str).to_numpy(),
            "caption": captions,
            "positive_score": mined.positive_scores,
            "positive_rank": mined.positive_ranks,
            "negatives": [[files[j] for j in negs] for negs in mined.negatives],
            "scores": mined.scores,
            "ranks": mined.ranks,
        },
        columns=list(MINED_COLUMNS),
    )
    return table


def write_mined(mined: pd.DataFrame, path: Path) -> Path:
    """Write mined records to ``.parquet`` or ``.jsonl`` (one object per caption), atomically."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        lines = [json.dumps(record) for record in mined.to_dict(orient="records")]
        return write_text_atomic(path, "".join(line + "\n" for line in lines))
    if suffix == ".parquet":
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(mined, preserve_index=False), buffer)
        return write_bytes_atomic(path, buffer.getvalue())
    raise MiningError(
        f"{path}: mined negatives are written as .parquet or .jsonl, not {suffix or 'no suffix'!r}"
    )


def read_mined(path: Path) -> pd.DataFrame:
    """Read a file :func:`write_mined` wrote; its columns and list lengths are checked.

    Raises:
        MiningError: Missing or unreadable file, wrong suffix, missing columns, or a record whose negatives,
            scores and ranks differ in length (row named).
    """
    path = Path(path)
    if not path.is_file():
        raise MiningError(f"{path}: no such mined-negatives file")
    frame: pd.DataFrame
    try:
        if path.suffix.lower() == ".jsonl":
            frame = pd.read_json(path, lines=True, dtype=False)
        elif path.suffix.lower() == ".parquet":
            frame = pd.read_parquet(path)
        else:
            raise MiningError(
                f"{path}: mined negatives are read from .parquet or .jsonl, not {path.suffix!r}"
            )
    except (ValueError, OSError, pa.ArrowException) as err:
        if isinstance(err, MiningError):
            raise
        raise MiningError(f"{path}: unreadable mined-negatives file ({err})") from err
    missing = [c for c in MINED_COLUMNS if c not in frame.columns]
    if missing:
        raise MiningError(f"{path}: not a mined-negatives file, missing column(s) {', '.join(missing)}")
    for record in frame.to_dict(orient="records"):
        if not len(record["negatives"]) == len(record["scores"]) == len(record["ranks"]):
            raise MiningError(f"{path}: row {record['row']}: negatives, scores and ranks differ in length")
    return frame


def negatives_of_rows(
    mined: pd.DataFrame, rows: pd.DataFrame, train_rows: Sequence[int], text_column: str, path: Path, k: int
) -> list[list[int]]:
    """For each training row, the row indices (into ``rows``) of the images of its first ``k`` mined negatives.

    A record must name a training row of ``rows`` (its catalogue ``row``) with the same caption, and its
    negatives must be training images: a file mined on another catalogue, caption column or split would
    otherwise train on wrong pairs or leak held-out images. Training rows without a record get none.

    Args:
        mined: From :func:`read_mined`.
        rows: The prepared rows (``data.rows``), each with ``row``, ``file_name`` and the caption column.
        train_rows: Positions in ``rows`` of the training rows, in training-item order.
        text_column: The caption column.
        path: The mined file, for messages.
        k: Negatives kept per caption (the first by rank).

    Returns:
        One list (length <= k) per entry of ``train_rows``.

    Raises:
        MiningError: A record of a row that is not a training row, whose caption differs, or whose negative
            is not a training image (row and value named).
    """
    position = {int(r): i for i, r in enumerate(rows["row"])}
    train = set(train_rows)
    image_row: dict[str, int] = {}
    for i in train_rows:
        image_row.setdefault(str(rows["file_name"].iloc[i]), i)
    by_position: dict[int, list[int]] = {}
    for record in mined.to_dict(orient="records"):
        at = position.get(int(record["row"]))
        if at is None or at not in train:
            where = "no row of the catalogue" if at is None else f"split {rows['split'].iloc[at]!r}"
            raise MiningError(
                f"{path}: caption row {record['row']} is {where}, not a training row: mine on this run's train split"
            )
        caption = str(rows[text_column].iloc[at])
        if str(record["caption"]) != caption:
            raise MiningError(
                f"{path}: row {record['row']}: caption {record['caption']!r} in the file, {caption!r} in column "
                f"{text_column!r} of the catalogue: mined on another catalogue or caption column"
            )
        negatives = [str(f) for f in record["negatives"]][:k]
        unknown = [f for f in negatives if f not in image_row]
        if unknown:
            raise MiningError(f"{path}: row {record['row']}: negative {unknown[0]!r} is not a training image")
        by_position[at] = [image_row[f] for f in negatives]
    return [by_position.get(i, []) for i in train_rows]


def mining_data(
    target: Path | str, catalogue: Path, text_column: str, *, progress: bool = False
) -> tuple[PreparedData, str]:
    """The rows to mine and their group column: a run's own split (``splits.json``), else the catalogue's.

    A run directory gives its data settings and saved split, so ``train`` is the very split the run trained
    on; a bare model reads the catalogue's ``split`` column (every row in ``all`` without one).

    Args:
        target: A run directory or a model (folder, hub id, ``embedded``).
        catalogue: The catalogue folder (a run's own by default, chosen by the caller).
        text_column: The caption column.
        progress: Progress bar while the images are checked.

    Returns:
        ``(prepared rows, group column)``.
    """
    from cliptune.config import load_config
    from cliptune.data.prepare import prepare_data
    from cliptune.evaluation.catalogue import prepare_catalogue
    from cliptune.rundir import RunDir, is_run

    if is_run(target):
        cfg = load_config(RunDir(Path(target)).config)
        cfg.data.catalogue, cfg.data.text_column = Path(catalogue), text_column
        return prepare_data(cfg.data, Path(target), progress=progress), cfg.data.group_column
    return prepare_catalogue(Path(catalogue), text_column=text_column, progress=progress), "group"
