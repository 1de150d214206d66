"""The demo's plan: every step is a real command of the CLI, its configs validate."""

from __future__ import annotations

from pathlib import Path

from cliptune.cli.app import app
from cliptune.cli.demo_steps import demo_steps, write_demo_configs
from cliptune.config import load_config


def test_demo_configs_validate_and_steps_are_cli_commands(tmp_path: Path) -> None:
    paths = write_demo_configs(tmp_path, fast=True)
    for path in paths.values():
        cfg = load_config(path)
        assert cfg.model.image_size == 160  # the catalogues are rendered at 160 px
    base, tuned = load_config(paths["base"]), load_config(paths["finetuned"])
    # the base and fine-tuned runs differ only in the caption column they train on
    assert base.data.text_column == "text_generic" and tuned.data.text_column == "text"
    assert base.data.split == tuned.data.split and base.train == tuned.train
    names = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    for step in demo_steps(tmp_path, fast=True):
        assert step.args[0] in names, step.command
    evals = [s for s in demo_steps(tmp_path) if s.args[0] == "eval" and "fashion" in s.args[1]]
    # both fashion models are evaluated on the same rich-caption queries
    assert evals[0].args[-2:] == ["--text-column", "text"]
