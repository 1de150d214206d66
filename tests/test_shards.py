"""WebDataset shards as a catalogue: round trip, equal training and evaluation, bad samples, fsspec, splits."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import fsspec
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cliptune.cli.app import app
from cliptune.config import DataConfig, SplitConfig, load_config
from cliptune.data.catalogue import CatalogueError, read_catalogue
from cliptune.data.check import check_catalogue, write_clean
from cliptune.data.images import load_image, read_image_bytes
from cliptune.data.prepare import BadRowsError, prepare_data
from cliptune.data.shards import (
    _INDEX,
    CompressedShardError,
    expand_pattern,
    is_shard_spec,
    write_shard_index,
    write_shards,
)
from cliptune.data.splits import hash_split, make_splits
from cliptune.data.synthetic import render_fashion
from cliptune.evaluation.run import evaluate_run
from cliptune.models.factory import load_model
from cliptune.search import build_index, load_index
from cliptune.serve.app import create_app
from cliptune.train.run import train
from tests.tar_members import png, write_tar
from tests.tiny_models import make_tiny_clip

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shards")
    fashion = render_fashion(root / "fashion", n=40, seed=0, size=128)
    pattern = write_shards(read_catalogue(fashion), root / "shards", shard_size=15)
    return {"root": root, "fashion": fashion, "pattern": Path(pattern)}


def test_pattern_expansion_and_spec_detection(world: dict[str, Path]) -> None:
    # 40 images at 15 per shard: 15 + 15 + 10 samples in three shards
    assert str(world["pattern"]) == str(world["root"] / "shards" / "{00000..00002}.tar")
    assert expand_pattern("s/{00000..00002}.tar") == ["s/00000.tar", "s/00001.tar", "s/00002.tar"]
    assert expand_pattern(Path("memory://bucket/{0..1}.tar")) == [
        "memory://bucket/0.tar",
        "memory://bucket/1.tar",
    ]
    assert expand_pattern("file:///data/{a,b}.tar") == ["/data/a.tar", "/data/b.tar"]
    assert is_shard_spec("s/{0..3}.tar") and is_shard_spec("s/one.tar")
    assert not is_shard_spec("data/fashion") and not is_shard_spec("data/tarot")
    names = sorted(p.name for p in (world["root"] / "shards").iterdir())
    assert names == [n for i in range(3) for n in (f"0000{i}.tar", f"0000{i}.tar.idx.json")]  # + sidecars
    with tarfile.open(world["root"] / "shards" / "00001.tar") as tar:
        members = tar.getnames()
    # WebDataset layout: key.json + key.png per sample, keys numbered across shards
    assert members[:4] == ["000015.json", "000015.png", "000016.json", "000016.png"]
    assert len(members) == 30


def test_round_trip_rows_captions_attributes_and_bytes(world: dict[str, Path]) -> None:
    folder = read_catalogue(world["fashion"])
    shards = read_catalogue(world["pattern"])
    assert shards.attributes == folder.attributes == ["garment", "colour", "pattern", "rips", "style"]
    assert list(shards.rows.columns) == list(folder.rows.columns)
    pd.testing.assert_frame_equal(
        shards.rows.drop(columns="file_name"), folder.rows.drop(columns="file_name"), check_dtype=True
    )
    expected = [f"{i // 15:05d}.tar/{i:06d}.png" for i in range(40)]
    assert shards.rows["file_name"].tolist() == expected
    for src, dst in zip(folder.rows["file_name"], shards.rows["file_name"], strict=True):
        path = shards.image_path(dst)
        assert path == world["root"] / "shards" / dst
        assert read_image_bytes(path) == (world["fashion"] / src).read_bytes()
    assert check_catalogue(shards).ok
    _INDEX.clear()  # a fresh DataLoader worker: the member index is rebuilt (from the sidecar) on first use
    assert (
        read_image_bytes(shards.image_path("00001.tar/000020.png"))
        == (world["fashion"] / "images/000020.png").read_bytes()
    )


def test_several_captions_of_one_image_are_one_sample(tmp_path: Path) -> None:
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "a.png").write_bytes(png((255, 0, 0)))
    (tmp_path / "cat" / "b.png").write_bytes(png((0, 0, 255)))
    pd.DataFrame(
        {
            "file_name": ["a.png", "a.png", "b.png"],
            "text": ["red", "a red square", "blue"],
            "group": ["g", "g", ""],
        }
    ).to_csv(tmp_path / "cat" / "metadata.csv", index=False)
    pattern = write_shards(read_catalogue(tmp_path / "cat"), tmp_path / "out", shard_size=5)
    assert pattern == str(tmp_path / "out" / "00000.tar")  # one shard: a plain file name, no braces
    with tarfile.open(pattern) as tar:
        meta = json.loads(tar.extractfile("000000.json").read())  # type: ignore[union-attr]
        b_meta = json.loads(tar.extractfile("000001.json").read())  # type: ignore[union-attr]
    assert meta == [{"text": "red", "group": "g"}, {"text": "a red square", "group": "g"}]
    assert b_meta == {"text": "blue", "group": "b.png"}  # no group: its own file_name, the group it had
    rows = read_catalogue(Path(pattern)).rows
    assert rows["text"].tolist() == ["red", "a red square", "blue"]
    assert rows["file_name"].tolist() == ["00000.tar/000000.png"] * 2 + ["00000.tar/000001.png"]
    assert rows["row"].tolist() == [1, 2, 3]


def _bad_shards(folder: Path) -> Path:
    folder.mkdir()
    good = json.dumps({"text": "a red square", "group": "g1"}).encode()
    write_tar(folder / "00000.tar", [("000000.json", good), ("000000.png", png((255, 0, 0))),
                               ("000001.json", b'{"text": "no image"}'),
                               ("000002.json", b'{"text": "broken'), ("000002.png", png((0, 255, 0)))])  # fmt: skip
    write_tar(folder / "00001.tar", [("000003.json", b'{"text": "   "}'), ("000003.png", png((0, 0, 255))),
                               ("000004.json", b'{"text": "not a picture"}'), ("000004.jpg", b"<html>"),
                               ("000005.png", png((9, 9, 9))),
                               ("000006.json", json.dumps({"text": "fine", "group": "g2"}).encode()),
                               ("000006.png", png((1, 2, 3)))])  # fmt: skip
    return folder / "{00000..00001}.tar"


def test_bad_samples_are_rows_named_by_shard_and_key(tmp_path: Path) -> None:
    cat = read_catalogue(_bad_shards(tmp_path / "bad"))
    result = check_catalogue(cat)
    assert result.good["file_name"].tolist() == ["00000.tar/000000.png", "00001.tar/000006.png"]
    assert [(r.file_name, r.row) for r in result.rejected] == [
        ("00000.tar/000001", 2), ("00000.tar/000002.png", 3), ("00001.tar/000003.png", 4),
        ("00001.tar/000004.jpg", 5), ("00001.tar/000005.png", 6),
    ]  # fmt: skip
    reasons = [r.reason for r in result.rejected]
    assert reasons[0] == "sample has no image member (.jpg, .jpeg, .png, .webp)"
    assert reasons[1].startswith("invalid JSON metadata (Unterminated string") and reasons[1].endswith(
        "; missing text"
    )
    assert reasons[2] == "empty text (only whitespace)"
    assert reasons[3] == "not an image (unrecognised format)"
    assert reasons[4] == "sample has no .json metadata member; missing text"
    assert {r.source for r in result.rejected} == {"{00000..00001}.tar"}
    # the clean copy is a folder catalogue whose image paths still run through the shards
    write_clean(result, cat, tmp_path / "clean")
    clean = read_catalogue(tmp_path / "clean")
    assert clean.rows["file_name"].tolist() == ["00000.tar/000000.png", "00001.tar/000006.png"]
    assert check_catalogue(clean).ok
    assert load_image(clean.image_path("00001.tar/000006.png")).getpixel((0, 0)) == (1, 2, 3)


def test_bad_samples_follow_on_bad_row(tmp_path: Path) -> None:
    pattern = _bad_shards(tmp_path / "bad")
    with pytest.raises(BadRowsError, match=r"row 2 \(00000.tar/000001\): sample has no image member"):
        prepare_data(DataConfig(catalogue=pattern, on_bad_row="error"))
    run = tmp_path / "run"
    data = prepare_data(
        DataConfig(
            catalogue=pattern,
            on_bad_row="skip",
            split={"ratios": {"train": 0.5, "test": 0.5}, "min_groups": 0},
        ),
        run,
    )
    assert data.rows["file_name"].tolist() == ["00000.tar/000000.png", "00001.tar/000006.png"]
    rejected = pd.read_csv(run / "rejected.csv")
    assert rejected["file_name"].tolist()[:2] == ["00000.tar/000001", "00000.tar/000002.png"]
    assert load_image(cat_path := data.catalogue.image_path("00001.tar/000006.png")).getpixel((0, 0)) == (
        1,
        2,
        3,
    )
    assert cat_path.name == "000006.png"


def test_truncated_and_corrupt_shards_name_the_shard_and_offset(
    world: dict[str, Path], tmp_path: Path
) -> None:
    whole = (world["root"] / "shards" / "00002.tar").read_bytes()
    # cut inside the data of the first member (000030.json: header 0..512, data from 512)
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "00000.tar").write_bytes(whole[:600])
    with pytest.raises(CatalogueError, match=r"00000\.tar: truncated at offset 600: member 000030\.json"):
        read_catalogue(tmp_path / "cut" / "00000.tar")
    # cut exactly after a member: no end-of-archive marker, so samples may be missing
    with tarfile.open(world["root"] / "shards" / "00002.tar") as tar:
        second = tar.getmember("000031.json").offset
    (tmp_path / "cut" / "00001.tar").write_bytes(whole[:second])
    with pytest.raises(
        CatalogueError, match=rf"00001\.tar: corrupt or truncated tar header at offset {second}"
    ):
        read_catalogue(tmp_path / "cut" / "00001.tar")
    # garbage in place of a header
    broken = whole[:second] + b"x" * 512 + whole[second + 512 :]
    (tmp_path / "cut" / "00002.tar").write_bytes(broken)
    with pytest.raises(
        CatalogueError, match=rf"00002\.tar: corrupt or truncated tar header at offset {second}"
    ):
        read_catalogue(tmp_path / "cut" / "00002.tar")
    (tmp_path / "gone").mkdir()
    shutil.copy(world["root"] / "shards" / "00000.tar", tmp_path / "gone" / "00000.tar")
    with pytest.raises(CatalogueError, match=r"gone/00001\.tar: shard not found"):
        read_catalogue(tmp_path / "gone" / "{00000..00001}.tar")


def test_fsspec_memory_url(world: dict[str, Path]) -> None:
    fs = fsspec.filesystem("memory")
    for shard in expand_pattern(world["pattern"]):
        fs.pipe(f"/fashion-shards/{Path(shard).name}", Path(shard).read_bytes())
    try:
        cat = read_catalogue(Path("memory://fashion-shards/{00000..00002}.tar"))  # config fields are Paths
        local = read_catalogue(world["pattern"])
        pd.testing.assert_frame_equal(cat.rows, local.rows)
        assert check_catalogue(cat).ok
        for name in ("00000.tar/000000.png", "00002.tar/000039.png"):
            assert read_image_bytes(cat.image_path(name)) == read_image_bytes(local.image_path(name))
    finally:
        fs.rm("/fashion-shards", recursive=True)


def _train_and_eval(
    catalogue: Path, root: Path, name: str, clip: Path, extra: list[str]
) -> tuple[dict, dict, dict]:
    cfg = load_config(None, [
        f"name={name}", f"data.catalogue={catalogue}", "data.split.ratios={train: 0.6, val: 0.2, test: 0.2}",
        f"model.backbone={clip}", f"model.cache_dir={root / ('cache-' + name)}", "train.early_stopping=null",
        "train.epochs=1", "train.batch_size=8", "train.lr=2e-3", "train.seed=3", *extra,
    ])  # fmt: skip
    run = train(cfg, runs_root=root / "runs", quiet=True)
    summary = json.loads((run / "summary.json").read_text())
    test = evaluate_run(run, ["test"], progress=False, bootstrap=20)["test"]
    return summary, test, json.loads((run / "splits.json").read_text())


@pytest.mark.parametrize(
    "extra",
    [
        [],  # frozen towers: features cached by the images' bytes
        # a trained last layer on augmented views: each view seeded by the sha256 of the image's bytes
        ["model.trainable_layers=1", "data.augment={image: {crop: 0.2, flip: true}}"],
    ],
    ids=["frozen", "unfrozen-augmented"],
)
def test_shards_train_and_evaluate_to_the_folders_metrics(world: dict[str, Path], extra: list[str]) -> None:
    root = world["root"] / f"equal-{len(extra)}"
    clip = make_tiny_clip(root / "clip")
    f_summary, f_test, f_splits = _train_and_eval(world["fashion"], root, "folder", clip, extra)
    s_summary, s_test, s_splits = _train_and_eval(world["pattern"], root, "shards", clip, extra)
    assert s_splits == f_splits  # the same groups in each split
    assert s_summary["best"] == f_summary["best"]
    assert s_test["metrics"] == f_test["metrics"]
    assert s_test["per_query"]["t2i"]["values"] == f_test["per_query"]["t2i"]["values"]
    assert s_test["n_rows"] == f_test["n_rows"] > 0
    assert f_summary["best"]["val/t2i/mrr"] > 0  # a real number was compared, not two empty dicts


# ----------------------------------------------------------------------------------------------
# the hash split


def test_hash_split_is_stable_whatever_the_other_rows() -> None:
    ratios = {"train": 0.8, "val": 0.1, "test": 0.1}
    rows = pd.DataFrame(
        {"file_name": [f"{i}.jpg" for i in range(300)], "group": [f"g{i % 100}" for i in range(300)]}
    )
    whole = make_splits(rows, ratios, seed=7, method="hash")
    split_of = {g: n for n, gids in whole.items() for g in gids}
    # a third of the rows, shuffled, plus rows of new groups: every shared group keeps its split
    part = pd.concat(
        [rows.sample(frac=0.3, random_state=1), pd.DataFrame({"file_name": ["x.jpg"], "group": ["new"]})]
    )
    for name, gids in make_splits(part, ratios, seed=7, method="hash").items():
        assert all(split_of.get(g, name) == name for g in gids)
    # the rule itself, recomputed independently: sha256 of "cliptune-split\0seed\0id", 64 bits, cumulative
    # ratios in name order (test 0.1 | train 0.8 | val 0.1)
    for gid in ("g0", "g1", "g42"):
        u = int(hashlib.sha256(f"cliptune-split\0{7}\0{gid}".encode()).hexdigest()[:16], 16) / 2**64
        assert split_of[gid] == ("test" if u < 0.1 else "train" if u < 0.9 else "val")
        assert hash_split(gid, ratios, 7) == split_of[gid]
    assert make_splits(rows, ratios, seed=8, method="hash") != whole  # another seed, another split
    # fixed rows keep their split
    fixed = rows.assign(split=["test" if g == "g1" else "" for g in rows["group"]])
    assert "g1" in make_splits(fixed, ratios, seed=7, method="hash")["test"]


def test_hash_split_meets_ratios_within_binomial_tolerance() -> None:
    ratios = {"train": 0.7, "val": 0.2, "test": 0.1}
    counts = {n: 0 for n in ratios}
    for i in range(10_000):
        counts[hash_split(f"group-{i}", ratios, seed=0)] += 1
    for name, share in ratios.items():  # within 4 standard deviations of n * p
        sd = math.sqrt(10_000 * share * (1 - share))
        assert abs(counts[name] - 10_000 * share) < 4 * sd, (name, counts)


def test_hash_split_config_refuses_what_it_cannot_honour() -> None:
    assert SplitConfig(method="hash").method == "hash"  # min_groups left at its default: not applied
    with pytest.raises(ValueError, match="data.split.min_groups does not apply to data.split.method: hash"):
        SplitConfig(method="hash", min_groups=3)
    with pytest.raises(ValueError, match="data.split.stratify does not apply"):
        SplitConfig(method="hash", stratify="colour")


# ----------------------------------------------------------------------------------------------
# the CLI


def test_cli_shard_then_check(world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["data", "shard", str(world["fashion"]), str(out), "--shard-size", "25", "-q"]
    )
    assert result.exit_code == 0, result.output
    pattern = str(out / "{00000..00001}.tar")
    assert pattern in result.output and "40 row(s)" in result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "00000.tar",
        "00000.tar.idx.json",
        "00001.tar",
        "00001.tar.idx.json",
    ]
    check = runner.invoke(app, ["data", "check", pattern, "-q"])
    assert check.exit_code == 0, check.output
    assert "40 good row(s), 0 bad row(s)" in check.output
    again = runner.invoke(app, ["data", "shard", str(world["fashion"]), str(out)])
    assert again.exit_code == 2 and "already holds .tar files" in again.output
    assert "empty OUT folder" in again.output
    assert "empty OUT folder" in again.output and "Traceback" not in again.output
    gif = tmp_path / "gif"
    gif.mkdir()
    pd.DataFrame({"file_name": ["a.png", "b.gif", ""], "text": ["a", "b", "c"]}).to_csv(
        gif / "metadata.csv", index=False
    )
    refused = runner.invoke(app, ["data", "shard", str(gif), str(tmp_path / "gif-out")])
    assert refused.exit_code == 2 and "row 3 has no file_name" in refused.output
    pd.DataFrame({"file_name": ["a.png", "b.gif"], "text": ["a", "b"]}).to_csv(
        gif / "metadata.csv", index=False
    )
    refused = runner.invoke(app, ["data", "shard", str(gif), str(tmp_path / "gif-out")])
    assert (
        refused.exit_code == 2
        and "b.gif: a shard sample's image must be .jpg, .jpeg, .png, .webp" in refused.output
    )


def test_cli_check_of_a_truncated_shard_is_a_typed_error(world: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "00000.tar").write_bytes((world["root"] / "shards" / "00000.tar").read_bytes()[:700])
    result = runner.invoke(app, ["data", "check", str(tmp_path / "00000.tar"), "-q"])
    assert result.exit_code == 2 and "truncated at offset 700" in result.output
    assert "cliptune data shard" in result.output and "Traceback" not in result.output


def test_compressed_shards_are_refused_naming_the_shard(tmp_path: Path) -> None:
    plain = write_tar(tmp_path / "plain.tar", [("a.png", png((1, 2, 3))), ("a.json", b'{"text": "x"}')])
    for name in ("00000.tar.gz", "00001.tar.gz"):
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(plain.read_bytes())
    pattern = tmp_path / "{00000..00001}.tar.gz"
    assert is_shard_spec(pattern) and is_shard_spec("s/one.tgz") and is_shard_spec("s/{a.tar,b.tar.xz}")
    with pytest.raises(CompressedShardError, match="cannot be read as a shard") as info:
        read_catalogue(pattern)
    assert info.value.shard == str(tmp_path / "00000.tar.gz") and info.value.plain == "00000.tar"
    assert "(to 00000.tar)" in str(info.value) and "seeking to their member" in str(info.value)
    assert pickle.loads(pickle.dumps(info.value)).args == info.value.args  # crosses DataLoader workers
    # a pattern mixing plain and compressed tars names the compressed one; .tgz decompresses to .tar
    (tmp_path / "b.tgz").write_bytes((tmp_path / "00000.tar.gz").read_bytes())
    with pytest.raises(CompressedShardError) as info:
        read_catalogue(tmp_path / "{plain.tar,b.tgz}")
    assert info.value.shard == str(tmp_path / "b.tgz") and info.value.plain == "b.tar"
    result = runner.invoke(app, ["data", "check", str(pattern), "-q"])
    assert result.exit_code == 2 and "00000.tar.gz: a compressed tar" in result.output
    assert "gunzip" in result.output and "cliptune data shard" in result.output
    assert "Traceback" not in result.output


# ----------------------------------------------------------------------------------------------
# index and serve


def test_index_of_shards_equals_the_folders_and_serve_reads_the_members(world: dict[str, Path]) -> None:
    root = world["root"] / "serve"
    make_tiny_clip(root / "model", seed=0)
    model = load_model(root / "model")
    folder = load_index(
        build_index(model, read_catalogue(world["fashion"]), root / "idx-folder", progress=False)
    )
    built = build_index(model, read_catalogue(world["pattern"]), root / "idx-shards", progress=False)
    shards = load_index(built)
    assert (shards.vectors() == folder.vectors()).all()  # same bytes, same order, same vectors
    assert shards.ids[:2] == ["00000.tar/000000.png", "00000.tar/000001.png"]
    client = TestClient(create_app(built))
    for n, item in ((0, shards.ids[0]), (39, shards.ids[39])):
        response = client.get(f"/images/{item}")
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert response.content == (world["fashion"] / f"images/{n:06d}.png").read_bytes()
    assert client.get("/images/00000.tar/999999.png").status_code == 404


def test_a_folder_named_like_a_scheme_stays_a_folder(world: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "backup:" / "shards"
    folder.mkdir(parents=True)
    shutil.copy(world["root"] / "shards" / "00000.tar", folder / "00000.tar")
    cat = read_catalogue(folder / "00000.tar")
    assert len(cat.rows) == 15 and check_catalogue(cat).ok


# ----------------------------------------------------------------------------------------------
# open shards: one open per shard and process


def _counting_memory(monkeypatch: pytest.MonkeyPatch, log: Path) -> None:
    """memory:// whose every open of a file appends ``<pid> <path>`` to ``log`` (forked children too)."""
    from fsspec.implementations.memory import MemoryFileSystem

    real = MemoryFileSystem._open

    def counting(self: MemoryFileSystem, path: str, *args: object, **kwargs: object) -> object:
        with log.open("a") as f:
            f.write(f"{os.getpid()} {path} {kwargs.get('block_size')}\n")
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "_open", counting)


