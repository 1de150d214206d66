"""Every command of the app, run with broken arguments, ends in a short message and exit 1 or 2, never a traceback.

The commands are found by walking the typer app, so a new command is covered the day it is registered:
each gets a generic broken call (every required argument a path that does not exist) and, where it has
``--set``, a bad override; :data:`CASES` adds the specific bad inputs users were seen to give (a missing,
non-image or truncated query image, broken YAML, an unwritable output folder). ``--debug`` shows the
traceback that is otherwise hidden.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer.main
from PIL import Image
from typer.testing import CliRunner

from cliptune.cli.app import app
from cliptune.data.catalogue import read_catalogue
from cliptune.data.synthetic import render_fashion
from cliptune.models.factory import load_model
from cliptune.search import build_index
from tests.tiny_models import make_tiny_clip

runner = CliRunner()

MAX_LINES = 8  # a config error lists its fields, one line each, plus a hint: still short


def _walk(command: Any, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Every leaf command of the app by its path, e.g. ("data", "check")."""
    if hasattr(command, "commands"):
        found: dict[tuple[str, ...], Any] = {}
        for name, sub in command.commands.items():
            found.update(_walk(sub, (*path, name)))
        return found
    return {path: command}


COMMANDS = _walk(typer.main.get_command(app))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("broken")
    fashion = render_fashion(root / "fashion", n=6, seed=0, size=128)
    clip = make_tiny_clip(root / "clip", seed=0)
    idx = build_index(
        load_model(clip), read_catalogue(fashion), root / "idx", cache_dir=root / "cache", progress=False
    )
    (root / "notimage.png").write_text("hello, I am text\n")
    Image.new("RGB", (64, 64), (200, 10, 10)).save(root / "full.jpg", quality=95)
    (root / "truncated.jpg").write_bytes((root / "full.jpg").read_bytes()[:400])
    (root / "truncated.png").write_bytes((fashion / "images" / "000001.png").read_bytes()[:300])
    (root / "broken.yaml").write_text("train: [1\n")
    (root / "ok.yaml").write_text("train:\n  epochs: 2\n")
    return {
        "root": root,
        "fashion": fashion,
        "clip": clip,
        "idx": idx,
        "cache": root / "cache",
        "missing": root / "missing",
    }


def _generic(path: tuple[str, ...], missing: Path) -> list[list[str]]:
    """Broken calls derived from the command's parameters alone."""
    params = COMMANDS[path].params
    required = [p for p in params if p.param_type_name == "argument" and p.required]
    calls = []
    if required:
        calls.append([*path, *(str(missing / f"{p.name}-{i}") for i, p in enumerate(required))])
    if any("--set" in p.opts for p in params):
        calls.append([*path, *(str(missing / p.name) for p in required), "--set", "train.epochs=true"])
        calls.append([*path, *(str(missing / p.name) for p in required), "--set", "no-equals-sign"])
    if not calls:  # no argument to break: a bad option value
        calls.append([*path, "--no-such-option"])
    return calls


def CASES(f: dict[str, Path]) -> list[list[str]]:  # noqa: N802 (reads as the table it is)
    r, idx = f["root"], str(f["idx"])
    return [
        ["search", idx, "--image", str(f["missing"] / "query.png")],
        ["search", idx, "--image", str(r / "notimage.png")],
        ["search", idx, "--image", str(r / "truncated.jpg")],
        ["search", idx, "--image", str(r / "truncated.png")],
        ["search", idx, "jeans", "-k", "0"],
        ["search", idx, "jeans", "--where", "no-equals"],
        ["serve", idx, "--suite", str(r / "broken.yaml")],
        ["train", str(r / "broken.yaml")],
        ["train", str(r / "ok.yaml"), "--set", "train.epochs=true"],
        ["config", "show", str(r / "broken.yaml")],
        ["config", "show", str(r / "ok.yaml"), "--set", "train.lr=true"],
        ["config", "docs", "--out", "/proc/no/such/folder/config.md"],
        ["demo", "--out", "/proc/no/such/folder"],
        ["data", "check", str(r / "notimage.png")],
        ["data", "audit", str(f["fashion"]), "--out", str(r / "audit"), "--splits-from", str(f["missing"])],
        ["data", "audit", str(f["fashion"]), "--out", str(r / "audit"), "--model", str(f["missing"])],
        ["data", "synth", "fashion", "/proc/no/such/folder", "-n", "4"],
        ["data", "shard", str(f["fashion"]), "/proc/no/such/folder"],
        ["data", "shard", str(f["fashion"]), str(r / "shards-new"), "--shard-size", "0"],
        ["data", "index-shards", str(r / "notimage.png")],
        ["suite", "generate", str(f["fashion"]), "--out", str(r / "gen.yaml"), "--attributes", "nope"],
        ["index", str(f["clip"]), str(r / "idx-new"), "--data", str(f["missing"])],
        ["export", str(f["clip"]), str(r / "export-new"), "--data", str(f["missing"])],
        ["eval", str(f["clip"]), "--data", str(f["missing"])],
        ["embed", str(f["clip"]), str(r / "emb"), "--data", str(r / "notimage.png")],
        ["mine", str(f["clip"]), str(r / "mined.parquet"), "--data", str(f["missing"])],
        ["report", str(f["idx"])],
        ["compare", str(f["idx"]), str(f["missing"])],
        ["test", str(f["clip"]), "--suite", str(r / "broken.yaml")],
        ["sweep", str(r / "ok.yaml")],
        ["push", str(f["idx"]), "me/model", "--dry-run"],
        ["wise", str(f["idx"]), "--alphas", "0,1"],
    ]


