"""Approximate indexes (kind hnsw / ivfpq): the stored recall@10 is what a recomputation finds, generous
HNSW equals flat, IVF-PQ recall lands in a sane band, filters keep to matching items, scores are exact
cosines, `search --info` shows kind, parameters and recall, and the model identity is still enforced."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from cliptune.cli import index as index_cli
from cliptune.cli import search as search_cli
from cliptune.data.catalogue import read_catalogue
from cliptune.data.synthetic import render_fashion
from cliptune.models.embed import embed_texts_with
from cliptune.models.factory import LoadedModel, load_model
from cliptune.search import SearchIndexError, build_index, load_index, search, search_embeddings
from cliptune.search import index as index_module
from cliptune.search.ann import resolve_params
from cliptune.search.index import ModelMismatchError, index_facts
from tests.tiny_models import make_tiny_clip

GENEROUS = {"hnsw_m": 16, "ef_construction": 200, "ef_search": 200}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ann")


@pytest.fixture(scope="module")
def fashion(root: Path) -> Path:
    return render_fashion(root / "fashion", n=40, seed=0)


@pytest.fixture(scope="module")
def model(root: Path) -> LoadedModel:
    return load_model(make_tiny_clip(root / "clip", seed=0))


@pytest.fixture(scope="module")
def hnsw(root: Path, fashion: Path, model: LoadedModel) -> Path:
    return build_index(
        model,
        read_catalogue(fashion),
        root / "hnsw",
        cache_dir=root / "cache",
        progress=False,
        kind="hnsw",
        params=GENEROUS,
    )


def _brute_top(vectors: np.ndarray, query: np.ndarray, k: int, pool: np.ndarray | None = None) -> list[int]:
    """Item numbers by (score desc, number asc) over ``pool`` (default all items)."""
    pool = np.arange(len(vectors)) if pool is None else pool
    scores = vectors[pool] @ query  # (n,) a matrix-vector product, not the search's kernels
    return [int(pool[i]) for i in np.lexsort((pool, -scores))[:k]]


def _recall(index: Any, queries: np.ndarray) -> float:
    """recall@10 recomputed: each query's brute-force top-10 against what search_embeddings returns."""
    position = {item_id: i for i, item_id in enumerate(index.ids)}
    k = min(10, len(index))
    found = search_embeddings(index, queries, k=k)
    shares = [
        len(set(_brute_top(index.vectors(), q, k)) & {position[h.id] for h in hits}) / k
        for q, hits in zip(queries, found, strict=True)
    ]
    return float(np.mean(shares))


def test_generous_hnsw_has_recall_one_and_equals_flat(
    root: Path, fashion: Path, model: LoadedModel, hnsw: Path
) -> None:
    manifest = json.loads((hnsw / "index.json").read_text())
    assert manifest["kind"] == "hnsw" and manifest["params"] == GENEROUS
    recall = manifest["recall"]
    # 40 images: every image and every first caption is a query (the sample is the whole catalogue)
    assert recall["image_queries"] == 40 and recall["text_queries"] == 40 and recall["k"] == 10
    index = load_index(hnsw)
    assert index.kind == "hnsw" and index.params == GENEROUS and index.faiss_index.hnsw.efSearch == 200
    texts = embed_texts_with(model, [c[0] for c in index.captions], cache_dir=root / "cache", progress=False)
    assert recall["at_10_images"] == pytest.approx(_recall(index, index.vectors().copy()), abs=1e-4)
    assert recall["at_10_texts"] == pytest.approx(_recall(index, texts.numpy()), abs=1e-4)
    assert manifest["recall_at_10"] == 1.0 and recall["at_10_images"] == 1.0

    flat = load_index(
        build_index(model, read_catalogue(fashion), root / "flat", cache_dir=root / "cache", progress=False)
    )
    np.testing.assert_array_equal(index.vectors(), flat.vectors())  # the HNSW storage keeps the floats
    for text in ["ripped blue jeans", "a red dress", "a black leather jacket"]:
        got = search(index, model, text=text, k=7, cache_dir=root / "cache")
        want = search(flat, model, text=text, k=7, cache_dir=root / "cache")
        assert [h.id for h in got] == [h.id for h in want]
        np.testing.assert_allclose([h.score for h in got], [h.score for h in want], rtol=0, atol=1e-6)


