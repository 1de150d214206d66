"""`cliptune embed`: one Parquet row per catalogue row with its vectors, bit-equal to an index's; the model
named in the file's metadata; bad rows and unknown columns refused with the facts, never a traceback."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from cliptune.cli import embed as embed_cli
from cliptune.data.catalogue import read_catalogue
from cliptune.data.synthetic import render_fashion
from cliptune.models.backbone import PixelRecipe
from cliptune.models.embed import Workers, embed_images_with, embed_texts_with
from cliptune.models.factory import LoadedModel, load_model
from cliptune.search import build_index, load_index
from cliptune.search.index import IndexBadRowsError
from cliptune.search.vectors import EmbedBadRowsError, EmbedError, export_embeddings, read_embeddings_metadata
from tests.tiny_models import make_tiny_clip

ATTRIBUTES = ["garment", "colour", "pattern", "rips", "style"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embed")


@pytest.fixture(scope="module")
def fashion(root: Path) -> Path:
    return render_fashion(root / "fashion", n=24, seed=0)  # 24 photos, one caption each


@pytest.fixture(scope="module")
def model(root: Path) -> LoadedModel:
    return load_model(make_tiny_clip(root / "clip", seed=0))


def _app() -> typer.Typer:
    app = typer.Typer()
    embed_cli.register(app)
    app.command("noop")(lambda: None)  # a second command keeps `embed` a subcommand, as in cliptune's app
    return app


def _embed(root: Path, catalogue: Path, out: Path, *extra: str) -> tuple[int, str]:
    args = [
        "embed",
        str(root / "clip"),
        str(out),
        "--data",
        str(catalogue),
        "--cache-dir",
        str(root / "cache"),
    ]
    result = CliRunner().invoke(_app(), [*args, "-q", *extra])
    # a user error exits through typer.Exit: never an uncaught exception (a traceback)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, " ".join(result.output.split())


def _matrix(column: pd.Series) -> np.ndarray:
    return np.stack(column.to_list())


def test_cli_writes_one_row_per_catalogue_row_with_the_index_vectors(
    tmp_path: Path, root: Path, fashion: Path, model: LoadedModel
) -> None:
    out = tmp_path / "vectors" / "fashion.parquet"  # the folder is created
    code, output = _embed(root, fashion, out)
    assert code == 0, output
    assert f"embedded 24 rows (24 images, image vectors of dim 24) with {model.name} into {out}" in output

    table = pd.read_parquet(out)
    rows = pd.read_csv(fashion / "metadata.csv")
    assert list(table.columns) == ["file_name", "caption", *ATTRIBUTES, "image_embedding"]
    assert table["file_name"].tolist() == rows["file_name"].tolist()
    assert table["caption"].tolist() == rows["text"].tolist()
    assert table["rips"].tolist() == rows["rips"].tolist() and table["rips"].dtype == bool
    schema = pq.read_schema(out)
    assert schema.field("image_embedding").type == pa.list_(pa.float32())
    vectors = _matrix(table["image_embedding"])
    assert vectors.shape == (24, 24) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    # the same bits as `cliptune index` stores and as embed_images_with returns for the same files
    index = load_index(
        build_index(
            model, read_catalogue(fashion), tmp_path / "idx", cache_dir=root / "cache", progress=False
        )
    )
    assert index.ids == table["file_name"].tolist()
    np.testing.assert_array_equal(vectors, index.vectors())
    direct = embed_images_with(
        model, [fashion / f for f in rows["file_name"]], cache_dir=root / "cache", progress=False
    ).numpy()
    np.testing.assert_array_equal(vectors, direct)

    info = read_embeddings_metadata(out)
    assert (info["format"], info["version"], info["model"]) == ("cliptune-embeddings", 1, model.name)
    assert info["model_source"] == str((root / "clip").resolve()) and info["dim"] == 24
    assert (info["n_rows"], info["n_images"], info["text_column"]) == (24, 24, "text")
    assert info["columns"] == list(table.columns)
    assert json.loads(schema.metadata[b"cliptune"]) == info  # readable without cliptune too

    # a rerun replaces the file atomically: nothing but the file is left beside it
    code, output = _embed(root, fashion, out)
    assert code == 0, output
    assert [p.name for p in out.parent.iterdir()] == ["fashion.parquet"]


def test_cli_texts_and_another_caption_column(
    tmp_path: Path, root: Path, fashion: Path, model: LoadedModel
) -> None:
    out = tmp_path / "t.parquet"
    code, output = _embed(root, fashion, out, "--texts", "--text-column", "text_generic")
    assert code == 0, output
    assert "image and text vectors of dim 24" in output
    table = pd.read_parquet(out)
    rows = pd.read_csv(fashion / "metadata.csv")
    assert list(table.columns) == ["file_name", "caption", *ATTRIBUTES, "image_embedding", "text_embedding"]
    assert table["caption"].tolist() == rows["text_generic"].tolist()
    assert pq.read_schema(out).field("text_embedding").type == pa.list_(pa.float32())
    texts = _matrix(table["text_embedding"])
    assert texts.shape == (24, 24) and texts.dtype == np.float32
    expected = embed_texts_with(
        model, rows["text_generic"].tolist(), cache_dir=root / "cache", progress=False
    )
    np.testing.assert_array_equal(texts, expected.numpy())
    assert read_embeddings_metadata(out)["text_column"] == "text_generic"


def test_an_image_with_several_rows_is_embedded_once_and_repeated(
    tmp_path: Path, root: Path, fashion: Path, model: LoadedModel
) -> None:
    cat = tmp_path / "cat"
    (cat / "img").mkdir(parents=True)
    for name in ("000000.png", "000001.png"):
        shutil.copy(fashion / "images" / name, cat / "img" / name)
    records = [
        {"file_name": "img/000001.png", "text": "blue jeans", "lang": "en", "size": 3},
        {"file_name": "img/000000.png", "text": "a dress", "lang": "en", "size": None},
        {"file_name": "img/000001.png", "text": "jean bleu", "lang": "fr", "size": "x"},
    ]
    (cat / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    info = export_embeddings(
        model, read_catalogue(cat), tmp_path / "e.parquet", cache_dir=root / "cache", progress=False
    )
    assert (info["n_rows"], info["n_images"]) == (3, 2)
    table = pd.read_parquet(tmp_path / "e.parquet")
    assert table["file_name"].tolist() == ["img/000001.png", "img/000000.png", "img/000001.png"]
    assert table["lang"].tolist() == ["en", "en", "fr"]
    # cells of mixed types are kept as text, missing ones as null
    assert pq.read_table(tmp_path / "e.parquet").column("size").to_pylist() == ["3", None, "x"]
    vectors = _matrix(table["image_embedding"])
    np.testing.assert_array_equal(vectors[0], vectors[2])
    assert not np.array_equal(vectors[0], vectors[1])


def test_cli_bad_rows_exit_1_listing_them(
    tmp_path: Path, root: Path, fashion: Path, model: LoadedModel
) -> None:
    cat = tmp_path / "cat"
    (cat / "img").mkdir(parents=True)
    shutil.copy(fashion / "images" / "000001.png", cat / "img" / "000001.png")
    (cat / "metadata.csv").write_text(
        "file_name,text,text_generic\nimg/000001.png,jeans,jeans\nimg/missing.png,a coat,a coat\n"
        "img/000001.png,,blank\n"
    )
    out = tmp_path / "e.parquet"
    code, output = _embed(root, cat, out)
    assert code == 1 and not out.exists()
    assert "2 bad row(s), nothing embedded: row 2 (img/missing.png): file not found" in output
    assert "row 3 (img/000001.png): missing text" in output
    root_dir = read_catalogue(cat).root
    assert f"embed a clean copy (`cliptune data check {root_dir} --write-clean OUT`)" in output

    # the library states the facts; another caption column must be filled as well
    (cat / "metadata.csv").write_text("file_name,text,text_generic\nimg/000001.png,jeans,\n")
    with pytest.raises(EmbedBadRowsError, match=r"row 1 \(img/000001.png\): missing text_generic") as exc:
        export_embeddings(model, read_catalogue(cat), out, text_column="text_generic", progress=False)
    assert isinstance(exc.value, IndexBadRowsError) and [r.row for r in exc.value.rejected] == [1]
    assert "--write-clean" not in str(exc.value) and not out.exists()


def test_cli_unknown_text_column_and_bad_options(
    tmp_path: Path, root: Path, fashion: Path, model: LoadedModel
) -> None:
    out = tmp_path / "e.parquet"
    code, output = _embed(root, fashion, out, "--text-column", "caption_en")
    assert code == 1 and not out.exists()
    assert "no caption column 'caption_en' (columns: file_name, text, text_generic, group, garment" in output
    code, output = _embed(root, fashion, out, "--precision", "fp16")
    assert code == 2 and "--precision must be auto, fp32 or bf16, got fp16" in output
    out.mkdir()
    code, output = _embed(root, fashion, out)
    assert code == 1 and "is a folder; the embeddings are written to one Parquet file" in output


def test_attribute_named_like_an_output_column_is_refused(
    tmp_path: Path, root: Path, fashion: Path, model: LoadedModel
) -> None:
    cat = tmp_path / "cat"
    (cat / "img").mkdir(parents=True)
    shutil.copy(fashion / "images" / "000001.png", cat / "img" / "000001.png")
    (cat / "metadata.csv").write_text("file_name,text,caption\nimg/000001.png,jeans,old caption\n")
    with pytest.raises(EmbedError, match=r"attribute column\(s\) caption would clash"):
        export_embeddings(model, read_catalogue(cat), tmp_path / "e.parquet", progress=False)
    # ... unless it is the caption column itself
    info = export_embeddings(
        model,
        read_catalogue(cat),
        tmp_path / "e.parquet",
        text_column="caption",
        cache_dir=root / "cache",
        progress=False,
    )
    assert info["columns"] == ["file_name", "caption", "image_embedding"]
    assert pd.read_parquet(tmp_path / "e.parquet")["caption"].tolist() == ["old caption"]


def test_read_metadata_of_a_foreign_file(tmp_path: Path) -> None:
    pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "x.parquet")
    with pytest.raises(EmbedError, match="no cliptune description"):
        read_embeddings_metadata(tmp_path / "x.parquet")
    (tmp_path / "y.parquet").write_text("not parquet")
    with pytest.raises(EmbedError, match="not a readable Parquet file"):
        read_embeddings_metadata(tmp_path / "y.parquet")


def _photos(folder: Path) -> list[Path]:
    """Two real photos (skimage) as 1024 x 768 quality-92 JPEGs."""
    from PIL import Image
    from skimage.data import astronaut, coffee

    folder.mkdir(exist_ok=True)
    paths = []
    for name, photo in (("astronaut", astronaut()), ("coffee", coffee())):
        paths.append(folder / f"{name}.jpg")
        Image.fromarray(photo).resize((1024, 768), Image.Resampling.LANCZOS).save(paths[-1], quality=92)
    return paths


def _full_decode_embeddings(model: LoadedModel, paths: list[Path]) -> torch.Tensor:
    """The reference: every file decoded at full size, the backbone's preprocess, towers and head."""
    from cliptune.data.images import load_image

    backbone = model.backbone
    with torch.inference_mode():
        pixels = backbone.preprocess([load_image(p) for p in paths])
        feats = backbone.image_head(backbone.image_features(pixels))
    return torch.nn.functional.normalize(feats, dim=-1)


