"""Random shard-member reads per second: folder files vs local shards vs the same shards at a memory:// URL.

Run against two source trees to compare them (the library is imported from PYTHONPATH):
    PYTHONPATH=src python benchmarks/bench_shard_reads.py --images 600 --shard-size 200 --reads 3000
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import fsspec

from cliptune.data.catalogue import read_catalogue
from cliptune.data.images import read_image_bytes
from cliptune.data.shards import expand_pattern, write_shards
from cliptune.data.synthetic import render_fashion


def _rate(paths: list[Path], reads: int, seed: int) -> float:
    order = random.Random(seed).choices(paths, k=reads)
    start = time.perf_counter()
    for path in order:
        read_image_bytes(path)
    return reads / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--shard-size", type=int, default=200)
    parser.add_argument("--reads", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = read_catalogue(render_fashion(root / "fashion", n=args.images, seed=0, size=128))
        pattern = write_shards(folder, root / "shards", shard_size=args.shard_size)
        fs = fsspec.filesystem("memory")
        for shard in expand_pattern(pattern):
            fs.pipe(f"/bench/{Path(shard).name}", Path(shard).read_bytes())
        remote = "memory://bench/" + Path(pattern).name
        sources = {"folder": folder, "local shards": read_catalogue(Path(pattern))}
        sources["memory:// shards"] = read_catalogue(Path(remote))
        for name, cat in sources.items():
            paths = [cat.image_path(str(f)) for f in cat.rows["file_name"]]
            rates = sorted(_rate(paths, args.reads, seed) for seed in range(args.repeats))
            print(f"{name:18s} {rates[len(rates) // 2]:9,.0f} reads/s (median of {args.repeats})")
        fs.rm("/bench", recursive=True)


if __name__ == "__main__":
    main()
