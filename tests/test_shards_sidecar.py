"""Shard sidecar indexes (``00000.tar.idx.json``): the reading pass from a sidecar equals the scan, reads no
byte of the shard, and a stale or damaged sidecar is said and scanned past, never trusted silently."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pandas as pd
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import known_implementations
from fsspec.spec import AbstractBufferedFile
from PIL import Image
from typer.testing import CliRunner

from cliptune.cli.app import app
from cliptune.config import DataConfig
from cliptune.data import shards as shards_module
from cliptune.data.catalogue import Catalogue, read_catalogue
from cliptune.data.check import check_catalogue
from cliptune.data.images import read_image_bytes
from cliptune.data.prepare import BadRowsError, prepare_data
from cliptune.data.shards import (
    ShardIndexWarning,
    expand_pattern,
    index_path,
    index_shards,
    read_shards,
    write_shard_index,
    write_shards,
)
from cliptune.data.synthetic import render_fashion
from tests.tar_members import add_members, png, write_tar

runner = CliRunner()

# ----------------------------------------------------------------------------------------------------------
# countmem://: the memory store, read through ranged requests like an object store, each request logged

FETCHED: list[tuple[str, int, int]] = []
"""(path, start, end) of every byte range a countmem:// file or cat_file fetched."""


class _RangedFile(AbstractBufferedFile):  # type: ignore[misc]  # fsspec is untyped
    def _fetch_range(self, start: int, end: int) -> bytes:
        FETCHED.append((self.path, start, end))
        return bytes(MemoryFileSystem.store[self.path].getbuffer()[start:end])


class CountingFS(MemoryFileSystem):  # type: ignore[misc]  # fsspec is untyped
    """memory:// (same store) whose reads are ranged fetches with fsspec's default read-ahead, logged."""

    protocol = "countmem"

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        return MemoryFileSystem._strip_protocol(str(path).removeprefix("countmem://"))

    def _open(self, path: str, mode: str = "rb", block_size: Any = None, **kwargs: Any) -> Any:
        if mode != "rb":
            return super()._open(path, mode, block_size=block_size, **kwargs)
        path = self._strip_protocol(path)
        if path not in self.store:
            raise FileNotFoundError(path)
        return _RangedFile(self, path, mode, block_size=block_size or "default")

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        data = bytes(super().cat_file(path, start, end, **kwargs))
        FETCHED.append((self._strip_protocol(path), start or 0, (start or 0) + len(data)))
        return data


@pytest.fixture
def countmem() -> Iterator[MemoryFileSystem]:
    # registered by name (as fsspec's own protocols are), so shard paths through countmem:// are URLs
    known_implementations["countmem"] = {"class": f"{__name__}.CountingFS"}
    fs = fsspec.filesystem("memory")
    FETCHED.clear()
    try:
        yield fs
    finally:
        shards_module._close_handles()
        for path in [p for p in fs.store if p.startswith("/cnt")]:
            fs.rm(path)
        del known_implementations["countmem"]


def _fetched(path: str) -> int:
    return sum(end - start for p, start, end in FETCHED if p == path)


# ----------------------------------------------------------------------------------------------------------
# shards


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sidecar")
    fashion = render_fashion(root / "fashion", n=12, seed=0, size=128)
    pattern = write_shards(read_catalogue(fashion), root / "shards", shard_size=5)
    bad = root / "bad"
    bad.mkdir()
    # samples: good; no image member; invalid JSON; JSON not UTF-8; no JSON member (a .txt instead); a list
    # of two objects (one setting the reserved `row`) beside a .jpg that is not an image; a stray member
    red = json.dumps({"text": "red", "group": "g1"}).encode()
    two = json.dumps([{"text": "one"}, {"text": "two", "row": 9}]).encode()
    write_tar(
        bad / "00000.tar",
        [
            ("000000.json", red),
            ("000000.png", png((255, 0, 0))),
            ("000001.json", b'{"text": "no image"}'),
            ("000002.json", b'{"text": "broken'),
            ("000002.png", png((0, 255, 0))),
            ("000003.json", b'{"text": "caf\xe9"}'),
            ("000003.png", png((0, 0, 1))),
            ("000004.png", png((0, 0, 2))),
            ("000004.txt", b"a caption"),
            ("000005.json", two),
            ("000005.jpg", b"<html>"),
            ("extra/000006.cls", b"3"),
        ],
    )
    return {"root": root, "fashion": fashion, "pattern": Path(pattern), "bad": bad / "00000.tar"}