def test_large_jpegs_embed_reduced_with_the_same_embeddings_when_fast_decode_is_on(
    root: Path, model: LoadedModel
) -> None:
    from PIL import Image

    from cliptune.models.embed import DRAFT_OVERSAMPLE, image_loader, model_input_side

    backbone = model.backbone
    side = model_input_side(backbone.preprocess)
    assert side == max(backbone.preprocess([Image.new("RGB", (300, 200))]).shape[-2:])
    load, key = image_loader(backbone.preprocess, 1_000_000, fast_decode=True)
    assert key == f"jpeg-min-side={DRAFT_OVERSAMPLE * side}"
    paths = _photos(root / "photos")
    assert load(paths[0]).size[1] < 768  # decoded reduced
    backbone.fast_decode = True
    try:
        got = embed_images_with(model, paths, cache_dir=root / "photo-cache", progress=False)
    finally:
        backbone.fast_decode = False
    cos = (got * _full_decode_embeddings(model, paths)).sum(dim=-1)
    assert cos.min().item() >= 0.999, cos


def test_full_decode_is_the_default_and_never_gets_fast_decoded_features(
    root: Path, model: LoadedModel
) -> None:
    from cliptune.models.embed import FULL_DECODE_ID, image_loader

    backbone = model.backbone
    assert backbone.fast_decode is False
    load, key = image_loader(backbone.preprocess)
    paths = _photos(root / "photos-cache")
    assert key == FULL_DECODE_ID and load(paths[0]).size == (1024, 768)
    cache_dir = root / "fast-then-full"
    backbone.fast_decode = True
    try:
        fast = embed_images_with(model, paths, cache_dir=cache_dir, precision="fp32", progress=False)
    finally:
        backbone.fast_decode = False
    assert any(p.is_file() for p in cache_dir.rglob("*"))  # the fast features were cached
    full = embed_images_with(model, paths, cache_dir=cache_dir, precision="fp32", progress=False)
    want = _full_decode_embeddings(model, paths)
    # the full-decode run recomputed (a cached fast feature would differ from the reference)
    assert torch.allclose(full, want, atol=1e-5) and not torch.allclose(fast, want, atol=1e-4)
    # and it left its own entries: a second full run reads them back bit for bit
    again = embed_images_with(model, paths, cache_dir=cache_dir, precision="fp32", progress=False)
    assert torch.equal(again, full)


