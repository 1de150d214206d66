"""Shards at scale: a 2-process index of a shard pattern equals the folder's, the CLI end to end on shards,
and reading a shard pattern holds only the metadata in memory."""

from __future__ import annotations

import io
import json
import tarfile
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cliptune.cli.app import app
from cliptune.data.catalogue import read_catalogue
from cliptune.data.shards import write_shards
from cliptune.data.synthetic import render_fashion
from cliptune.models.factory import load_model
from cliptune.search import build_index, load_index
from cliptune.search.sharded import Processes
from tests.launched import launch, run_rank
from tests.tiny_models import make_tiny_clip

WORLD, BATCH = 2, 4


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shards-index")
    fashion = render_fashion(root / "fashion", n=30, seed=0, size=128)
    # 7 images per shard: shard boundaries (7, 14, ...) fall inside the batches of 4 and inside the
    # 2 processes' halves (16 + 14 images), so no process's rows line up with a shard
    pattern = write_shards(read_catalogue(fashion), root / "shards", shard_size=7)
    make_tiny_clip(root / "clip")
    return {"root": root, "fashion": fashion, "pattern": Path(pattern), "clip": root / "clip"}


def _index_worker(rank: int, port: int, root: str, job: str, pattern: str) -> None:
    """One launched process (as under torchrun): index the shard pattern with its own feature cache."""
    base = Path(root)

    def work(processes: Processes) -> dict[str, Any]:
        model, catalogue = load_model(str(base / "clip")), read_catalogue(Path(pattern))
        out = build_index(
            model,
            catalogue,
            base / job,
            cache_dir=base / f"cache-{job}",
            batch_size=BATCH,
            progress=False,
            processes=processes,
        )
        return {"returned": str(out)}

    run_rank(rank, port, WORLD, root, job, work)


def test_two_processes_index_a_shard_pattern_as_one_process_indexes_the_folder(
    world: dict[str, Path],
) -> None:
    root = world["root"]
    model = load_model(str(world["clip"]))
    folder = build_index(
        model,
        read_catalogue(world["fashion"]),
        root / "one-folder",
        cache_dir=root / "cache-one",
        batch_size=BATCH,
        progress=False,
    )
    results = launch(_index_worker, WORLD, root, "two-shards", str(world["pattern"]))
    for rank, result in enumerate(results):
        assert "error" not in result, result
        assert result["processes"] == [rank, WORLD]
        assert result["returned"] == str(root / "two-shards")  # every process returns the folder
    one, two = load_index(folder), load_index(root / "two-shards")
    # the shard converter gives the i-th image the key i: shard i // 7, member <i>.png
    assert one.ids == [f"images/{i:06d}.png" for i in range(30)]
    assert two.ids == [f"{i // 7:05d}.tar/{i:06d}.png" for i in range(30)]
    assert np.array_equal(two.vectors(), one.vectors())  # bit for bit: the same bytes, batches and order
    items = [json.loads(line) for line in (root / "two-shards" / "items.jsonl").read_text().splitlines()]
    folder_items = [json.loads(line) for line in (folder / "items.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in i.items() if k not in ("id", "path")} for i in items] == [
        {k: v for k, v in i.items() if k not in ("id", "path")} for i in folder_items
    ]  # captions and attributes too
    assert items[8]["path"] == str(world["pattern"].parent / "00001.tar" / "000008.png")
    # and the same files as a 1-process index of the shards
    single = build_index(
        model,
        read_catalogue(world["pattern"]),
        root / "one-shards",
        cache_dir=root / "cache-one",
        batch_size=BATCH,
        progress=False,
    )
    assert (single / "index.faiss").read_bytes() == (root / "two-shards" / "index.faiss").read_bytes()
    assert (single / "items.jsonl").read_bytes() == (root / "two-shards" / "items.jsonl").read_bytes()


def test_cli_embed_index_and_search_a_shard_pattern(world: dict[str, Path], tmp_path: Path) -> None:
    runner, clip, cache = CliRunner(), str(world["clip"]), str(tmp_path / "cache")
    pattern = str(world["pattern"])
    embedded = runner.invoke(
        app, ["embed", clip, str(tmp_path / "s.parquet"), "--data", pattern, "--cache-dir", cache, "-q"]
    )
    assert embedded.exit_code == 0, embedded.output
    folder_run = ["embed", clip, str(tmp_path / "f.parquet"), "--data", str(world["fashion"]), "-q"]
    assert runner.invoke(app, [*folder_run, "--cache-dir", cache]).exit_code == 0
    shards, folder = pd.read_parquet(tmp_path / "s.parquet"), pd.read_parquet(tmp_path / "f.parquet")
    assert shards["file_name"].tolist() == [f"{i // 7:05d}.tar/{i:06d}.png" for i in range(30)]
    assert np.array_equal(
        np.stack(shards["image_embedding"].to_list()), np.stack(folder["image_embedding"].to_list())
    )
    assert shards.drop(columns=["file_name", "image_embedding"]).equals(
        folder.drop(columns=["file_name", "image_embedding"])
    )

    out = str(tmp_path / "idx")
    indexed = runner.invoke(app, ["index", clip, out, "--data", pattern, "--cache-dir", cache, "-q"])
    assert indexed.exit_code == 0, indexed.output
    assert "indexed 30 images" in indexed.output
    found = runner.invoke(
        app, ["search", out, "ripped blue jeans", "-k", "3", "--cache-dir", cache, "--json"]
    )
    assert found.exit_code == 0, found.output
    hits = json.loads(found.stdout)["hits"]
    # the same hits as a search of the folder's index, each named by shard and key
    folder_index = build_index(
        load_model(clip),
        read_catalogue(world["fashion"]),
        tmp_path / "f-idx",
        cache_dir=Path(cache),
        progress=False,
    )
    expected = runner.invoke(
        app, ["search", str(folder_index), "ripped blue jeans", "-k", "3", "--cache-dir", cache, "--json"]
    )
    folder_hits = json.loads(expected.stdout)["hits"]
    assert len(hits) == 3
    for hit, twin in zip(hits, folder_hits, strict=True):
        n = int(twin["id"].removeprefix("images/").removesuffix(".png"))
        assert hit["id"] == f"{n // 7:05d}.tar/{n:06d}.png"
        assert (hit["score"], hit["caption"], hit["attributes"]) == (
            twin["score"],
            twin["caption"],
            twin["attributes"],
        )


def test_reading_a_shard_pattern_holds_metadata_not_images(tmp_path: Path) -> None:
    # 200 samples of 200 KB (random bytes under a .jpg name: reading never decodes) in 4 shards: 40 MB
    n, image_size, per_shard = 200, 200_000, 50
    rng = np.random.default_rng(0)
    for s in range(n // per_shard):
        with tarfile.open(tmp_path / f"{s:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(s * per_shard, (s + 1) * per_shard):
                meta = json.dumps({"text": f"a photo of item {i}", "group": f"g{i // 2}"}).encode()
                for name, data in ((f"{i:06d}.json", meta), (f"{i:06d}.jpg", rng.bytes(image_size))):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    tracemalloc.start()
    try:
        catalogue = read_catalogue(tmp_path / "{00000..00003}.tar")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert catalogue.rows["text"].tolist() == [f"a photo of item {i}" for i in range(n)]
    assert catalogue.rows["file_name"].iloc[-1] == "00003.tar/000199.jpg"
    # 40 MB of images; the peak is the rows, the member index and tarfile's headers: under 2.5% of it
    # (about 0.5 MB here, 2.6 KB per row at the peak, most of it transient records and tar headers)
    assert peak < 0.025 * n * image_size, peak
