"""Behavioural suites: schema and validation messages, filters, per-query metrics by hand, yellow/red
semantics, category and suite verdicts, JUnit XML, the `cliptune test` command and the fashion suite."""

from __future__ import annotations

import json
import math
import random
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import typer
import yaml
from PIL import Image
from typer.testing import CliRunner

import cliptune.models.factory
import cliptune.suites.run as suite_run
from cliptune.cli.test import register
from cliptune.config import Config, save_config
from cliptune.data.catalogue import read_catalogue
from cliptune.data.synthetic import render_fashion
from cliptune.data.synthetic.suite import write_fashion_suite
from cliptune.models.factory import LoadedModel
from cliptune.suites import (
    SuiteError,
    parse_suite,
    query_metrics,
    resolve_suite,
    run_suite,
    suite_json_schema,
    write_junit,
)
from cliptune.suites.schema import Thresholds
from cliptune.suites.scoring import gate_failures
from cliptune.suites.selectors import CatalogueItems
from tests.tiny_models import make_tiny_clip

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

# The tiny catalogue: 7 rows, 6 unique images (img/a.png has two captions).
ROWS = [
    ("img/a.png", "ripped blue jeans", "g1", "jeans", "blue", "true"),
    ("img/a.png", "distressed blue denim", "g1", "jeans", "blue", "true"),
    ("img/b.png", "ripped black jeans", "g2", "jeans", "black", "true"),
    ("img/c.png", "blue jeans", "g3", "jeans", "blue", "false"),
    ("img/d.png", "blue t-shirt", "g4", "t-shirt", "blue", "false"),
    ("img/e.png", "navy sweater", "g5", "sweater", "navy", "false"),
    ("img/f.png", "ripped red dress", "g6", "dress", "red", "true"),
]
IDS = ["img/a.png", "img/b.png", "img/c.png", "img/d.png", "img/e.png", "img/f.png"]
COLOURS = {"blue": (30, 60, 200), "black": (20, 20, 20), "red": (200, 30, 30), "navy": (20, 30, 90)}


def _write_catalogue(root: Path, rows: list[tuple[str, ...]]) -> Path:
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = ["file_name,text,group,garment,colour,rips"] + [",".join(r) for r in rows]
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    for r in rows:
        Image.new("RGB", (40, 40), COLOURS[r[4]]).save(root / r[0])
    return root


@pytest.fixture(scope="module")
def cat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_catalogue(tmp_path_factory.mktemp("tiny") / "cat", ROWS)


def _suite(*queries: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"suite": "tiny", "categories": {"rips": {"queries": list(queries)}}, **top}


def _errors(raw: dict[str, Any], cat_dir: Path | None = None) -> list[str]:
    with pytest.raises(SuiteError) as info:
        suite = parse_suite(raw)
        assert cat_dir is not None, "structure was valid"
        resolve_suite(suite, read_catalogue(cat_dir))
    return info.value.errors


# --- fake model: item i embeds as the one-hot e_i, a query as the score vector we choose ------------


class FakeEmbedder:
    """Item ``i`` -> one-hot e_i (D = 6), so the score of item i for a query is that query's vector[i]."""

    def __init__(self, scores: dict[str, list[float]]) -> None:
        self.scores = scores  # query text or image file name -> (6,) scores over IDS

    def images(self, model: LoadedModel, paths: list[Path], **_: Any) -> torch.Tensor:
        keys = [f"{p.parent.name}/{p.name}" for p in paths]
        if keys == IDS:  # the catalogue's items
            return torch.eye(len(IDS))
        return torch.tensor([self.scores[k] for k in keys])

    def texts(self, model: LoadedModel, texts: list[str], **_: Any) -> torch.Tensor:
        return torch.tensor([self.scores[t] for t in texts])


FAKE = LoadedModel(backbone=None, head=None, source=Path("fake"), name="fake-model")  # type: ignore[arg-type]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch):
    def install(scores: dict[str, list[float]]) -> None:
        emb = FakeEmbedder(scores)
        monkeypatch.setattr(suite_run, "embed_images_with", emb.images)
        monkeypatch.setattr(suite_run, "embed_texts_with", emb.texts)
        monkeypatch.setattr(cliptune.models.factory, "load_model", lambda *_a, **_k: FAKE)

    return install


# --- schema and validation -----------------------------------------------------------------------

