"""Embedding throughput: the full pipeline vs the bare tower forward, at the same precision, per tower.

The pipeline (``cliptune.models.embed.embed_images``: hash and read the files, decode, resize, batch,
forward; no feature cache) should reach >= 0.8x the bare forward's images/s. Rows, side by side and
interleaved per repeat so a shared machine's load hits them alike:

- ``bare``: the tower on already-preprocessed float pixels;
- ``full decode, float``: full JPEG decode, the float preprocess in the loader (cliptune before issue 17);
- ``full decode, uint8``: full decode, uint8 batches normalised on the forward's device (the default now,
  for backbones with a ``PixelRecipe``);
- ``fast decode, uint8``: ``data.fast_decode`` (JPEGs decoded at a reduced DCT scale, >= 2x the input side);
- ``pixel cache, cold``: ``data.pixel_cache`` on an empty cache (decode, write, read back);
- ``pixel cache, warm``: ``data.pixel_cache`` with every image cached (no decoding).

On the CPU a last column gives each pipeline row's milliseconds per image *outside* the forward (the
pipeline's time minus the time spent inside the tower's calls, median over repeats): what the pipeline adds
to the tower, measured within one run, so it does not move with the tower's own speed, which on a shared
2-core machine swings by 20% between runs. On a GPU the forward is asynchronous: the column is left out.

Towers: ``efficientnet`` (the embedded EfficientNet-Lite0, pretrained) and ``vit-b16`` (open_clip's
``ViT-B-16`` CLIP config, random weights, its own preprocess: short side -> 224 bicubic, centre crop).
Images: real photos from skimage resized to ``--size`` (default 2048 x 1536, a 3-megapixel photo; 1024 x 768
is a typical catalogue image, which the fast decode cannot reduce) and saved as JPEG (distinct bytes per file).

Usage:
    python benchmarks/bench_embed.py --threads 2 --towers efficientnet,vit-b16 --repeats 3
    python benchmarks/bench_embed.py --threads 2 --towers efficientnet --size 1024x768
    python benchmarks/bench_embed.py --device cuda --n 2048 --batch 256 --precision bf16  # workers: auto
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from cliptune.data.images import load_image
from cliptune.models.backbone import PixelRecipe
from cliptune.models.embed import decode_workers, embed_images, image_loader


def _tower(
    name: str,
) -> tuple[Callable[[Tensor], Tensor], Callable[[list[Image.Image]], Tensor], PixelRecipe]:
    """(forward, float preprocess, uint8 recipe) of a tower."""
    if name == "efficientnet":
        from cliptune.models.composed import _EfficientNetLite0

        eff = _EfficientNetLite0().eval()
        return eff, eff.preprocess, eff.pixel_recipe()
    from cliptune.models.openclip import OpenClipBackbone, import_open_clip

    open_clip = import_open_clip()  # with cliptune's torchvision stand-in where torchvision is absent

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None)
    preprocess_cfg = dict(model.visual.preprocess_cfg)
    preprocess_cfg["size"] = [224, 224]
    preprocess_cfg["mean"], preprocess_cfg["std"] = list(preprocess_cfg["mean"]), list(preprocess_cfg["std"])
    backbone = OpenClipBackbone(
        model.float(),
        open_clip.get_tokenizer("ViT-B-16"),
        open_clip.get_model_config("ViT-B-16"),
        preprocess_cfg,
    ).eval()
    return backbone.image_features, backbone.preprocess, backbone.pixel_recipe()


def _images(n: int, folder: Path, size: tuple[int, int] = (2048, 1536)) -> list[Path]:
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry()]
    paths = []
    for i in range(n):  # distinct files (the pipeline embeds identical bytes once)
        path = folder / f"{i:05d}.jpg"
        image = Image.fromarray(photos[i % len(photos)]).convert("RGB").resize(size, Image.Resampling.BICUBIC)
        image.save(path, quality=85 + i % 10, comment=f"copy {i}")
        paths.append(path)
    return paths


def _timed(fn: Callable[[], Any]) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    tic = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - tic


def bench_tower(
    name: str, paths: list[Path], args: argparse.Namespace, tmp: Path
) -> list[tuple[str, float, float | None]]:
    """Rows of (run, images/s, ms per image outside the forward or None)."""
    device = torch.device(args.device)
    tower, preprocess, recipe = _tower(name)
    if isinstance(tower, torch.nn.Module):
        tower = tower.to(device)
    else:
        tower.__self__.to(device)  # type: ignore[attr-defined]  # a bound method of the backbone
    inside: list[float] = []  # seconds inside the tower's calls, this run

    def forward(x: Tensor) -> Tensor:
        tic = time.perf_counter()
        out = tower(x)
        inside.append(time.perf_counter() - tic)
        return out

    fast_load, fast_id = image_loader(preprocess, fast_decode=True)
    pixels = preprocess([load_image(p) for p in paths[: args.batch]]).to(device)
    bf16 = args.precision == "bf16"
    warm_root = tmp / f"warm-{name}"

    def bare() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            for start in range(0, len(paths), args.batch):
                tower(pixels[: min(args.batch, len(paths) - start)])

    def pipeline(load: Callable[[Path], Image.Image], load_id: str, **kw: Any) -> None:
        embed_images(
            paths,
            cache=None,
            load=load,
            preprocess=preprocess,
            forward=forward,
            batch_size=args.batch,
            precision=args.precision,
            num_workers=args.workers,
            device=device,
            preprocess_id=load_id,
            progress=False,
            **kw,
        )

    runs: dict[str, Callable[[], None]] = {
        "bare": bare,
        "full decode, float": lambda: pipeline(load_image, ""),
        "full decode, uint8": lambda: pipeline(load_image, "", recipe=recipe),
        "fast decode, uint8": lambda: pipeline(fast_load, fast_id, recipe=recipe),
        "pixel cache, cold": lambda: pipeline(
            load_image, "", recipe=recipe, pixel_cache_dir=tmp / f"cold-{uuid.uuid4().hex}"
        ),
        "pixel cache, warm": lambda: pipeline(load_image, "", recipe=recipe, pixel_cache_dir=warm_root),
    }
    bare()  # warm-up
    pipeline(load_image, "", recipe=recipe, pixel_cache_dir=warm_root)  # fills the warm cache
    times: dict[str, list[float]] = {row: [] for row in runs}
    outside: dict[str, list[float]] = {row: [] for row in runs}
    for _ in range(args.repeats):  # interleaved: a load spike on the shared machine hits every row
        for row, fn in runs.items():
            inside.clear()
            times[row].append(_timed(fn))
            outside[row].append((times[row][-1] - sum(inside)) / len(paths) * 1000)
    on_cpu = device.type == "cpu"
    return [
        (row, len(paths) / statistics.median(times[row]), statistics.median(outside[row]) if on_cpu else None)
        for row in runs
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--towers", default="efficientnet,vit-b16")
    parser.add_argument("--n", type=int, default=16, help="images per tower")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--workers",
        type=lambda v: v if v == "auto" else int(v),
        default="auto",
        help="DataLoader workers, or 'auto' (data.num_workers' default: 0 on CPU, up to 8 on a GPU)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", default="2048x1536", help="the JPEGs' width x height")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    width, height = (int(side) for side in args.size.split("x"))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or 'cpu'}"
    load_before = os.getloadavg()[0]
    print(
        f"device {device} ({where}), torch threads {torch.get_num_threads()}, {os.cpu_count()} cpus, "
        f"n={args.n} JPEGs {width}x{height}, batch {args.batch}, workers {args.workers} "
        f"(= {decode_workers(args.workers, device, items=args.n, batch_size=args.batch)}), {args.precision}, "
        f"median of {args.repeats} interleaved, load average at start {load_before:.1f}",
        flush=True,
    )
    print("tower | run | img/s | pipeline/bare | >= 0.8x | ms/img outside the forward", flush=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        paths = _images(args.n, tmp, (width, height))
        for name in args.towers.split(","):
            rows = bench_tower(name, paths, args, tmp)
            bare_rate = rows[0][1]
            for row, rate, out_ms in rows:
                ratio = rate / bare_rate
                verdict = "" if row == "bare" else ("met" if ratio >= 0.8 else "NOT met")
                extra = "" if out_ms is None or row == "bare" else f"{out_ms:6.2f}"
                print(
                    f"{name:12} | {row:20} | {rate:8.2f} | {ratio:5.2f} | {verdict:7} | {extra}", flush=True
                )
            print(f"load average after {name}: {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
