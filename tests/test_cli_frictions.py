"""Small CLI frictions of issue 13 item 11: -q quiets transformers, `config --help` names real commands,
`data check --text-column` for a catalogue whose caption column is not `text`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from cliptune.cli.app import app
from tests.tiny_models import make_tiny_clip

runner = CliRunner()


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def titles(tmp_path: Path) -> Path:
    """Two photos whose caption column is `title` (no `text` column)."""
    root = tmp_path / "titles"
    root.mkdir()
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (32, 32), colour).save(root / name)
    pd.DataFrame(
        {"file_name": ["a.png", "b.png"], "title": ["a red square", "a blue square"], "shape": ["sq", "sq"]}
    ).to_csv(root / "metadata.csv", index=False)
    return root


@pytest.fixture
def restore_library_output() -> Iterator[None]:
    """-q switches process-wide library settings: put them back for the tests that follow."""
    yield
    import os

    from huggingface_hub.utils import enable_progress_bars  # type: ignore[attr-defined]  # lazily exported
    from transformers.utils import logging as hf_logging

    enable_progress_bars()
    hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]  # transformers leaves it unannotated
    hf_logging.set_verbosity_warning()  # type: ignore[no-untyped-call]  # likewise
    os.environ.pop("TRANSFORMERS_VERBOSITY", None)


def test_quiet_silences_transformers_loading_bars(
    tmp_path: Path, titles: Path, restore_library_output: None
) -> None:
    model = make_tiny_clip(tmp_path / "clip")
    args = ["embed", str(model), str(tmp_path / "e.parquet"), "--data", str(titles), "--text-column", "title"]
    loud = runner.invoke(app, [*args, "--cache-dir", str(tmp_path / "c1")])
    assert loud.exit_code == 0, loud.output
    assert "Loading weights" in loud.output  # transformers' own bar, drawn on every load
    quiet = runner.invoke(app, [*args, "--cache-dir", str(tmp_path / "c2"), "-q"])
    assert quiet.exit_code == 0, quiet.output
    assert "Loading weights" not in quiet.output and "%|" not in quiet.output
    assert "embedded 2 rows" in _flat(quiet.output)


def test_config_help_names_only_real_subcommands() -> None:
    result = runner.invoke(app, ["config", "--help"])
    assert result.exit_code == 0
    assert "`show` resolves and validates one" in _flat(result.output)
    assert "Show, validate and document" not in _flat(result.output)
    assert runner.invoke(app, ["config", "validate"]).exit_code == 2  # there is no such command


def test_data_check_takes_the_caption_column(titles: Path) -> None:
    missing = runner.invoke(app, ["data", "check", str(titles), "-q"])
    assert missing.exit_code == 2
    assert "no caption column 'text' (columns: file_name, title, shape)" in _flat(missing.output)
    assert "name the caption column: data.text_column in the config, or --text-column" in _flat(
        missing.output
    )
    checked = runner.invoke(app, ["data", "check", str(titles), "--text-column", "title", "-q"])
    assert checked.exit_code == 0, checked.output
    assert "2 good row(s), 0 bad row(s)" in _flat(checked.output)


def test_index_and_embed_of_a_bare_model_need_data(tmp_path: Path) -> None:
    # a run defaults to its own catalogue (tests/test_own_data_doc.py runs `cliptune index RUN OUT`);
    # a bare model has none to default to, and is told which flag gives it, before any model loads
    for command in (
        ["index", "embedded", str(tmp_path / "idx")],
        ["embed", "embedded", str(tmp_path / "e.pq")],
    ):
        result = runner.invoke(app, command)
        assert result.exit_code == 2
        assert "embedded: not a run directory; give the catalogue with --data CATALOGUE" in _flat(
            result.output
        )
