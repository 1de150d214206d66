"""The command line: help texts, config commands, exit codes (data commands are tested in test_cli_data)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from cliptune.cli.app import app
from cliptune.cli.errors import HINTS, exit_on_error, with_hint
from cliptune.config import Config
from cliptune.data.catalogue import CatalogueError
from cliptune.errors import CliptuneError
from cliptune.search.index import IndexExistsError

runner = CliRunner()


def test_help_lists_every_command_group() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("config", "data"):
        assert name in result.output


def test_every_command_has_help_with_an_example() -> None:
    for args in (
        ["config", "show"],
        ["config", "schema"],
        ["config", "docs"],
        ["data", "synth"],
        ["data", "check"],
    ):
        result = runner.invoke(app, [*args, "--help"])
        assert result.exit_code == 0, args
        assert "cliptune " + " ".join(args) in result.output, f"no example in {args} --help"


def test_config_show_resolves_overrides(tmp_path: Path) -> None:
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("train:\n  epochs: 3\n")
    result = runner.invoke(app, ["config", "show", str(cfg_path), "--set", "train.lr=1e-4"])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["train"]["epochs"] == 3
    assert shown["train"]["lr"] == 1e-4
    assert Config.model_validate(shown).train.epochs == 3


def test_config_show_invalid_exits_2_naming_the_field() -> None:
    result = runner.invoke(app, ["config", "show", "--set", "train.lr=-1"])
    assert result.exit_code == 2
    assert "train.lr" in result.output


def test_config_schema_is_json_schema() -> None:
    result = runner.invoke(app, ["config", "schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert set(schema["properties"]) == set(Config.model_fields)


def test_python_dash_m_entry_point() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cliptune", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("cliptune ")


def test_every_registered_command_has_help_and_an_example() -> None:
    # Every command the app shows (top level and in groups) documents itself with a runnable example.
    commands = [[c.name] for c in app.registered_commands]
    for group in app.registered_groups:
        commands += [[group.name, c.name] for c in group.typer_instance.registered_commands]
    assert {"train", "eval", "test", "report", "compare", "sweep", "index", "search", "demo"} <= {
        c[0] for c in commands
    }
    for args in commands:
        result = runner.invoke(app, [*args, "--help"])
        assert result.exit_code == 0, args
        assert f"cliptune {' '.join(args)}" in " ".join(result.output.split()), f"no example in {args} --help"


def test_every_hint_names_a_cliptune_error_class() -> None:
    # HINTS is keyed by "module.Class" so that looking a hint up imports nothing: check every key is real
    for key in HINTS:
        module, _, name = key.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, CliptuneError), key


def test_errors_print_one_line_with_the_hint_and_exit_with_the_code(
    capsys: pytest.CaptureFixture[str],
) -> None:
    one_line = IndexExistsError(Path("idx"), "idx is not empty and holds no index")
    assert with_hint(one_line) == "idx is not empty and holds no index: use a new folder or --overwrite"
    assert with_hint(CatalogueError("no hint")) == "no hint"  # a type without a hint: the message alone
    with pytest.raises(typer.Exit) as exc, exit_on_error(3, prefix="index failed: "):
        raise one_line
    assert exc.value.exit_code == 3
    assert capsys.readouterr().err == (
        "index failed: idx is not empty and holds no index: use a new folder or --overwrite\n"
    )
    with pytest.raises(KeyError), exit_on_error(1):  # not a user error: not swallowed
        raise KeyError("bug")


def test_training_and_sweep_errors_get_their_flag_hints_only_in_the_cli(tmp_path: Path) -> None:
    # The library's message states facts; cli.errors.with_hint adds the flags, restoring the sentence
    # the library itself used to print (word for word where the old text was one sentence).
    from cliptune.cli.errors import with_hint
    from cliptune.sweep import MissingSweepNameError, StudyDirectionMismatchError
    from cliptune.train.errors import MissingRunNameError, RunExistsError, WorldSizeMismatchError

    run = tmp_path / "runs" / "ft"
    cases = [
        (RunExistsError(run), f"{run} already holds a run: pass --resume {run}, or another --name"),
        (MissingRunNameError(), "the run has no name: set `name:` in the config or pass --name"),
        (MissingSweepNameError(), "the sweep has no name: set `name:` in the config or pass --name"),
        (
            StudyDirectionMismatchError("s", "sqlite:///x.db", "maximize", "minimize"),
            "study 's' in sqlite:///x.db maximises/minimises differently (maximize vs sweep.direction "
            "minimize): use another --name",
        ),
    ]
    for exc, expected in cases:
        assert "--" not in str(exc)
        assert with_hint(exc) == expected
    world = WorldSizeMismatchError(run / "checkpoints" / "step-1", saved=2, now=1)
    assert "--nproc_per_node" not in str(world)
    assert with_hint(world).endswith(
        "launch it the same way (e.g. torchrun --nproc_per_node 2) or start a new run"
    )
