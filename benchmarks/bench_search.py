"""Time single-query search on an index: FAISS flat search + attribute filter + tie handling, no model.

Random unit vectors stand in for image embeddings and random attributes for catalogue columns (colour:
11 values, garment: 8, rips: 35% true, like the fashion catalogue). Each scenario runs ``--queries``
single queries (one ``search_embeddings`` call each, the filter included) after a warm-up and reports
p50 / p99 latency. As a sanity check, every result of the first 20 queries is compared with a numpy
brute force over the matching items. A second table times the alternative a filter could use: gather
the matching vectors and do a numpy matmul + argpartition ("subset").

Usage:
    python benchmarks/bench_search.py --n 100000 --d 256 --k 10 --queries 500
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

from cliptune.search import SearchIndex, search_embeddings
from cliptune.search.query import select

COLOURS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "grey"]
GARMENTS = ["jeans", "t-shirt", "dress", "jacket", "skirt", "shorts", "sweater", "coat"]
SCENARIOS: dict[str, dict[str, object] | None] = {
    "no filter": None,
    "rips=true (35%)": {"rips": "true"},
    "colour=blue (9%)": {"colour": "blue"},
    "colour=blue,garment=jeans (1.1%)": {"colour": "blue", "garment": "jeans"},
    "+ rips=true (0.4%)": {"colour": "blue", "garment": "jeans", "rips": "true"},
}


def _index(n: int, d: int, seed: int) -> SearchIndex:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, d), dtype=np.float32)  # (N, D)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    flat = faiss.IndexFlatIP(d)
    flat.add(vectors)
    attributes = {
        "colour": [COLOURS[i] for i in rng.integers(0, len(COLOURS), n)],
        "garment": [GARMENTS[i] for i in rng.integers(0, len(GARMENTS), n)],
        "rips": [bool(v) for v in rng.random(n) < 0.35],
    }
    ids = [f"images/{i:07d}.png" for i in range(n)]
    return SearchIndex(
        path=Path("<memory>"), faiss_index=flat, ids=ids, paths=ids, captions=[["caption"]] * n,
        attributes=attributes, model="random", model_source="", manifest={},
    )  # fmt: skip


def _latencies(fn: Callable[[np.ndarray], object], queries: np.ndarray, warmup: int = 10) -> np.ndarray:
    for q in queries[:warmup]:
        fn(q)
    times = []
    for q in queries:
        t0 = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - t0)
    return np.asarray(times) * 1e3  # ms


def _brute(index: SearchIndex, q: np.ndarray, k: int, where: dict[str, object] | None) -> list[int]:
    sel = select(index, where)
    sel = np.arange(len(index)) if sel is None else sel
    scores = index.vectors()[sel] @ q  # (n_sel,)
    order = np.lexsort((sel, -scores))[:k]
    return [int(i) for i in sel[order]]


def _subset(index: SearchIndex, q: np.ndarray, k: int, where: dict[str, object] | None) -> np.ndarray:
    sel = select(index, where)
    items = index.vectors() if sel is None else index.vectors()[sel]  # (n_sel, D) (a copy when filtered)
    scores = items @ q
    top = np.argpartition(-scores, min(k, len(scores) - 1))[:k]
    return top[np.argsort(-scores[top], kind="stable")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="items in the index")
    parser.add_argument("--d", type=int, default=256, help="embedding dimension")
    parser.add_argument("--k", type=int, default=10, help="results per query")
    parser.add_argument("--queries", type=int, default=500, help="single queries timed per scenario")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    index = _index(args.n, args.d, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    queries = rng.standard_normal((args.queries, args.d), dtype=np.float32)  # (Q, D)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    print(
        f"N={args.n} D={args.d} k={args.k}, {args.queries} single queries per row, {faiss.omp_get_max_threads()} threads"
    )
    print(
        f"{'scenario':<36} {'matching':>9} {'p50 ms':>8} {'p99 ms':>8} {'subset p50':>11} {'subset p99':>11} exact"
    )
    for name, where in SCENARIOS.items():
        sel = select(index, where)
        n_sel = len(index) if sel is None else len(sel)
        ok = all(
            [h.id for h in search_embeddings(index, q[None], k=args.k, where=where)[0]]
            == [index.ids[i] for i in _brute(index, q, args.k, where)]
            for q in queries[:20]
        )
        ours = _latencies(lambda q, w=where: search_embeddings(index, q[None], k=args.k, where=w), queries)
        alt = _latencies(lambda q, w=where: _subset(index, q, args.k, w), queries)
        print(
            f"{name:<36} {n_sel:>9} {np.percentile(ours, 50):>8.2f} {np.percentile(ours, 99):>8.2f} "
            f"{np.percentile(alt, 50):>11.2f} {np.percentile(alt, 99):>11.2f} {'yes' if ok else 'NO'}"
        )


if __name__ == "__main__":
    main()
