"""Fast JPEG decode (``data.fast_decode``): where each image's CPU time goes, and how far its pixels move.

Two reports, both on real photos (skimage's astronaut, coffee, chelsea, rocket, immunohistochemistry):

- ``--stages``: per-image milliseconds of every step the embedding pipeline takes outside the forward, on
  the fast-decode path (read, sha256, DCT-draft decode, EXIF transpose, RGB, the embedded
  EfficientNet-Lite0's resize + crop to uint8, batch stack, normalise), one thread, median over files and
  repeats; the photos as ``bench_embed.py`` writes them (2048 x 1536, quality 85-94).
- ``--tolerance``: per stored size (1024 x 768, 2048 x 1536, 4032 x 3024; each photo at quality 85 and 92)
  and for the bench's own photos, the model view (bicubic short side -> 224, centre crop) of the full
  decode vs the fast decode: mean / max absolute difference on the 0-255 scale, min / median cosine of the
  pretrained EfficientNet-Lite0's features; for the fast decode (the DCT draft to >= 2x the input side)
  and for a candidate that was measured and *not* adopted: the draft, then a box reduction (Pillow's
  ``Image.reduce``, what ``resize(reducing_gap=...)`` does first) by the largest exact factor keeping the
  shorter side >= 1.5x the input side.
- ``--resize``: the embedded tower's resize + crop on torch's antialiased bicubic (``models/resize.py``,
  the recipe's now) against Pillow's ``Image.resize`` (the recipe's before), per decoded size (the
  fast decode's 1024 x 768, full decodes at 2048 x 1536 and 4032 x 3024): milliseconds per image on one
  thread (median over photos and repeats, the copy out of PIL included), max abs difference and share of
  differing values on the 0-255 scale, min / median cosine of the pretrained EfficientNet-Lite0's features.

Usage:
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/bench_decode.py --stages --tolerance --resize
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).parent))
from bench_embed import _images  # noqa: E402  (the bench's own photos, byte for byte)

from cliptune.data.images import _draft, load_image  # noqa: E402
from cliptune.models.backbone import normalise_uint8  # noqa: E402
from cliptune.models.composed import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    _EfficientNetLite0,
    _imagenet_geometry,
    _imagenet_uint8,
)

SIDE = 224
MIN_SIDE = 2 * SIDE  # what image_loader asks for (DRAFT_OVERSAMPLE x the input side)


def _photos() -> list[np.ndarray]:
    from skimage import data

    return [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry()]


def stages(n: int, repeats: int) -> None:
    torch.set_num_threads(1)
    ms: dict[str, list[float]] = {
        k: []
        for k in (
            "read file",
            "sha256",
            "open + draft decode",
            "EXIF transpose",
            "RGB convert",
            "resize + crop (recipe)",
            "stack batch",
            "normalise",
        )
    }
    with tempfile.TemporaryDirectory() as tmp:
        paths = _images(n, Path(tmp))
        for _ in range(repeats):
            rows = []
            for path in paths:
                t = [time.perf_counter()]
                data = path.read_bytes()
                t.append(time.perf_counter())
                hashlib.sha256(data).hexdigest()
                t.append(time.perf_counter())
                img = Image.open(path)
                _draft(img, MIN_SIDE)
                img.load()
                t.append(time.perf_counter())
                ImageOps.exif_transpose(img, in_place=True)  # as load_image does: no copy when upright
                upright = img
                t.append(time.perf_counter())
                rgb = upright if upright.mode == "RGB" else upright.convert("RGB")
                t.append(time.perf_counter())
                rows.append(_imagenet_uint8(rgb, SIDE))
                t.append(time.perf_counter())
                for key, a, b in zip(ms, t, t[1:], strict=False):
                    ms[key].append((b - a) * 1000)
            tic = time.perf_counter()
            batch = torch.from_numpy(np.stack(rows))
            toc = time.perf_counter()
            normalise_uint8(batch, IMAGENET_MEAN, IMAGENET_STD)
            ms["stack batch"].append((toc - tic) * 1000 / len(rows))
            ms["normalise"].append((time.perf_counter() - toc) * 1000 / len(rows))
    print(f"decoded at {img.size}")
    print("| stage | ms/img |\n| --- | ---: |")
    for key, values in ms.items():
        print(f"| {key} | {statistics.median(values):.2f} |")
    print(f"| **total** | **{sum(statistics.median(v) for v in ms.values()):.2f}** |")


def _draft_and_box(path: Path) -> Image.Image:
    """The candidate: the fast decode, then box-reduced by the largest exact k keeping the short side >= 1.5x."""
    image = load_image(path, min_side=MIN_SIDE)
    width, height = image.size
    for k in range(min(width, height) * 2 // (3 * SIDE), 1, -1):
        if width % k == 0 and height % k == 0:  # a partial last block would shift the picture
            return image.reduce(k)
    return image


def _compare(paths: list[Path], tower: _EfficientNetLite0) -> list[str]:
    def feats(views: list[np.ndarray]) -> torch.Tensor:
        with torch.inference_mode():
            return tower(normalise_uint8(torch.from_numpy(np.stack(views)), IMAGENET_MEAN, IMAGENET_STD))

    full = [_imagenet_uint8(load_image(p), SIDE) for p in paths]
    ref = feats(full)
    out = []
    fast_loaders: list[tuple[str, Callable[[Path], Image.Image]]] = [
        ("draft (data.fast_decode)", lambda p: load_image(p, min_side=MIN_SIDE)),
        ("draft + box >= 1.5x (not adopted)", _draft_and_box),
    ]
    for name, load in fast_loaders:
        views = [_imagenet_uint8(load(p), SIDE) for p in paths]
        diff = np.abs(np.stack(full).astype(np.int16) - np.stack(views).astype(np.int16))
        cos = torch.nn.functional.cosine_similarity(ref, feats(views), dim=1)
        tic = time.perf_counter()
        for p in paths:
            _imagenet_uint8(load(p), SIDE)
        per = (time.perf_counter() - tic) * 1000 / len(paths)
        size = load(paths[0]).size
        out.append(
            f"{name} | {size[0]} x {size[1]} | {diff.mean():.2f} | {diff.max()} | {cos.min():.5f} | "
            f"{cos.median():.5f} | {per:.1f}"
        )
    tic = time.perf_counter()
    for p in paths:
        _imagenet_uint8(load_image(p), SIDE)
    out.append(f"full decode | | | | | | {(time.perf_counter() - tic) * 1000 / len(paths):.1f}")
    return out


def tolerance() -> None:
    torch.set_num_threads(1)
    tower = _EfficientNetLite0().eval()
    photos = _photos()
    print(
        "| stored size | fast decode | reaches the resize at | mean abs diff | max abs diff | min cosine |"
        " median cosine | decode + resize ms/img |"
    )
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for size in ((1024, 768), (2048, 1536), (4032, 3024)):
            paths = []
            for i, photo in enumerate(photos):
                image = Image.fromarray(photo).convert("RGB").resize(size, Image.Resampling.BICUBIC)
                for quality in (85, 92):
                    path = folder / f"{size[0]}-{i}-{quality}.jpg"
                    image.save(path, quality=quality)
                    paths.append(path)
            for line in _compare(paths, tower):
                print(f"| {size[0]} x {size[1]} | {line} |")
        (folder / "bench").mkdir()
        own = _images(10, folder / "bench")
        for line in _compare(own, tower):
            print(f"| bench's photos (2048 x 1536, q 85-94) | {line} |")
        from skimage import data

        stars = Image.fromarray(data.hubble_deep_field()).convert("RGB").resize((2048, 1536))
        stars.save(folder / "stars.jpg", quality=90)
        for line in _compare([folder / "stars.jpg"], tower):
            print(f"| star field (hubble_deep_field, 2048 x 1536) | {line} |")


def _pillow_view(image: Image.Image) -> np.ndarray:
    """The recipe as it was before ``models/resize.py``: the same geometry, Pillow's bicubic resize."""
    (new_w, new_h), (left, top) = _imagenet_geometry(image.size, SIDE)
    resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    return np.asarray(resized.crop((left, top, left + SIDE, top + SIDE)), dtype=np.uint8)


