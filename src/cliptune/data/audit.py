"""Near-duplicate audit without a model: exact and near copies by perceptual hash, which split each is in.

Grouped splits stop only the leaks a catalogue declares. The same photo saved twice under two names, a
resized or re-encoded copy, or a mirrored one still crosses from train to test and flatters every metric.
This module finds those copies from the pixels alone and says which pairs cross splits (leaks) and which
sit inside one split (the same picture counted twice); ``cliptune data audit`` adds re-shoots and crops
by embedding cosine (:mod:`cliptune.search.duplicates`) and the HTML page (:mod:`cliptune.report.audit`).

Hashes (our own numpy code, ~20 lines; ``docs/dependencies.md`` says why not the ``imagehash`` package):

- ``digest``: sha256 of the decoded RGB pixels and size. Equal digests are **exact** copies, whatever
  the file format or name (a PNG saved again as PNG, a copied file).
- ``phash``: the 256-bit DCT hash of Zauner (2010) / pHash.org as ``imagehash.phash(hash_size=16)``
  computes it: grey, 64 x 64 Lanczos, 2-D DCT-II, the 16 x 16 lowest frequencies, each bit "above their
  median". Pairs at a Hamming distance of at most :data:`NEAR_BITS` are **near** copies (resized,
  re-encoded). 256 bits, not the usual 64: studio shots of similar garments on one background collide at
  64 bits (2 bits apart for two different products), not at 256 (``docs/catalogues.md``).
  The hash of the mirrored image is kept too, so a horizontally flipped copy is a near copy (``mirrored``).

Example:
    >>> hashes = hash_images([Path("a.png"), Path("b.jpg")], ["a.png", "b.jpg"])  # doctest: +SKIP
    >>> hash_pairs(hashes)  # doctest: +SKIP
    [Pair(a=0, b=1, kind='near', score=4.0, mirrored=False)]
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps
from rich.progress import track

from cliptune.data.images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image
from cliptune.data.splits import group_ids

__all__ = [
    "HASH_BITS",
    "NEAR_BITS",
    "ImageHashes",
    "Pair",
    "audit_table",
    "hash_images",
    "hash_pairs",
    "merge_leaking_groups",
    "phash",
]

NEAR_BITS = 24
"""Largest Hamming distance (of 256 bits) between two pHashes that counts as a near copy.

