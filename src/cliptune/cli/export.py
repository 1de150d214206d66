"""``cliptune export``: a run's model as ONNX graphs (with a parity check) or as the plain library folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from cliptune.cli.errors import err_console, exit_on_error, fail

__all__ = ["export_cmd", "register"]

console = Console(soft_wrap=True)
FORMATS = ("onnx", "safetensors")


def register(app: typer.Typer) -> None:
    """Add ``cliptune export`` to ``app``."""
    app.command("export")(export_cmd)


def export_cmd(
    model: Annotated[str, typer.Argument(help="Run directory, model folder, or backbone spec (embedded).")],
    out: Annotated[Path, typer.Argument(help="Folder to write (atomically: nothing on failure).")],
    format: Annotated[  # noqa: A002 (the option is --format)
        str,
        typer.Option(
            "--format", help="onnx (graphs + client, parity-checked) or safetensors (plain folder)."
        ),
    ] = "onnx",
    data: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            "--data", help="Catalogue for the parity sample; default for a run: its data.catalogue."
        ),
    ] = None,
    text_column: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Caption column (default: the run's data.text_column, else 'text')."),
    ] = None,
    parity_samples: Annotated[
        int, typer.Option(help="Images (and their captions) the ONNX parity check compares.", min=1)
    ] = 32,
    baseline: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Baseline run or evaluation folder the model card compares against."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Export a trained model: ONNX graphs that onnxruntime runs without torch, or the plain model folder.

    ONNX writes image.onnx and text.onnx (and head.onnx for a Siamese run), preprocess.json, the tokenizer,
    export.json and a torch-free client (cliptune_onnx.py), after checking on a sample of the catalogue
    that onnxruntime's embeddings equal PyTorch's (cosine >= 0.9999); it writes nothing if they do not.
    Exporting a run also writes its model card (README.md: test metrics with intervals, suite verdicts),
    the card `cliptune push` uploads.

    Examples:
        cliptune export runs/fashion-finetuned exports/fashion-onnx
        cliptune export embedded exports/base --data data/fashion --parity-samples 8
        cliptune export runs/clip-lora exports/clip-plain --format safetensors
    """
    from cliptune.models.factory import load_model

    if format not in FORMATS:
        err_console.print(f"[red]--format must be onnx or safetensors, got {format}[/red]", highlight=False)
        raise typer.Exit(2)
    if out.exists() and not overwrite:  # before loading any model: the library would refuse it the same way
        from cliptune.export.errors import ExportExistsError

        fail(ExportExistsError(str(out)), 1)
    if format == "safetensors":
        from cliptune.export.plain import export_plain

        with exit_on_error(1):
            written = export_plain(load_model(model), out, overwrite=overwrite)
        console.print(f"wrote the plain model folder [bold]{out}[/bold] ({', '.join(written)})")
        _card(model, out, baseline, onnx=False)
        return
    from cliptune.cli.rundata import data_for
    from cliptune.data.catalogue import read_catalogue
    from cliptune.export.onnx import export_onnx, parity_sample

    catalogue_dir, column, _ = data_for(model, data, text_column, None)
    with exit_on_error(1):
        loaded = load_model(model)
        paths, texts = parity_sample(read_catalogue(catalogue_dir, column), parity_samples)
        if not quiet:
            err_console.print(f"exporting {loaded.name} and checking it on {len(paths)} images and captions")
        manifest = export_onnx(loaded, out, paths, texts, overwrite=overwrite)
    for name, numbers in manifest["parity"]["graphs"].items():
        console.print(
            f"{name:<5} graph: min cosine {numbers['min_cosine']:.7f}, max abs diff {numbers['max_abs_diff']:.2e} "
            f"on {numbers['n']} samples ({manifest['exporter'][name]})"
        )
    console.print(f"exported {loaded.name} as ONNX into [bold]{out}[/bold]")
    _card(model, out, baseline, onnx=True)


def _card(model: str, out: Path, baseline: Path | None, *, onnx: bool) -> None:
    """The run's model card beside the export (a bare model or spec has no run to describe: no card)."""
    from cliptune.export.card import write_model_card
    from cliptune.rundir import is_run

    run = Path(model)
    if not is_run(run):
        if baseline is not None:
            err_console.print(f"[red]--baseline needs a run to compare; {model} is not a run directory[/red]")
            raise typer.Exit(2)
        console.print(f"no model card: {model} is not a run directory (export a run to get one)")
        return
    with exit_on_error(1):
        card = write_model_card(run, out, baseline=baseline, onnx=out if onnx else None)
    console.print(f"wrote the model card [bold]{card}[/bold]")