def resize(repeats: int) -> None:
    torch.set_num_threads(1)
    tower = _EfficientNetLite0().eval()
    photos = [Image.fromarray(p).convert("RGB") for p in _photos()]
    print(
        "| decoded size | Pillow ms/img | torch ms/img | speed-up | max abs diff | differing values |"
        " min cosine | median cosine |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for size in ((1024, 768), (2048, 1536), (4032, 3024)):
        images = [p.resize(size, Image.Resampling.LANCZOS) for p in photos]
        timings: dict[str, list[float]] = {"pillow": [], "torch": []}
        views: dict[str, list[np.ndarray]] = {}
        for _ in range(repeats):
            for name, view in (("pillow", _pillow_view), ("torch", partial(_imagenet_uint8, size=SIDE))):
                views[name] = []
                for image in images:
                    tic = time.perf_counter()
                    views[name].append(view(image))
                    timings[name].append((time.perf_counter() - tic) * 1000)
        old, new = np.stack(views["pillow"]), np.stack(views["torch"])
        diff = np.abs(old.astype(np.int16) - new.astype(np.int16))
        with torch.inference_mode():
            feats = [
                tower(normalise_uint8(torch.from_numpy(v), IMAGENET_MEAN, IMAGENET_STD)) for v in (old, new)
            ]
        cos = torch.nn.functional.cosine_similarity(*feats, dim=1)
        pil_ms, torch_ms = statistics.median(timings["pillow"]), statistics.median(timings["torch"])
        print(
            f"| {size[0]} x {size[1]} | {pil_ms:.2f} | {torch_ms:.2f} | {pil_ms / torch_ms:.1f}x | {diff.max()} |"
            f" {(diff > 0).mean():.2%} | {cos.min():.6f} | {cos.median():.6f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--stages", action="store_true")
    parser.add_argument("--tolerance", action="store_true")
    parser.add_argument("--resize", action="store_true")
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.stages:
        stages(args.n, args.repeats)
    if args.tolerance:
        tolerance()
    if args.resize:
        resize(args.repeats)


if __name__ == "__main__":
    main()
