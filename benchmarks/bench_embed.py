"""Embedding throughput: the full pipeline vs the bare tower forward, at the same precision.

The pipeline (``cliptune.models.embed.embed_images``: hash and read the files, decode, resize, normalise,
batch, forward, no cache) should reach >= 0.8x the bare forward's images/s, i.e. preprocessing and loading
are not the bottleneck. Rows, side by side in one run so a shared machine's load hits them alike:

- ``bare``: the tower on already-preprocessed pixels;
- ``full decode``: the pipeline decoding every image at full size (cliptune before the fast path);
- ``fast decode``: the pipeline with ``embed.image_loader`` (JPEGs decoded at a reduced DCT scale, >= 2x
  the model's input side), for each ``--workers`` value.

Towers: ``efficientnet`` (the embedded EfficientNet-Lite0) or ``vit-b16`` (a CLIP ViT-B/16 vision tower,
random weights from ``CLIPVisionConfig(patch_size=16)``, with CLIP's image processor). Images: ``png``
(the synthetic 160 px catalogue) or ``jpeg`` (real photos from skimage, resized to 2048 x 1536 and saved
as JPEG: what a product catalogue holds). Also the bf16-vs-fp32 feature difference when both run.

Usage:
    python benchmarks/bench_embed.py --threads 2 --tower efficientnet --images jpeg --n 64 --workers 0,1,2
    python benchmarks/bench_embed.py --threads 2 --tower vit-b16 --images jpeg --n 32 --batch 16
    python benchmarks/bench_embed.py --n 4096 --batch 256 --workers 12 --device cuda --precisions fp32,bf16
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from cliptune.data.images import load_image
from cliptune.data.synthetic import render_fashion
from cliptune.models.embed import embed_images, image_loader

Preprocess = Callable[[list[Image.Image]], Tensor]


def _time(fn: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        tic = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tic)
    return times


def _tower(name: str) -> tuple[nn.Module, Preprocess]:
    if name == "efficientnet":
        from cliptune.models.composed import _EfficientNetLite0

        eff = _EfficientNetLite0()
        return eff, eff.preprocess
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from cliptune.models.composed import _HFVisionTower

    torch.manual_seed(0)
    vit = _HFVisionTower(CLIPVisionModel(CLIPVisionConfig(patch_size=16)), CLIPImageProcessor())
    return vit, vit.preprocess


def _images(kind: str, n: int, folder: Path) -> list[Path]:
    if kind == "png":
        cat = render_fashion(folder / "f", n=n, seed=0)
        return sorted((cat / "images").glob("*.png"))[:n]
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry()]
    paths = []
    for i in range(n):  # distinct files (the pipeline embeds identical bytes once)
        path = folder / f"{i:05d}.jpg"
        image = (
            Image.fromarray(photos[i % len(photos)])
            .convert("RGB")
            .resize((2048, 1536), Image.Resampling.BICUBIC)
        )
        image.save(path, quality=85 + i % 10, comment=f"copy {i}")  # distinct bytes, same pixels
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--tower", choices=("efficientnet", "vit-b16"), default="efficientnet")
    parser.add_argument("--images", choices=("png", "jpeg"), default="jpeg")
    parser.add_argument("--precisions", default="fp32", help="comma-separated: fp32,bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tower, preprocess = _tower(args.tower)
    tower = tower.eval().to(device)
    workers = [int(w) for w in args.workers.split(",")]
    fast_load, fast_id = image_loader(preprocess)
    with tempfile.TemporaryDirectory() as tmp:
        paths = _images(args.images, args.n, Path(tmp))
        pixels = preprocess([load_image(p) for p in paths[: args.batch]]).to(device)
        rows: list[tuple[str, str, float]] = []
        feats: dict[str, Tensor] = {}
        for precision in args.precisions.split(","):
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32

            def bare(precision: str = precision, dtype: torch.dtype = dtype) -> None:
                with (
                    torch.inference_mode(),
                    torch.autocast(device.type, dtype=dtype, enabled=precision == "bf16"),
                ):
                    for start in range(0, len(paths), args.batch):
                        tower(pixels[: min(args.batch, len(paths) - start)])

            def pipeline(
                load: Callable[[Path], Image.Image], n_workers: int, key: str, precision: str
            ) -> None:
                feats[key] = embed_images(
                    paths,
                    cache=None,
                    load=load,
                    preprocess=preprocess,
                    forward=tower,
                    batch_size=args.batch,
                    precision=precision,
                    num_workers=n_workers,
                    device=device,
                    progress=False,
                )

            bare()  # warm-up
            runs: dict[str, Callable[[], None]] = {"bare": bare}
            for w in workers:
                runs[f"full decode, {w} workers"] = partial(
                    pipeline, load_image, w, f"{precision} full", precision
                )
                runs[f"fast decode, {w} workers"] = partial(
                    pipeline, fast_load, w, f"{precision} fast", precision
                )
            times: dict[str, list[float]] = {name: [] for name in runs}
            for _ in range(args.repeats):  # interleaved: a load spike on the shared machine hits every row
                for name, fn in runs.items():
                    times[name] += _time(fn, 1)
            for name in runs:
                rows.append((precision, name, len(paths) / statistics.median(times[name])))
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        where = (
            torch.cuda.get_device_name()
            if device.type == "cuda"
            else f"cpu, {torch.get_num_threads()} threads"
        )
        print(
            f"tower {args.tower}, images {args.images}, device {device} ({where}), n={len(paths)}, "
            f"batch={args.batch}, median of {args.repeats} (interleaved), load average {load:.1f}, "
            f"fast decode key {fast_id!r}"
        )
        print("precision | run | img/s | pipeline/bare")
        for precision, name, rate in rows:
            bare_rate = next(r for p, n, r in rows if p == precision and n == "bare")
            print(f"{precision:9} | {name:22} | {rate:7.2f} | {rate / bare_rate:.2f}")
        for precision in args.precisions.split(","):
            cos = nn.functional.cosine_similarity(feats[f"{precision} full"], feats[f"{precision} fast"])
            print(f"{precision}: fast vs full decode features: min cosine {cos.min().item():.5f}")
        if "fp32 full" in feats and "bf16 full" in feats:
            diff = (feats["fp32 full"] - feats["bf16 full"]).abs().max().item()
            cos = nn.functional.cosine_similarity(feats["fp32 full"], feats["bf16 full"]).min().item()
            print(f"bf16 vs fp32 features: max abs diff {diff:.4f}, min cosine {cos:.5f}")


if __name__ == "__main__":
    main()