Q = {
    "id": "q1",
    "text": "ripped blue jeans",
    "relevant": {"garment": "jeans", "colour": "blue", "rips": True},
}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"relevant": {"garmet": "jeans"}},
         "categories.rips.queries[0].relevant.garmet: unknown attribute 'garmet'; attributes: garment, colour, rips, group"),
        ({"red": {"colour": "bleu"}},
         "categories.rips.queries[0].red.colour: unknown value 'bleu' for 'colour'; values: black, blue, navy, red"),
        ({"yellow": {"colour": {"not": ["blue", "purple"]}}},
         "categories.rips.queries[0].yellow.colour.not: unknown value 'purple' for 'colour'; values: black, blue, navy, red"),
        ({"relevant": ["img/a.png", "img/zz.png"]},
         "categories.rips.queries[0].relevant[1]: unknown image id 'img/zz.png' (no such file_name in"),
        ({"relevant": [{"garment": "jeans"}, {"rips": "maybe"}]},
         "categories.rips.queries[0].relevant[1].rips: unknown value 'maybe' for 'rips'; values: false, true"),
        ({"relevant": {"garment": "dress", "rips": False}},
         "categories.rips.queries[0].relevant: matches no image of the catalogue; a query needs >= 1 relevant image"),
        ({"relevant": {"garment": "jeans"}, "red": {"rips": True}},
         "categories.rips.queries[0].red: 2 image(s) are also relevant: img/a.png, img/b.png"),
        ({"yellow": {"garment": "jeans"}, "red": {"rips": False}},
         "categories.rips.queries[0].yellow: 1 image(s) are also red: img/c.png"),
        ({"text": None, "image": "img/missing.png"},
         "categories.rips.queries[0].image: file not found: "),
        ({"text": None, "image": "img/d.png", "relevant": {"garment": "t-shirt"}},
         "categories.rips.queries[0].relevant: matches no image of the catalogue other than the query image itself"),
    ],
)  # fmt: skip
def test_catalogue_errors_name_the_exact_location(
    cat_dir: Path, change: dict[str, Any], expected: str
) -> None:
    errors = _errors(_suite({**Q, **change}), cat_dir)
    assert len(errors) == 1, errors
    assert errors[0].startswith(expected), errors[0]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (_suite({**Q, "image": "img/a.png"}), "categories.rips.queries[0]: give exactly one of 'text' or 'image' (got both)"),
        (_suite({"id": "q1", "relevant": ["img/a.png"]}), "categories.rips.queries[0]: give exactly one of 'text' or 'image' (got neither)"),
        (_suite({**Q, "relevent": {}}), "categories.rips.queries[0].relevent: unknown key; allowed keys: description, id, image, k, red, relevant, text, thresholds, yellow"),
        (_suite({**Q, "thresholds": {"mrr": 1.5}}), "categories.rips.queries[0].thresholds.mrr: Input should be less than or equal to 1 (got 1.5)"),
        (_suite(Q, defaults={"thresholds": {"presicion": 0.7}}), "defaults.thresholds.presicion: unknown key; allowed keys: accuracy, mrr, ndcg, precision, recall, red_flag_rate"),
        (_suite(Q, Q), "categories.rips.queries[1].id: duplicate query id 'q1' (first at categories.rips.queries[0])"),
        (_suite({**Q, "relevant": {}}), "categories.rips.queries[0].relevant: an empty filter would match every image"),
        (_suite({**Q, "red": "img/c.png"}), "categories.rips.queries[0].red: expected a filter mapping or a list of image ids / filters"),
        (_suite({**Q, "yellow": {"colour": {"nicht": "blue"}}}), "categories.rips.queries[0].yellow.colour: a mapping value must be {not: value}"),
        (_suite({**Q, "red": [{"colour": [["blue"]]}]}), "categories.rips.queries[0].red[0].colour: values must be text, true/false or numbers"),
        ({"suite": "has space", "categories": {"c": {"queries": [Q]}}}, "suite: String should match pattern"),
        ({"suite": "x", "categories": {"c": {"queries": []}}}, "categories.c.queries: List should have at least 1 item"),
    ],
)  # fmt: skip
def test_structure_errors_name_the_exact_location(raw: dict[str, Any], expected: str) -> None:
    errors = _errors(raw)
    assert len(errors) == 1, errors
    assert errors[0].startswith(expected), errors[0]