def _without_sidecars(pattern: Path, folder: Path) -> Path:
    """The same shards copied into ``folder`` without their sidecars: read by scanning."""
    folder.mkdir()
    for shard in expand_pattern(pattern):
        shutil.copy(shard, folder / Path(shard).name)
    return folder / pattern.name


def _assert_same(a: Catalogue, b: Catalogue) -> None:
    pd.testing.assert_frame_equal(a.rows, b.rows)
    assert a.problems == b.problems and a.attributes == b.attributes
    for name in a.rows["file_name"]:
        if "." in Path(name).name:  # a sample without an image has no bytes to read
            assert read_image_bytes(a.image_path(name)) == read_image_bytes(b.image_path(name))


def _index_of(shard: str) -> dict[str, tuple[int, int]]:
    return next(v for k, v in shards_module._INDEX.items() if k[0] == shard)


def test_write_shards_writes_a_sidecar_per_shard(world: dict[str, Path]) -> None:
    shards = expand_pattern(world["pattern"])
    assert [Path(index_path(s)).name for s in shards] == [f"0000{i}.tar.idx.json" for i in range(3)]
    doc = json.loads(Path(index_path(shards[1])).read_text())
    assert (doc["format"], doc["version"]) == ("cliptune-shard-index", 1)
    assert doc["shard_bytes"] == Path(shards[1]).stat().st_size
    # shard 1 holds images 5..9: its samples and members as the tar lists them
    with tarfile.open(shards[1]) as tar:
        members = [[m.name, m.offset_data, m.size] for m in tar.getmembers()]
        meta = tar.extractfile("000005.json").read().decode()  # type: ignore[union-attr]
    assert doc["members"] == members
    assert [s["key"] for s in doc["samples"]] == [f"00000{i}" for i in range(5, 10)]
    assert doc["samples"][0] == {"key": "000005", "image": "000005.png", "meta": meta}
    assert not any(Path(shards[0]).parent.glob("*.tmp*"))  # written atomically: no temporary left


