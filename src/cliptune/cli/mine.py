"""``cliptune mine``: mine each training caption's hard negatives with a model, for ``train.hard_negatives``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console

from cliptune.cli.errors import err_console, exit_on_error

if TYPE_CHECKING:
    from cliptune.models.cache import Precision

__all__ = ["mine_cmd", "register"]

console = Console(soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add ``cliptune mine`` to ``app``."""
    app.command("mine")(mine_cmd)


def _fail(message: str) -> None:
    err_console.print(f"[red]{message}[/red]", highlight=False)
    raise typer.Exit(2)


def mine_cmd(
    model: Annotated[str, typer.Argument(help="Run directory, model folder, or backbone spec (embedded).")],
    out: Annotated[Path, typer.Argument(help="Mined negatives to write: .parquet or .jsonl (atomically).")],
    data: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--data", help="Catalogue folder; default for a run: its data.catalogue."),
    ] = None,
    split: Annotated[
        str, typer.Option(help="Split whose captions are mined among its own images (a run's split).")
    ] = "train",
    per_caption: Annotated[int, typer.Option(help="Negatives kept per caption.", min=1)] = 3,
    range_min: Annotated[
        int, typer.Option(help="Skip the candidates ranked 1..R0 (likeliest unlabelled positives).", min=0)
    ] = 0,
    range_max: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="Consider only candidates ranked 1..R1 (default: all).", min=1),
    ] = None,
    margin: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(help="Keep a negative only if its score <= the positive's score - M."),
    ] = None,
    relative_margin: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(
            help="Keep a negative only if its score <= the positive's score * (1 - m); m in [0, 1)."
        ),
    ] = None,
    text_column: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Caption column; default: the run's data.text_column, else 'text'."),
    ] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Feature cache folder.")] = None,  # noqa: UP045
    precision: Annotated[str, typer.Option(help="Tower precision: auto, fp32 or bf16.")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Mine hard negatives: for each caption of a split, the highest-ranked images that are not its match.

    Images of the caption's own group and images matching its image on every catalogue attribute are
    never negatives (likely false negatives). Use the file with train.hard_negatives.file; see
    docs/training.md, "Hard negatives".

    Examples:
        cliptune mine runs/fashion-ft mined.parquet --per-caption 3 --range-min 2 --range-max 50
        cliptune mine embedded mined.jsonl --data data/fashion --split all --relative-margin 0.05
    """
    from cliptune.cli.rundata import data_for
    from cliptune.models.factory import load_model
    from cliptune.train.mining import MiningWindow, mine_hard_negatives, mining_data, write_mined

    precisions: dict[str, Precision] = {"auto": "auto", "fp32": "fp32", "bf16": "bf16"}
    if precision not in precisions:
        _fail(f"--precision must be auto, fp32 or bf16, got {precision}")
    if out.suffix.lower() not in (".parquet", ".jsonl"):
        _fail(f"{out}: OUT must end in .parquet or .jsonl")
    if margin is not None and relative_margin is not None:
        _fail("give --margin or --relative-margin, not both")
    if relative_margin is not None and not 0.0 <= relative_margin < 1.0:
        _fail(f"--relative-margin must be in [0, 1), got {relative_margin:g}")
    if range_max is not None and range_max <= range_min:
        _fail(f"--range-max ({range_max}) must exceed --range-min ({range_min})")
    window = MiningWindow(per_caption, range_min, range_max, margin, relative_margin)
    catalogue, column, cache_dir = data_for(model, data, text_column, cache_dir)
    with exit_on_error(1):
        prepared, group_column = mining_data(model, catalogue, column, progress=not quiet)
        loaded = load_model(model)
        mined = mine_hard_negatives(
            loaded,
            prepared,
            split,
            window,
            group_column=group_column,
            cache_dir=cache_dir,
            precision=precisions[precision],
            progress=not quiet,
        )
        write_mined(mined, out)
    counts = mined["negatives"].map(len)
    console.print(
        f"mined {int(counts.sum())} negatives for {len(mined)} captions of split {split!r} "
        f"({int((counts == 0).sum())} captions with none in the window) with {loaded.name} into [bold]{out}[/bold]"
    )
