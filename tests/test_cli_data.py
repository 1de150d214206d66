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
    assert result.exit_code == 1
    assert "2 good row(s), 4 bad row(s)" in out
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