Set on planted copies in a calibration catalogue that no test judges (``render_fashion`` seed 1, 400
images; the tests use seed 0 and real photos): 30 images each resized to half and double size and
re-encoded as JPEG at quality 50 and 20 land at most 22 bits from their original (mean 0.7-9), while the
closest two images of different products are 26 bits apart; 24 sits between. The 64-bit rule of thumb
(Krawetz, "Looks like it", 2011: up to 10 of 64 bits is a variation) scales to 40 bits here and would pair
different products of that catalogue. Crops and re-shoots are the embedding pass's job.
"""

HASH_BITS = 256
_HASH_SIDE, _LOW = 64, 16  # imagehash.phash(hash_size=16): highfreq_factor 4
_N = np.arange(_HASH_SIDE)
# Unnormalised DCT-II basis (rows are frequencies), as scipy.fftpack.dct's default that imagehash uses (up to
# its factor 2, which no median comparison sees): C @ X @ C.T is the 2-D DCT of X.
_DCT = np.cos(np.pi * (2 * _N[None, :] + 1) * _N[:, None] / (2 * _HASH_SIDE))


@dataclass(frozen=True)
class ImageHashes:
    """Hashes of the images that loaded, and the ones that did not.

    Attributes:
        file_names: ``file_name`` of each hashed image (row i of the arrays).
        digest: sha256 hex of the decoded pixels, per image.
        phash: 256-bit pHash per image, packed, first coefficient in the highest bit of byte 0.
        phash_mirror: pHash of the horizontally mirrored image.
        bad: ``(file_name, reason)`` of each image that cannot be used (the loader's reasons, as
            ``cliptune data check`` lists them).
    """

    file_names: list[str]
    digest: list[str]
    phash: np.ndarray  # (N, 32) uint8
    phash_mirror: np.ndarray  # (N, 32) uint8
    bad: list[tuple[str, str]]


@dataclass(frozen=True)
class Pair:
    """Two images found to be copies of each other.

    Attributes:
        a: Index of the first image (lower), into the hashed / embedded images.
        b: Index of the second image.
        kind: ``exact`` (same pixels), ``near`` (pHash within :data:`NEAR_BITS`) or ``embedding``
            (cosine at or above the audit's threshold).
        score: Hamming distance in bits for ``exact`` / ``near``, cosine for ``embedding``.
        mirrored: The near copy matched the mirrored hash (a flipped copy).
    """

    a: int
    b: int
    kind: str
    score: float
    mirrored: bool = False


def phash(image: Image.Image) -> np.ndarray:
    """The 256-bit DCT perceptual hash of an image (``imagehash.phash(hash_size=16)``'s definition).

    Args:
        image: Any PIL image; it is converted to grey.

    Returns:
        (32,) uint8: the 256 bits packed, the DC coefficient's bit first (``np.packbits`` order).

    Example:
        >>> bool((phash(Image.new("RGB", (64, 64), "red")) == phash(Image.new("RGB", (640, 640), "red"))).all())
        True
    """
    grey = image.convert("L").resize((_HASH_SIDE, _HASH_SIDE), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey, dtype=np.float64)  # (64, 64)
    low = (_DCT @ pixels @ _DCT.T)[:_LOW, :_LOW].ravel()  # (256,) lowest frequencies, row-major
    packed: np.ndarray = np.packbits(low > np.median(low))
    return packed


def hash_images(
    paths: Sequence[Path],
    file_names: Sequence[str],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = False,
) -> ImageHashes:
    """Decode every image once (the robust loader) and hash it.

    Args:
        paths: Image files.
        file_names: Their ``file_name`` values (same order), which name them in the results.
        max_pixels: Decompression-bomb limit of the loader.
        progress: Show a progress bar.

    Returns:
        The :class:`ImageHashes`; unusable images are listed in ``bad``, never dropped silently.
    """
    names: list[str] = []
    digests: list[str] = []
    hashes: list[np.ndarray] = []
    mirrors: list[np.ndarray] = []
    bad: list[tuple[str, str]] = []
    items: Iterable[tuple[Path, str]] = zip(paths, file_names, strict=True)
    if progress:
        items = track(list(items), description="hashing images", transient=True)
    for path, name in items:
        try:
            img = load_image(path, max_pixels=max_pixels)
        except ImageLoadError as exc:
            bad.append((name, exc.reason))
            continue
        pixels = img.tobytes()
        size = f"{img.width}x{img.height}:".encode()
        names.append(name)
        digests.append(hashlib.sha256(size + pixels).hexdigest())
        hashes.append(phash(img))
        mirrors.append(phash(ImageOps.mirror(img)))
    empty = np.zeros((0, HASH_BITS // 8), dtype=np.uint8)
    return ImageHashes(
        names, digests, np.stack(hashes) if hashes else empty, np.stack(mirrors) if mirrors else empty, bad
    )


def hash_pairs(hashes: ImageHashes, max_bits: int = NEAR_BITS) -> list[Pair]:
    """Exact copies (same digest) and near copies (pHash within ``max_bits``, either orientation).

    FAISS's exact binary index does the Hamming range search (SIMD popcount), so 100k images take
    seconds rather than the hour of a Python double loop.

    Args:
        hashes: From :func:`hash_images`.
        max_bits: Largest Hamming distance of a near pair (0..255).

    Returns:
        One :class:`Pair` per unordered pair, ``a < b``, sorted by ``(a, b)``; a pair that is exact is
        not listed again as near.
    """
    import faiss

    n = len(hashes.file_names)
    pairs: dict[tuple[int, int], Pair] = {}
    first: dict[str, int] = {}
    by_digest: dict[int, list[int]] = {}
    for i, digest in enumerate(hashes.digest):
        by_digest.setdefault(first.setdefault(digest, i), []).append(i)
    for members in by_digest.values():
        for x, a in enumerate(members):
            for b in members[x + 1 :]:
                pairs[(a, b)] = Pair(a, b, "exact", 0.0)
    if n < 2:
        return sorted(pairs.values(), key=lambda p: (p.a, p.b))
    index = faiss.IndexBinaryFlat(HASH_BITS)
    index.add(np.ascontiguousarray(hashes.phash))
    for queries, mirrored in ((hashes.phash, False), (hashes.phash_mirror, True)):
        # faiss's binary range search keeps distances strictly below the radius
        lims, dist, ids = index.range_search(np.ascontiguousarray(queries), max_bits + 1)
        for q in range(n):
            for j, d in zip(ids[lims[q] : lims[q + 1]], dist[lims[q] : lims[q + 1]], strict=True):
                a, b = (q, int(j)) if q < j else (int(j), q)
                if a == b:
                    continue
                old = pairs.get((a, b))
                if old is None or (old.kind == "near" and float(d) < old.score):
                    pairs[(a, b)] = Pair(a, b, "near", float(d), mirrored)
    return sorted(pairs.values(), key=lambda p: (p.a, p.b))


def audit_table(
    pairs: Sequence[Pair],
    file_names: Sequence[str],
    rows: pd.DataFrame,
    split_of: pd.Series,
    group_column: str = "group",
) -> pd.DataFrame:
    """The audit's rows: each pair with its images, kind, score, splits, groups and what it means.

    Args:
        pairs: Pairs whose ``a`` / ``b`` index ``file_names``.
        file_names: The images the pairs index.
        rows: Catalogue rows (``file_name``, optionally ``group_column``); an image's first row names its
            group.
        split_of: Split name of each row, aligned with ``rows``.
        group_column: Column naming each row's group.

    Returns:
        Columns ``file_a, file_b, kind, score, mirrored, split_a, split_b, group_a, group_b, finding``
        where ``finding`` is ``leak`` (different splits), ``same_split`` (two groups of one split: the
        picture weighs double) or ``same_group`` (declared, harmless). Leaks come first; within a
        finding, exact pairs, then near ones by distance, then embedding ones by cosine, highest first.
    """
    first = ~rows["file_name"].duplicated()
    names = rows.loc[first, "file_name"].astype(str).tolist()
    group = dict(zip(names, group_ids(rows, group_column)[first], strict=True))
    split = dict(zip(names, split_of[first].astype(str), strict=True))
    records = []
    for p in pairs:
        fa, fb = file_names[p.a], file_names[p.b]
        ga, gb, sa, sb = group[fa], group[fb], split[fa], split[fb]
        finding = "leak" if sa != sb else ("same_group" if ga == gb else "same_split")
        records.append((fa, fb, p.kind, p.score, p.mirrored, sa, sb, ga, gb, finding))
    columns = ["file_a", "file_b", "kind", "score", "mirrored", "split_a", "split_b", "group_a", "group_b"]
    table = pd.DataFrame(records, columns=[*columns, "finding"])
    # most certain first within each finding: exact, near by bits, then embedding by cosine descending
    keys = pd.DataFrame(
        {
            "finding": table["finding"].map({"leak": 0, "same_split": 1, "same_group": 2}),
            "kind": table["kind"].map({"exact": 0, "near": 1, "embedding": 2}),
            "doubt": np.where(table["kind"] == "embedding", -table["score"], table["score"]),
        }
    )
    order = keys.sort_values(["finding", "kind", "doubt"], kind="stable").index
    sorted_table: pd.DataFrame = table.loc[order].reset_index(drop=True)
    return sorted_table


def merge_leaking_groups(
    rows: pd.DataFrame, table: pd.DataFrame, group_column: str = "group", split_column: str = "split"
) -> tuple[pd.DataFrame, int]:
    """Rows whose groups are merged wherever a leaking pair joins them (union-find), no row dropped.

    Each connected set of groups takes its smallest group id, so the next grouped split keeps every copy
    on one side. Where the catalogue fixes splits explicitly and a merged set names several, its rows
    take the split most of them name (ties: the smallest name), because one group cannot be in two splits.

    Args:
        rows: Catalogue rows as read (``row`` column and all).
        table: From :func:`audit_table`; only ``finding == "leak"`` rows merge groups.
        group_column: Column naming each row's group (written, created if absent).
        split_column: Column of explicit split names.

    Returns:
        ``(rows with merged groups, rows whose explicit split changed)``.
    """
    gids = group_ids(rows, group_column)
    parent: dict[str, str] = {}

    def root(g: str) -> str:
        while parent.get(g, g) != g:
            parent[g] = parent.get(parent[g], parent[g])  # path halving
            g = parent[g]
        return g

    for ga, gb in zip(
        table.loc[table["finding"] == "leak", "group_a"],
        table.loc[table["finding"] == "leak", "group_b"],
        strict=True,
    ):
        ra, rb = root(str(ga)), root(str(gb))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    merged = gids.map(root)
    out = rows.copy()
    out[group_column] = merged.to_numpy()
    changed = 0
    if split_column in out.columns:
        explicit = out[split_column].where(out[split_column].astype(str).str.strip() != "")
        for gid in sorted(set(merged[merged != gids])):
            members = (merged == gid).to_numpy()
            values = explicit[members].dropna().astype(str)
            if values.nunique() > 1:
                counts = values.value_counts()
                keep = min(counts.index[counts == counts.max()])
                changed += int((values != keep).sum())
                out.loc[members & explicit.notna().to_numpy(), split_column] = keep
    return out.drop(columns=["row"], errors="ignore"), changed
