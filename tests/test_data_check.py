"""`data check`: every bad row is rejected with its row number and a precise reason; good rows survive."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import cliptune.data.check as check_module
from cliptune.data.catalogue import Catalogue, CatalogueError, read_catalogue
from cliptune.data.check import CheckResult, Rejection, check_catalogue, write_clean

MAX_PIXELS = 300  # big.png is 20 x 20 = 400 pixels, over it; the others are 8 x 8 = 64

# One row per case: (file_name, text, extra columns). Row numbers are JSONL line numbers: 1-based positions.
ROWS: list[tuple[object, object, dict]] = [
    ("a.png", "red shirt", {"group": "g1", "colour": "red"}),  # 1 good
    ("a.png", "crimson shirt", {"group": "g1", "colour": "red"}),  # 2 good
    ("a.png", "red shirt ", {"group": "g1", "colour": "red"}),  # 3 duplicate of 1 (compared stripped)
    ("b.png", "   ", {"group": "g2"}),  # 4 blank text
    ("b.png", None, {"group": "g2"}),  # 5 missing text
    ("b.png", "blue shirt", {"group": "g2", "colour": "blue"}),  # 6 good
    ("missing.png", "x", {}),  # 7 file not found
    ("empty.png", "x", {}),  # 8 zero bytes
    ("page.png", "x", {}),  # 9 html saved as png
    ("cut.jpg", "x", {}),  # 10 truncated
    ("big.png", "x", {}),  # 11 over the pixel limit
    ("../outside.png", "x", {}),  # 12 escapes the folder
    ("/tmp/abs.png", "x", {}),  # 13 absolute path
    ("c.png", "x", {"group": "g6", "tags": ["a", "b"]}),  # 14 non-scalar cell
    ("sub/d.png", "d one", {"group": "g3", "split": "train"}),  # 15 group g3: train and test
    ("sub/d2.png", "d two", {"group": "g3", "split": "test"}),  # 16 same group
    ("e.png", "e one", {"group": "g4"}),  # 17 e.png in groups g4 and g5
    ("e.png", "e two", {"group": "g5"}),  # 18
    (None, "no file", {}),  # 19 missing file_name
    ("missing.png", "\t", {}),  # 20 two problems
    ("c.png", "grey shirt", {"group": "g6", "split": "val"}),  # 21 good, explicit split
    (7, "x", {}),  # 22 file_name not text
    ("a.png", 12, {"group": "g1"}),  # 23 text not text
]

EXPECTED = {
    3: "duplicate of row 1 (same file_name and text)",
    4: "empty text (only whitespace)",
    5: "missing text",
    7: "file not found",
    8: "empty file (0 bytes)",
    9: "not an image (unrecognised format)",
    10: "truncated image (",  # + Pillow's detail
    11: "image too large: 20 x 20 = 400 pixels > limit 300",
    12: "path escapes the catalogue folder: ../outside.png",
    13: "path escapes the catalogue folder (absolute path): /tmp/abs.png",
    14: "unknown column type: 'tags' holds a list",
    15: "group 'g3' has conflicting explicit splits: test, train",
    16: "group 'g3' has conflicting explicit splits: test, train",
    17: "file_name is in several groups: g4, g5",
    18: "file_name is in several groups: g4, g5",
    19: "missing file_name",
    20: "empty text (only whitespace); file not found",
    22: "file_name is not text (int)",
    23: "text is not text (int)",
}
GOOD = [1, 2, 6, 21]


def _image(path: Path, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(len(path.name)).integers(0, 255, (size, size, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(path)


@pytest.fixture
def catalogue(tmp_path: Path) -> Catalogue:
    root = tmp_path / "cat"
    for name in ("a.png", "b.png", "c.png", "e.png", "sub/d.png", "sub/d2.png"):
        _image(root / name)
    _image(root / "big.png", size=20)
    _image(tmp_path / "outside.png")
    (root / "empty.png").write_bytes(b"")
    (root / "page.png").write_text("<html>not found</html>")
    _image(root / "whole.jpg", size=16)
    data = (root / "whole.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(data[: len(data) // 2])
    lines = [json.dumps({"file_name": f, "text": t, **extra}) for f, t, extra in ROWS]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return read_catalogue(root)


def test_every_bad_row_has_its_row_and_reason(catalogue: Catalogue) -> None:
    result = check_catalogue(catalogue, max_pixels=MAX_PIXELS)
    got = {r.row: r.reason for r in result.rejected}
    assert sorted(got) == sorted(EXPECTED)
    for row, reason in EXPECTED.items():
        assert got[row].startswith(reason), (row, got[row])
    assert [r.row for r in result.rejected] == sorted(EXPECTED)  # in row order
    by_row = {r.row: r for r in result.rejected}
    assert by_row[12].file_name == "../outside.png" and by_row[19].file_name == ""
    assert by_row[22].file_name == "7" and by_row[12].source == "metadata.jsonl"
    assert result.good["row"].tolist() == GOOD
    assert not result.ok


def test_good_plus_rejected_is_all_rows(catalogue: Catalogue) -> None:
    result = check_catalogue(catalogue, max_pixels=MAX_PIXELS)
    good, bad = set(result.good["row"]), {r.row for r in result.rejected}
    assert good.isdisjoint(bad) and good | bad == set(catalogue.rows["row"])
    assert len(result.good) + len(result.rejected) == len(catalogue.rows) == len(ROWS)


def test_each_image_is_probed_once(catalogue: Catalogue, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    real = check_module.probe_image

    def counting(path: Path, max_pixels: int) -> tuple[int, int]:
        calls.append(path)
        return real(path, max_pixels)

    monkeypatch.setattr(check_module, "probe_image", counting)
    check_catalogue(catalogue, max_pixels=MAX_PIXELS, progress=True)
    assert len(calls) == len(set(calls))
    # every distinct usable file_name: a, b, c, e, sub/d, sub/d2, missing, empty, page, cut, big = 11
    assert len(calls) == 11 and catalogue.root / "a.png" in calls


def test_write_clean_round_trips(catalogue: Catalogue, tmp_path: Path) -> None:
    result = check_catalogue(catalogue, max_pixels=MAX_PIXELS)
    out = tmp_path / "clean"
    metadata, rejected = write_clean(result, catalogue, out)
    assert (metadata, rejected) == (out / "metadata.csv", out / "rejected.csv")
    table = pd.read_csv(rejected, keep_default_na=False)
    assert list(table.columns) == ["file_name", "row", "reason", "source"]
    assert table["row"].tolist() == sorted(EXPECTED)
    assert table.loc[table["row"] == 11, "reason"].item() == EXPECTED[11]
    clean = read_catalogue(out)
    assert clean.image_root == catalogue.root.resolve()
    assert clean.rows["file_name"].tolist() == ["a.png", "a.png", "b.png", "c.png"]
    assert clean.rows["text"].tolist() == ["red shirt", "crimson shirt", "blue shirt", "grey shirt"]
    assert clean.rows["split"].fillna("").tolist() == ["", "", "", "val"]
    recheck = check_catalogue(clean, max_pixels=MAX_PIXELS)
    assert recheck.ok and len(recheck.good) == len(GOOD)
    assert len(clean.rows) + len(table) == len(ROWS)


def test_write_clean_refuses_ambiguous_outputs(catalogue: Catalogue, tmp_path: Path) -> None:
    result = check_catalogue(catalogue, max_pixels=MAX_PIXELS)
    with pytest.raises(ValueError, match="another folder than the catalogue itself"):
        write_clean(result, catalogue, catalogue.root)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "metadata.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="already holds metadata.parquet"):
        write_clean(result, catalogue, tmp_path / "busy")


def test_missing_required_column_is_a_catalogue_error(catalogue: Catalogue) -> None:
    broken = Catalogue(catalogue.root, catalogue.metadata_path, catalogue.rows.drop(columns="text"), [])
    with pytest.raises(CatalogueError, match="missing required column\\(s\\) text"):
        check_catalogue(broken)


def test_no_group_column_means_one_group_per_file(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    _image(tmp_path / "b.png")
    (tmp_path / "metadata.csv").write_text(
        "file_name,text,split\na.png,x,train\na.png,y,test\nb.png,z,test\n"
    )
    result = check_catalogue(read_catalogue(tmp_path))
    assert [(r.row, r.reason) for r in result.rejected] == [
        (1, "group 'a.png' has conflicting explicit splits: test, train"),
        (2, "group 'a.png' has conflicting explicit splits: test, train"),
    ]
    assert result.good["row"].tolist() == [3]


def test_triplets_are_checked_against_good_rows(tmp_path: Path) -> None:
    for name in ("a.png", "b.png", "c.png"):
        _image(tmp_path / name)
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,x\nb.png,y\nc.png,z\ngone.png,w\n")
    (tmp_path / "triplets.csv").write_text(
        "anchor,positive,negative\na.png,b.png,c.png\na.png,gone.png,c.png\na.png,b.png,a.png\n,b.png,c.png\n"
    )
    catalogue = read_catalogue(tmp_path)
    result = check_catalogue(catalogue)
    assert [r.row for r in result.rejected] == [4]
    assert result.rejected_triplets == [
        Rejection("a.png", 2, "positive 'gone.png' is not a good catalogue row", "triplets.csv"),
        Rejection("a.png", 3, "negative is the same file as the anchor or positive", "triplets.csv"),
        Rejection("", 4, "missing anchor", "triplets.csv"),
    ]
    assert isinstance(result, CheckResult) and result.good_triplets is not None
    assert result.good_triplets["row"].tolist() == [1]
    _, rejected = write_clean(result, catalogue, tmp_path / "clean")
    table = pd.read_csv(rejected, keep_default_na=False)
    assert table[["row", "source"]].values.tolist() == [
        [4, "metadata.csv"],
        [2, "triplets.csv"],
        [3, "triplets.csv"],
        [4, "triplets.csv"],
    ]
    clean = read_catalogue(tmp_path / "clean")
    assert clean.triplets is not None and len(clean.triplets) == 1
    assert check_catalogue(clean).ok


def test_caption_checks_apply_to_the_named_column(tmp_path: Path) -> None:
    # data.text_column: title -> blank and duplicate *titles* are bad rows, named by the column; a blank
    # `text` beside it is free text and no reason to reject a row
    root = tmp_path / "titles"
    for name in ("a.png", "b.png", "c.png"):
        _image(root / name)
    (root / "metadata.csv").write_text(
        "file_name,title,text,colour\n"
        "a.png,blue jeans,,blue\n"  # row 1: good (blank `text` is not the caption)
        "b.png,  ,x,red\n"  # row 2: blank title
        "c.png,,x,red\n"  # row 3: missing title
        "a.png, blue jeans ,y,blue\n"  # row 4: same file and title as row 1 (whitespace ignored)
    )
    result = check_catalogue(read_catalogue(root, "title"))
    assert [(r.row, r.reason) for r in result.rejected] == [
        (2, "empty title (only whitespace)"),
        (3, "missing title"),
        (4, "duplicate of row 1 (same file_name and title)"),
    ]
    assert result.good["row"].tolist() == [1]
