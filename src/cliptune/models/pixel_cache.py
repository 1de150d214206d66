"""On-disk cache of decoded, resized uint8 pixels: storage only (``models/embed.py`` fills and reads it).

Decoding a photo and resizing it to the model's input size costs as much as a small tower's forward on a
CPU (docs/benchmarks.md). When the features cannot be cached (another model, fine-tuned towers, a new
checkpoint each epoch) the same catalogue is decoded again and again; this cache does it once. Each entry
is the ``(H, W, 3)`` uint8 array a backbone's :class:`cliptune.models.backbone.PixelRecipe` makes, 150 KB
at 224 px (H * W * 3 bytes), read back through ``numpy.memmap`` without copying a whole shard.

Layout (see ``docs/feature_cache.md``)::

    <root>/<sha256(identity)[:16]>/
        identity.txt            the full identity string (pixel recipe + decode settings), for humans
        <uuid>.pixels           one immutable shard per flush: a header, then N x H x W x 3 uint8

A shard starts with ``MAGIC``, an 8-byte little-endian header length and a JSON header (``shape``
``[H, W, 3]``, ``keys``: row i <-> key i), padded to 64 bytes; then the rows. As in the feature cache,
shards are written to a hidden temp file, fsync'ed and renamed (``os.replace``), so a killed write leaves
either no shard or a complete one; a shard whose size does not match its header is skipped with a
warning, its rows recomputed. The index is rebuilt in memory from the headers and refreshed on a miss, by
the same bookkeeping as the feature cache's (``models/cache_index.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from cliptune.models.cache_index import CacheIndex, CacheStats, identity_directory

__all__ = ["MAGIC", "PixelCache", "pixel_key"]

MAGIC = b"CLTPIX1\n"
_FORMAT = "cliptune-pixels-v1"
_SUFFIX = ".pixels"
_ALIGN = 64


def pixel_key(identity: str, content_sha256: str) -> str:
    """Cache key of one image: the pixel identity (recipe + decode settings) and the file bytes' sha256.

    Example:
        >>> len(pixel_key("imagenet:224|", hashlib.sha256(b"jpeg bytes").hexdigest()))
        64
    """
    return hashlib.sha256("\0".join((_FORMAT, identity, content_sha256)).encode("utf-8")).hexdigest()


class PixelCache:
    """Content-addressed, append-only store of uint8 images of one shape for one pixel identity.

    Args:
        root: cache root; one sub-directory per identity is created under it.
        identity: everything the pixels depend on besides the file bytes: the backbone's
            ``PixelRecipe.identity`` (size, resize/crop mode, filter) and the loader's decode settings
            (full or fast JPEG decode, an augmented view's settings).
        shape: ``(H, W, 3)`` of every entry.

    Example:
        >>> cache = PixelCache(tmp_path, "recipe|full", (2, 2, 3))
        >>> cache.put_many({"k": np.zeros((2, 2, 3), np.uint8)})
        >>> cache.get_many(["k", "other"])["k"].shape
        (2, 2, 3)
    """

    def __init__(self, root: Path | str, identity: str, shape: tuple[int, int, int]) -> None:
        self.identity = identity
        self.shape = tuple(int(v) for v in shape)
        self.directory = identity_directory(root, identity)
        self._maps: dict[str, np.ndarray] = {}  # shard name -> (N, H, W, 3) read-only memmap
        self._index = CacheIndex(self.directory, _SUFFIX, self._open, "pixel cache")

    @property
    def stats(self) -> CacheStats:
        """Hits and misses counted by :meth:`get_many` since this instance was opened."""
        return self._index.stats

    def __len__(self) -> int:
        return len(self._index)

    def get_many(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        """Look up keys; missing keys are absent from the result.

        Returns:
            ``{key: (H, W, 3) uint8}``, read-only views into the shards' memory maps (copy to keep).
        """
        # a miss rescans for shards another process wrote since
        return {k: self._maps[shard][row] for k, (shard, row) in self._index.locate(keys).items()}

    def put_many(self, pixels: Mapping[str, np.ndarray]) -> None:
        """Store images atomically as one new shard; keys already stored are skipped.

        Raises:
            ValueError: an array is not uint8 of this cache's shape (names the key).
        """
        new = {k: v for k, v in pixels.items() if not self._index.stored(k)}
        if not new:
            return
        for k, v in new.items():
            if v.dtype != np.uint8 or tuple(v.shape) != self.shape:
                raise ValueError(
                    f"pixel cache {self.directory}: image for key {k} is {v.dtype} {tuple(v.shape)}, "
                    f"expected uint8 {self.shape}"
                )
        keys = list(new)
        header = json.dumps({"format": _FORMAT, "shape": list(self.shape), "keys": keys}).encode("utf-8")
        start = len(MAGIC) + 8 + len(header)
        pad = -start % _ALIGN
        name = f"{uuid.uuid4().hex}{_SUFFIX}"
        tmp = self.directory / f".{name}.tmp"  # hidden: never read until renamed
        try:
            with open(tmp, "wb") as f:
                f.write(MAGIC + struct.pack("<Q", len(header) + pad) + header + b" " * pad)
                for k in keys:
                    f.write(np.ascontiguousarray(new[k]).tobytes())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.directory / name)
        finally:
            tmp.unlink(missing_ok=True)
        self._index.add(name, self._open(self.directory / name))

    def _open(self, path: Path) -> list[str]:
        """Check one shard against its header, keep its memory map, return its keys (row i <-> key i)."""
        with open(path, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                raise ValueError("not a cliptune pixel shard")
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        keys: list[str] = header["keys"]
        shape = tuple(header["shape"])
        if shape != self.shape:
            raise ValueError(f"shape {shape}, expected {self.shape}")
        offset = len(MAGIC) + 8 + length
        expected = offset + len(keys) * int(np.prod(shape))
        if path.stat().st_size != expected:
            raise ValueError(f"{path.stat().st_size} bytes, expected {expected} (truncated)")
        self._maps[path.name] = np.memmap(path, np.uint8, "r", offset, (len(keys), *shape))
        return keys
