"""`cliptune suite generate`: every generated relevant / yellow / red set follows the flag rules, recomputed
here from the catalogue's rows; the hand-written fashion suite's flags are contained in the generated ones;
the file loads, resolves and runs under `cliptune test`; same seed, same bytes; --min-relevant drops and
lists; a phrases file words the queries; bad input ends in one sentence."""

from __future__ import annotations

import csv
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from cliptune.cli.app import app
from cliptune.config import load_config, save_config
from cliptune.data.catalogue import read_catalogue
from cliptune.data.splits import save_splits
from cliptune.data.synthetic import render_fashion
from cliptune.rundir import RunDir
from cliptune.suites import load_suite, parse_suite, resolve_suite
from cliptune.suites.generate import counted_items, generate_suite
from cliptune.suites.phrases import PhraseError, load_phrases
from cliptune.suites.schema import Thresholds
from tests.tiny_models import make_tiny_clip

runner = CliRunner()
ATTRS = ("garment", "colour", "pattern", "rips", "style")


@pytest.fixture(scope="module")
def fashion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render_fashion(tmp_path_factory.mktemp("gen") / "fashion", n=60, seed=0, size=128)


def _rows(catalogue: Path) -> list[dict[str, str]]:
    with (catalogue / "metadata.csv").open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _text(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _expected(
    rows: list[dict[str, str]], ids: list[str], asked: dict[str, str], tested: str
) -> dict[str, Any]:
    """The three sets by the rules, from the rows alone (one row per image in this catalogue)."""
    by_id = {r["file_name"]: r for r in rows}
    sets: dict[str, Any] = {"relevant": [], "yellow": [], "red": []}
    for i, image in enumerate(ids):
        row = by_id[image]
        differ = [a for a, v in asked.items() if row[a] != v]
        sets["relevant"].append(not differ)
        sets["yellow"].append(len(differ) == 1 and differ[0] != tested)
        sets["red"].append(row[tested] != asked[tested])
        assert i == ids.index(image)
    return {k: np.array(v) for k, v in sets.items()}


def test_every_generated_set_follows_the_flag_rules(fashion: Path) -> None:
    cat = read_catalogue(fashion)
    gen = generate_suite(cat, combinations=3, max_queries=100, min_relevant=1, seed=0)
    assert gen.attributes == list(ATTRS)  # every fashion attribute has 2..11 values shared by images
    resolved = resolve_suite(parse_suite(yaml.safe_load(gen.yaml)), cat)
    rows = _rows(fashion)
    # 5 single + 10 pairs + 10 triples; a category exists per combination present in the catalogue
    assert len(resolved.suite.categories) == 25
    seen: Counter[str] = Counter()
    for rq in resolved.queries:
        attrs = rq.category.split("+")
        asked = {a: _text(v) for a, v in rq.query.relevant.items()}  # type: ignore[union-attr]  # a filter
        assert list(asked) == attrs
        want = _expected(rows, resolved.items.ids, asked, tested=attrs[0])
        assert (rq.relevant == want["relevant"]).all(), rq.query.id
        assert (rq.yellow == want["yellow"]).all(), rq.query.id
        assert (rq.red == want["red"]).all(), rq.query.id
        if len(attrs) == 1:
            assert not rq.yellow.any()  # one attribute: nothing else may differ
        seen[rq.category] += 1
    # min_relevant=1 and a generous cap: one query per value (combination) that exists
    for name, n in seen.items():
        combos = {tuple(r[a] for a in name.split("+")) for r in rows}
        assert n == min(100, len(combos)), name


def test_queries_are_the_most_frequent_values_first(fashion: Path) -> None:
    cat = read_catalogue(fashion)
    gen = generate_suite(cat, attributes=["colour"], combinations=1, max_queries=3, min_relevant=1)
    queries = gen.document["categories"]["colour"]["queries"]
    counts = Counter(r["colour"] for r in _rows(fashion))
    got = [counts[q["relevant"]["colour"]] for q in queries]
    assert got == sorted(counts.values(), reverse=True)[:3]


def test_generated_flags_contain_the_hand_written_ones(fashion: Path) -> None:
    # the hand-written "ripped blue jeans" queries: rips tested, colour the acceptable difference
    cat = read_catalogue(fashion)
    hand = resolve_suite(load_suite(fashion / "suite.yaml"), cat)
    gen = generate_suite(
        cat, attributes=["rips", "garment", "colour"], combinations=3, max_queries=100, min_relevant=1
    )
    ours = resolve_suite(parse_suite(yaml.safe_load(gen.yaml)), cat)
    triples = {rq.relevant.tobytes(): rq for rq in ours.queries if rq.category == "rips+garment+colour"}
    checked = 0
    for rq in hand.queries:
        rel = rq.query.relevant
        if (
            rq.category != "combinations"
            or not isinstance(rel, dict)
            or set(rel) != {"garment", "colour", "rips"}
        ):
            continue
        mine = triples[rq.relevant.tobytes()]  # the same relevant set
        assert not (rq.yellow & ~mine.yellow).any()  # their yellow (another colour) is ours
        assert not (rq.red & ~mine.red).any()  # their red (intact, same garment) is ours (intact anything)
        checked += 1
    assert checked >= 2


def test_suite_defaults_are_the_schemas_thresholds(fashion: Path) -> None:
    gen = generate_suite(read_catalogue(fashion), combinations=1)
    assert gen.document["defaults"]["thresholds"] == Thresholds().model_dump()
    assert gen.document["defaults"]["thresholds"]["mrr"] == 0.3  # the seed's


def test_same_seed_same_bytes_and_the_cli_writes_them(fashion: Path, tmp_path: Path) -> None:
    cat = read_catalogue(fashion)
    assert generate_suite(cat, seed=3).yaml == generate_suite(cat, seed=3).yaml
    for name in ("a.yaml", "b.yaml"):
        result = runner.invoke(
            app, ["suite", "generate", str(fashion), "--out", str(tmp_path / name), "--seed", "3"]
        )
        assert result.exit_code == 0, result.output
    assert (tmp_path / "a.yaml").read_bytes() == (tmp_path / "b.yaml").read_bytes()
    assert (tmp_path / "a.yaml").read_text() == generate_suite(cat, seed=3).yaml


def test_min_relevant_drops_and_lists(fashion: Path, tmp_path: Path) -> None:
    counts = Counter(r["colour"] for r in _rows(fashion))
    floor = sorted(counts.values())[len(counts) // 2]  # about half the colours have fewer photos
    few = {c for c, n in counts.items() if n < floor}
    assert few and few != set(counts)
    out = tmp_path / "s.yaml"
    args = ["suite", "generate", str(fashion), "--out", str(out), "--attributes", "colour"]
    result = runner.invoke(
        app, [*args, "--combinations", "1", "--max-queries-per-category", "50", "--min-relevant", str(floor)]
    )
    assert result.exit_code == 0, result.output
    doc = yaml.safe_load(out.read_text())
    kept = {q["relevant"]["colour"] for q in doc["categories"]["colour"]["queries"]}
    assert kept == set(counts) - few
    header = next(line for line in out.read_text().splitlines() if line.startswith("# Queries dropped"))
    assert f"({len(few)})" in header
    for colour in few:
        assert f"colour: '{colour}' ({counts[colour]} relevant image(s))" in header
        assert f"colour: '{colour}' ({counts[colour]} relevant image(s))" in result.output


def test_split_column_counts_only_that_split(fashion: Path, tmp_path: Path) -> None:
    copy = tmp_path / "cat"
    shutil.copytree(fashion, copy)
    rows = _rows(fashion)
    for i, r in enumerate(rows):
        r["split"] = "test" if i % 3 == 0 else "train"
    with (copy / "metadata.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cat = read_catalogue(copy)
    words, files = counted_items(cat, "test", None)
    assert files is not None and len(files) == 20 and "split test" in words
    gen = generate_suite(
        cat, attributes=["garment"], combinations=1, max_queries=50, min_relevant=2, counted=(words, files)
    )
    in_test = Counter(r["garment"] for r in rows if r["split"] == "test")
    kept = {q["relevant"]["garment"] for q in gen.document["categories"]["garment"]["queries"]}
    assert kept == {g for g, n in in_test.items() if n >= 2}
    assert {d.text for d in gen.dropped} == {g for g in {r["garment"] for r in rows} if in_test[g] < 2}


def test_phrases_word_the_queries(fashion: Path, tmp_path: Path) -> None:
    cat = read_catalogue(fashion)
    plain = generate_suite(
        cat, attributes=["garment", "rips"], combinations=2, max_queries=50, min_relevant=1
    )
    texts = {q["text"] for c in plain.document["categories"].values() for q in c["queries"]}
    assert {"with rips", "without rips", "jeans with rips", "jeans without rips"} <= texts  # the defaults
    phrases_file = tmp_path / "phrases.yaml"
    phrases_file.write_text(
        "order: [rips, garment]\ntemplate: 'a photo of {}'\n"
        "phrases:\n  rips: {true: ripped, false: intact}\n  garment: {jeans: [jeans, denim]}\n"
    )
    values = {a: sorted({r[a] for r in _rows(fashion)}) for a in ATTRS}
    worded = generate_suite(
        cat,
        attributes=["garment", "rips"],
        max_queries=50,
        min_relevant=1,
        phrases=load_phrases(phrases_file, values),
    )
    by_relevant = {
        (q["relevant"].get("garment"), q["relevant"].get("rips")): q["text"]
        for c in worded.document["categories"].values()
        for q in c["queries"]
    }
    assert by_relevant[(None, True)] == "a photo of ripped"
    assert by_relevant[("shorts", False)] == "a photo of intact shorts"
    assert by_relevant[("jeans", True)] in {"a photo of ripped jeans", "a photo of ripped denim"}  # a synonym
    bad = tmp_path / "bad.yaml"
    bad.write_text("phrases:\n  colour: {bleu: blue}\n  fabric: {x: y}\n")
    with pytest.raises(
        PhraseError, match=r"phrases\.colour\.bleu: unknown value.*phrases\.fabric: unknown attribute"
    ):
        load_phrases(bad, values)


def test_cliptune_test_runs_the_generated_suite(fashion: Path, tmp_path: Path) -> None:
    out = tmp_path / "gen.yaml"
    result = runner.invoke(app, ["suite", "generate", str(fashion), "--out", str(out), "--combinations", "1"])
    assert result.exit_code == 0, result.output
    clip = make_tiny_clip(tmp_path / "clip", seed=0)
    result = runner.invoke(
        app,
        [
            "test",
            str(clip),
            "--suite",
            str(out),
            "--data",
            str(fashion),
            "--out",
            str(tmp_path / "res"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--bootstrap",
            "10",
            "-q",
        ],
    )
    assert result.exit_code in (0, 1), result.output  # a verdict, not an invalid suite (2)
    assert "PASS fashion-generated" in result.output or "FAIL fashion-generated" in result.output
    assert (tmp_path / "res" / "fashion-generated.json").is_file()


def _no_traceback(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1, result.output
    return result.output


def test_cli_errors_are_one_sentence(fashion: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "s.yaml")
    msg = _no_traceback(["suite", "generate", str(fashion), "--out", out, "--attributes", "garment,nope"])
    assert "unknown attribute(s) 'nope'; attributes: garment, colour, pattern, rips, style" in msg
    bare = tmp_path / "bare"
    (bare / "images").mkdir(parents=True)
    shutil.copy(fashion / "images" / "000000.png", bare / "images" / "a.png")
    (bare / "metadata.csv").write_text("file_name,text,group\nimages/a.png,a thing,g1\n")
    msg = _no_traceback(["suite", "generate", str(bare), "--out", out])
    assert "no attribute columns" in msg
    msg = _no_traceback(["suite", "generate", str(fashion), "--out", out, "--split", "test"])
    assert "no split column" in msg


def test_the_phrases_example_in_the_docs_loads(fashion: Path, tmp_path: Path) -> None:
    docs = (Path(__file__).resolve().parents[1] / "docs" / "suites.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", docs, re.S) if b.startswith("order:")]
    assert len(blocks) == 1
    (tmp_path / "phrases.yaml").write_text(blocks[0])
    values = {a: sorted({r[a] for r in _rows(fashion)}) for a in ATTRS}
    phrases = load_phrases(tmp_path / "phrases.yaml", values)
    assert phrases.text({"garment": "jeans", "rips": "ripped"}, ["garment", "rips"]) == "ripped jeans"


def test_splits_from_a_run_counts_its_held_out_images(fashion: Path, tmp_path: Path) -> None:
    rows = _rows(fashion)
    groups = sorted({r["group"] for r in rows})
    run = tmp_path / "run"
    save_config(load_config(None, ["name=run", f"data.catalogue={fashion}"]), RunDir(run).config)
    save_splits({"train": groups[4:], "val": groups[2:4], "test": groups[:2]}, RunDir(run).splits)
    test_images = {r["file_name"] for r in rows if r["group"] in groups[:2]}
    words, files = counted_items(read_catalogue(fashion), None, run)  # the default: the run's test split
    assert set(files or []) == test_images and words == f"split test of {run}"
    out = tmp_path / "s.yaml"
    result = runner.invoke(
        app,
        ["suite", "generate", str(fashion), "--out", str(out), "--splits-from", str(run), "--split", "val"],
    )
    assert result.exit_code == 0, result.output
    val_images = {r["file_name"] for r in rows if r["group"] in groups[2:4]}
    assert f"split val of {run} ({len(val_images)} images)" in result.output


def test_an_image_with_contradicting_rows_drops_its_queries(fashion: Path, tmp_path: Path) -> None:
    # one image photographed under two colours would be both relevant and red: its queries are dropped
    copy = tmp_path / "cat"
    shutil.copytree(fashion, copy)
    rows = _rows(fashion)
    first = rows[0]
    other = next(c for c in sorted({r["colour"] for r in rows}) if c != first["colour"])
    rows.append({**first, "colour": other})
    with (copy / "metadata.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cat = read_catalogue(copy)
    gen = generate_suite(cat, attributes=["colour"], combinations=1, max_queries=50, min_relevant=1)
    conflicts = {d.text for d in gen.dropped if "both sides" in d.reason}
    assert conflicts == {first["colour"], other}
    resolve_suite(parse_suite(yaml.safe_load(gen.yaml)), cat)  # what is left resolves
