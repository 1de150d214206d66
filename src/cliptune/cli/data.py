"""``cliptune data``: render synthetic catalogues, validate a catalogue and write a clean copy of it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from cliptune.cli.errors import err_console, exit_on_error

__all__ = ["register"]

console = Console(soft_wrap=True)

data_app = typer.Typer(help="Render, validate and clean catalogues.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add the ``data`` group to ``app``."""
    app.add_typer(data_app, name="data")


@data_app.command("synth")
def data_synth(
    kind: Annotated[str, typer.Argument(help="Which catalogue: 'fashion' or 'art'.")],
    out: Annotated[Path, typer.Argument(help="Folder to write the catalogue into.")],
    n: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option("--n", help="Images (fashion) or originals (art); default 1500 / 200.", min=1),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same bytes.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Render a deterministic synthetic catalogue (images, metadata.csv, contact_sheet.png).

    Examples:
        cliptune data synth fashion data/fashion --n 1500 --seed 0
        cliptune data synth art data/art --n 200
    """
    from cliptune.data.synthetic import CATALOGUES, render_catalogue

    if kind not in CATALOGUES:
        err_console.print(
            f"[red]unknown catalogue '{kind}'; choose one of: {', '.join(sorted(CATALOGUES))}[/red]"
        )
        raise typer.Exit(2)
    path = render_catalogue(kind, out, n=n, seed=seed, progress=not quiet)
    console.print(
        f"wrote {kind} catalogue to [bold]{path}[/bold] (contact sheet: {path / 'contact_sheet.png'})"
    )


@data_app.command("check")
def data_check(
    catalogue: Annotated[Path, typer.Argument(help="Catalogue folder (images + metadata file).")],
    write_clean: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            "--write-clean", help="Write the good rows to OUT/metadata.csv and the bad to OUT/rejected.csv."
        ),
    ] = None,
    max_pixels: Annotated[
        int, typer.Option(help="Reject images with more pixels than this (decompression-bomb guard).", min=1)
    ] = 89_478_485,
    text_column: Annotated[
        str,
        typer.Option(
            help="Caption column (your config's data.text_column): required, and blank captions are bad rows."
        ),
    ] = "text",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Validate a catalogue; list every bad row (file, row, reason).

    Exit 1 if there is any bad row, 0 if there is none. With --write-clean the bad rows are listed and set
    aside in OUT/rejected.csv, the good ones written to OUT, and the exit is 0: OUT is the catalogue to use.

    Examples:
        cliptune data check data/fashion
        cliptune data check my_photos --text-column title
        cliptune data check my_catalogue --write-clean my_catalogue_clean
    """
    from cliptune.data.catalogue import read_catalogue
    from cliptune.data.check import check_catalogue
    from cliptune.data.check import write_clean as write_clean_fn

    with exit_on_error(2):
        cat = read_catalogue(catalogue, text_column)
        result = check_catalogue(cat, max_pixels=max_pixels, progress=not quiet)
    rejected = [*result.rejected, *result.rejected_triplets]
    n_good, n_bad = len(result.good), len(rejected)
    if n_bad:
        table = Table(title=f"{n_bad} bad row(s) in {cat.root}", show_lines=False)
        table.add_column("source")
        table.add_column("row", justify="right")
        table.add_column("file")
        table.add_column("reason")
        for rej in rejected:
            table.add_row(rej.source, str(rej.row), rej.file_name, rej.reason)
        console.print(table)
    console.print(f"{n_good} good row(s), {n_bad} bad row(s) in {catalogue}")
    if write_clean is not None:
        with exit_on_error(2, ValueError):
            manifest, rejected_csv = write_clean_fn(result, cat, write_clean)
        console.print(f"wrote {manifest} ({n_good} rows) and {rejected_csv} ({n_bad} rows set aside)")
        return  # the clean copy is the catalogue to use: nothing is left to fail on
    if n_bad:
        raise typer.Exit(1)