def test_search_info_shows_kind_params_and_recall(root: Path, hnsw: Path) -> None:
    app = typer.Typer()
    index_cli.register(app)
    search_cli.register(app)
    runner = CliRunner()
    result = runner.invoke(app, ["search", str(hnsw), "--info"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "kind       hnsw" in lines
    assert "params     hnsw_m=16, ef_construction=200, ef_search=200" in lines
    assert any(
        line.startswith("recall@10  1.0000 against exact search on 40 image and 40 caption") for line in lines
    )
    as_json = runner.invoke(app, ["search", str(hnsw), "--info", "--json"])
    assert as_json.exit_code == 0 and json.loads(as_json.stdout) == json.loads(
        json.dumps(index_facts(load_index(hnsw)))
    )
    assert runner.invoke(app, ["search", str(hnsw), "jeans", "--info"]).exit_code == 2

    flat = runner.invoke(app, ["search", str(root / "flat"), "--info"])
    assert flat.exit_code == 0 and "kind       flat" in flat.output and "1.0 (exact search)" in flat.output
    # the CLI builds an ANN index and reports its measured recall
    out = root / "cli-hnsw"
    built = runner.invoke(
        app,
        [
            "index",
            str(root / "clip"),
            str(out),
            "--data",
            str(root / "fashion"),
            "--cache-dir",
            str(root / "cache"),
            "-q",
            "--kind",
            "hnsw",
            "--ef-search",
            "32",
        ],
    )
    assert built.exit_code == 0, built.output
    stored = json.loads((out / "index.json").read_text())
    assert stored["params"] == {"hnsw_m": 32, "ef_construction": 40, "ef_search": 32}
    assert f"recall@10 {stored['recall_at_10']:.4f} against exact search" in built.output
    wrong = runner.invoke(
        app,
        [
            "index",
            str(root / "clip"),
            str(root / "x"),
            "--data",
            str(root / "fashion"),
            "-q",
            "--kind",
            "hnsw",
            "--nlist",
            "4",
        ],
    )
    assert wrong.exit_code == 1 and "parameter(s) nlist do not apply to index kind hnsw" in wrong.output


def test_ann_index_refuses_another_model(root: Path, model: LoadedModel, hnsw: Path) -> None:
    other = load_model(make_tiny_clip(root / "clip-other", seed=1))
    with pytest.raises(ModelMismatchError, match="was built with model .*; the query model is"):
        search(load_index(hnsw), other, text="jeans")


def _fake_catalogue(monkeypatch: pytest.MonkeyPatch, n: int, d: int) -> np.ndarray:
    """Stand in random clustered embeddings for a catalogue's images, and the captions' embeddings for
    queries, so build_index runs on a few thousand items without rendering images."""
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((32, d)).astype(np.float32)
    vectors = centres[rng.integers(0, 32, n)] + 0.6 * rng.standard_normal((n, d)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    colours = ["red", "blue", "black"]
    items = {
        "id": [f"i{i}" for i in range(n)],
        "path": [f"/x/i{i}.png" for i in range(n)],
        "captions": [[f"caption {i}"] for i in range(n)],
        "attributes": {"colour": [colours[i % 3] for i in range(n)]},
    }
    queries = vectors[rng.integers(0, n, n)] + 0.3 * rng.standard_normal((n, d)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    monkeypatch.setattr(index_module, "_items", lambda catalogue, progress: items)
    monkeypatch.setattr(index_module, "embed_images_with", lambda *a, **kw: _Numpy(vectors))
    monkeypatch.setattr(
        index_module, "embed_texts_with", lambda m, texts, **kw: _Numpy(queries[: len(texts)])
    )
    return vectors


class _Numpy:
    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def numpy(self) -> np.ndarray:
        return self.array


def test_ivfpq_recall_is_sane_stored_and_filters_hold(
    tmp_path: Path, fashion: Path, model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    n, d = 3000, 32
    vectors = _fake_catalogue(monkeypatch, n, d)
    out = build_index(model, read_catalogue(fashion), tmp_path / "ivfpq", progress=False, kind="ivfpq")
    manifest = json.loads((out / "index.json").read_text())
    # defaults: nlist = 4 sqrt(3000) = 219 (3000 // 39 = 76 caps it), pq_m = 32 / 4 = 8, nprobe = 76 // 16
    assert manifest["params"] == {"nlist": 76, "pq_m": 8, "nprobe": 4}
    recall = manifest["recall"]
    assert recall["image_queries"] == 1000 and recall["text_queries"] == 200
    assert 0.7 <= manifest["recall_at_10"] < 1.0  # lossy codes, 4 of 76 cells: not exact, not useless
    index = load_index(out)
    assert index.kind == "ivfpq" and index.faiss_index.nprobe == 4
    np.testing.assert_array_equal(index.vectors(), vectors)  # vectors.npy keeps the floats
    rng = np.random.default_rng(0)  # the build's sample (seed 0), redrawn: images first, then captions
    image_rows = np.sort(rng.choice(n, 1000, replace=False))
    assert recall["at_10_images"] == pytest.approx(_recall(index, vectors[image_rows]), abs=1e-4)

    query = vectors[5:6]
    for where in ({"colour": "blue"}, {"colour": ["red", "black"]}):  # 33% and 67%: the selector path
        hits = search_embeddings(index, query, k=10, where=where)[0]
        wanted = where["colour"] if isinstance(where["colour"], list) else [where["colour"]]
        assert len(hits) == 10 and all(h.attributes["colour"] in wanted for h in hits)
        numbers = [int(h.id[1:]) for h in hits]
        np.testing.assert_allclose([h.score for h in hits], vectors[numbers] @ query[0], rtol=0, atol=1e-6)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert [h.id for h in search_embeddings(index, query, k=1)[0]] == ["i5"]  # itself first, score exact


def test_filtered_hnsw_search_returns_only_matching_items(
    tmp_path: Path, fashion: Path, model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    vectors = _fake_catalogue(monkeypatch, 600, 16)
    out = build_index(
        model, read_catalogue(fashion), tmp_path / "h", progress=False, kind="hnsw", params=GENEROUS
    )
    index = load_index(out)
    assert not (out / "vectors.npy").exists()  # HNSW keeps the floats in its own storage
    for q in (0, 7, 123):
        hits = search_embeddings(index, vectors[q : q + 1], k=8, where={"colour": "red"})[0]
        pool = np.arange(0, 600, 3)  # i % 3 == 0 is red
        assert [int(h.id[1:]) for h in hits] == _brute_top(vectors, vectors[q], 8, pool)


def test_bad_kinds_and_parameters_are_refused(root: Path, fashion: Path, model: LoadedModel) -> None:
    with pytest.raises(SearchIndexError, match="index kind must be one of flat, hnsw, ivfpq, got 'ivf'"):
        build_index(model, read_catalogue(fashion), root / "bad", kind="ivf", progress=False)
    with pytest.raises(SearchIndexError, match="needs at least 256 items; this catalogue has 40"):
        build_index(model, read_catalogue(fashion), root / "bad", kind="ivfpq", progress=False)
    with pytest.raises(SearchIndexError, match="pq_m 5 must divide the embedding dimension 24"):
        resolve_params("ivfpq", 1000, 24, {"pq_m": 5})
    assert resolve_params("ivfpq", 1000, 24, {}) == {"nlist": 25, "pq_m": 6, "nprobe": 1}
    assert not (root / "bad").exists()


def test_served_info_shows_kind_and_recall(hnsw: Path) -> None:
    from fastapi.testclient import TestClient

    from cliptune.serve.app import create_app

    info = TestClient(create_app(hnsw)).get("/info").json()
    stored = json.loads((hnsw / "index.json").read_text())
    assert info["index"]["kind"] == "hnsw" and info["index"]["params"] == GENEROUS
    assert (
        info["index"]["recall_at_10"] == stored["recall_at_10"]
        and info["index"]["recall"] == stored["recall"]
    )
    assert info["index"]["n"] == 40 and info["index"]["dim"] == 24