def test_every_problem_is_reported_at_once(cat_dir: Path) -> None:
    q2 = {"id": "q2", "text": "x", "relevant": {"garmet": "jeans"}, "red": ["img/nope.png"]}
    errors = _errors(_suite({**Q, "red": {"colour": "bleu"}}, q2), cat_dir)
    assert [e.split(":")[0] for e in errors] == [
        "categories.rips.queries[0].red.colour",
        "categories.rips.queries[1].relevant.garmet",
        "categories.rips.queries[1].red[0]",
    ]


def test_json_schema_in_docs_is_up_to_date() -> None:
    published = (ROOT / "docs" / "suite.schema.json").read_text()
    assert published == suite_json_schema(), (
        "regenerate: python -c 'from cliptune.suites import suite_json_schema; "
        'print(suite_json_schema(), end="")\' > docs/suite.schema.json'
    )


def test_yaml_examples_in_docs_are_valid_suites() -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "docs" / "suites.md").read_text(), re.S)
    suites = [yaml.safe_load(b) for b in blocks if b.startswith("suite:")]
    assert suites
    for raw in suites:
        parse_suite(raw)


# --- selectors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "selected"),
    [
        ({"colour": ["blue", "navy"]}, "acde"),  # list = any of
        ({"colour": {"not": "blue"}}, "bef"),  # negation
        ({"colour": {"not": ["blue", "navy"]}}, "bf"),  # negation of several
        ({"garment": "jeans", "rips": True}, "ab"),  # AND of keys
        ({"garment": "jeans", "rips": "true"}, "ab"),  # YAML true and the text "true" are the same value
        ({"garment": "jeans", "colour": {"not": "blue"}, "rips": True}, "b"),
        (["img/f.png", {"garment": "sweater"}, "img/f.png"], "ef"),  # list = union of ids and filters
        ({"group": ["g2", "g3"]}, "bc"),  # the group column is filterable too
        (None, ""),
    ],
)
def test_filters(cat_dir: Path, selector: Any, selected: str) -> None:
    items = CatalogueItems(read_catalogue(cat_dir))
    assert items.ids == IDS  # unique images in order of first appearance: 7 rows, 6 items
    mask, errors = items.select(selector, "here")
    assert errors == []
    assert [i[4] for i, m in zip(IDS, mask, strict=True) if m] == list(selected)


def test_an_image_matches_when_one_of_its_rows_satisfies_the_whole_filter(tmp_path: Path) -> None:
    rows = [ROWS[0], ("img/a.png", "navy denim", "g1", "jeans", "navy", "false"), ROWS[2]]
    items = CatalogueItems(read_catalogue(_write_catalogue(tmp_path, rows)))
    assert items.ids == ["img/a.png", "img/b.png"]
    # a has a (blue, ripped) row and a (navy, intact) row: AND holds within one row, never across rows
    assert items.select({"colour": "navy", "rips": True}, "x")[0].tolist() == [False, False]
    assert items.select({"colour": "navy", "rips": False}, "x")[0].tolist() == [True, False]
    assert items.select({"colour": {"not": "blue"}}, "x")[0].tolist() == [True, True]


# --- per-query metrics ---------------------------------------------------------------------------


def _mask(letters: str) -> torch.Tensor:
    return torch.tensor([i[4] in letters for i in IDS])


def test_query_metrics_by_hand() -> None:
    # "ripped blue jeans": relevant {a}, yellow {b}, red {c}; scores rank b, c, d, a, e, f; k = 3
    scores = torch.tensor([0.2, 0.9, 0.8, 0.5, 0.1, 0.0])
    m = query_metrics(scores, _mask("a"), _mask("b"), _mask("c"), k=3, yellow_gain=0.5)
    idcg = 1 + 0.5 / math.log2(3)  # ideal: a (gain 1) at rank 1, b (0.5) at rank 2
    assert m == {
        "mrr": 0.25,  # first relevant (a) at rank 4
        "precision@3": 0.5,  # acceptable {a, b}: b in the top 3 -> 1 / min(3, 2)
        "recall@3": 0.0,  # a not in the top 3 -> 0 / min(1, 3)
        "accuracy@3": 0.0,  # no relevant item in the top 3 (the yellow b does not count)
        "ndcg@3": round(
            0.5 / idcg, 6
        ),  # DCG = 0.5 / log2(2) (b at rank 1) = 0.5; 0.5 / 1.3154649 = 0.3800938
        "red_flag_rate@3": round(1 / 3, 6),  # c at rank 2
    }
    assert m["ndcg@3"] == pytest.approx(0.380094, abs=1e-6)
    # without the yellow flag only precision and nDCG change: b is no longer acceptable
    plain = query_metrics(scores, _mask("a"), _mask(""), _mask("c"), k=3)
    assert {k: plain[k] for k in ("mrr", "recall@3", "accuracy@3", "red_flag_rate@3")} == {
        k: m[k] for k in ("mrr", "recall@3", "accuracy@3", "red_flag_rate@3")
    }
    assert plain["precision@3"] == 0.0  # 0 / min(3, 1)
    assert plain["ndcg@3"] == 0.0  # DCG@3 = 0: a is at rank 4


