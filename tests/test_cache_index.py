"""The caches' shared bookkeeping (models/cache_index.py), and both caches reading shards written by hand.

The hand-written shards follow the documented layouts byte by byte (docs/feature_cache.md), not the caches'
writers, so a cache directory written before the bookkeeping moved still reads.
"""

from __future__ import annotations

import hashlib
import json
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cliptune.models.cache import FeatureCache
from cliptune.models.cache_index import CacheIndex, CacheStats, UnreadableShardWarning, identity_directory
from cliptune.models.pixel_cache import PixelCache


def _words(path: Path) -> list[str]:
    text = path.read_text()
    if text == "damaged":
        raise ValueError("not a word shard")
    return text.split()


def test_index_locates_counts_and_rescans_only_on_a_miss(tmp_path: Path) -> None:
    (tmp_path / "a.w").write_text("x y")
    reads: list[str] = []

    def read(path: Path) -> list[str]:
        reads.append(path.name)
        return _words(path)

    index = CacheIndex(tmp_path, ".w", read, "word cache")
    assert reads == ["a.w"]
    # duplicates count once: y hit, z miss -> 1 hit, 1 miss; the miss rescans (no new shard yet)
    assert index.locate(["y", "z", "y"]) == {"y": ("a.w", 1)}
    assert index.stats == CacheStats(hits=1, misses=1)
    (tmp_path / "b.w").write_text("z x")  # another process publishes z (and x again)
    (tmp_path / ".c.w.tmp").write_text("q")  # an in-flight write: never read
    (tmp_path / "notes.txt").write_text("q")  # not a shard
    assert index.locate(["x"]) == {"x": ("a.w", 0)}  # a hit: no rescan, b.w unseen
    assert reads == ["a.w"]
    assert index.locate(["z", "x"]) == {"z": ("b.w", 0), "x": ("a.w", 0)}  # the miss rescans; first wins
    assert reads == ["a.w", "b.w"]
    assert index.stats == CacheStats(hits=1 + 1 + 2, misses=1)
    assert not index.stored("q") and "q" not in index and len(index) == 3  # x, y, z
    index.add("d.w", ["q"])  # a shard this process wrote: known at once, never read back
    assert index.stored("q") and index.locate(["q"]) == {"q": ("d.w", 0)}
    assert reads == ["a.w", "b.w"]


def test_a_damaged_shard_is_skipped_with_one_warning(tmp_path: Path) -> None:
    (tmp_path / "bad.w").write_text("damaged")
    with pytest.warns(
        UnreadableShardWarning, match=r"word cache: ignoring unreadable shard .*bad\.w: not a word shard"
    ):
        index = CacheIndex(tmp_path, ".w", _words, "word cache")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the damaged shard is not read (nor warned about) again
        assert index.locate(["k"]) == {} and len(index) == 0


def test_identity_directory_is_the_hashed_name_with_the_identity_written(tmp_path: Path) -> None:
    # sha256("tower@1") = 5b0089da2dda1ae9...
    directory = identity_directory(tmp_path / "root", "tower@1")
    assert directory == tmp_path / "root" / "5b0089da2dda1ae9"
    assert (directory / "identity.txt").read_text() == "tower@1"
    assert identity_directory(tmp_path / "root", "tower@1") == directory  # idempotent


def test_caches_read_directories_written_by_the_documented_layouts(tmp_path: Path) -> None:
    # a feature shard: <root>/<sha256(identity)[:16]>/shards/<name>.safetensors, "features" (N, F) float32,
    # metadata keys = JSON list, row i <-> key i
    folder = tmp_path / "f" / hashlib.sha256(b"tower@1").hexdigest()[:16] / "shards"
    folder.mkdir(parents=True)
    feats = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    save_file({"features": feats}, str(folder / "old.safetensors"), metadata={"keys": '["a", "b"]'})
    features = FeatureCache(tmp_path / "f", "tower@1")
    got = features.get_many(["b", "a", "c"])
    assert {k: v.tolist() for k, v in got.items()} == {"b": [3.0, 4.0], "a": [1.0, 2.0]}
    assert features.stats == CacheStats(hits=2, misses=1) and len(features) == 2 and "a" in features
    # a pixel shard: <root>/<sha256(identity)[:16]>/<name>.pixels = magic, 8-byte LE header length,
    # JSON header padded with spaces to a multiple of 64 bytes, then N x H x W x 3 uint8 rows
    folder = tmp_path / "p" / hashlib.sha256(b"recipe|full").hexdigest()[:16]
    folder.mkdir(parents=True)
    header = json.dumps({"format": "cliptune-pixels-v1", "shape": [1, 2, 3], "keys": ["u", "v"]}).encode()
    pad = -(8 + 8 + len(header)) % 64
    rows = np.arange(12, dtype=np.uint8).reshape(2, 1, 2, 3)
    blob = b"CLTPIX1\n" + struct.pack("<Q", len(header) + pad) + header + b" " * pad + rows.tobytes()
    (folder / "old.pixels").write_bytes(blob)
    pixels = PixelCache(tmp_path / "p", "recipe|full", (1, 2, 3))
    got_px = pixels.get_many(["v", "w", "u"])
    assert list(got_px) == ["v", "u"]
    assert got_px["v"].tolist() == [[[6, 7, 8], [9, 10, 11]]] and got_px["u"].tolist() == [
        [[0, 1, 2], [3, 4, 5]]
    ]
    assert pixels.stats == CacheStats(hits=2, misses=1) and len(pixels) == 2
    # and a write next to the old shard is read back by a fresh instance
    pixels.put_many({"w": np.full((1, 2, 3), 7, np.uint8), "u": np.zeros((1, 2, 3), np.uint8)})
    again = PixelCache(tmp_path / "p", "recipe|full", (1, 2, 3))
    assert again.get_many(["w"])["w"].tolist() == [[[7] * 3] * 2] and len(again) == 3
