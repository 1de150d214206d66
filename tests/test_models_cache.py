"""Tests for the feature cache: hits, invalidation, de-duplication, exactness, bf16, atomicity, processes."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from cliptune.data.images import ImageLoadError
from cliptune.models import embed as embed_mod
from cliptune.models.cache import CacheStats, FeatureCache, feature_key
from cliptune.models.embed import embed_images, embed_texts, resolve_precision

SIDE = 8


class CountingTower(nn.Module):
    """A fake frozen image tower: flatten (B, 3, 8, 8) -> linear -> (B, 16); counts calls and items."""

    def __init__(self, out: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(3 * SIDE * SIDE, out)
        self.calls = 0
        self.items = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        self.items += x.shape[0]
        return self.linear(x.flatten(1))


class CountingTextTower(nn.Module):
    """A fake frozen text tower: embedding bag over character codes -> (B, 12); counts calls and items."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.emb = nn.Embedding(256, 12)
        self.calls = 0
        self.items = 0

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        self.calls += 1
        self.items += input_ids.shape[0]
        m = attention_mask.unsqueeze(-1).float()  # (B, L, 1)
        return (self.emb(input_ids) * m).sum(1) / m.sum(1).clamp(min=1)  # (B, 12)


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def to_pixels(images: list[Image.Image]) -> Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])  # (B, H, W, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)