def _assert_user_error(args: list[str]) -> str:
    result = runner.invoke(app, args)
    out = result.output
    assert result.exit_code in (1, 2), (args, result.exit_code, out)
    # an exception other than the exit is one the user would see as a traceback
    assert isinstance(result.exception, SystemExit), (args, repr(result.exception))
    assert "Traceback" not in out, (args, out)
    lines = [line for line in out.splitlines() if line.strip() and "Loading weights" not in line]
    assert 1 <= len(lines) <= MAX_LINES, (args, out)
    return out


def test_every_command_is_walked() -> None:
    # the walk finds the groups' commands too: the test covers what --help lists
    assert {("search",), ("train",), ("data", "check"), ("config", "show")} <= set(COMMANDS)
    assert len(COMMANDS) >= 14


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_every_command_with_broken_arguments_ends_in_a_sentence(
    path: tuple[str, ...], files: dict[str, Path]
) -> None:
    for args in _generic(path, files["missing"]):
        _assert_user_error(args)


def test_every_command_has_a_specific_broken_case(files: dict[str, Path]) -> None:
    cases = CASES(files)
    covered = {tuple(c[:2]) if c[0] in ("data", "config", "suite") else (c[0],) for c in cases}
    assert set(COMMANDS) - {("config", "schema")} <= covered  # schema takes no input to break
    for args in cases:
        _assert_user_error(args)


def test_bad_query_images_are_named_with_the_reason(files: dict[str, Path]) -> None:
    idx, r = str(files["idx"]), files["root"]
    for name, reason in [
        ("notimage.png", "not an image"),
        ("truncated.png", "truncated image"),
        ("truncated.jpg", "truncated"),
    ]:
        out = _assert_user_error(["search", idx, "--image", str(r / name)])
        assert f"{r / name}: " in out and reason in out, out
    out = _assert_user_error(["search", idx, "--image", str(files["missing"] / "q.png")])
    assert "q.png: file not found" in out


def test_debug_shows_the_traceback(files: dict[str, Path]) -> None:
    query = str(files["root"] / "notimage.png")
    result = runner.invoke(app, ["--debug", "search", str(files["idx"]), "--image", query])
    assert result.exit_code == 1
    assert "Traceback (most recent call last)" in result.output
    assert "ImageLoadError" in result.output
    assert result.output.rstrip().endswith("not an image (unrecognised format)")
    # the flag holds for one invocation only
    assert "Traceback" not in runner.invoke(app, ["search", str(files["idx"]), "--image", query]).output


def test_a_real_process_prints_no_traceback(files: dict[str, Path]) -> None:
    # CliRunner catches what escapes; a subprocess shows what the user really sees on stderr. `config docs`
    # into a folder that cannot exist reaches the app-wide handler (an OSError) without loading torch.
    out = "/proc/no/such/folder/config.md"
    done = subprocess.run(
        [sys.executable, "-m", "cliptune", "config", "docs", "--out", out],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr + done.stdout
    assert done.stderr.strip().splitlines() == ["folder not found: /proc/no/such/folder"]
