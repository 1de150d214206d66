"""Index build and search: exact against a brute-force ranking, filters before top-k, model identity,
atomic builds, the CLI; and, with the embedded backbone trained briefly, "ripped blue jeans" works."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from cliptune.cli import index as index_cli
from cliptune.cli import search as search_cli
from cliptune.config import Config
from cliptune.data.catalogue import read_catalogue
from cliptune.data.synthetic import render_fashion
from cliptune.models.embed import embed_images_with, embed_texts_with
from cliptune.models.factory import LoadedModel, load_model
from cliptune.search import SearchIndex, SearchIndexError, build_index, load_index, search, search_embeddings
from cliptune.search import query as query_module
from cliptune.search.index import IndexBadRowsError, IndexExistsError
from cliptune.train.run import train
from tests.tiny_models import make_tiny_clip

QUERIES = ["ripped blue jeans", "a red dress with white dots", "a black leather jacket", "a photo of a cat"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("search")


@pytest.fixture(scope="module")
def fashion(root: Path) -> Path:
    return render_fashion(root / "fashion", n=40, seed=0)  # 40 photos, one caption each


@pytest.fixture(scope="module")
def model(root: Path) -> LoadedModel:
    return load_model(make_tiny_clip(root / "clip", seed=0))


@pytest.fixture(scope="module")
def built(root: Path, fashion: Path, model: LoadedModel) -> Path:
    return build_index(model, read_catalogue(fashion), root / "idx", cache_dir=root / "cache", progress=False)


def _brute_force(
    model: LoadedModel, fashion: Path, cache: Path, query: np.ndarray
) -> list[tuple[str, float]]:
    """Every image of the catalogue scored by a plain dot product, sorted by (score desc, index asc)."""
    rows = pd.read_csv(fashion / "metadata.csv")
    names = list(dict.fromkeys(rows["file_name"]))  # unique, first-appearance order
    items = embed_images_with(model, [fashion / n for n in names], cache_dir=cache, progress=False).numpy()
    scores = [float(np.dot(query, items[i])) for i in range(len(names))]
    order = sorted(range(len(names)), key=lambda i: (-scores[i], i))
    return [(names[i], scores[i]) for i in order]


def _text(model: LoadedModel, text: str, cache: Path) -> np.ndarray:
    return embed_texts_with(model, [text], cache_dir=cache, progress=False).numpy()[0]


def _check(hits: list, expected: list[tuple[str, float]]) -> None:
    assert [h.id for h in hits] == [i for i, _ in expected]
    assert [h.rank for h in hits] == list(range(1, len(expected) + 1))
    np.testing.assert_allclose([h.score for h in hits], [s for _, s in expected], rtol=0, atol=1e-5)


def test_text_search_equals_brute_force_before_and_after_reload(
    root: Path, fashion: Path, model: LoadedModel, built: Path
) -> None:
    index = load_index(built)
    assert len(index) == 40 and index.model == model.name and index.dim == 24
    cache = root / "cache"
    for text in QUERIES:
        expected = _brute_force(model, fashion, cache, _text(model, text, cache))
        hits = search(index, model, text=text, k=10, cache_dir=cache)
        _check(hits, expected[:10])
        again = search(load_index(built), model, text=text, k=10, cache_dir=cache)
        assert again == hits
        # k larger than the index: everything, in brute-force order
        _check(search(index, model, text=text, k=100, cache_dir=cache), expected)


def test_metadata_is_saved_with_the_vectors(fashion: Path, built: Path) -> None:
    index = load_index(built)
    rows = pd.read_csv(fashion / "metadata.csv")
    assert index.ids == list(rows["file_name"])
    assert index.captions == [[t] for t in rows["text"]]
    # `group` is filterable as in suites (search --where group=...); the caption column never is
    assert list(index.attributes) == ["garment", "colour", "pattern", "rips", "style", "group"]
    assert index.attributes["group"] == rows["group"].astype(str).tolist()
    assert index.attributes["rips"] == [bool(v) for v in rows["rips"]]
    assert all(Path(p).is_file() for p in index.paths)
    np.testing.assert_allclose(np.linalg.norm(index.vectors(), axis=1), 1.0, atol=1e-5)  # L2-normalised


# 0.0: every filter goes through FAISS with a bitmap selector; 1.0: every filter gathers its subset
BOTH_PATHS = pytest.mark.parametrize("subset_share", [0.0, 1.0], ids=["faiss-bitmap", "subset"])


@BOTH_PATHS
def test_filter_restricts_candidates_before_top_k(
    root: Path,
    fashion: Path,
    model: LoadedModel,
    built: Path,
    subset_share: float,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(query_module, "_SUBSET_SHARE", subset_share)
    index, cache = load_index(built), root / "cache"
    rows = pd.read_csv(fashion / "metadata.csv")
    blue = set(rows.loc[rows["colour"] == "blue", "file_name"])
    assert len(blue) == 3  # (the seed-0 catalogue has 3 blue photos)
    expected = _brute_force(model, fashion, cache, _text(model, "ripped blue jeans", cache))
    hits = search(index, model, text="ripped blue jeans", k=10, where={"colour": "Blue"}, cache_dir=cache)
    _check(hits, [e for e in expected if e[0] in blue])  # exactly the 3, in brute-force order

    # several attributes AND; a list is any-of; booleans accept True and "TRUE"
    for where, keep in [
        (
            {"garment": "jacket", "colour": "black"},
            (rows["garment"] == "jacket") & (rows["colour"] == "black"),
        ),
        ({"colour": ["blue", "RED"]}, rows["colour"].isin(["blue", "red"])),
        ({"rips": True}, rows["rips"]),
        ({"rips": "TRUE", "garment": "jeans"}, rows["rips"] & (rows["garment"] == "jeans")),
        ({"rips": "false"}, ~rows["rips"]),
    ]:
        ids = set(rows.loc[keep, "file_name"])
        hits = search(index, model, text="ripped blue jeans", k=5, where=where, cache_dir=cache)
        _check(hits, [e for e in expected if e[0] in ids][:5])

    assert search(index, model, text="jeans", where={"colour": "bleu"}, cache_dir=cache) == []
    with pytest.raises(SearchIndexError, match=r"unknown attribute 'color'; attributes: garment, colour"):
        search(index, model, text="jeans", where={"color": "blue"}, cache_dir=cache)


def test_image_query_finds_itself_first(root: Path, fashion: Path, model: LoadedModel, built: Path) -> None:
    index, cache = load_index(built), root / "cache"
    query = fashion / "images" / "000007.png"
    emb = embed_images_with(model, [query], cache_dir=cache, progress=False).numpy()[0]
    hits = search(index, model, image=query, k=5, cache_dir=cache)
    _check(hits, _brute_force(model, fashion, cache, emb)[:5])
    assert hits[0].id == "images/000007.png" and hits[0].score == pytest.approx(1.0, abs=1e-5)


@BOTH_PATHS
def test_ties_rank_the_lower_item_first(subset_share: float, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(query_module, "_SUBSET_SHARE", subset_share)
    # 30 identical items e0 tie at score 1.0 for the query e0; FAISS sees only k + 16 = 21 candidates,
    # so the exact fallback must order them 0, 1, 2, ... (and 1, 3, 5, ... among the odd ones)
    vectors = np.zeros((40, 2), dtype=np.float32)
    vectors[:30, 0] = 1.0
    vectors[30:, 1] = 1.0
    flat = faiss.IndexFlatIP(2)
    flat.add(vectors)
    parity = ["odd" if i % 2 else "even" for i in range(40)]
    index = SearchIndex(
        path=Path("mem"), faiss_index=flat, ids=[f"i{i}" for i in range(40)], paths=[""] * 40,
        captions=[[f"c{i}"] for i in range(40)], attributes={"parity": parity}, model="m", model_source="",
        manifest={},
    )  # fmt: skip
    query = np.array([[1.0, 0.0]], dtype=np.float32)
    assert [h.id for h in search_embeddings(index, query, k=5)[0]] == ["i0", "i1", "i2", "i3", "i4"]
    hits = search_embeddings(index, query, k=5, where={"parity": "odd"})[0]
    assert [h.id for h in hits] == ["i1", "i3", "i5", "i7", "i9"]
    # 35 queries take FAISS's BLAS path; the selector and the tie rule must hold there too
    many = search_embeddings(index, np.repeat(query, 35, axis=0), k=3, where={"parity": "odd"})
    assert all([h.id for h in hits] == ["i1", "i3", "i5"] for hits in many)
    # a query orthogonal to the first 30 items: items 30..39 score 1, every other 0
    other = search_embeddings(index, np.array([[0.0, 1.0]], dtype=np.float32), k=12)[0]
    assert [h.id for h in other] == [f"i{i}" for i in range(30, 40)] + ["i0", "i1"]
    assert [h.caption for h in other[:2]] == ["c30", "c31"] and other[0].attributes == {"parity": "even"}


def test_other_model_is_refused(root: Path, fashion: Path, model: LoadedModel, built: Path) -> None:
    other = load_model(make_tiny_clip(root / "clip-other", seed=1))
    assert other.name != model.name
    with pytest.raises(SearchIndexError, match="was built with model .*; the query model is"):
        search(load_index(built), other, text="jeans")
    before = (built / "index.faiss").read_bytes()
    # the library states the facts (folder, both models); the CLI adds the flag (test_cli_index_and_search)
    with pytest.raises(
        IndexExistsError, match=rf"was built with model {model.name} .*; this is {other.name}"
    ) as exc:
        build_index(other, read_catalogue(fashion), built, cache_dir=root / "cache", progress=False)
    assert isinstance(exc.value, SearchIndexError) and exc.value.out == built
    assert "--overwrite" not in str(exc.value)
    assert (built / "index.faiss").read_bytes() == before
    # with overwrite=True (into a copy, the module's index stays): the new model's index replaces it
    copy = root / "idx-copy"
    shutil.copytree(built, copy)
    build_index(
        other, read_catalogue(fashion), copy, cache_dir=root / "cache", overwrite=True, progress=False
    )
    assert load_index(copy).model == other.name


def test_interrupted_build_leaves_nothing_or_the_old_index(
    tmp_path: Path, root: Path, fashion: Path, model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, cache = tmp_path / "idx", root / "cache"

    def write_then_fail(index: object, path: str) -> None:
        real_write(index, path)  # the vectors are on disk, the metadata not yet: a half-written index
        raise KeyboardInterrupt

    real_write = faiss.write_index
    monkeypatch.setattr(faiss, "write_index", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        build_index(model, read_catalogue(fashion), out, cache_dir=cache, progress=False)
    assert list(tmp_path.iterdir()) == []  # no OUT and no temporary folder

    monkeypatch.setattr(faiss, "write_index", real_write)
    build_index(model, read_catalogue(fashion), out, cache_dir=cache, progress=False)
    snapshot = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(faiss, "write_index", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        build_index(model, read_catalogue(fashion), out, cache_dir=cache, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == snapshot
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]

    monkeypatch.setattr(faiss, "write_index", real_write)  # same model: a rebuild replaces it in place
    build_index(model, read_catalogue(fashion), out, cache_dir=cache, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["idx"] and len(load_index(out)) == 40


def test_captions_and_disagreeing_attributes_are_merged_per_image(
    tmp_path: Path, root: Path, fashion: Path, model: LoadedModel
) -> None:
    cat = tmp_path / "cat"
    (cat / "img").mkdir(parents=True)
    for name in ("000000.png", "000001.png"):
        shutil.copy(fashion / "images" / name, cat / "img" / name)
    (cat / "metadata.csv").write_text(
        "file_name,text,lang,colour\n"
        "img/000001.png,blue jeans,en,blue\n"
        "img/000000.png,a dress,en,\n"
        "img/000001.png,jean bleu,fr,blue\n"
    )
    index = load_index(
        build_index(model, read_catalogue(cat), tmp_path / "idx", cache_dir=root / "cache", progress=False)
    )
    assert index.ids == ["img/000001.png", "img/000000.png"]  # first-appearance order
    assert index.captions == [["blue jeans", "jean bleu"], ["a dress"]]
    assert index.attributes == {"lang": [["en", "fr"], "en"], "colour": ["blue", None]}
    query = index.vectors()[:1]
    assert [h.id for h in search_embeddings(index, query, where={"lang": "fr"})[0]] == ["img/000001.png"]
    assert [h.id for h in search_embeddings(index, query, where={"lang": "en"})[0]] == [
        "img/000001.png",
        "img/000000.png",
    ]
    assert search_embeddings(index, query, where={"colour": "none"})[0] == []  # missing matches nothing

    (cat / "metadata.csv").write_text("file_name,text\nimg/000001.png,jeans\nimg/missing.png,a coat\n")
    with pytest.raises(
        IndexBadRowsError, match=r"1 bad row\(s\), nothing indexed:\n  row 2 \(img/missing.png\)"
    ) as exc:
        build_index(model, read_catalogue(cat), tmp_path / "idx2", cache_dir=root / "cache", progress=False)
    assert isinstance(exc.value, SearchIndexError) and exc.value.catalogue == read_catalogue(cat).root
    assert [r.file_name for r in exc.value.rejected] == ["img/missing.png"]
    assert "--write-clean" not in str(exc.value)  # the CLI adds it: test_cli_index_of_bad_rows_names_the_fix
    assert not (tmp_path / "idx2").exists()


def _index_and_search_app() -> typer.Typer:
    app = typer.Typer()
    index_cli.register(app)
    search_cli.register(app)
    return app


def test_cli_index_and_search(tmp_path: Path, root: Path, fashion: Path, model: LoadedModel) -> None:
    app = _index_and_search_app()
    runner = CliRunner()
    clip, out, cache = str(root / "clip"), str(tmp_path / "idx"), str(root / "cache")
    result = runner.invoke(app, ["index", clip, out, "--data", str(fashion), "--cache-dir", cache, "-q"])
    assert result.exit_code == 0, result.output
    assert f"indexed 40 images (dim 24) with {model.name}" in result.output

    args = ["search", out, "ripped blue jeans", "-k", "3", "--cache-dir", cache]
    result = runner.invoke(app, [*args, "--where", "colour=blue", "--where", "colour=red", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)  # stdout is pure JSON (progress bars go to stderr)
    expected = search(
        load_index(out), model, text="ripped blue jeans", k=3, where={"colour": ["blue", "red"]}
    )
    assert payload["where"] == {"colour": ["blue", "red"]} and payload["model"] == model.name
    assert [h["id"] for h in payload["hits"]] == [h.id for h in expected]
    assert payload["hits"][0] == {
        "rank": 1,
        "id": expected[0].id,
        "score": expected[0].score,
        "caption": expected[0].caption,
        "attributes": expected[0].attributes,
    }

    result = runner.invoke(app, [*args, "--where", "garment=jeans"])
    assert result.exit_code == 0, result.output
    assert "result(s) for ripped blue jeans" in result.output and "garment=jeans" in result.output

    result = runner.invoke(app, [*args, "--where", "colour=bleu"])
    assert result.exit_code == 0 and "no result; colour values in this index: black, blue" in result.output

    assert runner.invoke(app, [*args, "--where", "colour"]).exit_code == 2
    assert runner.invoke(app, [*args, "--image", str(fashion / "images" / "000001.png")]).exit_code == 2
    bad = runner.invoke(app, [*args, "--where", "color=blue"])
    assert bad.exit_code == 1 and "unknown attribute 'color'" in bad.output
    other = make_tiny_clip(tmp_path / "other", seed=1)
    refused = runner.invoke(
        app, ["index", str(other), out, "--data", str(fashion), "--cache-dir", cache, "-q"]
    )
    assert refused.exit_code == 1 and "use a new folder or --overwrite" in refused.output
    assert f"this is {load_model(other).name} (from {other}): use a new folder or --overwrite" in " ".join(
        refused.output.split()
    )


def test_cli_index_refuses_a_file_or_a_foreign_folder(tmp_path: Path, root: Path, fashion: Path) -> None:
    runner, clip = CliRunner(), str(root / "clip")
    args = ["--data", str(fashion), "--cache-dir", str(root / "cache"), "-q"]
    (tmp_path / "file").write_text("x")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    app = _index_and_search_app()
    result = runner.invoke(app, ["index", clip, str(tmp_path / "file"), *args])
    assert result.exit_code == 1
    assert "exists and is not a folder: use a new folder or --overwrite" in " ".join(result.output.split())
    result = runner.invoke(app, ["index", clip, str(tmp_path / "notes"), *args])
    assert result.exit_code == 1
    assert "is not empty and holds no index: use a new folder or --overwrite" in " ".join(
        result.output.split()
    )
    # --overwrite replaces even a file, and leaves nothing of it behind
    result = runner.invoke(app, ["index", clip, str(tmp_path / "file"), *args, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "file" / "index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "notes"]


def test_cli_index_of_bad_rows_names_the_fix(tmp_path: Path, root: Path, fashion: Path) -> None:
    cat = tmp_path / "cat"
    (cat / "img").mkdir(parents=True)
    shutil.copy(fashion / "images" / "000001.png", cat / "img" / "000001.png")
    (cat / "metadata.csv").write_text("file_name,text\nimg/000001.png,jeans\nimg/missing.png,a coat\n")
    out = tmp_path / "idx"
    result = CliRunner().invoke(
        _index_and_search_app(),
        ["index", str(root / "clip"), str(out), "--data", str(cat), "--cache-dir", str(root / "cache"), "-q"],
    )
    assert result.exit_code == 1 and not out.exists()
    assert "1 bad row(s), nothing indexed:\n  row 2 (img/missing.png)" in result.output
    root_dir = read_catalogue(cat).root
    assert (
        f"fix them, or index a clean copy (`cliptune data check {root_dir} --write-clean OUT`)"
        in " ".join(result.output.split())
    )


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """The embedded backbone's heads trained for a few epochs on attribute-rich captions (about a minute)."""
    root = tmp_path_factory.mktemp("embedded")
    # seed 2, n = 200: 68 products, one of them blue ripped jeans (2 photos); other jeans and other ripped
    # garments are distractors
    cat = render_fashion(root / "fashion", n=200, seed=2)
    cfg = Config.model_validate(
        {
            "name": "ft",
            "data": {"catalogue": str(cat), "split": {"ratios": {"train": 0.8, "val": 0.2}}},
            "model": {"cache_dir": str(root / "cache")},
            "train": {"epochs": 6, "batch_size": 16, "lr": 2e-3, "early_stopping": None},
        }
    )
    return train(cfg, runs_root=root / "runs", quiet=True), cat, root / "cache"


def test_embedded_model_finds_ripped_blue_jeans(embedded_run: tuple[Path, Path, Path]) -> None:
    run, cat, cache = embedded_run
    model = load_model(run)
    out = build_index(model, read_catalogue(cat), run.parent / "idx", cache_dir=cache, progress=False)
    hits = search(load_index(out), model, text="ripped blue jeans", k=5, cache_dir=cache)
    top = hits[0].attributes
    assert (top["garment"], top["colour"], top["rips"]) == ("jeans", "blue", True), hits