def test_fast_decode_is_saved_with_the_model_and_restored(root: Path) -> None:
    from cliptune.models.factory import load_backbone

    backbone = load_backbone(make_tiny_clip(root / "clip-fd", seed=0))
    assert backbone.fast_decode is False
    backbone.fast_decode = True
    backbone.save(root / "saved-fd")
    assert json.loads((root / "saved-fd" / "cliptune_backbone.json").read_text())["fast_decode"] is True
    assert load_model(root / "saved-fd").backbone.fast_decode is True
    backbone.fast_decode = False
    backbone.save(root / "saved-full")
    assert load_model(root / "saved-full").backbone.fast_decode is False


def test_model_input_side_is_none_for_a_size_preserving_preprocess() -> None:

    from cliptune.models.embed import image_loader, model_input_side

    def as_is(images: list[Image.Image]) -> torch.Tensor:
        return torch.stack(
            [torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) for im in images]
        )

    assert model_input_side(as_is) is None
    assert image_loader(as_is, fast_decode=True)[1] == ""  # full decode, the plain cache key


def _jpeg_catalogue(folder: Path, n: int = 12) -> Path:
    """``n`` detailed 256 x 192 JPEGs with captions: large for the tiny CLIP (32 px), so fast decoding
    draws them at 1/2 scale (192 // 2 = 96 >= 2 x 32 > 192 // 4 = 48)."""
    from PIL import Image

    rng = np.random.default_rng(7)
    (folder / "img").mkdir(parents=True)
    lines = ["file_name,text"]
    for i in range(n):
        coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((256, 192), Image.Resampling.BILINEAR), np.int16)
        detail = rng.integers(-40, 40, (192, 256, 3))
        Image.fromarray(np.clip(smooth + detail, 0, 255).astype(np.uint8)).save(
            folder / "img" / f"{i}.jpg", quality=92
        )
        lines.append(f"img/{i}.jpg,photo number {i}")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_a_model_trained_with_fast_decode_evaluates_and_embeds_fast_decoded(tmp_path: Path) -> None:
    import yaml

    from cliptune.cli.app import app
    from cliptune.models.cache import FeatureCache, feature_key

    catalogue = _jpeg_catalogue(tmp_path / "cat")
    cfg = {
        "data": {
            "catalogue": str(catalogue),
            "fast_decode": True,
            "split": {"ratios": {"train": 0.5, "val": 0.5}},
        },
        "model": {
            "backbone": str(make_tiny_clip(tmp_path / "clip", seed=0)),
            "cache_dir": str(tmp_path / "c-train"),
            "embed_precision": "fp32",
        },
        "train": {"epochs": 1, "batch_size": 4, "early_stopping": None},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    runner = CliRunner()
    done = runner.invoke(
        app, ["train", str(tmp_path / "run.yaml"), "--name", "fd", "--runs", str(tmp_path / "runs"), "-q"]
    )
    assert done.exit_code == 0, done.output
    run = tmp_path / "runs" / "fd"
    assert json.loads((run / "model" / "cliptune_backbone.json").read_text())["fast_decode"] is True

    trained = load_model(run / "model")
    assert trained.backbone.fast_decode is True
    paths = [catalogue / "img" / f"{i}.jpg" for i in range(12)]
    fast = embed_images_with(trained, paths, use_cache=False, precision="fp32", progress=False).numpy()
    trained.backbone.fast_decode = False
    full = embed_images_with(trained, paths, use_cache=False, precision="fp32", progress=False).numpy()
    assert np.abs(fast - full).max() > 1e-3  # the two decodes give other embeddings here

    # eval of the run: its feature cache holds fast-decode image features (min side 2 x 32) and no full ones
    done = runner.invoke(
        app,
        [
            "eval",
            str(run),
            "--cache-dir",
            str(tmp_path / "c-eval"),
            "--out",
            str(tmp_path / "ev"),
            "--split",
            "val",
            "-q",
        ],
    )
    assert done.exit_code == 0, done.output
    cache = FeatureCache(tmp_path / "c-eval", trained.backbone.identity())
    shas = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]

    def keys(preprocess_id: str) -> list[str]:
        return [
            feature_key(cache.identity, "image", s, preprocess_id=preprocess_id, precision="fp32")
            for s in shas
        ]

    val = json.loads((run / "splits.json").read_text())["val"]
    assert len(cache.get_many(keys("jpeg-min-side=64"))) == len(val) > 0
    assert cache.get_many(keys("")) == {}

    # embed of the run's model: the fast-decode embeddings, not the full ones
    out = tmp_path / "vectors.parquet"
    args = [
        "embed",
        str(run / "model"),
        str(out),
        "--data",
        str(catalogue),
        "--cache-dir",
        str(tmp_path / "c-emb"),
        "--precision",
        "fp32",
    ]
    done = runner.invoke(app, [*args, "-q"])
    assert done.exit_code == 0, done.output
    vectors = _matrix(pd.read_parquet(out)["image_embedding"])
    np.testing.assert_allclose(vectors, fast, atol=1e-6)
    assert np.abs(vectors - full).max() > 1e-3


