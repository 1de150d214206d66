"""Cost of K augmented views through the feature cache: plain features, K views cold, K views warm.

Usage:
    python benchmarks/bench_augment_views.py WORKDIR [--views 4] [--n 160]

Renders the synthetic fashion catalogue into WORKDIR (once) and uses a fresh feature cache per call, with
the embedded backbone in fp32: the plain features, then ``--views`` augmented views of every image and
caption (crop, flip, blur, rotation; templates, synonyms) computed, then the same views again (all read
from the cache, as every training epoch after the first and every later run would).
"""

from __future__ import annotations

import argparse
import time
import uuid
from pathlib import Path

import pandas as pd

from cliptune.config import AugmentConfig, ImageAugmentConfig, TextAugmentConfig
from cliptune.data.augment import keep_words
from cliptune.data.synthetic import render_fashion
from cliptune.models.embed import augmented_tower_features, tower_features
from cliptune.models.factory import load_backbone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--n", type=int, default=160)
    args = parser.parse_args()
    catalogue = args.workdir / f"fashion-{args.n}"
    if not catalogue.exists():
        render_fashion(catalogue, n=args.n, seed=0)
    rows = pd.read_csv(catalogue / "metadata.csv")
    paths = [catalogue / f for f in rows["file_name"]]
    texts = rows["text"].astype(str).tolist()
    keep = [keep_words(r, ["garment", "colour", "pattern", "rips", "style"]) for r in rows.to_dict("records")]
    backbone = load_backbone("embedded")
    augment = AugmentConfig(
        views=args.views,
        image=ImageAugmentConfig(crop=0.2, flip=True, blur=1.0, rotate=5),
        text=TextAugmentConfig(templates=True, synonyms=True),
    )
    cache = args.workdir / f"cache-{uuid.uuid4().hex[:8]}"
    start = time.perf_counter()
    tower_features(backbone, paths, texts, cache_dir=cache, precision="fp32", progress=False)
    plain = time.perf_counter() - start
    timings = []
    for _ in range(2):  # cold (computed), then warm (read from the cache)
        start = time.perf_counter()
        augmented_tower_features(
            backbone, paths, texts, keep, augment, cache_dir=cache, precision="fp32", progress=False
        )
        timings.append(time.perf_counter() - start)
    cold, warm = timings
    print(
        f"rows={len(rows)} plain features (cold)={plain:.1f}s  {args.views} views cold={cold:.1f}s  "
        f"{args.views} views warm (cache)={warm:.2f}s"
    )


if __name__ == "__main__":
    main()