def test_broad_sets_still_reach_one_with_a_perfect_ranking() -> None:
    # relevant {a, b, c} (3 jeans) at k = 2, ranked a, b, c, ...: plain recall@2 would be 2/3
    scores = torch.tensor([0.9, 0.8, 0.7, 0.3, 0.2, 0.1])
    m = query_metrics(scores, _mask("abc"), _mask("d"), _mask("f"), k=2)
    assert m == {"mrr": 1.0, "precision@2": 1.0, "recall@2": 1.0, "accuracy@2": 1.0, "ndcg@2": 1.0,
                 "red_flag_rate@2": 0.0}  # fmt: skip
    # ties break by the lower index: all scores equal -> ranking a, b, c, d, e, f
    tied = query_metrics(torch.zeros(6), _mask("c"), _mask("a"), _mask("b"), k=2)
    assert tied["mrr"] == pytest.approx(1 / 3, abs=1e-6)  # c is third
    assert tied["precision@2"] == 0.5  # a acceptable, b red: 1 / min(2, 2)
    assert tied["red_flag_rate@2"] == 0.5  # b at rank 2


def _naive(
    scores: list[float], rel: set[int], yel: set[int], red: set[int], k: int, g: float
) -> dict[str, float]:
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    top = order[:k]
    acc = rel | yel
    first = next(r for r, i in enumerate(order, 1) if i in rel)
    gain = {i: 1.0 if i in rel else g if i in yel else 0.0 for i in range(len(scores))}
    dcg = sum(gain[i] / math.log2(r + 1) for r, i in enumerate(top, 1))
    ideal = sorted(gain.values(), reverse=True)[:k]
    idcg = sum(v / math.log2(r + 1) for r, v in enumerate(ideal, 1))
    return {
        "mrr": 1 / first,
        f"precision@{k}": len(acc & set(top)) / min(k, len(acc)),
        f"recall@{k}": len(rel & set(top)) / min(k, len(rel)),
        f"accuracy@{k}": float(bool(rel & set(top))),
        f"ndcg@{k}": dcg / idcg,
        f"red_flag_rate@{k}": len(red & set(top)) / k,
    }


def test_query_metrics_match_a_naive_loop() -> None:
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(2, 12)
        scores = [rng.choice([0.0, 0.1, 0.5, 0.9]) + rng.random() * rng.choice([0, 1]) for _ in range(n)]
        labels = [rng.choice("rryn.") for _ in range(n)]
        labels[rng.randrange(n)] = "r"
        sets = {c: {i for i, x in enumerate(labels) if x == c} for c in "ryn"}
        k, g = rng.randint(1, n + 2), rng.choice([0.0, 0.25, 0.5, 1.0])
        masks = [torch.tensor([i in sets[c] for i in range(n)]) for c in "ryn"]
        got = query_metrics(torch.tensor(scores), *masks, k=k, yellow_gain=g)
        want = _naive(scores, sets["r"], sets["y"], sets["n"], k, g)
        assert got == pytest.approx(want, abs=2e-6), (scores, labels, k, g)


