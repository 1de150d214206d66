"""2 processes (gloo) build the same index and Parquet file as 1 process, and a failure on process 1 ends both.

The processes are forked (imports shared, fast) and join through the launcher's environment variables and
:func:`launched_processes`, as under ``torchrun``. Each side embeds with its own feature cache, so the
2-process vectors are really computed by two processes, not read back from the 1-process run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from safetensors import safe_open

import cliptune.models.embed as embed_module
from cliptune.data.catalogue import read_catalogue
from cliptune.data.synthetic import render_fashion
from cliptune.models.factory import load_model
from cliptune.search import build_index, load_index
from cliptune.search.errors import SearchIndexError
from cliptune.search.sharded import OtherProcessFailedError, Processes, shard_rows
from cliptune.search.vectors import export_embeddings
from tests.launched import launch, run_rank
from tests.tiny_models import make_tiny_clip

WORLD, BATCH = 2, 4


def _worker(rank: int, port: int, root: str, job: str) -> None:
    """One launched process: build both indexes and the Parquet file (``ok``) or fail on process 1 (``bad``)."""
    import cliptune.models.embed as embed_module

    base = Path(root)
    model, catalogue = load_model(str(base / "clip")), read_catalogue(base / "fashion")
    if job == "bad" and rank == 1:  # an image of process 1's shard cannot be decoded at embedding time
        real = embed_module.load_image
        broken = Path(catalogue.image_path(str(catalogue.rows["file_name"].iloc[-1]))).resolve()

        def load(path: Path, **kwargs: Any) -> Any:
            if Path(path).resolve() == broken:
                raise OSError("image file is truncated")
            return real(path, **kwargs)

        embed_module.load_image = load  # type: ignore[assignment]  # this forked process only
    cache = base / f"cache-{job}"

    def work(processes: Processes) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for kind in ("flat", "hnsw"):
            out = build_index(
                model,
                catalogue,
                base / f"{job}-{kind}",
                cache_dir=cache,
                batch_size=BATCH,
                progress=False,
                kind=kind,
                processes=processes,
            )
            result[f"returned-{kind}"] = str(out)
        info = export_embeddings(
            model,
            catalogue,
            base / f"{job}.parquet",
            texts=True,
            cache_dir=cache,
            batch_size=BATCH,
            progress=False,
            processes=processes,
        )
        return {**result, "n_rows": info["n_rows"]}

    run_rank(rank, port, WORLD, root, job, work)


def _no_decoding(path: Path, **kwargs: Any) -> Any:
    raise AssertionError(f"{path} was decoded: its features should have come from the cache")


def _shard_rows(cache: Path) -> list[int]:
    """Rows of each feature-cache shard file (one file per flush of one process)."""
    rows = []
    for shard in cache.glob("*/shards/*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            rows.append(len(json.loads((f.metadata() or {})["keys"])))
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mp")
    render_fashion(root / "fashion", n=30, seed=0, size=128)
    make_tiny_clip(root / "clip")
    return root


def test_shards_are_contiguous_whole_batches() -> None:
    # 30 rows in batches of 4 = 8 batches: 4 each; the last batch is 2 rows
    assert shard_rows(30, 4, Processes(0, 2)) == list(range(0, 16))
    assert shard_rows(30, 4, Processes(1, 2)) == list(range(16, 30))
    # 3 batches over 2 processes: 2 + 1 (shard_indices' padding repeat is dropped)
    assert shard_rows(9, 4, Processes(0, 2)) == list(range(0, 8))
    assert shard_rows(9, 4, Processes(1, 2)) == [8]
    # fewer batches than processes: the second one gets nothing
    assert shard_rows(3, 4, Processes(1, 2)) == []
    assert shard_rows(3, 4, Processes(0, 1)) == [0, 1, 2]


def test_two_processes_write_the_one_process_index_and_file(
    setup: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = setup
    model, catalogue = load_model(str(root / "clip")), read_catalogue(root / "fashion")
    cache = root / "cache-one"
    for kind in ("flat", "hnsw"):
        build_index(
            model,
            catalogue,
            root / f"one-{kind}",
            cache_dir=cache,
            batch_size=BATCH,
            progress=False,
            kind=kind,
        )
    export_embeddings(
        model, catalogue, root / "one.parquet", texts=True, cache_dir=cache, batch_size=BATCH, progress=False
    )

    results = launch(_worker, WORLD, root, "ok")
    for rank, result in enumerate(results):
        assert "error" not in result, result
        assert result["processes"] == [rank, WORLD]
        assert result["returned-flat"] == str(root / "ok-flat")  # every process returns the folder
        assert result["n_rows"] == 30
    # both processes embedded their shard of images (16 and 14 of 30): each flushed its own cache shard,
    # while the 1-process run flushed all 30 images at once (caption shards are written on the main process)
    assert {16, 14} <= set(_shard_rows(root / "cache-ok"))
    assert not {16, 14} & set(_shard_rows(root / "cache-one"))
    assert 30 in _shard_rows(root / "cache-one")
    # the cache both processes wrote at once is whole: no temp file left, and a 1-process build that reads
    # every image from it (no image decoded: they are all hits) writes the same index again
    assert [p.name for p in (root / "cache-ok").rglob(".*")] == []
    monkeypatch.setattr(embed_module, "load_image", _no_decoding)
    reread = build_index(
        model, catalogue, root / "reread", cache_dir=root / "cache-ok", batch_size=BATCH, progress=False
    )
    assert (reread / "index.faiss").read_bytes() == (root / "one-flat" / "index.faiss").read_bytes()

    for kind in ("flat", "hnsw"):
        one, two = root / f"one-{kind}", root / f"ok-{kind}"
        assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
        assert (two / "index.faiss").read_bytes() == (one / "index.faiss").read_bytes()
        assert (two / "items.jsonl").read_bytes() == (one / "items.jsonl").read_bytes()
        m1, m2 = (json.loads((d / "index.json").read_text()) for d in (one, two))
        m1.pop("created"), m2.pop("created")
        assert m2 == m1
        a, b = load_index(one), load_index(two)
        assert b.ids == a.ids and len(a.ids) == 30
        assert np.array_equal(a.vectors(), b.vectors())
    assert (root / "ok.parquet").exists()
    t1, t2 = pd.read_parquet(root / "one.parquet"), pd.read_parquet(root / "ok.parquet")
    assert list(t2.columns) == list(t1.columns)
    for column in t1.columns:
        if column.endswith("_embedding"):
            assert np.array_equal(np.stack(t1[column].to_list()), np.stack(t2[column].to_list())), column
        else:
            assert t2[column].equals(t1[column]), column
    # the index's stored vectors are the file's image vectors (one image per row here)
    first = dict(zip(t1["file_name"], np.stack(t1["image_embedding"].to_list()), strict=False))
    index = load_index(root / "ok-flat")
    assert np.array_equal(np.stack([first[i] for i in index.ids]), index.vectors())


def test_a_bad_image_on_process_1_ends_both_with_its_message(setup: Path) -> None:
    root = setup
    results = launch(_worker, WORLD, root, "bad")  # returns: neither process hangs
    name, message = results[0]["error"]
    catalogue = read_catalogue(root / "fashion")
    broken = Path(catalogue.image_path(str(catalogue.rows["file_name"].iloc[-1]))).resolve()
    assert name == "ImageLoadError"  # the main process reports process 1's error itself, naming the file
    assert message == f"{broken}: cannot load image (image file is truncated)"
    other, relayed = results[1]["error"]
    assert other == "OtherProcessFailedError"
    assert relayed == f"process 1 failed: {message}"
    assert not (root / "bad-flat").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".bad-flat")]  # no temporary folder left


@pytest.mark.parametrize("rank", [0, 1])
def test_only_the_main_process_prints_an_error(
    rank: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import contextlib

    import typer

    from cliptune.cli import index as index_cli
    from cliptune.search import sharded

    @contextlib.contextmanager
    def launched() -> Iterator[Processes]:
        yield Processes(rank, 2)

    monkeypatch.setattr(sharded, "launched_processes", launched)
    message = "data/x.png: cannot load image (truncated)"
    # what on_every raises: the failure itself on the main process, a relay elsewhere
    error = SearchIndexError(message) if rank == 0 else OtherProcessFailedError(1, message)
    with pytest.raises(typer.Exit) as info, index_cli.main_process_speaks():
        raise error
    assert info.value.exit_code == 1
    err = capsys.readouterr().err
    assert (message in err) == (rank == 0)  # printed once, by the main process
    assert "process 1 failed" not in err