# --- a batch decodes on the forward's threads (0 workers) ----------------------------------------------


def _to_4x4(image: Image.Image) -> np.ndarray:
    return np.asarray(image.resize((4, 4), Image.Resampling.NEAREST), dtype=np.uint8)  # (4, 4, 3)


_RECIPE = PixelRecipe(to_uint8=_to_4x4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), identity="test-4x4")


def _colour_files(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        Image.new("RGB", (12 + i, 9), (10 * i, 255 - 10 * i, 7 * i)).save(folder / f"{i}.png")
        paths.append(folder / f"{i}.png")
    return paths


def test_a_batch_decodes_on_two_threads_in_order_with_the_same_pixels(tmp_path: Path) -> None:
    from cliptune.data.images import load_image
    from cliptune.models.embed import _loaded

    paths = _colour_files(tmp_path, 7)
    meeting = threading.Barrier(2, timeout=10)  # passes only if two loads run at the same time
    threads: set[int] = set()

    def load(path: Path) -> Image.Image:
        threads.add(threading.get_ident())
        if path.name in ("0.png", "1.png", "4.png", "5.png"):  # two files of each batch meet: in parallel
            meeting.wait()
        return load_image(path)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        batches = list(_loaded(paths, load, _RECIPE, 4, 0, False))
    finally:
        torch.set_num_threads(before)
    assert [tuple(b.shape) for b in batches] == [(4, 4, 4, 3), (3, 4, 4, 3)]
    # an independent computation, one file at a time in path order: the same uint8 pixels, row for row
    want = np.stack(
        [np.asarray(Image.open(p).convert("RGB").resize((4, 4), Image.Resampling.NEAREST)) for p in paths]
    )
    assert np.array_equal(torch.cat(batches).numpy(), want)
    assert threading.get_ident() not in threads  # every file was decoded on a decode thread


def test_a_bad_file_in_a_threaded_batch_is_raised_naming_it(tmp_path: Path) -> None:
    from cliptune.data.images import ImageLoadError, load_image
    from cliptune.models.embed import _loaded

    paths = _colour_files(tmp_path, 4)
    paths[2].write_bytes(b"")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(ImageLoadError, match="empty file") as raised:
            list(_loaded(paths, load_image, _RECIPE, 4, 0, False))
    finally:
        torch.set_num_threads(before)
    assert raised.value.path == paths[2]


def test_decode_threads_follow_the_forward_with_no_workers_and_are_one_per_worker() -> None:
    from cliptune.models.embed import _decode_threads

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert (_decode_threads(0), _decode_threads(2)) == (3, 1)
    finally:
        torch.set_num_threads(before)


# --- how many decoding workers: data.num_workers "auto" ------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "device", "cores", "processes", "want"),
    [
        ("auto", "cpu", 16, 1, 0),  # the forward takes every core; decoding runs on its threads
        (None, "cpu", 16, 1, 0),  # None means auto
        ("auto", "cuda", 16, 1, 8),  # 16 - 1 = 15, capped at 8
        ("auto", "cuda", 16, 4, 3),  # 16 // 4 - 1 = 3 per process of a 4-process launch
        ("auto", "cuda", 2, 1, 1),  # 2 - 1 = 1
        ("auto", "cuda", 1, 1, 1),  # 1 - 1 = 0, but an accelerator always gets one
        ("auto", "mps", 6, 1, 5),  # any accelerator: 6 - 1 = 5
        ("auto", "cuda:1", 8, 8, 1),  # 8 // 8 - 1 = 0 -> at least 1
        (0, "cuda", 16, 1, 0),  # an int is taken as given, on any device
        (3, "cpu", 16, 1, 3),
    ],
)
def test_decode_workers_table(
    setting: Workers | None, device: str, cores: int, processes: int, want: int
) -> None:
    from cliptune.models.embed import decode_workers

    assert decode_workers(setting, device, cores=cores, processes=processes) == want


