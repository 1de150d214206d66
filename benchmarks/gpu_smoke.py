"""Check the CUDA paths on a GPU machine: AMP training (precision auto -> bf16), raw-pixel training of
unfrozen blocks, the Siamese task, and exact resume on GPU.

Usage (on a machine with a GPU, from the repository root):
    PYTHONPATH=src:. python benchmarks/gpu_smoke.py --out /tmp/gpu-smoke
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tests.tiny_models import make_tiny_clip

from cliptune.config import load_config
from cliptune.data.synthetic import render_art, render_fashion
from cliptune.train.run import train


def _epochs(run: Path) -> list[dict]:
    return [
        r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "epoch"
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("/tmp/gpu-smoke"))
    args = parser.parse_args()
    out = args.out
    print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name())
    fashion = render_fashion(out / "fashion", n=400, seed=0)
    art = render_art(out / "art", n=40, seed=0)
    clip = make_tiny_clip(out / "clip")
    common = [f"model.cache_dir={out / 'cache'}", "train.early_stopping=null", "train.precision=auto"]
    runs = {
        "clip-layers1-raw": [f"data.catalogue={fashion}", f"model.backbone={clip}", "model.trainable_layers=1",
                             "train.epochs=3", "train.batch_size=32", "train.lr=1e-3"],
        "clip-frozen": [f"data.catalogue={fashion}", f"model.backbone={clip}", "train.epochs=3",
                        "train.batch_size=32", "train.lr=1e-3"],
        "siamese": [f"data.catalogue={art}", f"model.backbone={clip}", "train.task=siamese", "loss.name=triplet",
                    "model.head.width=64", "model.head.heads=4", "train.epochs=3", "train.batch_size=16",
                    "data.split.ratios={train: 0.7, val: 0.3}"],
    }  # fmt: skip
    for name, overrides in runs.items():
        cfg = load_config(None, [*common, *overrides, f"name={name}"])
        tic = time.perf_counter()
        run = train(cfg, runs_root=out / "runs", quiet=True)
        summary = json.loads((run / "summary.json").read_text())
        epochs = _epochs(run)
        finite = all(
            isinstance(v, (int, float)) and v == v
            for e in epochs
            for v in e.values()
            if not isinstance(v, str)
        )
        print(
            f"{name}: {time.perf_counter() - tic:.1f}s mixed_precision={summary['mixed_precision']} "
            f"epochs={summary['epochs_trained']} train/loss {epochs[1].get('train/loss'):.4f} -> "
            f"{epochs[-1].get('train/loss'):.4f} all finite={finite}"
        )


if __name__ == "__main__":
    main()
