"""Embedding throughput of the embedded image tower: the full pipeline vs the bare tower forward.

The pipeline (``cliptune.models.embed.embed_images``: read PNGs, decode, resize, normalise, batch,
forward, no cache) should reach >= 0.8x the bare forward's images/s at the same precision, i.e.
preprocessing and loading are not the bottleneck. Also bf16 vs fp32 speed and the largest difference
between their features.

Usage:
    python benchmarks/bench_embed.py --n 512 --batch 64 --workers 2 --device cpu
    python benchmarks/bench_embed.py --n 4096 --batch 256 --workers 12 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cliptune.data.images import load_image
from cliptune.data.synthetic import render_fashion
from cliptune.models.composed import _EfficientNetLite0
from cliptune.models.embed import embed_images


def _time(fn, repeats: int) -> list[float]:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    tower = _EfficientNetLite0().eval().to(device)
    with tempfile.TemporaryDirectory() as tmp:
        cat = render_fashion(Path(tmp) / "f", n=args.n, seed=0)
        paths = sorted((cat / "images").glob("*.png"))[: args.n]
        pixels = tower.preprocess([load_image(p) for p in paths[: args.batch]]).to(device)
        rows = []
        feats = {}
        for precision in ("fp32", "bf16"):
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32

            def bare(precision: str = precision, dtype: torch.dtype = dtype) -> None:
                with (
                    torch.inference_mode(),
                    torch.autocast(device.type, dtype=dtype, enabled=precision == "bf16"),
                ):
                    for _ in range(0, len(paths), args.batch):
                        tower(pixels)

            def pipeline(precision: str = precision) -> None:
                feats[precision] = embed_images(
                    paths, cache=None, load=load_image, preprocess=tower.preprocess, forward=tower,
                    batch_size=args.batch, precision=precision, num_workers=args.workers, device=device,
                    progress=False,
                )  # fmt: skip

            bare()  # warm-up
            b = statistics.median(_time(bare, args.repeats))
            p = statistics.median(_time(pipeline, args.repeats))
            rows.append((precision, len(paths) / b, len(paths) / p, b / p))
        print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), n={len(paths)}, "
              f"batch={args.batch}, workers={args.workers}, median of {args.repeats}")  # fmt: skip
        print("precision | bare img/s | pipeline img/s | pipeline/bare")
        for precision, bare_rate, pipe_rate, ratio in rows:
            print(f"{precision:9} | {bare_rate:10.1f} | {pipe_rate:14.1f} | {ratio:.2f}")
        diff = (feats["fp32"] - feats["bf16"]).abs().max().item()
        cos = torch.nn.functional.cosine_similarity(feats["fp32"], feats["bf16"]).min().item()
        print(f"bf16 vs fp32 features: max abs diff {diff:.4f}, min cosine {cos:.5f}")


if __name__ == "__main__":
    main()
