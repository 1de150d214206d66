"""``cliptune push``: upload a run's model folder with its model card (and an ONNX export) to the hub."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from cliptune.cli.errors import exit_on_error

__all__ = ["push_cmd", "register"]

console = Console(soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add ``cliptune push`` to ``app``."""
    app.command("push")(push_cmd)


def push_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory (runs/<name>) whose model/ is pushed.")],
    repo_id: Annotated[
        str, typer.Argument(help="Hub repository, user/name or org/name (created if absent).")
    ],
    private: Annotated[bool, typer.Option("--private", help="Create the repository private.")] = False,
    token: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--token",
            envvar="HF_TOKEN",
            show_envvar=True,
            help="Hub token (default: HF_TOKEN, else your saved login).",
        ),
    ] = None,
    onnx: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            "--onnx", help="An export folder of `cliptune export --format onnx`, uploaded as onnx/."
        ),
    ] = None,
    baseline: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            "--baseline",
            help="Run or evaluation folder (e.g. the zero-shot baseline) the card compares with "
            "(default: a compare.json listing RUN).",
        ),
    ] = None,
    license_id: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--license", help="Licence id for the card (e.g. mit, apache-2.0)."),
    ] = None,
    revision: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--revision", help="Branch to commit to (default main)."),
    ] = None,
    message: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--message", "-m", help="Commit message (default: cliptune push <run name>)."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List the files the push would upload, and upload nothing.")
    ] = False,
) -> None:
    """Push RUN's model folder, its model card (README.md) and an optional ONNX export to the hub.

    One commit: the model folder's files at the repository root (so cliptune's load_model reads the
    download as it is), README.md with test metrics, intervals and suite verdicts, and onnx/ with --onnx.
    Exit 1 with one sentence when the hub cannot be reached or refuses (no token, 401, 404, offline).

    Examples:
        cliptune push runs/demo-finetuned me/fashion-clip --private
        cliptune push runs/demo-finetuned me/fashion-clip --onnx export/demo --dry-run
        cliptune push runs/my-photos me/photos-siglip --baseline evals/siglip-zero-shot
    """
    from cliptune.export.hub import push, stage

    with exit_on_error(1, prefix="push failed: "):
        if dry_run:
            files = stage(run, onnx=onnx, baseline=baseline, license=license_id)
            for f in files:
                console.print(f"{f.path_in_repo}  {f.size} bytes", highlight=False, markup=False)
            total = sum(f.size for f in files)
            console.print(
                f"dry run: {len(files)} file(s), {total} bytes, would go to {repo_id}; nothing uploaded"
            )
            return
        url = push(
            run,
            repo_id,
            private=private,
            token=token or os.environ.get("HF_TOKEN") or None,
            onnx=onnx,
            baseline=baseline,
            license=license_id,
            revision=revision,
            commit_message=message,
        )
    console.print(f"pushed {run} to [bold]{url}[/bold]", highlight=False)
