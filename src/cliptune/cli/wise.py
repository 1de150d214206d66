"""``cliptune wise``: WiSE-FT over a run: interpolate epoch-0 and fine-tuned weights, evaluate, recommend."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from cliptune.cli.errors import err_console, exit_on_error

__all__ = ["parse_alphas", "register", "wise"]

DEFAULT_ALPHAS = "0,0.1,...,1"


def register(app: typer.Typer) -> None:
    """Add ``cliptune wise`` to ``app``."""
    app.command("wise")(wise)


def parse_alphas(text: str) -> list[float]:
    """``0,0.25,1`` as a list; ``a,b,...,c`` as the arithmetic steps from a to c (``0,0.1,...,1``: 11 values).

    Raises:
        ValueError: Not numbers, or an ellipsis that is not ``a,b,...,c`` with b > a and c >= b.
    """
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if "..." not in parts:
        return [float(p) for p in parts]
    if len(parts) != 4 or parts[2] != "...":
        raise ValueError("an ellipsis is written a,b,...,c")
    first, second, last = float(parts[0]), float(parts[1]), float(parts[3])
    step = second - first
    if step <= 0 or last < second:
        raise ValueError("a,b,...,c needs a < b <= c")
    n = round((last - first) / step)
    return [round(first + i * step, 10) for i in range(n + 1)]


def wise(
    run: Annotated[Path, typer.Argument(help="A retrieval run directory (runs/<name>).")],
    alphas: Annotated[
        str,
        typer.Option(
            "--alphas",
            help="Interpolation weights, comma-separated (0 = the untrained epoch-0 model, 1 = the fine-tuned "
            "one); 'a,b,...,c' steps from a to c. 0 is needed for the recommendation.",
        ),
    ] = DEFAULT_ALPHAS,
    general: Annotated[
        Optional[Path],  # noqa: UP045 (typer needs Optional)
        typer.Option(
            "--general",
            help="General catalogue ranked zero-shot (default: the run's train.forgetting.catalogue).",
        ),
    ] = None,
    tolerance: Annotated[
        float,
        typer.Option(
            "--tolerance",
            min=0.0,
            help="How far (absolute) the general score may fall below alpha 0's for an alpha to be recommended.",
        ),
    ] = 0.02,
    metric: Annotated[
        str, typer.Option("--metric", help="Metric of both evaluations (t2i/mrr, t2i/recall@5, i2t/mrr ...).")
    ] = "t2i/mrr",
    bootstrap: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option("--bootstrap", min=0, help="Bootstrap resamples (default: the run's eval.bootstrap)."),
    ] = None,
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--out", help="Output folder for wise.json and wise.png (default: RUN/wise)."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """WiSE-FT: evaluate (1 - alpha) * epoch-0 + alpha * fine-tuned weights on the domain and a general set.

    Each alpha's model is evaluated on the run's test split (as `cliptune eval`) and zero-shot on every
    row of the general catalogue, both with intervals; writes wise.json and wise.png and recommends the
    alpha with the best domain score whose general score stays within --tolerance of alpha 0's ("none"
    when no alpha above 0 does).

    Examples:
        cliptune wise runs/fashion-tuned --general data/art
        cliptune wise runs/fashion-tuned --alphas 0,0.25,0.5,0.75,1 --metric t2i/recall@5
    """
    from cliptune.report.wise import run_wise, write_wise

    try:
        values = parse_alphas(alphas)
    except ValueError as exc:
        err_console.print(f"[red]--alphas {alphas!r}: {exc}[/red]", highlight=False)
        raise typer.Exit(2) from None
    if not values:
        err_console.print("[red]--alphas: give at least one value[/red]", highlight=False)
        raise typer.Exit(2)
    with exit_on_error(1, prefix="wise failed: "):
        result = run_wise(
            run,
            values,
            general=general,
            tolerance=tolerance,
            metric=metric,
            bootstrap=bootstrap,
            progress=not quiet,
        )
        json_path, png_path = write_wise(result, out or run / "wise")
    console = Console(soft_wrap=True)
    console.print(f"{'alpha':>6}  {'domain ' + metric:<26} general {metric}", highlight=False)
    for p in result["points"]:
        d, g = p["domain"], p["general"]
        console.print(
            f"{p['alpha']:>6g}  {_interval(d):<26} {_interval(g)}",
            highlight=False,
        )
    chosen = result["recommended"]["alpha"]
    verdict = "none" if chosen is None else f"{chosen:g}"
    console.print(
        f"recommended alpha: [bold]{verdict}[/bold] ({result['recommended']['reason']})", highlight=False
    )
    console.print(f"wrote {json_path} and {png_path}", highlight=False)


def _interval(value: dict[str, float]) -> str:
    if "low" in value and "high" in value:
        return f"{value['mean']:.4f} [{value['low']:.4f}, {value['high']:.4f}]"
    return f"{value['mean']:.4f}"