def test_gates() -> None:
    t = Thresholds(mrr=0.5, precision=0.7, accuracy=0.8, recall=0.6, red_flag_rate=0.2, ndcg=None)
    v = {"mrr": 0.5, "precision@5": float(np.mean([0.7, 0.7, 0.7])), "recall@5": 0.6, "accuracy@5": 0.8,
         "ndcg@5": 0.0, "red_flag_rate@5": 0.2}  # fmt: skip
    assert v["precision@5"] < 0.7  # 0.6999999999999998: float noise must not fail the gate
    assert gate_failures(v, t, 5) == ["mrr 0.500 <= 0.5"]  # MRR is strict, the others inclusive
    worse = {**v, "mrr": 0.21, "recall@5": 0.4, "red_flag_rate@5": 0.4}
    assert gate_failures(worse, t, 5) == [
        "mrr 0.210 <= 0.5",
        "recall@5 0.400 < 0.6",
        "red_flag_rate@5 0.400 > 0.2",
    ]
    assert gate_failures(worse, Thresholds(mrr=None, precision=None, accuracy=None, recall=None), 5) == []


def test_query_metrics_edges_rounding_and_default_yellow_gain() -> None:
    # no relevant item: nothing to rank against, and the message says so
    with pytest.raises(ValueError) as err:
        query_metrics(torch.zeros(6), _mask(""), _mask("a"), _mask("b"), k=2)
    assert str(err.value) == "query_metrics: the query has no relevant item"
    # integer scores and 0/1 masks are accepted; ranking d, c, b, a, ... with relevant {a}, yellow {d}
    scores = torch.tensor([3, 4, 5, 6, 0, 0])
    masks = [torch.tensor([int(c in s) for c in "abcdef"]) for s in ("a", "d", "c")]
    m = query_metrics(scores, *masks, k=3)  # default yellow gain 0.5
    idcg = 1 + 0.5 / math.log2(3)
    assert m["ndcg@3"] == round(0.5 / idcg, 6)  # d (gain 0.5) at rank 1, a outside the top 3
    assert m["mrr"] == 0.25 and m["red_flag_rate@3"] == round(1 / 3, 6) == 0.333333  # 6 decimals
    assert m["precision@3"] == 0.5  # acceptable {a, d}: d in the top 3 -> 1 / min(3, 2)
    # a (1, N) row is the same query as (N,)
    assert query_metrics(scores[None], *(x[None] for x in masks), k=3) == m


def test_gates_on_ndcg_precision_and_accuracy_edges() -> None:
    t = Thresholds(mrr=None, precision=0.7, accuracy=1.0, recall=None, red_flag_rate=None, ndcg=0.5)
    v = {"mrr": 0.0, "precision@3": 0.69, "recall@3": 0.0, "accuracy@3": 1.0, "ndcg@3": 0.4999996,
         "red_flag_rate@3": 1.0}  # fmt: skip
    assert gate_failures(v, t, 3) == ["precision@3 0.690 < 0.7", "ndcg@3 0.500 < 0.5"]
    # rounding to 9 decimals: 4e-10 below the threshold meets it, 2e-9 below does not
    assert gate_failures({**v, "precision@3": 0.7 - 4e-10, "ndcg@3": 0.5 - 2e-9}, t, 3) == [
        "ndcg@3 0.500 < 0.5"
    ]
    # red-flag rate: at the maximum passes, above fails; MRR above the threshold passes
    t2 = Thresholds(mrr=0.25, precision=None, accuracy=None, recall=None, red_flag_rate=0.0)
    assert gate_failures({**v, "mrr": 0.2500001, "red_flag_rate@3": 0.0}, t2, 3) == []
    assert gate_failures({**v, "mrr": 0.25, "red_flag_rate@3": 0.01}, t2, 3) == [
        "mrr 0.250 <= 0.25",
        "red_flag_rate@3 0.010 > 0",
    ]


# --- running a suite -----------------------------------------------------------------------------

GOOD = [0.9, 0.8, 0.1, 0.2, 0.0, 0.3]  # "ripped jeans": a, b first; c (intact jeans) is fifth
BAD = [0.2, 0.9, 0.8, 0.5, 0.1, 0.0]  # "ripped blue jeans": ranks b, c, d, a, e, f