def test_decode_workers_start_none_for_a_job_smaller_than_two_batches() -> None:
    from cliptune.models.embed import decode_workers

    # batch 64: 127 images are under 2 batches (workers would start for ~2 forwards); 128 are not
    assert decode_workers("auto", "cuda", items=127, batch_size=64, cores=16, processes=1) == 0
    assert decode_workers("auto", "cuda", items=128, batch_size=64, cores=16, processes=1) == 8
    assert decode_workers(2, "cuda", items=1, batch_size=64) == 2  # a given count is never second-guessed


def test_decode_workers_default_to_this_process_cores_and_the_launch_local_processes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import os

    from cliptune.models.embed import decode_workers

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # what torchrun / accelerate launch set per machine
    assert decode_workers("auto", "cuda") == max(1, min(8, cores // 2 - 1))
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert decode_workers("auto", "cuda") == max(1, min(8, cores - 1))


@pytest.mark.parametrize("setting", ["many", -1, True])
def test_decode_workers_refuse_a_bad_setting(setting: Any) -> None:
    from cliptune.models.embed import decode_workers

    with pytest.raises(ValueError, match="num_workers"):
        decode_workers(setting, "cuda")


def _spy_workers(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The ``num_workers`` of every DataLoader ``embed_images`` builds (the real loader still runs)."""
    from torch.utils.data import DataLoader

    import cliptune.models.embed as embed

    seen: list[int] = []

    def spy(*args: Any, **kwargs: Any) -> DataLoader[Any]:
        seen.append(int(kwargs["num_workers"]))
        return DataLoader(*args, **kwargs)

    monkeypatch.setattr(embed, "DataLoader", spy)
    return seen


def _embed_colours(paths: list[Path], **kw: Any) -> torch.Tensor:
    from cliptune.data.images import load_image
    from cliptune.models.embed import embed_images

    return embed_images(
        paths,
        cache=None,
        load=load_image,
        preprocess=lambda images: torch.zeros(len(images), 3, 4, 4),  # unused: the recipe's uint8 path runs
        forward=lambda pixels: pixels.flatten(1)[:, :6],  # (B, 4, 4, 3) normalised -> (B, 6)
        batch_size=2,
        precision="fp32",
        progress=False,
        recipe=_RECIPE,
        **kw,
    )


def test_embed_images_on_the_cpu_starts_no_worker_by_default_and_a_given_count_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = _colour_files(tmp_path, 5)  # 5 images >= 2 batches of 2: not a small job, so the device decides
    seen = _spy_workers(monkeypatch)
    default = _embed_colours(paths)
    assert seen == [0]
    given = _embed_colours(paths, num_workers=1)
    assert seen == [0, 1]
    # the same features either way: row i is image i's first six normalised values, (x / 255 - 0.5) / 0.5
    # of its 4 x 4 uint8 pixels in (3, H, W) order
    pixels = [torch.from_numpy(_to_4x4(Image.open(p).convert("RGB")).copy()).permute(2, 0, 1) for p in paths]
    want = torch.stack([(x.float() / 255 - 0.5) / 0.5 for x in pixels]).flatten(1)[:, :6]  # (5, 6)
    torch.testing.assert_close(default, want)
    torch.testing.assert_close(given, default)
