"""``cliptune embed``: write a catalogue's embeddings to a Parquet file, for a vector store of one's own."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console

from cliptune.cli.errors import err_console
from cliptune.cli.index import main_process_speaks

if TYPE_CHECKING:
    from cliptune.models.cache import Precision

__all__ = ["embed_cmd", "register"]

console = Console(soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add ``cliptune embed`` to ``app``."""
    app.command("embed")(embed_cmd)


def embed_cmd(
    model: Annotated[str, typer.Argument(help="Run directory, model folder, or backbone spec (embedded).")],
    out: Annotated[Path, typer.Argument(help="Parquet file to write (replaced atomically).")],
    data: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--data", help="Catalogue folder to embed; default for a run: its data.catalogue."),
    ] = None,
    texts: Annotated[
        bool, typer.Option("--texts", help="Also embed each row's caption into text_embedding.")
    ] = False,
    text_column: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="Caption column, written as `caption` (and embedded with --texts); default: the run's "
            "data.text_column, else 'text'."
        ),
    ] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Feature cache folder.")] = None,  # noqa: UP045
    precision: Annotated[str, typer.Option(help="Tower precision: auto, fp32 or bf16.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per forward.", min=1)] = 64,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Embed every row of a catalogue with a model into a Parquet file: metadata + image (and text) vectors.

    A run embeds its own catalogue with its own caption column unless --data / --text-column say
    otherwise; a bare model (folder, hub id, 'embedded') needs --data. Under torchrun / accelerate
    launch each process embeds a shard of the images and the main process writes the file.

    Examples:
        cliptune embed runs/fashion-finetuned --data data/fashion fashion.parquet
        cliptune embed runs/ft ft.parquet --texts --text-column text_generic -q
        torchrun --standalone --nproc_per_node 2 -m cliptune embed runs/ft ft.parquet
    """
    from cliptune.cli.rundata import data_for
    from cliptune.data.catalogue import read_catalogue
    from cliptune.models.factory import load_model
    from cliptune.search.vectors import export_embeddings

    precisions: dict[str, Precision] = {"auto": "auto", "fp32": "fp32", "bf16": "bf16"}
    if precision not in precisions:
        err_console.print(
            f"[red]--precision must be auto, fp32 or bf16, got {precision}[/red]", highlight=False
        )
        raise typer.Exit(2)
    data, column, cache_dir = data_for(model, data, text_column, cache_dir)
    with main_process_speaks() as processes:
        catalogue = read_catalogue(data, column)
        loaded = load_model(model)
        info = export_embeddings(
            loaded,
            catalogue,
            out,
            texts=texts,
            cache_dir=cache_dir,
            precision=precisions[precision],
            batch_size=batch_size,
            progress=not quiet,
            processes=processes,
        )
    if not processes.main:
        return
    what = "image and text" if texts else "image"
    console.print(
        f"embedded {info['n_rows']} rows ({info['n_images']} images, {what} vectors of dim {info['dim']}) "
        f"with {loaded.name} into [bold]{out}[/bold]"
    )
