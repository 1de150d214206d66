"""Time exact top-k retrieval and ranking metrics: cliptune, FAISS, plain torch, sentence-transformers.

Random unit vectors (float32, CPU) stand in for embeddings; every backend ranks the same data and the
table reports the median of ``--repeats`` runs, the time relative to FAISS ``IndexFlatIP`` and whether the
result agrees with the reference:

- top-k backends (torch matmul+topk is the reference): the share of queries with identical top-k indices;
- metric backends: sentence-transformers' ``InformationRetrievalEvaluator.compute_all_metrics`` on the
  precomputed vectors (a stand-in model returns them, so no text model runs: only its ranking and
  metrics are timed) against cliptune's ``rank_chunked`` + ``retrieval_metrics_from_ranks`` (the same
  metrics: accuracy/precision/recall@k, MRR@k, nDCG@k, MAP@100). Each query has one relevant item, drawn at
  random from its exact top-50 (``--relevant top50``, a useful model) or uniformly from all items
  (``--relevant uniform``: a weak model whose relevant items rank deep, the adversarial case for the bf16
  kernel's band of near items); the column gives the largest absolute difference of the mean metrics. The
  ranking backends run interleaved (one repeat of each in turn), so a load change hits all of them.

Runs from a checkout without installing cliptune (``PYTHONPATH=src``); needs faiss-cpu and, unless
``--no-st``, sentence-transformers (tested with 6.0.1 and 6.2.0).

Usage:
    python benchmarks/bench_retrieval.py --n 100000 --q 1000 --d 512 --k 10
    PYTHONPATH=src python benchmarks/bench_retrieval.py --n 1000000 --q 1000 --threads 16
    python benchmarks/bench_retrieval.py --n 20000 --q 200 --no-st
    PYTHONPATH=src python benchmarks/bench_retrieval.py --n 100000 --relevant uniform --ranks-only
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch

from cliptune.ranking.metrics import retrieval_metrics_from_ranks
from cliptune.ranking.topk import TIE_PAD, bf16_pays, rank_chunked, refine_candidates, topk_chunked

_RELEVANT_POOL = 50  # the relevant item of a query is drawn from its exact top-50 (so MAP@100 == MAP)
_ST_MAP_K = 100  # ST's default MAP cut-off


def _plain_topk(queries: torch.Tensor, items: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.topk(queries @ items.T, k, dim=1)  # (Q, N) scores held at once


def _faiss_topk(queries: torch.Tensor, items: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FAISS IndexFlatIP made exact under the tie rule by refine_candidates (the search index's path)."""
    import faiss

    k = min(k, items.shape[0])
    index = faiss.IndexFlatIP(items.shape[1])
    index.add(items.contiguous().numpy().astype("float32"))
    d, i = index.search(queries.contiguous().numpy().astype("float32"), min(items.shape[0], k + TIE_PAD))

    def exact(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return topk_chunked(queries[rows].float(), items.float(), k)

    return refine_candidates(torch.from_numpy(d), torch.from_numpy(i), k, items.shape[0], exact)


def _gemm_only(queries: torch.Tensor, items: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    for n0 in range(0, items.shape[0], chunk):
        _ = queries @ items[n0 : n0 + chunk].T  # (Q, n)
    return torch.empty(0), torch.empty(0)


def _median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _ks(k: int) -> list[int]:
    return sorted({1, 5, k})


# --- cliptune: exact ranks of the relevant items + per-query metrics, averaged ---------------------


def _ours_metrics(
    queries: torch.Tensor,
    items: torch.Tensor,
    relevant: torch.Tensor,
    k: int,
    chunk: int,
    bf16: bool | Literal["auto"] = "auto",
) -> dict[str, float]:
    ranked = rank_chunked(
        queries, items, k, relevant_ids=relevant, chunk_size=chunk, bf16_pass=bf16
    )  # (Q, 1)
    per_query = retrieval_metrics_from_ranks(ranked.ranks, ks=_ks(k), prefix="")  # each (Q,)
    out = {name: float(v.mean()) for name, v in per_query.items()}
    rank = ranked.ranks[:, 0].double()  # one relevant item: AP@100 = 1 / rank within the cut-off, else 0
    out[f"map@{_ST_MAP_K}"] = float(torch.where(rank <= _ST_MAP_K, 1 / rank, torch.zeros_like(rank)).mean())
    return out


# --- sentence-transformers: its evaluator on the same vectors --------------------------------------


class _PrecomputedModel:
    """Stands in for a SentenceTransformer: every encode returns the precomputed query vectors.

    The evaluator only encodes the queries when ``corpus_embeddings`` is given; the similarity is the
    inner product (``dot``), which is what the other backends rank by.
    """

    similarity_fn_name = "dot"

    def __init__(self, queries: torch.Tensor) -> None:
        from sentence_transformers.util import dot_score

        self.queries = queries
        self.similarity = dot_score

    def encode(self, sentences: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if len(sentences) != self.queries.shape[0]:
            raise ValueError(
                f"stand-in model: asked to encode {len(sentences)} inputs, it holds "
                f"{self.queries.shape[0]} query vectors (only queries are encoded in this benchmark)"
            )
        return self.queries

    encode_query = encode
    encode_document = encode


def _st_evaluator(n_queries: int, n_items: int, relevant: torch.Tensor, k: int) -> Any:
    try:  # the module path of sentence-transformers >= 5; the old one still works with a warning
        from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
    except ImportError:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from sentence_transformers.evaluation import InformationRetrievalEvaluator
    from sentence_transformers.util import dot_score

    ks = _ks(k)
    return InformationRetrievalEvaluator(
        queries={str(q): f"query {q}" for q in range(n_queries)},
        corpus={str(i): f"item {i}" for i in range(n_items)},
        relevant_docs={str(q): {str(int(relevant[q, 0]))} for q in range(n_queries)},
        accuracy_at_k=ks,
        precision_recall_at_k=ks,
        mrr_at_k=[k],
        ndcg_at_k=[k],
        map_at_k=[_ST_MAP_K],
        score_functions={"dot": dot_score},  # explicit: compute_all_metrics is called without __call__
        show_progress_bar=False,
        write_csv=False,
    )


def _st_metrics(evaluator: Any, model: _PrecomputedModel, items: torch.Tensor) -> dict[str, float]:
    scores = evaluator.compute_all_metrics(model, corpus_embeddings=items)["dot"]
    out: dict[str, float] = {}
    for name, per_k in scores.items():  # e.g. "recall@k" -> {1: .., 5: .., 10: ..}
        for kk, value in per_k.items():
            out[name.replace("@k", f"@{kk}")] = float(value)
    return out


def _metric_gap(st: dict[str, float], ours: dict[str, float], k: int) -> float:
    """Largest |ST - ours| over the shared metrics (ST's MAP is cut at 100: ours from the ranks alike)."""
    pairs = [(f"{m}@{kk}", f"{m}@{kk}") for m in ("accuracy", "precision", "recall") for kk in _ks(k)]
    pairs += [(f"mrr@{k}", f"mrr@{k}"), (f"ndcg@{k}", f"ndcg@{k}"), (f"map@{_ST_MAP_K}", f"map@{_ST_MAP_K}")]
    return max(abs(st[a] - ours[b]) for a, b in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="number of items")
    parser.add_argument("--q", type=int, default=1_000, help="number of queries")
    parser.add_argument("--d", type=int, default=512, help="embedding dimension")
    parser.add_argument("--k", type=int, default=10, help="list length")
    parser.add_argument("--repeats", type=int, default=3, help="runs per backend (median reported)")
    parser.add_argument("--chunk-size", type=int, default=16384, help="items per block for cliptune")
    parser.add_argument("--threads", type=int, default=None, help="torch and FAISS threads (default: as is)")
    parser.add_argument("--no-st", action="store_true", help="skip the sentence-transformers evaluator")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--relevant",
        choices=["top50", "uniform"],
        default="top50",
        help="each query's relevant item: from its exact top-50, or uniformly from all items (ranks deep)",
    )
    parser.add_argument(
        "--ranks-only", action="store_true", help="skip the top-k backends (GEMM, FAISS, ...)"
    )
    args = parser.parse_args()
    if args.n < _RELEVANT_POOL:
        parser.error(
            f"--n must be >= {_RELEVANT_POOL} (relevant items are drawn from the top-{_RELEVANT_POOL})"
        )

    try:
        import faiss
    except ImportError as e:
        faiss = None
        print(f"FAISS skipped: cannot import faiss ({e}); install faiss-cpu for its row and the ratios")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        if faiss is not None:
            faiss.omp_set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(args.seed)
    items = torch.nn.functional.normalize(torch.randn(args.n, args.d, generator=gen), dim=1)  # (N, D)
    queries = torch.nn.functional.normalize(torch.randn(args.q, args.d, generator=gen), dim=1)  # (Q, D)
    if args.relevant == "top50":
        pool = topk_chunked(queries, items, _RELEVANT_POOL)[1]  # (Q, 50), exact
        pick = torch.randint(0, _RELEVANT_POOL, (args.q, 1), generator=gen)  # (Q, 1)
        relevant = pool.gather(1, pick)  # (Q, 1) one relevant item per query
    else:
        relevant = torch.randint(0, args.n, (args.q, 1), generator=gen)  # (Q, 1) anywhere in the ranking

    topk_backends: dict[str, Callable[[], Any]] = {
        # the floor: the GEMM alone, blocked like topk_chunked, no top-k (its "indices" are not compared)
        "torch GEMM only": lambda: _gemm_only(queries, items, args.chunk_size),
        "torch matmul+topk": lambda: _plain_topk(queries, items, args.k),
        "topk_chunked": lambda: topk_chunked(queries, items, args.k, chunk_size=args.chunk_size),
    }
    # the default ("auto") runs bf16 candidate GEMMs for the lists where they pay; the fp32 kernel beside it
    # must give the very same answer (exact scores decide): its row says whether it does
    bf16 = bf16_pays(items, args.n, args.k)
    if bf16:
        topk_backends["topk_chunked fp32"] = lambda: topk_chunked(
            queries, items, args.k, chunk_size=args.chunk_size, bf16_pass=False
        )
    if faiss is not None:
        topk_backends["faiss IndexFlatIP"] = lambda: _faiss_topk(queries, items, args.k)
    rows: list[tuple[str, float, str]] = []  # (backend, median s, agreement)
    reference = None
    lists: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, fn in topk_backends.items() if not args.ranks_only else []:
        seconds, (vals, idx) = _median_time(fn, args.repeats)
        if idx.numel() == 0:
            rows.append((name, seconds, "-"))
            continue
        lists[name] = (vals, idx)
        reference = idx if reference is None else reference  # plain torch is the reference
        agree = f"{float((idx == reference).all(1).float().mean()):.1%} idx"
        if name == "topk_chunked fp32":
            same = torch.equal(idx, lists["topk_chunked"][1]) and torch.equal(vals, lists["topk_chunked"][0])
            agree += ", = default" if same else ", DIFFERS from default"
        rows.append((name, seconds, agree))

    # the ranking backends, interleaved: one repeat of each in turn. The default ("auto") runs bf16 where it
    # pays, routing queries whose relevant items rank deep to the fp32 kernel; the fp32 kernel alone and bf16
    # for every query must give the very same metrics (exact scores decide): their rows say whether they do
    ours_name = "rank_chunked+metrics"
    rank_backends: dict[str, Callable[[], Any]] = {
        ours_name: lambda: _ours_metrics(queries, items, relevant, args.k, args.chunk_size),
    }
    if bf16:
        for label, forced in ((" fp32", False), (" bf16 all", True)):
            rank_backends[ours_name + label] = functools.partial(
                _ours_metrics, queries, items, relevant, args.k, args.chunk_size, forced
            )
    st_note = ""
    if args.no_st:
        st_note = "sentence-transformers skipped (--no-st)"
    else:
        try:
            evaluator = _st_evaluator(args.q, args.n, relevant, args.k)
            model = _PrecomputedModel(queries)
        except ImportError as e:
            st_note = f"sentence-transformers skipped: cannot import it ({e}); install it or pass --no-st"
        else:
            rank_backends["ST IR evaluator"] = lambda: _st_metrics(evaluator, model, items)
    times: dict[str, list[float]] = {name: [] for name in rank_backends}
    results: dict[str, dict[str, float]] = {}
    for _ in range(args.repeats):
        for name, fn in rank_backends.items():
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
    ours, ours_s = results[ours_name], statistics.median(times[ours_name])
    st_s = statistics.median(times["ST IR evaluator"]) if "ST IR evaluator" in times else None
    if st_s is not None:
        gap = _metric_gap(results["ST IR evaluator"], ours, args.k)
        rows.append(("ST IR evaluator", st_s, f"{gap:.1e} max|d|"))
    for name in rank_backends:
        if name.startswith(ours_name):
            gap = max(abs(results[name][m] - ours[m]) for m in ours)  # 0: one exact answer, any kernel
            agree = "reference" if name == ours_name else f"{gap:.1e} max|d| ours"
            extra = f", {st_s / statistics.median(times[name]):.2f}x ST" if st_s is not None else ""
            rows.append((name, statistics.median(times[name]), agree + extra))

    faiss_s = next((s for name, s, _ in rows if name == "faiss IndexFlatIP"), float("nan"))
    print(
        f"N={args.n:,} Q={args.q:,} D={args.d} k={args.k} float32 CPU, threads={torch.get_num_threads()}, "
        f"relevant items: {args.relevant}"
    )
    print(f"{'backend':<30} {'median s':>9} {'queries/s':>10} {'vs FAISS':>9} {'agreement':>24}")
    for name, seconds, agree in rows:
        vs = f"{seconds / faiss_s:>8.2f}x" if faiss_s == faiss_s else f"{'-':>9}"  # NaN: no FAISS row
        print(f"{name:<30} {seconds:>9.3f} {args.q / seconds:>10.0f} {vs} {agree:>24}")
    if st_s is not None:
        import sentence_transformers

        speedup = st_s / ours_s
        print(
            f"speed-up of {ours_name} over the ST {sentence_transformers.__version__} evaluator: "
            f"{speedup:.2f}x ({'ours faster' if speedup > 1 else 'ours slower'}; same metrics, same vectors)"
        )
    else:
        print(st_note)


if __name__ == "__main__":
    main()
