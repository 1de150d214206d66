"""Time the near-duplicate audit's pair searches at scale, to project ``cliptune data audit`` to 100k images.

Both searches compare every image with every other (exact, no index approximation), so they grow with
N squared; this times them on random codes (random 256-bit pHashes, random unit vectors standing in for
embeddings) at the sizes given and prints seconds per size. Decoding and hashing, and the embedding
forward, grow linearly and are timed by the real command on a real catalogue (docs/benchmarks.md).

Usage:
    python benchmarks/bench_audit.py --sizes 10000 20000 --d 256
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cliptune.data.audit import HASH_BITS, ImageHashes, hash_pairs
from cliptune.search.duplicates import DEFAULT_COSINE, embedding_pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 20_000])
    parser.add_argument("--d", type=int, default=256, help="Embedding dimension.")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for n in args.sizes:
        codes = rng.integers(0, 256, size=(n, HASH_BITS // 8), dtype=np.uint8)
        mirror = rng.integers(0, 256, size=(n, HASH_BITS // 8), dtype=np.uint8)
        hashes = ImageHashes([str(i) for i in range(n)], [str(i) for i in range(n)], codes, mirror, [])
        t = time.perf_counter()
        n_hash = len(hash_pairs(hashes))
        t_hash = time.perf_counter() - t
        vectors = torch.nn.functional.normalize(
            torch.from_numpy(rng.standard_normal((n, args.d), dtype=np.float32)), dim=-1
        )
        t = time.perf_counter()
        n_emb = len(embedding_pairs(vectors, DEFAULT_COSINE))
        t_emb = time.perf_counter() - t
        print(
            f"n={n}: pHash range search {t_hash:.2f} s ({n_hash} pairs), cosine range search {t_emb:.2f} s ({n_emb} pairs)"
        )


if __name__ == "__main__":
    main()
