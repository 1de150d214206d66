"""docs/own-data.md runs as written: every ```bash block, in order, through the CLI, on tiny stand-ins.

Marker convention of the page (an HTML comment on the line before a fence):

- ``<!-- doc-test: skip -->``: the block is not run (installs, hub downloads);
- ``<!-- doc-test: file NAME -->``: the block is a file the page asks the user to save: written to NAME;
- every other ```bash block is run, one command per line (``#`` comments dropped, ``\\`` continuations
  joined); each command must start with ``cliptune``.

What stands in for the user's world, and the only substitutions:

- the catalogue ``my_photos/``: 12 products x 2 photos (32 px squares) with a ``title`` caption column and
  no ``text`` column, plus one row with a blank title (so ``--write-clean`` has something to set aside);
  garments are laid out so that each split of the page's own ratios and seed holds jeans and a dress,
  which the page's suite needs on the held-out photos;
- the model folder the page tells the user to save from the hub (``models/siglip-base``) is a tiny random
  SigLIP (tests/tiny_models.py);
- sizes only: the config's ``epochs: 30`` and ``batch_size: 64`` run as 2 and 8 (14 training photos).

Exit codes: 0 for every command, except that ``cliptune test`` may exit 1: a failed gate is the command's
answer (a random tiny model fails real thresholds), not an error. Afterwards the files the page promises
are checked: titles as captions everywhere, ``title`` never an attribute, ``group`` filterable.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from cliptune.cli.app import app
from cliptune.data.splits import make_splits
from tests.tiny_models import make_tiny_siglip

DOC = Path(__file__).resolve().parents[1] / "docs" / "own-data.md"
MODEL_PATH = "models/siglip-base"  # where the page tells the user to save the hub model
SIZES = {"epochs: 30": "epochs: 2", "batch_size: 64": "batch_size: 8"}  # sizes only: 14 train rows
_FENCE = re.compile(r"(?:<!-- doc-test: (?P<marker>[^>]*?) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)


def doc_blocks(text: str) -> list[tuple[str, str, str]]:
    """(language, marker, body) of every fenced block, in page order; marker is '' when unmarked."""
    return [(m["lang"], (m["marker"] or "").strip(), m["body"]) for m in _FENCE.finditer(text)]


def doc_commands(body: str) -> list[list[str]]:
    """The commands of a bash block as argv lists: continuations joined, comments dropped."""
    joined = body.replace("\\\n", " ")
    return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


def test_blocks_and_commands_are_parsed() -> None:
    text = (
        "a\n<!-- doc-test: skip -->\n```bash\npip x\n```\n```bash\ncliptune a b \\\n  --c 'd e'  # why\n```\n"
    )
    assert doc_blocks(text) == [
        ("bash", "skip", "pip x\n"),
        ("bash", "", "cliptune a b \\\n  --c 'd e'  # why\n"),
    ]
    assert doc_commands(doc_blocks(text)[1][2]) == [["cliptune", "a", "b", "--c", "d e"]]


def _write_catalogue(root: Path, config: dict) -> None:
    """12 products x 2 photos, caption column `title`; each split of the page's ratios gets both garments."""
    colours = {"jeans": ("blue", (40, 60, 200)), "dress": ("red", (200, 40, 40))}
    groups = [f"p{i:02d}" for i in range(1, 13)]
    rows = [{"file_name": f"images/{g}-{v}.png", "group": g} for g in groups for v in ("front", "back")]
    split = config["data"]["split"]
    splits = make_splits(pd.DataFrame(rows), split["ratios"], split["seed"])
    garment = {}
    for members in splits.values():
        order = sorted(members, key=lambda g: (g != "p01", g))
        if "p02" in order and order.index("p02") % 2 == 0:  # the page searches p02 as a dress
            i = order.index("p02")
            j = 1 if i == 0 else i - 1
            order[i], order[j] = order[j], order[i]
        assert len(order) >= 2, splits  # every split needs jeans and a dress for the suite
        garment |= {g: ("jeans", "dress")[k % 2] for k, g in enumerate(order)}
    assert garment["p01"] == "jeans" and garment["p02"] == "dress"
    (root / "images").mkdir(parents=True)
    for row in rows:
        kind = garment[row["group"]]
        colour, rgb = colours[kind]
        shade = 30 if row["file_name"].endswith("back.png") else 0
        Image.new("RGB", (32, 32), tuple(max(0, c - shade) for c in rgb)).save(root / row["file_name"])
        view = " (back)" if shade else ""
        title = "blue jeans with rips" if kind == "jeans" else "a red dress with white dots"
        row |= {"title": f"{title} {row['group']}{view}", "garment": kind, "colour": colour}
    bad = {"file_name": "images/p03-front.png", "group": "p03", "title": "  "}  # a blank title: set aside
    table = pd.DataFrame([*rows, bad | {"garment": garment["p03"], "colour": colours[garment["p03"]][0]}])
    table[["file_name", "title", "group", "garment", "colour"]].to_csv(root / "metadata.csv", index=False)


