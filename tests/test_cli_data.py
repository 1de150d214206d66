"""`cliptune data synth` and `cliptune data check` end to end through the CLI."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from PIL import Image
from typer.testing import CliRunner

from cliptune.cli.app import app

runner = CliRunner()


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_synth_then_check_is_clean(tmp_path: Path) -> None:
    out = tmp_path / "fashion"
    result = runner.invoke(app, ["data", "synth", "fashion", str(out), "--n", "12", "-q"])
    assert result.exit_code == 0, result.output
    assert (out / "contact_sheet.png").exists()
    checked = runner.invoke(app, ["data", "check", str(out), "-q"])
    assert checked.exit_code == 0, checked.output
    assert "12 good row(s), 0 bad row(s)" in _flat(checked.output)


def test_unknown_synth_kind(tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "synth", "cars", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "art, fashion" in _flat(result.output)


def test_check_lists_bad_rows_and_write_clean(tmp_path: Path) -> None:
    cat = tmp_path / "cat"
    cat.mkdir()
    Image.new("RGB", (8, 8), "red").save(cat / "a.png")
    Image.new("RGB", (8, 8), "blue").save(cat / "b.png")
    (cat / "empty.png").write_bytes(b"")
    pd.DataFrame(
        {
            "file_name": ["a.png", "b.png", "missing.png", "empty.png", "a.png", "../escape.png"],
            "text": ["a red square", "a blue square", "gone", "nothing", "a red square", "out"],
        }
    ).to_csv(cat / "metadata.csv", index=False)
    clean = tmp_path / "clean"
    result = runner.invoke(app, ["data", "check", str(cat), "--write-clean", str(clean), "-q"])
    out = _flat(result.output)
    assert result.exit_code == 0, out  # the clean copy is written: it is the catalogue to use
    assert "2 good row(s), 4 bad row(s)" in out and "(4 rows set aside)" in out
    for needle in ("missing.png", "empty.png", "escape"):
        assert needle in out
    assert len(pd.read_csv(clean / "metadata.csv")) == 2
    rejected = pd.read_csv(clean / "rejected.csv")
    assert sorted(rejected["row"]) == [3, 4, 5, 6]
    again = runner.invoke(app, ["data", "check", str(clean), "-q"])
    assert again.exit_code == 0, again.output


def test_check_without_metadata_exits_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "check", str(tmp_path)])
    assert result.exit_code == 2
    assert "metadata" in result.output


def test_train_on_bad_rows_names_the_rows_and_the_fix(tmp_path: Path) -> None:
    # prepare_data raises BadRowsError with the rows; the CLI adds how to clean the catalogue
    cat = tmp_path / "cat"
    cat.mkdir()
    Image.new("RGB", (8, 8), "red").save(cat / "a.png")
    pd.DataFrame({"file_name": ["a.png", "missing.png"], "text": ["a red square", "gone"]}).to_csv(
        cat / "metadata.csv", index=False
    )
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"data:\n  catalogue: {cat}\n")
    result = runner.invoke(app, ["train", str(cfg), "--runs", str(tmp_path / "runs"), "-q"])
    assert result.exit_code == 1
    assert "1 bad row(s) in" in result.output and "row 2 (missing.png)" in result.output
    assert (
        "Fix them, clean the catalogue with `cliptune data check --write-clean`, or set "
        "data.on_bad_row=skip to train without them (they are then listed in rejected.csv)."
    ) in _flat(result.output)
    assert "Traceback" not in result.output