@pytest.mark.parametrize("where", ["local", "memory"])
def test_the_catalogue_from_sidecars_equals_the_scan(
    world: dict[str, Path], tmp_path: Path, where: str
) -> None:
    scanned_pattern = _without_sidecars(world["pattern"], tmp_path / "plain")
    bad_plain = tmp_path / "bad-plain"
    bad_plain.mkdir()
    shutil.copy(world["bad"], bad_plain / "00000.tar")
    bad_indexed = tmp_path / "bad-indexed"
    bad_indexed.mkdir()
    shutil.copy(world["bad"], bad_indexed / "00000.tar")
    index_shards(bad_indexed / "00000.tar")
    pairs = [(world["pattern"], scanned_pattern), (bad_indexed / "00000.tar", bad_plain / "00000.tar")]
    if where == "memory":
        fs = fsspec.filesystem("memory")
        moved = []
        for i, (indexed, plain) in enumerate(pairs):
            for name, folder in (("i", indexed.parent), ("p", plain.parent)):
                for f in folder.iterdir():
                    if f.name.endswith((".tar", ".idx.json")):
                        fs.pipe(f"/sc{i}{name}/{f.name}", f.read_bytes())
            moved.append((f"memory://sc{i}i/{indexed.name}", f"memory://sc{i}p/{plain.name}"))
        specs: list[tuple[Any, Any]] = moved
    else:
        specs = list(pairs)
    try:
        for indexed, plain in specs:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a fitting sidecar is used without a word
                from_sidecar = read_shards(indexed)
            from_scan = read_shards(plain)
            _assert_same(from_sidecar, from_scan)
            for a, b in zip(expand_pattern(indexed), expand_pattern(plain), strict=True):
                assert _index_of(a) == _index_of(b)  # the member index too: every member, offset, size
        # the bad samples are the same rows with the same problems: data.on_bad_row treats them alike
        bad = read_shards(specs[1][0])
        assert bad.rows["file_name"].tolist() == [
            "00000.tar/000000.png",
            "00000.tar/000001",
            "00000.tar/000002.png",
            "00000.tar/000003.png",
            "00000.tar/000004.png",
            "00000.tar/000005.jpg",
            "00000.tar/000005.jpg",
            "00000.tar/extra/000006",
        ]
        assert bad.problems[3].startswith("invalid JSON metadata") and bad.problems[4].startswith(
            "invalid JSON metadata ('utf-8' codec can't decode byte 0xe9"
        )
        assert bad.problems[5] == "sample has no .json metadata member"
        assert [r.reason for r in check_catalogue(bad).rejected] == [
            r.reason for r in check_catalogue(read_shards(specs[1][1])).rejected
        ]
    finally:
        if where == "memory":
            for path in [p for p in fsspec.filesystem("memory").store if p.startswith("/sc")]:
                fsspec.filesystem("memory").rm(path)


