"""Bookkeeping shared by the on-disk caches: which immutable shard holds each key, and hit/miss counts.

The feature cache (``models/cache.py``, float32 vectors in safetensors shards) and the pixel cache
(``models/pixel_cache.py``, uint8 images in memory-mapped shards) store different things in different
shard formats, but keep the same books: one directory per identity with ``identity.txt``, an in-memory
key -> (shard, row) index rebuilt from the shards' own headers (there is no index file to corrupt or race
on), a rescan for new shards whenever a lookup misses (so entries another process wrote are seen), damaged
shards skipped with a warning (their rows become misses), and hit/miss counters. They live here once; each
cache only says how to read one of its shards' keys.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cliptune.rundir import write_bytes_atomic

__all__ = ["CacheIndex", "CacheStats", "UnreadableShardWarning", "identity_directory"]


@dataclass(frozen=True)
class CacheStats:
    """Lookup counters of a cache since it was opened (unique keys per lookup).

    Attributes:
        hits: keys found on disk.
        misses: keys that had to be computed.
    """

    hits: int
    misses: int


def identity_directory(root: Path | str, identity: str) -> Path:
    """The directory of one identity under a cache root, created with its ``identity.txt`` on first use.

    The name is the identity's sha256 cut to 16 hex digits (identities are long); ``identity.txt`` holds
    the full string, for humans, written atomically so a concurrent opener never reads half of it.

    Example:
        >>> identity_directory(tmp_path, "tower@1").name
        '5b0089da2dda1ae9'
    """
    directory = Path(root) / hashlib.sha256(identity.encode("utf-8")).hexdigest()[:16]
    directory.mkdir(parents=True, exist_ok=True)
    ident_file = directory / "identity.txt"
    if not ident_file.exists():
        write_bytes_atomic(ident_file, identity.encode("utf-8"), fsync=True)
    return directory


class UnreadableShardWarning(UserWarning):
    """A cache shard that cannot be read was skipped; its rows are computed again (nothing is lost but time).

    A warning of cliptune's own, so the CLI prints it as one line (``cli.app``)."""


class CacheIndex:
    """Key -> (shard name, row) of the immutable shards in one directory, refreshed on a miss.

    Args:
        directory: the folder of shards.
        suffix: the shards' file-name suffix; hidden names (in-flight or abandoned temp files) and other
            files are never read.
        read_keys: reads one shard's keys (row i <-> key i) from its path, raising on a damaged shard; a
            cache may also keep what it opened (a memory map) before returning.
        label: the cache's name in warnings ("feature cache", "pixel cache").

    Example:
        >>> index = CacheIndex(tmp_path, ".txt", lambda p: p.read_text().split(), "word cache")
        >>> _ = (tmp_path / "a.txt").write_text("x y")
        >>> index.locate(["y", "z"]), index.stats
        ({'y': ('a.txt', 1)}, CacheStats(hits=1, misses=1))
    """

    def __init__(
        self, directory: Path, suffix: str, read_keys: Callable[[Path], list[str]], label: str
    ) -> None:
        self.directory = directory
        self._suffix = suffix
        self._read_keys = read_keys
        self._label = label
        self._where: dict[str, tuple[str, int]] = {}
        self._seen: set[str] = set()
        self._hits = 0
        self._misses = 0
        self.refresh()

    @property
    def stats(self) -> CacheStats:
        """Hits and misses counted by :meth:`locate` since this index was built."""
        return CacheStats(hits=self._hits, misses=self._misses)

    def __len__(self) -> int:
        self.refresh()
        return len(self._where)

    def __contains__(self, key: object) -> bool:
        if key not in self._where:
            self.refresh()
        return key in self._where

    def stored(self, key: str) -> bool:
        """Whether ``key`` is known without rescanning (a writer skips it; a missed one is stored twice)."""
        return key in self._where

    def locate(self, keys: Iterable[str]) -> dict[str, tuple[str, int]]:
        """Where each stored key is, in first-seen order; counts each unique key once as a hit or a miss.

        A miss rescans the directory first: another process may have written the key since.
        """
        wanted = list(dict.fromkeys(keys))
        if any(k not in self._where for k in wanted):
            self.refresh()
        found = {k: self._where[k] for k in wanted if k in self._where}
        self._hits += len(found)
        self._misses += len(wanted) - len(found)
        return found

    def add(self, name: str, keys: list[str]) -> None:
        """Record a shard this process just published (its rows are ``keys``), without rescanning."""
        self._seen.add(name)
        for row, k in enumerate(keys):
            self._where.setdefault(k, (name, row))  # two writers raced: the first shard found wins

    def refresh(self) -> None:
        """Read the keys of every shard not seen yet; a damaged one is skipped with a warning, once."""
        for entry in os.scandir(self.directory):
            name = entry.name
            if name in self._seen or name.startswith(".") or not name.endswith(self._suffix):
                continue  # hidden names are in-flight or abandoned temp files
            try:
                keys = self._read_keys(Path(entry.path))
            except Exception as e:  # damaged (copied by hand, disk full): skip it, recompute its rows
                self._seen.add(name)
                warnings.warn(
                    UnreadableShardWarning(f"{self._label}: ignoring unreadable shard {entry.path}: {e}"),
                    stacklevel=3,
                )
                continue
            self.add(name, keys)
