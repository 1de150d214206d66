"""Reading catalogues: CSV, JSONL and Parquet read the same, rows are numbered as a user counts them."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from cliptune.data.catalogue import Catalogue, CatalogueError, read_catalogue

RECORDS = [
    {"file_name": "img/a.png", "text": "red shirt", "group": "p1", "colour": "red", "rips": 0, "sale": True},
    {
        "file_name": "img/a.png",
        "text": "crimson top",
        "group": "p1",
        "colour": "red",
        "rips": 0,
        "sale": True,
    },
    {"file_name": "b.png", "text": "ripped jeans", "group": "p2", "colour": "blue", "rips": 3, "sale": False},
    {"file_name": "c.png", "text": "NA", "group": "007", "colour": "black", "rips": 1, "sale": False},
]


def _write(root: Path, fmt: str, records: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(records)
    if fmt == "csv":
        frame.to_csv(root / "metadata.csv", index=False)
    elif fmt == "jsonl":
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        frame.to_parquet(root / "metadata.parquet", index=False)
    return root


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_formats_read_the_same(tmp_path: Path, fmt: str) -> None:
    cat = read_catalogue(_write(tmp_path / fmt, fmt, RECORDS))
    assert isinstance(cat, Catalogue)
    assert cat.metadata_path == tmp_path / fmt / f"metadata.{fmt}"
    assert cat.image_root == cat.root == tmp_path / fmt
    assert cat.attributes == ["colour", "rips", "sale"]
    assert cat.rows["row"].tolist() == [1, 2, 3, 4]
    assert list(cat.rows.columns) == ["row", "file_name", "text", "group", "colour", "rips", "sale"]
    expected = pd.DataFrame(RECORDS)
    expected.insert(0, "row", [1, 2, 3, 4])
    pd.testing.assert_frame_equal(cat.rows, expected, check_dtype=False)
    # typed attributes survive every format: ints stay ints, bools stay bools, ids keep their spelling
    assert cat.rows["rips"].tolist() == [0, 0, 3, 1] and cat.rows["sale"].tolist() == [
        True,
        True,
        False,
        False,
    ]
    assert cat.rows.at[3, "group"] == "007" and cat.rows.at[3, "text"] == "NA"
    assert cat.triplets is None and cat.triplets_path is None


def test_csv_only_empty_cells_are_missing_and_rows_are_never_dropped(tmp_path: Path) -> None:
    (tmp_path / "metadata.csv").write_text(
        'file_name,text,colour\na.png,,red\nb.png,null,\n,no file,blue\nc.png,"two\nlines",green\n'
    )
    rows = read_catalogue(tmp_path).rows
    assert rows["row"].tolist() == [1, 2, 3, 4]  # data record numbers: line number - 1 (header)
    assert pd.isna(rows.at[0, "text"]) and rows.at[1, "text"] == "null"
    assert pd.isna(rows.at[1, "colour"]) and pd.isna(rows.at[2, "file_name"])
    assert rows.at[3, "text"] == "two\nlines"


def test_jsonl_rows_are_line_numbers_and_non_scalars_are_kept(tmp_path: Path) -> None:
    lines = [
        json.dumps({"file_name": "a.png", "text": "x", "tags": ["a", "b"]}),
        "",
        json.dumps({"file_name": "b.png", "text": "y", "meta": {"k": 1}}),
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    cat = read_catalogue(tmp_path)
    assert cat.rows["row"].tolist() == [1, 3]  # the blank line 2 is not a row, but numbering follows lines
    assert cat.rows.at[0, "tags"] == ["a", "b"]  # not cast: the check reports it
    assert cat.rows.at[1, "meta"] == {"k": 1}
    assert cat.attributes == ["tags", "meta"]


def test_parquet_list_column_is_kept(tmp_path: Path) -> None:
    pd.DataFrame({"file_name": ["a.png"], "text": ["x"], "tags": [["a", "b"]]}).to_parquet(
        tmp_path / "metadata.parquet"
    )
    assert list(read_catalogue(tmp_path).rows.at[0, "tags"]) == ["a", "b"]


def test_catalogue_level_errors(tmp_path: Path) -> None:
    with pytest.raises(CatalogueError, match="catalogue folder not found"):
        read_catalogue(tmp_path / "nope")
    with pytest.raises(
        CatalogueError, match="no metadata file; expected one of metadata.csv, metadata.jsonl"
    ):
        read_catalogue(tmp_path)
    (tmp_path / "metadata.csv").write_text("file_name,caption\na.png,x\n")
    with pytest.raises(
        CatalogueError, match=r"metadata.csv: no caption column 'text' \(columns: file_name, caption\)"
    ):
        read_catalogue(tmp_path)
    (tmp_path / "metadata.jsonl").write_text("")
    with pytest.raises(CatalogueError, match="several files found \\(metadata.csv, metadata.jsonl\\)"):
        read_catalogue(tmp_path)


def test_syntax_errors_name_the_line(tmp_path: Path) -> None:
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{"file_name": oops}\n')
    with pytest.raises(CatalogueError, match="metadata.jsonl line 2: invalid JSON"):
        read_catalogue(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n["a.png", "x"]\n')
    with pytest.raises(CatalogueError, match="line 2: expected a JSON object, got list"):
        read_catalogue(tmp_path)
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,x\nb.png,y,extra\n")
    with pytest.raises(CatalogueError, match="metadata.csv: cannot be read .*line 3"):
        read_catalogue(tmp_path)
    (tmp_path / "metadata.csv").write_text("row,file_name,text\n1,a.png,x\n")
    with pytest.raises(CatalogueError, match="column 'row' is reserved"):
        read_catalogue(tmp_path)


def test_triplets_and_image_root(tmp_path: Path) -> None:
    _write(tmp_path, "csv", RECORDS)
    (tmp_path / "triplets.csv").write_text("anchor,positive,negative\nimg/a.png,img/a.png,b.png\n")
    (tmp_path / "catalogue.json").write_text(json.dumps({"image_root": "../pictures"}))
    cat = read_catalogue(tmp_path)
    assert cat.triplets_path == tmp_path / "triplets.csv"
    assert cat.triplets is not None and cat.triplets.to_dict("records") == [
        {"row": 1, "anchor": "img/a.png", "positive": "img/a.png", "negative": "b.png"}
    ]
    assert cat.image_root == tmp_path / "../pictures"
    assert cat.image_path("img/a.png") == tmp_path / "../pictures/img/a.png"
    (tmp_path / "triplets.csv").write_text("anchor,positive\na.png,b.png\n")
    with pytest.raises(CatalogueError, match="triplets.csv: missing required column\\(s\\) negative"):
        read_catalogue(tmp_path)
    (tmp_path / "triplets.csv").unlink()
    (tmp_path / "catalogue.json").write_text("{}")
    with pytest.raises(CatalogueError, match='catalogue.json: expected {"image_root"'):
        read_catalogue(tmp_path)


def test_a_named_caption_column_replaces_text(tmp_path: Path) -> None:
    # `title` is the caption: required instead of `text`, read as text, never an attribute
    records = [{("title" if k == "text" else k): v for k, v in r.items()} for r in RECORDS]
    root = _write(tmp_path / "titles", "csv", records)
    with pytest.raises(CatalogueError, match=r"no caption column 'text' \(columns: file_name, title, group,"):
        read_catalogue(root)
    cat = read_catalogue(root, "title")
    assert cat.text_column == "title"
    assert cat.attributes == ["colour", "rips", "sale"]
    assert cat.filters == ["colour", "rips", "sale", "group"]  # suites and search --where
    assert cat.rows["title"].tolist() == ["red shirt", "crimson top", "ripped jeans", "NA"]  # "NA" stays text
    # a `text` column beside a named caption column is free text, not an attribute either
    with_text = [{**r, "text": "x"} for r in records]
    assert read_catalogue(_write(tmp_path / "both", "jsonl", with_text), "title").attributes == [
        "colour",
        "rips",
        "sale",
    ]
    # switching the caption column of a catalogue read: `colour` stops being an attribute, `title` becomes one
    by_colour = cat.with_text_column("colour")
    assert (by_colour.text_column, by_colour.attributes) == ("colour", ["title", "rips", "sale"])
    with pytest.raises(CatalogueError, match="no caption column 'caption_en'"):
        cat.with_text_column("caption_en")