def test_bad_samples_from_a_sidecar_follow_on_bad_row(world: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    shutil.copy(world["bad"], folder / "00000.tar")
    index_shards(folder / "00000.tar")
    with pytest.raises(BadRowsError, match=r"row 2 \(00000.tar/000001\): sample has no image member"):
        prepare_data(DataConfig(catalogue=folder / "00000.tar", on_bad_row="error"))


def test_with_sidecars_the_reading_pass_fetches_no_byte_of_a_shard(
    world: dict[str, Path], countmem: MemoryFileSystem, tmp_path: Path
) -> None:
    # 3 shards of 128 px images: with images between the JSON members, the scan fetches every shard whole
    # (fsspec's default read-ahead is 5 MiB); with sidecars it fetches the sidecars and nothing else
    for shard in expand_pattern(world["pattern"]):
        for f in (Path(shard), Path(index_path(shard))):
            countmem.pipe(f"/cnt/i/{f.name}", f.read_bytes())
            if f.suffix == ".tar":
                countmem.pipe(f"/cnt/p/{f.name}", f.read_bytes())
    names = [Path(s).name for s in expand_pattern(world["pattern"])]
    from_scan = read_shards(f"countmem://cnt/p/{world['pattern'].name}")
    assert [_fetched(f"/cnt/p/{n}") for n in names] == [len(countmem.cat_file(f"/cnt/p/{n}")) for n in names]
    FETCHED.clear()
    from_sidecar = read_shards(f"countmem://cnt/i/{world['pattern'].name}")
    sidecars = {f"/cnt/i/{n}.idx.json": json.loads(countmem.cat_file(f"/cnt/i/{n}.idx.json")) for n in names}
    assert sum(e - s for p, s, e in FETCHED if p in sidecars) == sum(
        len(countmem.cat_file(p)) for p in sidecars
    )
    # of the shards themselves, one 1 KiB read each: the end-of-archive marker the sidecar records
    assert sorted((p, s, e) for p, s, e in FETCHED if p not in sidecars) == sorted(
        (f"/cnt/i/{n}", doc["end"], doc["end"] + 1024)
        for n, doc in zip(names, sidecars.values(), strict=True)
    )
    pd.testing.assert_frame_equal(from_sidecar.rows.drop(columns=[]), from_scan.rows)

    # a process that never read the catalogue (a spawned worker) builds the member index from the sidecar:
    # its first fetch from the shard starts at the member it reads (at its header, which the read checks
    # against the sidecar), not at the tar's first header
    shards_module._INDEX.clear()
    shards_module._close_handles()
    FETCHED.clear()
    name = "00001.tar/000007.png"
    got = read_image_bytes(from_sidecar.image_path(name))
    assert got == (world["fashion"] / "images/000007.png").read_bytes()
    offset = _index_of("countmem://cnt/i/00001.tar")["000007.png"][0]
    shard_fetches = [(s, e) for p, s, e in FETCHED if p == "/cnt/i/00001.tar"]
    end = sidecars["/cnt/i/00001.tar.idx.json"]["end"]
    assert shard_fetches[0] == (end, end + 1024)  # the sidecar's end-of-archive check, then the member
    assert shard_fetches[1][0] == offset - 512 > 0


def _copy_first_shard(world: dict[str, Path], folder: Path) -> Path:
    """Shard 00000 and its sidecar copied into ``folder`` (a test may damage them); the shard's path."""
    folder.mkdir()
    for f in (world["root"] / "shards").glob("00000.tar*"):
        shutil.copy(f, folder / f.name)
    return folder / "00000.tar"


def _damage(kind: str, shard: Path) -> None:
    sidecar = Path(index_path(shard))
    doc = json.loads(sidecar.read_text())
    if kind == "rewritten":  # the shard rewritten (20 KB longer: tar pads to 10 KiB), the sidecar left behind
        with tarfile.open(shard, "a") as tar:
            add_members(
                tar,
                [
                    ("999999.json", b'{"text": "added later", "group": "late"}'),
                    ("999999.png", png((7, 7, 7)) + b"\0" * 20_000),
                ],
            )
        return
    if kind == "not JSON":
        sidecar.write_bytes(sidecar.read_bytes()[:100])
        return
    if kind == "version":
        doc["version"] = 2
    elif kind == "outside":
        doc["members"][-1][1] = doc["shard_bytes"] - 10
    elif kind == "unknown image":
        doc["samples"][0]["image"] = "nope.png"
    sidecar.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("rewritten", r"made for a shard of \d+ bytes, the shard has \d+ \(rewritten since\)"),
        ("not JSON", r"not valid JSON \("),
        ("version", r"version 2; this cliptune reads version 1"),
        ("outside", r"member 000004\.png at bytes \d+\.\.\d+ lies outside the archive's \d+"),
        ("unknown image", r"malformed sample entry for key '000000'"),
    ],
)
def test_a_stale_or_damaged_sidecar_is_said_and_the_shard_scanned(
    world: dict[str, Path], tmp_path: Path, kind: str, reason: str
) -> None:
    shard = _copy_first_shard(world, tmp_path / "shards")
    _damage(kind, shard)
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(shard, plain / "00000.tar")
    with pytest.warns(
        ShardIndexWarning, match=rf"00000\.tar\.idx\.json: not used, scanning .*00000\.tar instead: {reason}"
    ):
        got = read_shards(shard)
    _assert_same(got, read_shards(plain / "00000.tar"))
    if kind == "rewritten":
        assert got.rows["text"].tolist()[-1] == "added later"  # the new sample, seen by the scan
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per process, not on every read
        read_shards(shard)
    # the member-index rebuild of a fresh worker does not trust it either
    shards_module._INDEX.clear()
    shards_module._close_handles()
    assert (
        read_image_bytes(got.image_path("00000.tar/000001.png"))
        == (world["fashion"] / "images/000001.png").read_bytes()
    )
    shards_module._close_handles()


