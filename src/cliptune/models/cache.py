"""On-disk feature cache for frozen towers: storage only (``models/embed.py`` computes what it stores).

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
another process are seen); that bookkeeping is ``models/cache_index.py``'s, shared with the pixel cache. A
shard is written with ``cliptune.rundir.write_bytes_atomic(fsync=True)``: a
hidden temp file, fsync'ed and renamed with ``os.replace``; a crash at any point leaves either no shard or
a complete one, and the scan skips hidden names.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save as _safetensors_bytes
from torch import Tensor

from cliptune.models.cache_index import CacheIndex, CacheStats, identity_directory
from cliptune.rundir import write_bytes_atomic

__all__ = [
    "CacheStats",
    "FeatureCache",
    "feature_key",
]

Precision = Literal["fp32", "bf16", "auto"]
Modality = Literal["image", "text"]

_FORMAT = "cliptune-features-v1"
_SHARD_SUFFIX = ".safetensors"


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
        self.directory = identity_directory(self.root, identity)
        self._shards = self.directory / "shards"
        self._shards.mkdir(exist_ok=True)
        self._index = CacheIndex(self._shards, _SHARD_SUFFIX, _read_keys, "feature cache")

    @property
    def stats(self) -> CacheStats:
        """Hits and misses counted by :meth:`get_many` since this instance was opened."""
        return self._index.stats

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def get_many(self, keys: Iterable[str]) -> dict[str, Tensor]:
        """Look up keys; missing keys are simply absent from the result.

        Args:
            keys: cache keys (duplicates are looked up and counted once).

        Returns:
            ``{key: feature}`` for the keys found, each a float32 tensor of shape (F,).
        """
        by_shard: dict[str, list[tuple[str, int]]] = {}
        for k, (shard, row) in self._index.locate(keys).items():  # a miss rescans for other writers' shards
            by_shard.setdefault(shard, []).append((k, row))
        found: dict[str, Tensor] = {}
        for shard, items in by_shard.items():
            with safe_open(str(self._shards / shard), framework="pt") as f:
                feats = f.get_tensor("features")  # (N, F)
            picked = feats[torch.tensor([row for _, row in items])]  # (n, F), a copy: the shard is freed
            found.update(zip((k for k, _ in items), picked.unbind(0), strict=True))
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
        new = {k: v for k, v in features.items() if not self._index.stored(k)}
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
        self._index.add(name, keys)


def _read_keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    keys: list[str] = json.loads(meta["keys"])
    return keys
