"""``GET /suite/results``: a behavioural suite's queries ranked over the index, each hit flagged as the gate sees it.

The suite is resolved against the catalogue the index was built from (``index.json`` records it), each
query is embedded with the served model and scored against the index's stored vectors by
:func:`cliptune.suites.run.score_query`, the function ``cliptune test`` gates with: the same metrics, the
same verdict and the same relevant / yellow / red / none flag for each of the top k. The ranked images are
the whole index (``cliptune test`` on a run ranks its held-out split, so the numbers can differ from the
run's ``suite/`` file; the flags mean the same).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cliptune.data.catalogue import read_catalogue
from cliptune.models.embed import model_device
from cliptune.models.factory import LoadedModel
from cliptune.search.index import SearchIndex
from cliptune.search.query import hit_at
from cliptune.serve.errors import ServeError
from cliptune.serve.hits import hit_json, image_url
from cliptune.suites.resolve import resolve_suite
from cliptune.suites.run import embed_queries, score_category, score_query
from cliptune.suites.schema import load_suite

__all__ = ["suite_results"]


def suite_results(
    suite_file: Path, index: SearchIndex, model: LoadedModel, *, cache_dir: Path | None = None
) -> dict[str, Any]:
    """Every query of a suite ranked over the index: ``{"name", "categories", "queries": [...]}``.

    ``verdicts`` maps each category with a scored query to the gate's verdict (``cliptune test``'s rule on
    these rankings). Each query has ``id``, ``category``, ``text``, ``image`` (its item id when the query image is a
    catalogue item, else None), ``image_url``, ``k``, ``passed``, ``metrics`` and ``hits`` (the fields of
    ``POST /search`` plus ``flag``).

    Raises:
        SuiteError: the suite file is invalid or does not match the index's catalogue.
        ServeError: the catalogue lists images the index lacks (it changed since the index was built).
    """
    suite = load_suite(suite_file)
    catalogue = read_catalogue(Path(index.manifest["catalogue"]), index.manifest.get("text_column", "text"))
    resolved = resolve_suite(suite, catalogue)
    number = {item_id: n for n, item_id in enumerate(index.ids)}
    ids = resolved.items.ids
    missing = [i for i in ids if i not in number]
    if missing:
        raise ServeError(
            f"{catalogue.root}: {len(missing)} image(s) are not in index {index.path}, e.g. {missing[0]!r}; "
            "the catalogue changed since the index was built: rebuild the index"
        )
    items = torch.from_numpy(index.vectors()[[number[i] for i in ids]])  # (N, D) in the suite's item order
    queries = embed_queries(  # (Q, D), where serve keeps the model (the CPU it loads to)
        resolved, model, index.dim, cache_dir=cache_dir, device=model_device(model)
    )
    gain = suite.defaults.yellow_gain
    out, scores = [], []
    for j, q in enumerate(resolved.queries):
        scored = score_query(q, items @ queries[j], ids, gain)  # (N,) scores
        scores.append(scored)
        image = ids[q.exclude] if q.exclude is not None else None
        hits = [
            {**hit_json(hit_at(index, rank, number[t["id"]], t["score"])), "flag": t["flag"]}
            for rank, t in enumerate(scored["top"], start=1)
        ]
        out.append(
            {
                "id": scored["id"],
                "category": scored["category"],
                "text": scored["text"],
                "image": image,
                "image_url": image_url(image) if image is not None else None,
                "k": scored["k"],
                "passed": scored["passed"],
                "metrics": scored["metrics"],
                "hits": hits,
            }
        )
    verdicts = {  # the gate's verdict per category over the whole index (point values: it reads the means)
        name: score_category(resolved, name, [r for r in scores if r["category"] == name], 0, 0.95, 0)[
            "passed"
        ]
        for name in suite.categories
        if any(r["category"] == name for r in scores)
    }
    return {"name": suite.suite, "categories": list(suite.categories), "verdicts": verdicts, "queries": out}