def _two_categories(**rips_extra: Any) -> dict[str, Any]:
    return {
        "suite": "tiny",
        "defaults": {"k": 3},
        "categories": {
            "rips": {
                "queries": [
                    {"id": "rips-1", "text": "ripped jeans", "relevant": {"garment": "jeans", "rips": True},
                     "red": {"garment": "jeans", "rips": False}},
                    {"id": "rips-2", "text": "ripped blue jeans", "relevant": {"garment": "jeans", "colour": "blue", "rips": True},
                     "yellow": {"garment": "jeans", "rips": True}, "red": {"garment": "jeans", "rips": False}},
                ],
                **rips_extra,
            },
            "garments": {
                "queries": [
                    {"id": "garments-1", "text": "a sweater", "relevant": {"garment": "sweater"},
                     "yellow": {"garment": "t-shirt"}, "red": {"garment": {"not": ["sweater", "t-shirt"]}}},
                    {"id": "garments-2", "image": "img/f.png", "k": 2, "relevant": {"colour": "navy"},
                     "red": {"garment": "jeans"}},
                ]
            },
        },
    }  # fmt: skip


SCORES = {
    "ripped jeans": GOOD,
    "ripped blue jeans": BAD,
    "a sweater": [0.0, 0.1, 0.2, 0.8, 0.9, 0.3],  # e, d, f: mrr 1, precision 2/min(3, 2) = 1
    # image query f: the query image itself (f, score 1.0) is left out of its ranking
    "img/f.png": [0.1, 0.2, 0.3, 0.4, 0.5, 1.0],
}


def test_run_suite_verdicts_by_hand(cat_dir: Path, fake) -> None:
    fake(SCORES)
    raw = _two_categories()
    result = run_suite(parse_suite(raw), FAKE, read_catalogue(cat_dir), bootstrap=200)
    q = {r["id"]: r for r in result["queries"]}
    # rips-1: relevant {a, b} at ranks 1, 2; red c at rank 5; k = 3
    assert q["rips-1"]["metrics"] == {"mrr": 1.0, "precision@3": 1.0, "recall@3": 1.0, "accuracy@3": 1.0,
                                      "ndcg@3": 1.0, "red_flag_rate@3": 0.0}  # fmt: skip
    assert q["rips-1"]["passed"] and q["rips-1"]["failures"] == []
    # rips-2: the hand-computed query of test_query_metrics_by_hand
    assert q["rips-2"]["metrics"]["mrr"] == 0.25 and q["rips-2"]["metrics"]["precision@3"] == 0.5
    assert not q["rips-2"]["passed"]
    assert q["rips-2"]["failures"] == [
        "mrr 0.250 <= 0.3", "precision@3 0.500 < 0.7", "recall@3 0.000 < 0.6", "accuracy@3 0.000 < 0.8",
        "red in top 3: img/c.png (rank 2)",
    ]  # fmt: skip
    assert q["rips-2"]["red_in_top"] == [{"id": "img/c.png", "rank": 2, "score": 0.8}]
    assert [(t["id"], t["flag"]) for t in q["rips-2"]["top"]] == [
        ("img/b.png", "yellow"), ("img/c.png", "red"), ("img/d.png", "none")
    ]  # fmt: skip
    # rips category: means over its 2 queries; mrr (1 + 0.25) / 2 = 0.625 > 0.3, precision (1 + 0.5) / 2 =
    # 0.75 >= 0.7, recall (1 + 0) / 2 = 0.5 < 0.6, accuracy (1 + 0) / 2 = 0.5 < 0.8 -> FAIL
    rips = result["categories"]["rips"]
    assert rips["metrics"]["mrr"]["mean"] == 0.625 and rips["metrics"]["precision@3"]["mean"] == 0.75
    assert (
        rips["metrics"]["mrr"]["n"] == 2
        and 0.25 <= rips["metrics"]["mrr"]["low"] <= 0.625 <= rips["metrics"]["mrr"]["high"] <= 1
    )
    assert rips["failures"] == ["recall@3 0.500 < 0.6", "accuracy@3 0.500 < 0.8"]
    assert not rips["passed"] and rips["n_failed_queries"] == 1
    # image query: f (the query image) is ranked last and never shown; e (navy) is first of the rest
    g2 = q["garments-2"]
    assert g2["k"] == 2 and g2["image"] == "img/f.png" and g2["text"] is None
    assert [t["id"] for t in g2["top"]] == ["img/e.png", "img/d.png"]
    assert g2["metrics"]["mrr"] == 1.0 and g2["metrics"]["red_flag_rate@2"] == 0.0
    # garments: both queries perfect -> PASS; the suite fails because rips fails
    assert result["categories"]["garments"]["passed"]
    assert result["passed"] is False
    assert result["n_items"] == 6 and result["model"] == "fake-model" and result["k"] == 3
    json.dumps(result)  # plain JSON