def test_own_data_doc_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))  # the default feature cache lives under ~/.cache
    blocks = doc_blocks(DOC.read_text(encoding="utf-8"))
    files = {m.split(" ", 1)[1]: body for _, m, body in blocks if m.startswith("file ")}
    assert set(files) == {"my-photos.yaml", "my_suite.yaml"}
    for old, new in SIZES.items():
        assert old in files["my-photos.yaml"], old
        files["my-photos.yaml"] = files["my-photos.yaml"].replace(old, new)
    config = yaml.safe_load(files["my-photos.yaml"])
    assert config["data"]["text_column"] == "title" and config["model"]["backbone"] == MODEL_PATH
    for name, body in files.items():
        (tmp_path / name).write_text(body, encoding="utf-8")
    _write_catalogue(tmp_path / "my_photos", config)
    make_tiny_siglip(tmp_path / MODEL_PATH)

    runner = CliRunner()
    ran = []
    for lang, marker, body in blocks:
        if lang != "bash" or marker == "skip":
            continue
        assert marker == "", f"unknown doc-test marker {marker!r}"
        for argv in doc_commands(body):
            assert argv[0] == "cliptune", argv
            start = time.perf_counter()
            result = runner.invoke(app, argv[1:], env={"COLUMNS": "200"})  # tables unwrapped
            print(f"{time.perf_counter() - start:6.2f}s {shlex.join(argv)}")
            # a failed gate and a leaking pair are the commands' answers (exit 1), not errors
            allowed = {0, 1} if argv[1] == "test" or argv[1:3] == ["data", "audit"] else {0}
            assert result.exit_code in allowed, f"{shlex.join(argv)} -> {result.exit_code}\n{result.output}"
            assert "Traceback" not in result.output
            ran.append((argv, result.output))
    assert [argv[1] for argv, _ in ran] == [
        "data",
        "train",
        "eval",
        "test",
        "suite",
        "test",
        "data",
        "eval",
        "test",
        "train",
        "eval",
        "test",
        "compare",
        "embed",
        "index",
        "search",
        "search",
    ]  # fmt: the page's order

    # data check: the blank title is set aside, named by its column
    rejected = pd.read_csv(tmp_path / "my_photos_clean" / "rejected.csv")
    assert rejected[["row", "reason"]].values.tolist() == [[25, "empty title (only whitespace)"]]
    # both runs trained on `title`, the baseline was measured on the run's test split
    for run in ("my-photos", "my-photos-tl2"):
        assert (tmp_path / "runs" / run / "model").is_dir() and (
            tmp_path / "runs" / run / "eval" / "test.json"
        ).is_file()
    # the generated suite ran on the run's held-out photos; the audit found the stand-in's copies: its
    # photos are flat colour squares, so every jeans front is the same picture in another product
    generated = json.loads(
        (tmp_path / "runs" / "my-photos" / "suite" / "my-photos-generated.json").read_text()
    )
    assert generated["split"] == "test" and generated["categories"]
    pairs = pd.read_csv(tmp_path / "audit" / "my-photos" / "audit.csv")
    photos = pd.read_csv(tmp_path / "my_photos_clean" / "metadata.csv").drop_duplicates("file_name")
    look = {
        f: (g, f.endswith("back.png")) for f, g in zip(photos["file_name"], photos["garment"], strict=True)
    }
    same = {(a, b) for a in look for b in look if a < b and look[a] == look[b]}  # one garment, one view
    exact = pairs[pairs["kind"] == "exact"]
    assert set(zip(exact["file_a"], exact["file_b"], strict=True)) == same and "leak" in set(pairs["finding"])
    evaluation = json.loads((tmp_path / "evals" / "siglip-zero-shot" / "evaluation.json").read_text())
    assert evaluation["text_column"] == "title"
    assert (tmp_path / "compare" / "my-photos" / "compare.json").is_file()
    # embed: titles are the captions, title is not an attribute column
    table = pd.read_parquet(tmp_path / "my_photos.parquet")
    clean = pd.read_csv(tmp_path / "my_photos_clean" / "metadata.csv")
    assert table["caption"].tolist() == clean["title"].tolist() and "title" not in table.columns
    # index: titles are the captions; attributes are garment, colour and group, never title
    manifest = json.loads((tmp_path / "indexes" / "my-photos" / "index.json").read_text())
    assert manifest["attributes"] == ["garment", "colour", "group"] and manifest["text_column"] == "title"
    items = [json.loads(line) for line in (tmp_path / "indexes" / "my-photos" / "items.jsonl").open()]
    assert items[0]["captions"] == [clean["title"][0]]
    # search --where group=p02 (refused before): only p02's photos, each shown with its title
    hits = _table_rows(ran[-1][1])
    assert len(hits) == 2, ran[-1][1]
    ids = sorted(h[2].replace(" ", "") for h in hits)  # an id folds mid-word: its pieces join without spaces
    assert ids == ["images/p02-back.png", "images/p02-front.png"], hits
    assert all(h[3].startswith("a red dress with white dots p02") for h in hits), hits


def _table_rows(output: str) -> list[list[str]]:
    """The body rows of a rich table whose cells fold at the terminal's width: a line with a rank starts a
    row, the lines after it continue its cells (joined with one space)."""
    rows: list[list[str]] = []
    for line in output.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if not cells or cells[0] == "rank":
            continue
        if cells[0]:
            rows.append(cells)
        elif rows:
            rows[-1] = [f"{a} {b}".strip() if b else a for a, b in zip(rows[-1], cells, strict=True)]
    return rows
