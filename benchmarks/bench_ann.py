"""ANN index kinds side by side: build time, memory, single-query latency and recall@10 per kind.

N x D vectors from a mixture of gaussians (``--clusters`` centres, unit-normalised after noise), so nearest
neighbours have structure an ANN index can exploit (uniform random vectors in 256-d have none). With
``--intrinsic-dim r`` the noise lives in a random r-dimensional subspace (real embeddings have a low
intrinsic dimension); the default, isotropic noise in all D dimensions, makes the neighbours within a
cluster near-random: the hardest case. Queries are
held out: drawn from the same mixture, not in the index. Per kind (flat, hnsw, ivfpq, each with cliptune's
default parameters for N and D, see ``cliptune.search.ann``):

- build: seconds to build (IVF-PQ: training included) through ``cliptune.search.ann.build_faiss``;
- memory: the serialised FAISS index (``faiss.serialize_index``), and what a cliptune index keeps in
  memory to answer (IVF-PQ adds the float vectors it re-scores with);
- latency: p50 / p99 of single ``search_embeddings`` calls (k = 10, no filter), i.e. ANN candidates plus
  the exact re-scoring, after a warm-up;
- recall@10: ``cliptune.search.ann.measure_recall`` on ``--recall-queries`` held-out queries, the number
  ``cliptune index`` stores.

Each ANN kind is also queried with a more generous query-time setting on the same built index (HNSW
``ef_search`` = 256, IVF-PQ ``nprobe`` = nlist / 4) to show the latency / recall trade-off; the defaults
are FAISS's guidelines, not tuned here.

Usage:
    python benchmarks/bench_ann.py                      # N = 100k, D = 256
    python benchmarks/bench_ann.py --intrinsic-dim 16         # low intrinsic dimension
    python benchmarks/bench_ann.py --n 1000000 --threads 16
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import faiss
import numpy as np

from cliptune.search import SearchIndex, search_embeddings
from cliptune.search.ann import build_faiss, measure_recall, resolve_params


def _mixture(
    n: int, centres: np.ndarray, basis: np.ndarray, noise: float, rng: np.random.Generator
) -> np.ndarray:
    """n unit vectors: a random centre plus gaussian noise of norm ~``noise`` in the span of ``basis``."""
    r, d = basis.shape
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 100_000):  # blocks: 1M x 256 noise at once would double the peak memory
        e = min(n, s + 100_000)
        block = centres[rng.integers(0, len(centres), e - s)]
        block += noise * (rng.standard_normal((e - s, r), dtype=np.float32) @ basis) / np.sqrt(r)
        out[s:e] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def _search_index(faiss_index: object, kind: str, params: dict[str, int], vectors: np.ndarray) -> SearchIndex:
    n = len(vectors)
    return SearchIndex(
        path=Path("<memory>"),
        faiss_index=faiss_index,
        ids=[str(i) for i in range(n)],
        paths=[""] * n,
        captions=[[""]] * n,
        attributes={},
        model="random",
        model_source="",
        manifest={},
        kind=kind,
        params=params,
        stored_vectors=vectors if kind == "ivfpq" else None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="items in the index")
    parser.add_argument("--d", type=int, default=256, help="embedding dimension")
    parser.add_argument("--clusters", type=int, default=1000, help="gaussian centres of the mixture")
    parser.add_argument("--noise", type=float, default=1.0, help="noise norm relative to the unit centres")
    parser.add_argument(
        "--intrinsic-dim",
        type=int,
        default=0,
        help="noise in a random subspace of this dimension (0: all D, isotropic; neighbours within a "
        "cluster are then near-random, the hardest case for an ANN index)",
    )
    parser.add_argument("--queries", type=int, default=500, help="single queries timed per kind")
    parser.add_argument("--recall-queries", type=int, default=1000, help="held-out queries for recall@10")
    parser.add_argument(
        "--threads", type=int, default=1, help="FAISS OpenMP threads (1: single queries on a shared machine)"
    )
    parser.add_argument("--kinds", default="flat,hnsw,ivfpq")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.clusters, args.d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    r = args.intrinsic_dim or args.d
    basis = (
        np.eye(args.d, dtype=np.float32)
        if r == args.d
        else np.linalg.qr(rng.standard_normal((args.d, r), dtype=np.float32))[0].T.astype(np.float32)
    )  # (r, D) orthonormal rows
    vectors = _mixture(args.n, centres, basis, args.noise, rng)  # (N, D)
    queries = _mixture(max(args.queries, args.recall_queries), centres, basis, args.noise, rng)
    print(
        f"N={args.n} D={args.d}, {args.clusters}-centre gaussian mixture (noise {args.noise} in {r} dims), "
        f"{args.threads} FAISS threads, {args.queries} single queries, {args.recall_queries} recall queries"
    )
    print(
        f"{'kind':<6} {'params':<48} {'build s':>8} {'index MB':>9} {'held MB':>8} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'recall@10':>9}"
    )
    for kind in args.kinds.split(","):
        defaults = resolve_params(kind, args.n, args.d, {})
        t0 = time.perf_counter()
        built = build_faiss(kind, vectors, defaults, seed=args.seed)
        build_s = time.perf_counter() - t0
        index_mb = len(faiss.serialize_index(built)) / 2**20
        held_mb = index_mb + (vectors.nbytes / 2**20 if kind == "ivfpq" else 0.0)
        for params in _settings(kind, defaults):
            _row(kind, params, built, vectors, queries, args, build_s, index_mb, held_mb)


def _settings(kind: str, defaults: dict[str, int]) -> list[dict[str, int]]:
    if kind == "hnsw":
        return [defaults, {**defaults, "ef_search": 256}]
    if kind == "ivfpq":
        return [defaults, {**defaults, "nprobe": max(1, defaults["nlist"] // 4)}]
    return [defaults]


def _row(
    kind: str,
    params: dict[str, int],
    built: object,
    vectors: np.ndarray,
    queries: np.ndarray,
    args: argparse.Namespace,
    build_s: float,
    index_mb: float,
    held_mb: float,
) -> None:
    recall = (
        1.0
        if kind == "flat"
        else measure_recall(built, kind, params, vectors, queries[: args.recall_queries])
    )
    index = _search_index(built, kind, params, vectors)
    for q in queries[:10]:  # warm-up
        search_embeddings(index, q[None], k=10)
    times = []
    for q in queries[: args.queries]:
        t = time.perf_counter()
        search_embeddings(index, q[None], k=10)
        times.append(time.perf_counter() - t)
    ms = np.asarray(times) * 1e3
    shown = ", ".join(f"{p}={v}" for p, v in params.items()) or "exact"
    print(
        f"{kind:<6} {shown:<48} {build_s:>8.1f} {index_mb:>9.1f} {held_mb:>8.1f} "
        f"{np.percentile(ms, 50):>7.2f} {np.percentile(ms, 99):>7.2f} {recall:>9.4f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