def test_threshold_overrides_decide_the_category(cat_dir: Path, fake) -> None:
    fake(SCORES)
    raw = _two_categories(thresholds={"recall": 0.5, "accuracy": None})
    raw["categories"]["garments"]["queries"].pop()
    raw["categories"]["rips"]["queries"][1]["thresholds"] = {
        "mrr": 0.2,
        "precision": 0.5,
        "recall": None,
        "accuracy": None,
    }
    result = run_suite(parse_suite(raw), FAKE, read_catalogue(cat_dir), bootstrap=0)
    rips = result["categories"]["rips"]
    assert rips["thresholds"] == {"mrr": 0.3, "precision": 0.7, "accuracy": None, "recall": 0.5,
                                  "red_flag_rate": None, "ndcg": None}  # fmt: skip
    assert rips["passed"] and result["passed"]  # recall 0.5 >= 0.5, accuracy not gated
    assert rips["metrics"]["recall@3"] == {"mean": 0.5, "low": 0.5, "high": 0.5, "n": 2, "confidence": 0.95}
    # the query's own overrides: 0.25 > 0.2 and 0.5 >= 0.5 -> passes, red items are still listed
    q2 = result["queries"][1]
    assert q2["passed"] and q2["failures"] == [] and q2["red_in_top"][0]["rank"] == 2


def test_junit_structure(cat_dir: Path, fake, tmp_path: Path) -> None:
    fake(SCORES)
    raw = _two_categories()
    result = run_suite(parse_suite(raw), FAKE, read_catalogue(cat_dir), bootstrap=50)
    root = ET.parse(write_junit(result, tmp_path / "out" / "suite.xml")).getroot()
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == ["rips", "garments"]
    rips, garments = suites
    assert (rips.get("tests"), rips.get("failures")) == (
        "3",
        "2",
    )  # 2 queries + the gate; rips-2 and the gate fail
    assert (garments.get("tests"), garments.get("failures")) == ("3", "0")
    assert (root.get("tests"), root.get("failures")) == ("6", "2")
    cases = {c.get("name"): c for c in rips.findall("testcase")}
    assert set(cases) == {"rips-1", "rips-2", "gate"}
    assert all(c.get("classname") == "tiny.rips" for c in cases.values())
    assert cases["rips-1"].find("failure") is None
    failure = cases["rips-2"].find("failure")
    assert failure is not None and failure.get("message", "").startswith("mrr 0.250 <= 0.3")
    assert "red in top 3: img/c.png (rank 2)" in (failure.text or "")
    gate = cases["gate"].find("failure")
    assert gate is not None and gate.get("message") == "recall@3 0.500 < 0.6; accuracy@3 0.500 < 0.8"


# --- the CLI ---------------------------------------------------------------------------------------


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:  # a callback keeps `test` a named sub-command
        """cliptune."""

    return app