def tokenize(texts: list[str]) -> dict[str, Tensor]:
    codes = [[min(ord(c), 255) for c in t] or [0] for t in texts]
    length = max(len(c) for c in codes)
    ids = torch.zeros(len(codes), length, dtype=torch.long)
    mask = torch.zeros(len(codes), length, dtype=torch.long)
    for i, c in enumerate(codes):
        ids[i, : len(c)] = torch.tensor(c)
        mask[i, : len(c)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def run_images(paths, cache, tower, **kw) -> Tensor:
    kw.setdefault("precision", "fp32")
    return embed_images(
        paths,
        cache=cache,
        load=load_rgb,
        preprocess=to_pixels,
        forward=tower,
        batch_size=4,
        progress=False,
        **kw,
    )


def naive_image_features(paths: list[Path], tower: CountingTower) -> Tensor:
    with torch.no_grad():
        return torch.cat([tower.linear(to_pixels([load_rgb(p)]).flatten(1)) for p in paths])  # (N, 16)


def test_second_run_is_all_hits_and_equals_uncached_exactly(tmp_path: Path) -> None:
    paths = write_images(tmp_path, 10)
    tower = CountingTower()
    first = run_images(paths, FeatureCache(tmp_path / "cache", "tower@1"), tower)
    # 10 images, batch 4 -> ceil(10 / 4) = 3 forwards over 10 items
    assert (tower.calls, tower.items) == (3, 10)
    cache = FeatureCache(tmp_path / "cache", "tower@1")
    second = run_images(paths, cache, tower)
    assert (tower.calls, tower.items) == (3, 10)  # the tower never ran again
    assert cache.stats == CacheStats(hits=10, misses=0)
    assert first.dtype == second.dtype == torch.float32 and first.shape == (10, 16)
    assert torch.equal(first, second)  # fp32 on disk: bit-exact
    uncached = run_images(paths, None, CountingTower())
    assert torch.equal(first, uncached)
    assert torch.allclose(first, naive_image_features(paths, tower), atol=1e-6)


def test_changed_bytes_recompute_only_that_image(tmp_path: Path) -> None:
    paths = write_images(tmp_path, 6)
    root = tmp_path / "cache"
    tower = CountingTower()
    run_images(paths, FeatureCache(root, "tower@1"), tower)
    Image.fromarray(np.full((SIDE, SIDE, 3), 7, dtype=np.uint8)).save(paths[2])  # same name, new bytes
    tower.calls = tower.items = 0
    cache = FeatureCache(root, "tower@1")
    feats = run_images(paths, cache, tower)
    assert (tower.calls, tower.items) == (1, 1)
    assert cache.stats == CacheStats(hits=5, misses=1)
    assert torch.allclose(feats[2], naive_image_features([paths[2]], tower)[0], atol=1e-6)


def test_changed_identity_or_precision_is_a_miss(tmp_path: Path) -> None:
    paths = write_images(tmp_path, 3)
    root = tmp_path / "cache"
    tower = CountingTower()
    run_images(paths, FeatureCache(root, "tower@1"), tower)
    run_images(paths, FeatureCache(root, "tower@2"), tower)
    assert tower.items == 6  # new identity: everything recomputed
    run_images(paths, FeatureCache(root, "tower@1"), tower, precision="bf16")
    assert tower.items == 9  # bf16 features never masquerade as fp32 ones
    run_images(paths, FeatureCache(root, "tower@1"), tower, preprocess_id="resize=256")
    assert tower.items == 12
    run_images(paths, FeatureCache(root, "tower@1"), tower)
    assert tower.items == 12  # the original entries are still there
    assert len(list(root.iterdir())) == 2  # one directory per identity


def test_duplicates_are_embedded_once(tmp_path: Path) -> None:
    a, b = write_images(tmp_path, 2)
    copy = tmp_path / "copy_of_a.png"
    copy.write_bytes(a.read_bytes())  # same bytes under another name
    tower = CountingTower()
    cache = FeatureCache(tmp_path / "cache", "t")
    feats = run_images([a, b, a, copy, b], cache, tower)
    assert tower.items == 2
    assert cache.stats == CacheStats(hits=0, misses=2)
    assert (
        torch.equal(feats[0], feats[2])
        and torch.equal(feats[0], feats[3])
        and torch.equal(feats[1], feats[4])
    )
    assert not torch.equal(feats[0], feats[1])
    tower2 = CountingTower()
    run_images([a, a, a], None, tower2)  # de-duplicated without a cache too
    assert tower2.items == 1


def test_texts_cache_dedup_and_match_naive(tmp_path: Path) -> None:
    texts = ["red dress", "blue jeans", "red dress", "ripped denim", "é café"]
    tower = CountingTextTower()
    root = tmp_path / "cache"
    feats = embed_texts(texts, cache=FeatureCache(root, "t"), tokenize=tokenize, forward=tower, batch_size=2,
                        precision="fp32", progress=False)  # fmt: skip
    # 4 unique texts, batch 2 -> 2 forwards
    assert (tower.calls, tower.items) == (2, 4)
    naive = torch.stack([tower(**tokenize([t]))[0] for t in texts]).detach()  # one text per forward
    assert torch.allclose(feats, naive, atol=1e-6)
    again = embed_texts(texts + ["new"], cache=FeatureCache(root, "t"), tokenize=tokenize, forward=tower,
                        precision="fp32", progress=False)  # fmt: skip
    assert torch.equal(again[:5], feats)
    assert tower.items == 4 + 5 + 1  # naive pass 5, then only "new"


def test_bf16_returns_float32_close_to_fp32(tmp_path: Path) -> None:
    paths = write_images(tmp_path, 5)
    tower = CountingTower()
    fp32 = run_images(paths, None, tower, precision="fp32")
    bf16 = run_images(paths, FeatureCache(tmp_path / "c", "t"), tower, precision="bf16")
    assert bf16.dtype == torch.float32
    assert not torch.equal(bf16, fp32)  # really computed in bf16
    # bf16 keeps 8 mantissa bits (rel. error ~2**-8 = 0.004 per rounding); |features| <= ~1 here
    assert torch.allclose(bf16, fp32, atol=3e-2, rtol=2e-2)
    cached = run_images(paths, FeatureCache(tmp_path / "c", "t"), tower, precision="bf16")
    assert torch.equal(cached, bf16)


def test_resolve_precision_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_precision("fp32") == "fp32"
    assert resolve_precision("bf16") == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"
    assert resolve_precision("auto", "meta") == "fp32"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16")  # type: ignore[arg-type]


def test_dataloader_workers_give_same_features(tmp_path: Path) -> None:
    paths = write_images(tmp_path, 6)
    tower = CountingTower()
    in_process = run_images(paths, None, tower)
    with_workers = run_images(paths, None, tower, num_workers=2)
    assert torch.equal(in_process, with_workers)


def test_flushes_in_shards_during_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embed_mod, "_FLUSH_ROWS", 4)
    paths = write_images(tmp_path, 10)
    cache = FeatureCache(tmp_path / "c", "t")
    run_images(paths, cache, CountingTower())
    # batches of 4: flush after 4 and after 8 rows, then the last 2 at the end -> 3 shards
    assert len(list((cache.directory / "shards").glob("*.safetensors"))) == 3
    assert len(cache) == 10


