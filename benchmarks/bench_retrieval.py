"""Time exact top-k retrieval: chunked torch, FAISS IndexFlatIP and plain torch matmul + topk.

Random unit vectors (float32) stand in for embeddings; every backend ranks the same data and the
table reports the median of ``--repeats`` runs and whether the top-k indices agree with plain torch.

Usage:
    python benchmarks/bench_retrieval.py --n 100000 --q 1000 --d 512 --k 10
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from cliptune.retrieval import topk_chunked, topk_faiss


def _plain_topk(queries: torch.Tensor, items: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.topk(queries @ items.T, k, dim=1)  # (Q, N) scores held at once


def _gemm_only(queries: torch.Tensor, items: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    for n0 in range(0, items.shape[0], chunk):
        _ = queries @ items[n0 : n0 + chunk].T  # (Q, n)
    return torch.empty(0), torch.empty(0)


def _median_time(
    fn: Callable[[], tuple[torch.Tensor, torch.Tensor]], repeats: int
) -> tuple[float, torch.Tensor]:
    times, idx = [], torch.empty(0)
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, idx = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), idx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="number of items")
    parser.add_argument("--q", type=int, default=1_000, help="number of queries")
    parser.add_argument("--d", type=int, default=512, help="embedding dimension")
    parser.add_argument("--k", type=int, default=10, help="list length")
    parser.add_argument("--repeats", type=int, default=3, help="runs per backend (median reported)")
    parser.add_argument("--chunk-size", type=int, default=16384, help="items per block for topk_chunked")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(args.seed)
    items = torch.nn.functional.normalize(torch.randn(args.n, args.d, generator=gen), dim=1)  # (N, D)
    queries = torch.nn.functional.normalize(torch.randn(args.q, args.d, generator=gen), dim=1)  # (Q, D)
    backends: dict[str, Callable[[], tuple[torch.Tensor, torch.Tensor]]] = {
        # the floor: the GEMM alone, blocked like topk_chunked, no top-k (its "indices" are not compared)
        "GEMM only (floor)": lambda: _gemm_only(queries, items, args.chunk_size),
        "torch matmul+topk": lambda: _plain_topk(queries, items, args.k),
        "topk_chunked": lambda: topk_chunked(queries, items, args.k, chunk_size=args.chunk_size),
        "faiss IndexFlatIP": lambda: topk_faiss(queries, items, args.k),
    }
    print(f"N={args.n:,} Q={args.q:,} D={args.d} k={args.k} float32, threads={torch.get_num_threads()}")
    print(f"{'backend':<20} {'median s':>9} {'queries/s':>10} {'same indices':>13}")
    reference = None
    for name, fn in backends.items():
        seconds, idx = _median_time(fn, args.repeats)
        if idx.numel() == 0:
            print(f"{name:<20} {seconds:>9.3f} {args.q / seconds:>10.0f} {'-':>13}")
            continue
        reference = idx if reference is None else reference  # plain torch is the reference
        same = float((idx == reference).all(1).float().mean())
        print(f"{name:<20} {seconds:>9.3f} {args.q / seconds:>10.0f} {same:>13.1%}")


if __name__ == "__main__":
    main()
