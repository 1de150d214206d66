"""Bytes the catalogue-reading pass fetches from remote shards, with and without sidecar indexes (counted).

The shards live in fsspec's memory store and are read through the tests' ``countmem://`` filesystem, which
serves them in ranged requests with fsspec's default read-ahead (as object storage is read) and logs every
range; so the count is what an ``s3://`` pattern would download, without the network's noise:
    PYTHONPATH=src:. python benchmarks/bench_shard_index.py --shards 4 --samples 200 --image-bytes 50000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile

import fsspec
from fsspec.registry import known_implementations
from tests.test_shards_sidecar import FETCHED

from cliptune.data.shards import index_shards, read_shards


def _shard(first: int, samples: int, image_bytes: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(first, first + samples):
            key = f"{i:06d}"
            meta = json.dumps({"text": f"caption {key}", "group": key}).encode()
            for name, data in ((f"{key}.jpg", os.urandom(image_bytes)), (f"{key}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--samples", type=int, default=200, help="samples per shard")
    parser.add_argument("--image-bytes", type=int, default=50_000)
    args = parser.parse_args()
    known_implementations["countmem"] = {"class": "tests.test_shards_sidecar.CountingFS"}
    fs = fsspec.filesystem("memory")
    last = f"{args.shards - 1:05d}"
    total = 0
    for s in range(args.shards):
        data = _shard(s * args.samples, args.samples, args.image_bytes)
        total += len(data)
        for folder in ("plain", "indexed"):
            fs.pipe(f"/bench/{folder}/{s:05d}.tar", data)
    index_shards(f"memory://bench/indexed/{{00000..{last}}}.tar")
    print(f"{args.shards} shards x {args.samples} samples of {args.image_bytes:,} B: {total:,} B of shards")
    for folder in ("plain", "indexed"):
        FETCHED.clear()
        cat = read_shards(f"countmem://bench/{folder}/{{00000..{last}}}.tar")
        fetched = sum(end - start for _, start, end in FETCHED)
        from_tars = sum(end - start for path, start, end in FETCHED if path.endswith(".tar"))
        print(
            f"{'with sidecars' if folder == 'indexed' else 'without':14s} {len(cat.rows)} rows: "
            f"fetched {fetched:,} B in {len(FETCHED)} requests ({from_tars:,} B of them from the tars)"
        )
    fs.rm("/bench", recursive=True)


if __name__ == "__main__":
    main()