def _opens(log: Path) -> list[tuple[int, str]]:
    return [
        (int(p), s.rpartition("/")[2]) for p, s, _ in (line.split() for line in log.read_text().splitlines())
    ]


def _read_in_child(paths: list[Path]) -> list[bytes]:
    return [read_image_bytes(p) for p in paths]


def test_remote_shards_are_opened_once_per_process(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import multiprocessing
    import random

    from cliptune.data import shards as shards_module

    fs = fsspec.filesystem("memory")
    for shard in expand_pattern(world["pattern"]):
        fs.pipe(f"/counted/{Path(shard).name}", Path(shard).read_bytes())
    log = tmp_path / "opens.log"
    log.touch()
    _counting_memory(monkeypatch, log)
    try:
        cat = read_catalogue(Path("memory://counted/{00000..00002}.tar"))
        assert _opens(log) == [(os.getpid(), f"{i:05d}.tar") for i in range(3)]  # the reading pass
        log.write_text("")
        folder = read_catalogue(world["fashion"])
        pairs = zip(cat.rows["file_name"], folder.rows["file_name"], strict=True)
        expected = {n: (world["fashion"] / f).read_bytes() for n, f in pairs}
        first = list(cat.rows["file_name"][:15])  # every sample of shard 00000
        order = random.Random(0).choices(first, k=60)
        assert [read_image_bytes(cat.image_path(n)) for n in order] == [expected[n] for n in order]
        assert _opens(log) == [(os.getpid(), "00000.tar")]  # 60 random reads, one open
        assert log.read_text().split()[-1] == str(1 << 20)  # read-ahead 1 MiB, not the filesystem's default
        parent_handle = shards_module._HANDLES[os.getpid()]["memory://counted/00000.tar"]
        parent_position = parent_handle.file.tell()

        # two forked workers (as DataLoader workers are): each opens the shard itself, once, and never
        # moves the parent's handle
        log.write_text("")
        halves = [[cat.image_path(n) for n in order[:30]], [cat.image_path(n) for n in order[30:]]]
        # one task per worker process (maxtasksperchild=1, chunksize=1): a pool may otherwise hand both halves
        # to the same worker, which then rightly opens the shard only once
        with multiprocessing.get_context("fork").Pool(2, maxtasksperchild=1) as pool:
            got = pool.map(_read_in_child, halves, chunksize=1)
        assert got[0] + got[1] == [expected[n] for n in order]
        opens = _opens(log)
        assert sorted(s for _, s in opens) == ["00000.tar", "00000.tar"]
        assert len({pid for pid, _ in opens}) == 2 and os.getpid() not in {pid for pid, _ in opens}
        assert parent_handle.file.tell() == parent_position and not parent_handle.closed

        # at most OPEN_SHARDS open: the least recently used is closed and reopened when read again
        monkeypatch.setattr(shards_module, "OPEN_SHARDS", 2)
        log.write_text("")
        for name in ("00001.tar/000015.png", "00002.tar/000030.png", "00000.tar/000001.png"):
            assert read_image_bytes(cat.image_path(name)) == expected[name]
        assert parent_handle.closed  # 00000 was the least recently used when 00002 opened
        assert list(shards_module._HANDLES[os.getpid()]) == [
            f"memory://counted/{s}.tar" for s in ("00002", "00000")
        ]
        assert _opens(log) == [(os.getpid(), s) for s in ("00001.tar", "00002.tar", "00000.tar")]
    finally:
        shards_module._close_handles()
        fs.rm("/counted", recursive=True)
    assert os.getpid() not in shards_module._HANDLES


def test_a_rewritten_local_shard_is_reopened(world: dict[str, Path], tmp_path: Path) -> None:
    from cliptune.data import shards as shards_module

    folder = tmp_path / "rewrite"
    folder.mkdir()
    shutil.copy(world["root"] / "shards" / "00000.tar", folder / "00000.tar")
    cat = read_catalogue(folder / "00000.tar")
    before = read_image_bytes(cat.image_path("00000.tar/000003.png"))
    assert before == (world["fashion"] / "images/000003.png").read_bytes()
    old = shards_module._HANDLES[os.getpid()][str(folder / "00000.tar")]
    # replaced by another shard of a different size: the open handle is stale, so it is closed and reopened
    shutil.copy(world["root"] / "shards" / "00002.tar", folder / "00000.tar")
    assert (
        read_image_bytes(cat.image_path("00000.tar/000031.png"))
        == (world["fashion"] / "images/000031.png").read_bytes()
    )
    assert old.closed
    shards_module._close_handles()


def test_threads_share_an_open_shard_without_mixing_reads(world: dict[str, Path]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from cliptune.data import shards as shards_module

    shards_module._close_handles()  # none left open by earlier tests
    cat = read_catalogue(world["pattern"])
    names = list(cat.rows["file_name"][:15]) * 20  # 300 reads of shard 00000 through one handle
    expected = [(world["fashion"] / f"images/{n[10:]}").read_bytes() for n in names]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so an unguarded seek + read would interleave
    try:
        with ThreadPoolExecutor(4) as pool:  # as serve's thread pool reads /images
            got = list(pool.map(lambda n: read_image_bytes(cat.image_path(n)), names))
    finally:
        sys.setswitchinterval(interval)
    assert got == expected  # each seek + read took its turn: no read got another's offset
    assert list(shards_module._HANDLES[os.getpid()]) == [str(world["root"] / "shards" / "00000.tar")]
    shards_module._close_handles()


_FRESH_READER = """
import builtins, json, sys
from pathlib import Path
import fsspec
from fsspec.implementations.memory import MemoryFileSystem
from cliptune.data import shards
from cliptune.data.images import read_image_bytes

local = sys.argv[1]
fsspec.filesystem("memory").pipe("/fresh/0.tar", Path(local).read_bytes())
if Path(local + ".idx.json").exists():  # the sidecar beside the remote copy too
    fsspec.filesystem("memory").pipe("/fresh/0.tar.idx.json", Path(local + ".idx.json").read_bytes())
opens, real = [], MemoryFileSystem._open
def remote_open(self, path, *args, **kwargs):
    opens.append(path)
    return real(self, path, *args, **kwargs)
def local_open(path, *args, **kwargs):
    opens.append(str(path))
    return builtins.open(path, *args, **kwargs)
MemoryFileSystem._open = remote_open
shards.open = local_open  # the module's open() of local shards (its global shadows the builtin)
reads = [read_image_bytes(Path(p)).hex() for s in (local, "memory://fresh/0.tar") for p in (s + "/b.png", s + "/a.png")]
print(json.dumps({"opens": opens, "reads": reads}))
"""


@pytest.mark.parametrize("sidecar", [False, True])
def test_a_fresh_process_opens_each_shard_once(tmp_path: Path, sidecar: bool) -> None:
    # a process that never read the catalogue (a spawned DataLoader worker, a new serve process) has no
    # member index: it builds it through the handle it then reads from (from the headers, or from the
    # sidecar, whose end-of-archive check reads through that handle too), so 2 reads cost 1 open per shard
    red, blue = png((255, 0, 0)), png((0, 0, 255))
    shard = write_tar(
        tmp_path / "0.tar", [("a.png", red), ("a.json", b"{}"), ("b.png", blue), ("b.json", b"{}")]
    )
    if sidecar:
        write_shard_index(shard)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", _FRESH_READER, str(shard)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["reads"] == [blue.hex(), red.hex()] * 2
    assert result["opens"] == [str(shard), "/fresh/0.tar"]