def test_index_shards_of_tarwriter_shards_reads_as_without(tmp_path: Path) -> None:
    from webdataset import TarWriter

    folder = tmp_path / "wds"
    folder.mkdir()
    for s in range(2):  # as webdataset (and img2dataset through it) writes shards: .jpg, .json, .txt
        with TarWriter(str(folder / f"{s:05d}.tar")) as sink:
            for i in range(3):
                key = f"{s}{i:04d}"
                image = io.BytesIO()
                Image.new("RGB", (8, 8), (40 * i, 10 * s, 0)).save(image, format="JPEG")
                sink.write(
                    {
                        "__key__": key,
                        "jpg": image.getvalue(),
                        "txt": f"caption {key}",
                        "json": {"text": f"caption {key}", "group": f"g{i}"},
                    }
                )
    plain = _without_sidecars(folder / "{00000..00001}.tar", tmp_path / "plain")
    result = runner.invoke(app, ["data", "index-shards", str(folder / "{00000..00001}.tar"), "-q"])
    assert result.exit_code == 0, result.output
    assert "wrote 2 sidecar index(es)" in result.output
    assert sorted(p.name for p in folder.iterdir()) == [
        "00000.tar",
        "00000.tar.idx.json",
        "00001.tar",
        "00001.tar.idx.json",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        indexed = read_catalogue(folder / "{00000..00001}.tar")
    _assert_same(indexed, read_catalogue(plain))
    assert indexed.rows["text"].tolist()[:2] == ["caption 00000", "caption 00001"]


def test_index_shards_refuses_what_it_cannot_index(tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "index-shards", str(tmp_path / "{0..1}.tar")])
    assert result.exit_code == 2
    assert "0.tar: shard not found" in result.output
    result = runner.invoke(app, ["data", "index-shards", str(tmp_path / "folder")])
    assert result.exit_code == 2 and "not a shard pattern" in result.output
    assert not list(tmp_path.iterdir())


def test_a_shard_rewritten_to_the_same_size_is_caught_at_the_first_misread(
    world: dict[str, Path], tmp_path: Path
) -> None:
    from cliptune.data.shards import ShardIndexMismatchError

    shard = _copy_first_shard(world, tmp_path / "same")
    # the sidecar of a shard whose members moved, same size: 000001.png's offset now holds another member
    sidecar = Path(index_path(shard))
    doc = json.loads(sidecar.read_text())
    where = {name: (offset, size) for name, offset, size in doc["members"]}
    for entry in doc["members"]:
        if entry[0] == "000001.png":
            entry[1] = where["000002.png"][0]
    sidecar.write_text(json.dumps(doc))
    cat = read_shards(shard)  # the size fits: the sidecar is used
    assert (
        read_image_bytes(cat.image_path("00000.tar/000000.png"))
        == (world["fashion"] / "images/000000.png").read_bytes()
    )  # a member whose header is where the sidecar says reads as ever
    with pytest.raises(
        ShardIndexMismatchError,
        match=r"00000\.tar\.idx\.json: does not match the shard: no "
        r"header of 000001\.png before offset \d+ \(the shard was rewritten",
    ):
        read_image_bytes(cat.image_path("00000.tar/000001.png"))
    shards_module._close_handles()


def test_a_sample_appended_in_the_padding_is_seen_though_the_size_is_unchanged(tmp_path: Path) -> None:
    # tar pads an archive to 10 KiB records: a small sample appended fits in the padding, the size stays
    # the same and the members the sidecar lists are where it says; only the end-of-archive marker moved
    shard = tmp_path / "00000.tar"
    write_tar(shard, [("a.json", b'{"text": "first"}'), ("a.png", png((1, 2, 3)))])
    write_shard_index(shard)
    doc = json.loads(Path(index_path(shard)).read_text())
    size = shard.stat().st_size
    assert doc["shard_bytes"] == size and doc["end"] + 1024 <= size
    with tarfile.open(shard, "a") as tar:
        add_members(tar, [("b.json", b'{"text": "added"}'), ("b.png", png((4, 5, 6)))])
    assert shard.stat().st_size == size  # what the size check alone cannot see
    with pytest.warns(ShardIndexWarning, match=rf"no end-of-archive marker at offset {doc['end']}"):
        got = read_shards(shard)
    assert got.rows["text"].tolist() == ["first", "added"]
