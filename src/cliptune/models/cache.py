"""On-disk feature cache for frozen towers, and the batched embedding functions that use it.

When the towers are frozen (``trainable_layers == 0``) every image and every text is embedded once and the
features are kept on disk; training the projection heads (or the Siamese head) then never runs the towers
again, which turns an epoch from minutes into milliseconds.

Layout (see ``docs/feature_cache.md``)::

    <root>/<sha256(identity)[:16]>/
        identity.txt                 the full identity string, for humans
        shards/<uuid>.safetensors    one immutable shard per flush: "features" (N, F) float32, and
                                     metadata["keys"] = JSON list of the N keys, row i <-> key i

Shards are self-describing and immutable, so there is no index file to corrupt or to race on: the index is
rebuilt in memory from the shard headers and refreshed whenever a lookup misses (so entries written by
another process are seen). A shard is written with ``cliptune.rundir.write_bytes_atomic(fsync=True)``: a
hidden temp file, fsync'ed and renamed with ``os.replace``; a crash at any point leaves either no shard or
a complete one, and the scan skips hidden names.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors import safe_open
from safetensors.torch import save as _safetensors_bytes
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from cliptune.rundir import write_bytes_atomic

__all__ = [
    "CacheStats",
    "FeatureCache",
    "embed_images",
    "embed_texts",
    "feature_key",
    "resolve_precision",
]

Precision = Literal["fp32", "bf16", "auto"]
Modality = Literal["image", "text"]

_FORMAT = "cliptune-features-v1"
_SHARD_SUFFIX = ".safetensors"
_FLUSH_ROWS = 4096  # rows buffered before a shard is written: bounds the work lost to a crash
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class CacheStats:
    """Lookup counters of a :class:`FeatureCache` since it was opened (unique keys per lookup).

    Attributes:
        hits: keys found on disk.
        misses: keys that had to be computed.
    """

    hits: int
    misses: int


def feature_key(
    identity: str,
    modality: Modality,
    content_sha256: str,
    *,
    preprocess_id: str = "",
    precision: Literal["fp32", "bf16"] = "fp32",
) -> str:
    """Cache key of one item: anything that changes the feature changes the key.

    Args:
        identity: the backbone identity (hash of the frozen weights and preprocessing): a retrained or
            different model never reads another model's features.
        modality: "image" or "text", so an image and a text with the same bytes never collide.
        content_sha256: sha256 hex of the item content (image file bytes, or the UTF-8 text).
        preprocess_id: anything about preprocessing/tokenisation not already in ``identity``.
        precision: the resolved compute precision; bf16 features differ from fp32 ones, so an fp32 run
            never reads bf16 features (which keeps cached fp32 features bit-exact).

    Returns:
        A 64-character sha256 hex digest.

    Example:
        >>> k = feature_key("clip-b32@abc", "text", hashlib.sha256(b"red dress").hexdigest())
        >>> len(k)
        64
    """
    parts = (_FORMAT, identity, preprocess_id, modality, precision, content_sha256)
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()


class FeatureCache:
    """Content-addressed, append-only store of feature vectors for one backbone identity.

    Safe for many concurrent readers and writers (processes or machines sharing a file system): shards are
    immutable and published atomically, and a reader that misses a key rescans for new shards. Features are
    stored as float32 so a cached feature is bit-identical to the one computed (float16 would halve the
    disk use but not round-trip).

    Args:
        root: cache root; one sub-directory per identity is created under it.
        identity: the backbone identity string (``backbone.identity()``).

    Example:
        >>> cache = FeatureCache(tmp_path, "tower@1")
        >>> cache.put_many({"k1": torch.ones(4)})
        >>> cache.get_many(["k1", "k2"])["k1"].shape
        torch.Size([4])
    """

    def __init__(self, root: Path | str, identity: str) -> None:
        self.root = Path(root)
        self.identity = identity
        self.directory = self.root / hashlib.sha256(identity.encode("utf-8")).hexdigest()[:16]
        self._shards = self.directory / "shards"
        self._shards.mkdir(parents=True, exist_ok=True)
        ident_file = self.directory / "identity.txt"
        if not ident_file.exists():
            write_bytes_atomic(ident_file, identity.encode("utf-8"), fsync=True)
        self._index: dict[str, tuple[str, int]] = {}  # key -> (shard file name, row)
        self._seen: set[str] = set()
        self._hits = 0
        self._misses = 0
        self._refresh()

    @property
    def stats(self) -> CacheStats:
        """Hits and misses counted by :meth:`get_many` since this instance was opened."""
        return CacheStats(hits=self._hits, misses=self._misses)

    def __len__(self) -> int:
        self._refresh()
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        if key not in self._index:
            self._refresh()
        return key in self._index

    def get_many(self, keys: Iterable[str]) -> dict[str, Tensor]:
        """Look up keys; missing keys are simply absent from the result.

        Args:
            keys: cache keys (duplicates are looked up and counted once).

        Returns:
            ``{key: feature}`` for the keys found, each a float32 tensor of shape (F,).
        """
        wanted = list(dict.fromkeys(keys))
        if any(k not in self._index for k in wanted):
            self._refresh()  # another process may have written them since we last looked
        by_shard: dict[str, list[tuple[str, int]]] = {}
        for k in wanted:
            if k in self._index:
                shard, row = self._index[k]
                by_shard.setdefault(shard, []).append((k, row))
        found: dict[str, Tensor] = {}
        for shard, items in by_shard.items():
            with safe_open(str(self._shards / shard), framework="pt") as f:
                feats = f.get_tensor("features")  # (N, F)
            picked = feats[torch.tensor([row for _, row in items])]  # (n, F), a copy: the shard is freed
            found.update(zip((k for k, _ in items), picked.unbind(0), strict=True))
        self._hits += len(found)
        self._misses += len(wanted) - len(found)
        return found

    def put_many(self, features: Mapping[str, Tensor]) -> None:
        """Store features atomically as one new shard; keys already stored are skipped.

        Args:
            features: ``{key: feature}``, each feature 1-D with the same length F and finite values
                (a NaN would otherwise be served forever).

        Raises:
            ValueError: a feature is not 1-D, has a different length from the first, or is not finite;
                the message names the key.
        """
        new = {k: v for k, v in features.items() if k not in self._index}
        if not new:
            return
        keys = list(new)
        dim = new[keys[0]].shape
        for k in keys:
            v = new[k]
            if v.ndim != 1 or v.shape != dim:
                raise ValueError(
                    f"feature cache {self.directory}: feature for key {k} has shape {tuple(v.shape)}, "
                    f"expected a 1-D vector of shape {tuple(dim)} like the first key {keys[0]}"
                )
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"feature cache {self.directory}: feature for key {k} has NaN/inf values")
        stacked = torch.stack([new[k].detach().to("cpu", torch.float32) for k in keys]).contiguous()  # (N, F)
        blob = _safetensors_bytes(
            {"features": stacked}, metadata={"format": _FORMAT, "keys": json.dumps(keys)}
        )
        name = f"{uuid.uuid4().hex}{_SHARD_SUFFIX}"
        write_bytes_atomic(self._shards / name, blob, fsync=True)
        self._seen.add(name)
        for row, k in enumerate(keys):
            self._index[k] = (name, row)

    def _refresh(self) -> None:
        for entry in os.scandir(self._shards):
            name = entry.name
            if name in self._seen or name.startswith(".") or not name.endswith(_SHARD_SUFFIX):
                continue  # hidden names are in-flight or abandoned temp files
            self._seen.add(name)
            try:
                with safe_open(entry.path, framework="pt") as f:
                    meta = f.metadata() or {}
                keys = json.loads(meta["keys"])
            except Exception as e:  # a shard copied in by hand may be damaged: skip it, recompute its rows
                warnings.warn(f"feature cache: ignoring unreadable shard {entry.path}: {e}", stacklevel=2)
                continue
            for row, k in enumerate(keys):
                self._index.setdefault(k, (name, row))


def resolve_precision(precision: Precision, device: torch.device | str = "cpu") -> Literal["fp32", "bf16"]:
    """Decide the compute precision of a frozen forward.

    Rule: "fp32" and "bf16" are taken as given (bf16 always works, but without hardware support it is
    emulated and slower). "auto" picks bf16 only where it is native: on CUDA when
    ``torch.cuda.is_bf16_supported()``; on CPU when the CPU has AVX512_BF16 or AMX tiles (what oneDNN uses
    for bf16 GEMMs, 2.5-3x faster than fp32 there); fp32 everywhere else (MPS, older CPUs).

    Args:
        precision: "fp32", "bf16" or "auto".
        device: the device the forward runs on.

    Returns:
        "fp32" or "bf16".
    """
    if precision not in ("fp32", "bf16", "auto"):
        raise ValueError(f"precision must be 'fp32', 'bf16' or 'auto', got {precision!r}")
    if precision != "auto":
        return precision
    kind = torch.device(device).type
    if kind == "cuda":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if kind == "cpu":
        cpu = torch.cpu
        avx512_bf16 = getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
        amx = getattr(cpu, "_is_amx_tile_supported", lambda: False)()
        return "bf16" if (avx512_bf16 or amx) else "fp32"
    return "fp32"


def embed_images(
    paths: Sequence[Path | str],
    *,
    cache: FeatureCache | None,
    load: Callable[[Path], Image.Image],
    preprocess: Callable[[list[Image.Image]], Tensor],
    forward: Callable[[Tensor], Tensor],
    batch_size: int = 64,
    precision: Precision = "auto",
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    preprocess_id: str = "",
    progress: bool = True,
) -> Tensor:
    """Embed image files with a frozen tower, computing only what the cache lacks.

    Each file is keyed by the sha256 of its bytes (so an edited image is recomputed and a copy under another
    name is not), identical files are embedded once, and misses are decoded and preprocessed in a
    ``DataLoader`` (``num_workers`` processes; ``load`` and ``preprocess`` must then be picklable) so
    decoding does not starve the forward. New features are flushed to the cache every 4,096 rows and at the
    end, so an interrupted run keeps most of its work.

    Args:
        paths: image files, in the order of the returned rows.
        cache: where features are read from and written to; None computes everything (still de-duplicated).
        load: path -> RGB PIL image (the robust loader of ``cliptune.data``); its errors are re-raised
            naming the file.
        preprocess: list of images -> (B, 3, H, W) pixel tensor; used as the DataLoader's collate function.
        forward: (B, 3, H, W) -> (B, F) frozen image features (``backbone.image_features``).
        batch_size: images per forward.
        precision: "fp32", "bf16" or "auto" (see :func:`resolve_precision`); features are returned as
            float32 either way.
        num_workers: DataLoader worker processes for decoding (0 = in this process).
        device: where the forward runs; batches are moved there.
        preprocess_id: preprocessing settings not already part of ``cache.identity``.
        progress: show a rich progress bar over the items to compute.

    Returns:
        (N, F) float32 features on CPU, row i for ``paths[i]``; (0, 0) when ``paths`` is empty.

    Example:
        >>> feats = embed_images(paths, cache=FeatureCache(root, backbone.identity()), load=load_image,
        ...                      preprocess=backbone.preprocess, forward=backbone.image_features)
    """
    resolved = resolve_precision(precision, device)
    identity = cache.identity if cache is not None else ""
    keys = [
        feature_key(identity, "image", _file_sha256(Path(p)), preprocess_id=preprocess_id, precision=resolved)
        for p in paths
    ]
    first_path: dict[str, Path] = {}
    for k, p in zip(keys, paths, strict=True):
        first_path.setdefault(k, Path(p))
    found = cache.get_many(first_path) if cache is not None else {}
    misses = [k for k in first_path if k not in found]
    loader = DataLoader(
        _ImageFiles([first_path[k] for k in misses], load),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=preprocess,
        pin_memory=torch.device(device).type == "cuda",
    )
    batches: Iterable[tuple[dict[str, Any], Tensor | None]] = (({}, pixels) for pixels in loader)
    _compute_misses(batches, misses, found, cache, forward, resolved, device, progress, "images")
    return _assemble(keys, found)


def embed_texts(
    texts: Sequence[str],
    *,
    cache: FeatureCache | None,
    tokenize: Callable[[list[str]], Mapping[str, Tensor]],
    forward: Callable[..., Tensor],
    batch_size: int = 256,
    precision: Precision = "auto",
    device: torch.device | str = "cpu",
    preprocess_id: str = "",
    progress: bool = True,
) -> Tensor:
    """Embed texts with a frozen tower, computing only what the cache lacks.

    Each text is keyed by the sha256 of its UTF-8 bytes; identical texts are embedded once.

    Args:
        texts: the texts, in the order of the returned rows.
        cache: where features are read from and written to; None computes everything (still de-duplicated).
        tokenize: list of texts -> dict of (B, L) tensors (``backbone.tokenize``).
        forward: called as ``forward(**tokens)`` -> (B, F) frozen text features (``backbone.text_features``).
        batch_size: texts per forward.
        precision: "fp32", "bf16" or "auto" (see :func:`resolve_precision`); features are float32 either way.
        device: where the forward runs; token tensors are moved there.
        preprocess_id: tokeniser settings (e.g. max length) not already part of ``cache.identity``.
        progress: show a rich progress bar over the items to compute.

    Returns:
        (N, F) float32 features on CPU, row i for ``texts[i]``; (0, 0) when ``texts`` is empty.

    Example:
        >>> feats = embed_texts(["red dress", "blue jeans"], cache=cache, tokenize=backbone.tokenize,
        ...                     forward=backbone.text_features)
    """
    resolved = resolve_precision(precision, device)
    identity = cache.identity if cache is not None else ""
    keys = [
        feature_key(
            identity,
            "text",
            hashlib.sha256(t.encode("utf-8")).hexdigest(),
            preprocess_id=preprocess_id,
            precision=resolved,
        )
        for t in texts
    ]
    first_text: dict[str, str] = {}
    for k, t in zip(keys, texts, strict=True):
        first_text.setdefault(k, t)
    found = cache.get_many(first_text) if cache is not None else {}
    misses = [k for k in first_text if k not in found]
    chunks = (misses[i : i + batch_size] for i in range(0, len(misses), batch_size))
    batches = ((dict(tokenize([first_text[k] for k in chunk])), None) for chunk in chunks)
    _compute_misses(batches, misses, found, cache, forward, resolved, device, progress, "texts")
    return _assemble(keys, found)


class _ImageFiles(Dataset[Image.Image]):
    def __init__(self, paths: list[Path], load: Callable[[Path], Image.Image]) -> None:
        self.paths, self.load = paths, load

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Image.Image:
        try:
            return self.load(self.paths[i])
        except Exception as e:
            raise ValueError(f"cannot load image {self.paths[i]}: {e}") from e


def _compute_misses(
    batches: Iterable[tuple[dict[str, Any], Tensor | None]],
    misses: list[str],
    found: dict[str, Tensor],
    cache: FeatureCache | None,
    forward: Callable[..., Tensor],
    precision: Literal["fp32", "bf16"],
    device: torch.device | str,
    progress: bool,
    what: str,
) -> None:
    """Run ``forward`` over batches (kwargs, positional) lined up with ``misses``; fill ``found``, flush cache."""
    dev = torch.device(device)
    pending: dict[str, Tensor] = {}
    done = 0
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress or not misses) as bar:
        task = bar.add_task(f"embedding {what} ({len(found)} cached)", total=len(misses))
        for kwargs, positional in batches:
            kwargs = {
                k: v.to(dev, non_blocking=True) if isinstance(v, Tensor) else v for k, v in kwargs.items()
            }
            args = () if positional is None else (positional.to(dev, non_blocking=True),)
            with (
                torch.inference_mode(),
                torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"),
            ):
                out = forward(*args, **kwargs)  # (B, F)
            batch_keys = misses[done : done + out.shape[0]]
            if out.ndim != 2 or out.shape[0] != len(batch_keys):
                raise ValueError(
                    f"embedding {what}: forward returned shape {tuple(out.shape)} for a batch of "
                    f"{len(batch_keys)} items; expected (batch, features)"
                )
            out = out.float().cpu()  # (B, F) float32 whatever the autocast dtype
            for k, row in zip(batch_keys, out, strict=True):
                found[k] = row
                pending[k] = row
            done += len(batch_keys)
            bar.advance(task, len(batch_keys))
            if cache is not None and len(pending) >= _FLUSH_ROWS:
                cache.put_many(pending)
                pending = {}
    if cache is not None and pending:
        cache.put_many(pending)


def _assemble(keys: list[str], found: dict[str, Tensor]) -> Tensor:
    if not keys:
        return torch.empty(0, 0)
    return torch.stack([found[k] for k in keys]).float()  # (N, F)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
    except OSError as e:
        raise FileNotFoundError(f"cannot read image {path}: {e.strerror or e}") from e
    return digest.hexdigest()