def test_put_get_and_validation(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path, "t")
    cache.put_many({"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0, 4.0])})
    got = cache.get_many(["a", "zz", "a"])
    assert set(got) == {"a"} and torch.equal(got["a"], torch.tensor([1.0, 2.0]))
    assert cache.stats == CacheStats(hits=1, misses=1)
    assert "b" in cache and "zz" not in cache and len(cache) == 2
    cache.put_many({"a": torch.tensor([9.0, 9.0])})  # existing key: content-addressed, kept as is
    assert torch.equal(FeatureCache(tmp_path, "t").get_many(["a"])["a"], torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="key y has shape"):
        cache.put_many({"x": torch.zeros(2), "y": torch.zeros(3)})
    with pytest.raises(ValueError, match="key n has NaN"):
        cache.put_many({"n": torch.tensor([float("nan"), 0.0])})
    assert "x" not in FeatureCache(tmp_path, "t")  # a rejected batch writes nothing
    assert (cache.directory / "identity.txt").read_text() == "t"


def test_feature_key_golden() -> None:
    content = hashlib.sha256(b"red dress").hexdigest()
    expected = hashlib.sha256(
        "\0".join(["cliptune-features-v1", "id", "", "text", "fp32", content]).encode()
    ).hexdigest()
    assert feature_key("id", "text", content) == expected
    assert feature_key("id", "image", content) != expected


def test_missing_and_unreadable_images_are_named(tmp_path: Path) -> None:
    # the typed error of the image loader, naming the file: the CLI prints it as one sentence
    with pytest.raises(ImageLoadError, match="nope.png: file not found"):
        run_images([tmp_path / "nope.png"], None, CountingTower())
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"<html>not an image</html>")
    with pytest.raises(ImageLoadError, match="bad.png: cannot load image"):  # a plain PIL loader here
        run_images([bad], None, CountingTower())


_CHILD = textwrap.dedent(
    """
    import os, sys, torch
    from cliptune.models import cache as cache_mod
    root, mode = sys.argv[1], sys.argv[2]
    cache = cache_mod.FeatureCache(root, "tower@1")
    if mode == "write":
        cache.put_many({"k%d" % i: torch.full((4,), float(i)) for i in range(3)})
    else:  # crash: the temp file is written and fsync'ed, then the process dies before the rename
        os.replace = lambda *a, **k: os._exit(3)
        cache.put_many({"lost": torch.zeros(4)})
    """
)


def _child(root: Path, mode: str) -> int:
    return subprocess.run([sys.executable, "-c", _CHILD, str(root), mode], check=False).returncode


def test_entries_are_shared_across_processes(tmp_path: Path) -> None:
    mine = FeatureCache(tmp_path, "tower@1")  # opened before the other process writes
    assert mine.get_many(["k0"]) == {}
    assert _child(tmp_path, "write") == 0
    got = mine.get_many(["k0", "k1", "k2"])  # the miss triggers a rescan
    assert [got[f"k{i}"].tolist() for i in range(3)] == [[0.0] * 4, [1.0] * 4, [2.0] * 4]
    assert len(FeatureCache(tmp_path, "tower@1")) == 3


def test_crash_before_rename_leaves_cache_consistent(tmp_path: Path) -> None:
    assert _child(tmp_path, "write") == 0
    assert _child(tmp_path, "crash") == 3
    shards = FeatureCache(tmp_path, "tower@1").directory / "shards"
    leftovers = [p.name for p in shards.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    assert len(leftovers) == 1  # the abandoned temp file is really there ...
    (shards / "zz-truncated.safetensors").write_bytes(b"\x10\x00")  # ... and a damaged shard copied in
    with pytest.warns(UserWarning, match="ignoring unreadable shard .*zz-truncated"):
        cache = FeatureCache(tmp_path, "tower@1")
    assert len(cache) == 3 and "lost" not in cache  # ... yet the cache reads the 3 complete entries
    assert cache.get_many(["k2"])["k2"].tolist() == [2.0] * 4
    cache.put_many({"after": torch.ones(4)})  # and still accepts writes
    with pytest.warns(UserWarning, match="zz-truncated"):
        assert "after" in FeatureCache(tmp_path, "tower@1")