def _write(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_cli_exit_codes_with_a_fake_model(cat_dir: Path, fake, tmp_path: Path) -> None:
    fake(SCORES)
    failing = _two_categories()
    failing["categories"]["garments"]["queries"].pop()
    suite = _write(tmp_path / "failing.yaml", failing)
    args = [
        "test",
        "embedded",
        "--suite",
        str(suite),
        "--data",
        str(cat_dir),
        "--out",
        str(tmp_path / "o"),
        "-q",
    ]
    res = runner.invoke(_app(), [*args, "--junit", str(tmp_path / "j.xml")])
    assert res.exit_code == 1, res.output
    assert "FAIL tiny: 1 of 2 categories failed: rips" in res.output
    assert "rips-2" in res.output and "img/c.png (2)" in res.output  # the failing query and its red result
    written = json.loads((tmp_path / "o" / "tiny.json").read_text())
    assert written["passed"] is False and (tmp_path / "j.xml").is_file()

    passing = _two_categories(thresholds={"recall": 0.5, "accuracy": 0.5})
    passing["categories"]["garments"]["queries"].pop()
    res = runner.invoke(_app(), [*args[:3], str(_write(tmp_path / "passing.yaml", passing)), *args[4:]])
    assert res.exit_code == 0, res.output
    assert "PASS tiny: all 2 categories passed" in res.output

    broken = _suite({**Q, "relevant": {"garmet": "jeans"}})
    res = runner.invoke(_app(), [*args[:3], str(_write(tmp_path / "broken.yaml", broken)), *args[4:]])
    assert res.exit_code == 2
    assert "categories.rips.queries[0].relevant.garmet: unknown attribute 'garmet'" in res.output

    res = runner.invoke(_app(), ["test", "embedded", "--suite", str(suite)])  # not a run: --data needed
    assert res.exit_code == 2 and "--data" in res.output


def test_cli_on_a_real_run_directory(cat_dir: Path, tmp_path: Path) -> None:
    """A tiny CLIP saved as RUN/model; the catalogue comes from RUN/config.yaml. Gates that cannot fail or
    cannot pass whatever the model ranks give exit 0 and 1."""
    run = tmp_path / "run"
    make_tiny_clip(run / "model")
    save_config(Config.model_validate({"data": {"catalogue": str(cat_dir)},
                                       "model": {"cache_dir": str(tmp_path / "cache")}}), run / "config.yaml")  # fmt: skip
    ungated = {"mrr": None, "precision": None, "accuracy": None, "recall": None}
    raw = _two_categories()
    raw["defaults"]["thresholds"] = ungated
    res = runner.invoke(_app(), ["test", str(run), "--suite", str(_write(tmp_path / "s.yaml", raw)), "-q"])
    assert res.exit_code == 0, res.output
    result = json.loads((run / "suite" / "tiny.json").read_text())
    assert result["passed"] and set(result["categories"]) == {"rips", "garments"}
    for q in result["queries"]:
        assert set(q["metrics"]) == {"mrr", f"precision@{q['k']}", f"recall@{q['k']}", f"accuracy@{q['k']}",
                                     f"ndcg@{q['k']}", f"red_flag_rate@{q['k']}"}  # fmt: skip
        assert all(0.0 <= v <= 1.0 for v in q["metrics"].values()) and len(q["top"]) == q["k"]
    raw["defaults"]["thresholds"] = {**ungated, "mrr": 1.0}  # MRR > 1 is impossible
    res = runner.invoke(_app(), ["test", str(run), "--suite", str(_write(tmp_path / "s.yaml", raw)), "-q"])
    assert res.exit_code == 1, res.output


# --- the fashion suite ---------------------------------------------------------------------------


def test_fashion_suite_validates_against_a_rendered_catalogue(tmp_path: Path) -> None:
    cat = render_fashion(tmp_path / "fashion", n=200, seed=0)
    path = write_fashion_suite(cat)
    first = path.read_bytes()
    assert write_fashion_suite(cat).read_bytes() == first  # deterministic
    catalogue = read_catalogue(cat)
    from cliptune.suites import load_suite

    resolved = resolve_suite(load_suite(path), catalogue)  # raises on any problem
    suite = resolved.suite
    assert list(suite.categories) == ["rips", "styles", "garments", "colours", "patterns", "combinations"]
    assert len(resolved.queries) >= 40
    assert all(len(c.queries) >= 5 for c in suite.categories.values())
    captions = set(catalogue.rows["text"]) | set(catalogue.rows["text_generic"])
    assert not [q.query.text for q in resolved.queries if q.query.text in captions]  # not copied captions
    # the flags say what a shopper expects: for a rips query, the intact garment is red
    items = resolved.items
    for q in resolved.queries:
        if q.category == "rips" and "ripped" in q.query.text:
            rows = catalogue.rows.set_index("file_name")
            red_rips = {bool(rows.loc[[items.ids[i]], "rips"].iloc[0]) for i in np.flatnonzero(q.red)}
            assert red_rips == {False}, q.query.id
    # a tiny render lacks some garments and colours: their queries are left out (named in the header) and
    # no yellow/red filter names an absent value, so the suite still validates
    small = render_fashion(tmp_path / "small", n=20, seed=1)
    small_suite = write_fashion_suite(small)
    assert "Fixed queries left out (no relevant image in this catalogue): rips:" in small_suite.read_text()
    assert resolve_suite(load_suite(small_suite), read_catalogue(small)).queries
    combos = [q for q in resolved.queries if q.category == "combinations"]
    assert combos[0].query.text.startswith(("ripped", "a ripped")) and combos[0].red.any()
    assert all(q.red.any() for q in combos) and sum(q.yellow.any() for q in combos) >= len(combos) // 2
