"""FAISS IndexFlatIP alone, in a fresh process, on bench_retrieval.py's data (same seed and sizes).

Why: inside bench_retrieval.py FAISS runs after torch's GEMMs in one process, and on the 2-core dev box its
time there swung from 12.6 s to 32.6 s at 1M x 1k while it took 8.0 s alone (docs/benchmarks.md): the
threads of torch's and FAISS's runtimes get in each other's way. The verdict "top-k <= 1.0x FAISS" is
taken against the faster of the two, this one.

Usage:
    python benchmarks/bench_faiss_alone.py --n 1000000 --q 1000 --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import faiss
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="number of items")
    parser.add_argument("--q", type=int, default=1000, help="number of queries")
    parser.add_argument("--d", type=int, default=512, help="embedding dimension")
    parser.add_argument("--k", type=int, default=10, help="list length")
    parser.add_argument("--threads", type=int, default=2, help="torch and FAISS threads")
    parser.add_argument("--repeats", type=int, default=3, help="runs (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)  # drawn exactly as bench_retrieval.py draws them
    items = torch.nn.functional.normalize(torch.randn(args.n, args.d, generator=gen), dim=1)  # (N, D)
    queries = torch.nn.functional.normalize(torch.randn(args.q, args.d, generator=gen), dim=1)  # (Q, D)
    seconds = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        index = faiss.IndexFlatIP(args.d)  # incl. the build, as bench_retrieval.py times it
        index.add(items.numpy())
        index.search(queries.numpy(), args.k)
        seconds.append(time.perf_counter() - t0)
    print(f"N={args.n:,} Q={args.q:,} D={args.d} k={args.k}, {args.threads} threads")
    print(
        f"FAISS IndexFlatIP alone: {', '.join(f'{s:.3f}' for s in seconds)} s; median {statistics.median(seconds):.3f} s"
    )


if __name__ == "__main__":
    main()
