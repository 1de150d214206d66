"""``cliptune test``: run a behavioural suite on a run or model, gate it, write JSON (and JUnit XML)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from cliptune.cli.errors import exit_on_error

__all__ = ["register", "category_table", "ranked_line"]


def _gate(field: str, limit: float | None) -> str:
    if limit is None:
        return "-"
    return (
        f"> {limit:g}"
        if field == "mrr"
        else (f"<= {limit:g}" if field == "red_flag_rate" else f">= {limit:g}")
    )


def category_table(name: str, cat: dict[str, Any]) -> Table:
    """One category of a suite result: each metric's mean, 95% interval, gate and PASS/FAIL."""
    from cliptune.ranking.bootstrap import format_interval
    from cliptune.suites.scoring import METRICS, metric_key

    verdict = "[green]PASS[/green]" if cat["passed"] else "[red]FAIL[/red]"
    conf = int(round(100 * next(iter(cat["metrics"].values()))["confidence"]))
    skipped = cat.get("n_skipped", 0)
    title = f"{cat['n_queries']} queries, {cat['n_failed_queries']} failed" + (
        f", {skipped} not scored" if skipped else ""
    )
    table = Table(title=f"{name}: {verdict} ({title})")
    for col in ("metric", f"mean [{conf}% interval]", "gate", ""):
        table.add_column(col)
    failed = {f.split(" ")[0] for f in cat["failures"]}
    for field in METRICS:
        key = metric_key(field, cat["k"])
        limit = cat["thresholds"][field]
        status = "" if limit is None else ("[red]FAIL[/red]" if key in failed else "[green]ok[/green]")
        table.add_row(key, format_interval(cat["metrics"][key]), _gate(field, limit), status)
    return table


def _failing_queries(result: dict[str, Any]) -> Table | None:
    failing = [q for q in result["queries"] if not q["passed"]]
    if not failing:
        return None
    table = Table(title=f"{len(failing)} failing quer{'y' if len(failing) == 1 else 'ies'}")
    for col in ("category", "id", "query", "failed", "red results in the top k (rank)"):
        table.add_column(col)
    for q in failing:
        gates = [f for f in q["failures"] if not f.startswith("red in top")]
        reds = ", ".join(f"{r['id']} ({r['rank']})" for r in q["red_in_top"]) or "-"
        table.add_row(q["category"], q["id"], q["text"] or f"image {q['image']}", "; ".join(gates), reds)
    return table


def ranked_line(result: dict[str, Any], note: str | None = None) -> str:
    """``ranked: split test, 44 images (splits of /abs/runs/x)``: which images a suite result ranked, and why."""
    origin = f" (splits of {result['splits_from']})" if result.get("splits_from") else ""
    text = f"ranked: split {result['split']}, {result['n_items']} images{origin}"
    if note:
        text += f"; {note}"
    if result["skipped"]:
        text += f"; {len(result['skipped'])} quer{'y' if len(result['skipped']) == 1 else 'ies'} not scored"
    return text


def register(app: typer.Typer) -> None:
    """Add ``cliptune test`` to ``app``."""

    @app.command("test")
    def test_cmd(
        target: Annotated[
            str, typer.Argument(help="A run directory, a saved model folder, a hub id, or 'embedded'.")
        ],
        suite: Annotated[Path, typer.Option("--suite", help="The suite YAML file.")],
        splits_from: Annotated[
            Optional[Path],  # noqa: UP045
            typer.Option(
                "--splits-from",
                help="Rank this run's --split images (its catalogue and splits.json), and write to an "
                "evaluation folder that compare takes beside runs.",
            ),
        ] = None,
        split: Annotated[
            Optional[str],  # noqa: UP045
            typer.Option(
                help="Images to rank: all, train, val, test (any split of the run). Default: the run's "
                "held-out split (test, else val), so the gate measures images training never saw; all "
                "images for a bare model without --splits-from.",
            ),
        ] = None,
        data: Annotated[
            Optional[Path],  # noqa: UP045
            typer.Option("--data", help="Catalogue folder; default for a run: its config's data.catalogue."),
        ] = None,
        text_column: Annotated[
            Optional[str],  # noqa: UP045
            typer.Option(
                help="Caption column of the catalogue (default: the run's data.text_column, else 'text')."
            ),
        ] = None,
        junit: Annotated[
            Optional[Path],  # noqa: UP045
            typer.Option("--junit", help="Also write JUnit XML here (one testsuite per category)."),
        ] = None,
        out: Annotated[
            Optional[Path],  # noqa: UP045
            typer.Option(
                help="Folder for <suite>.json (default: RUN/suite, or ./suite for a bare model); with "
                "--splits-from, the evaluation folder (evaluation.json + suite/<suite>.json, default "
                "evals/<model>-on-<run>)."
            ),
        ] = None,
        bootstrap: Annotated[
            int, typer.Option(help="Bootstrap resamples of the category intervals.", min=0)
        ] = 1000,
        seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
        cache_dir: Annotated[
            Optional[Path],  # noqa: UP045
            typer.Option(help="Feature cache folder (default: the run's, else ~/.cache/cliptune/features)."),
        ] = None,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    ) -> None:
        """Run a behavioural suite and gate the model: exit 1 if any category fails, 0 if all pass.

        Each query ranks the images; its relevant / yellow / red results give MRR, precision@k, recall@k,
        accuracy@k, nDCG@k and the red-flag rate; a category passes when its means meet its thresholds.
        Writes <suite>.json; an invalid suite or catalogue exits 2 naming the exact location.

        A run ranks its held-out split (test, else val: what training never saw); --split chooses another
        (all: the whole catalogue). A bare model ranks every image, or with --splits-from RUN the images of
        RUN's split on RUN's catalogue. Queries left without a relevant image in the split are listed as
        skipped and gate nothing.

        Examples:
            cliptune test runs/demo-finetuned --suite data/fashion/suite.yaml
            cliptune test runs/demo-finetuned --suite data/fashion/suite.yaml --junit reports/suite.xml
            cliptune test runs/demo-finetuned --suite data/fashion/suite.yaml --split all
            cliptune test embedded --suite data/fashion/suite.yaml --data data/fashion --out suite/base
            cliptune test embedded --suite data/fashion/suite.yaml --splits-from runs/tuned --out evals/base
        """
        from cliptune.cli.rundata import data_for
        from cliptune.data.catalogue import read_catalogue
        from cliptune.models.factory import load_model
        from cliptune.rundir import RunDir, write_suite_json
        from cliptune.rundir import is_run as is_run_dir
        from cliptune.suites import load_suite, resolve_suite, run_suite, write_junit
        from cliptune.suites.heldout import ranked_images

        path = Path(target)
        is_run = is_run_dir(path)
        with exit_on_error(2, ValueError):
            spec = load_suite(suite)
        # the catalogue, caption column and cache: the flags, else the run's (the --splits-from run's)
        data, column, cache_dir = data_for(str(splits_from or path), data, text_column, cache_dir)
        with exit_on_error(2, ValueError):
            resolved = resolve_suite(spec, read_catalogue(data, column))
            # the run's held-out split unless --split says otherwise; a bare model: every image
            ranked = ranked_images(
                splits_from or (path if is_run else None),
                split,
                catalogue=data,
                progress=not quiet,
                required=splits_from is not None,
            )
            model = load_model(path if path.exists() else target)
        with exit_on_error(1, ValueError):
            result = run_suite(
                resolved,
                model,
                cache_dir=cache_dir,
                bootstrap=bootstrap,
                seed=seed,
                suite_file=suite.resolve(),
                progress=not quiet,
                items=ranked.items,
                split=ranked.split,
            )
        result["splits_from"] = None if ranked.splits_from is None else str(ranked.splits_from.resolve())
        if splits_from is not None:
            from cliptune.cli.eval import default_evaluation_folder
            from cliptune.evaluation.run import write_model_evaluation

            with exit_on_error(1, ValueError):
                folder = out if out is not None else default_evaluation_folder(target, splits_from)
                written = write_model_evaluation(folder, target, splits_from, suite=result)[0]
        else:
            folder = out if out is not None else (RunDir(path).suite_dir if is_run else Path("suite"))
            written = write_suite_json(folder, result)
        console = Console(soft_wrap=True)
        console.print(ranked_line(result, ranked.note), highlight=False)
        for name in dict.fromkeys(q["category"] for q in result["skipped"]):
            lost = [q for q in result["skipped"] if q["category"] == name]
            ids = ", ".join(q["id"] for q in lost)
            console.print(f"skipped in {name} ({lost[0]['status']}): {ids}", highlight=False)
        for name, cat in result["categories"].items():
            console.print(category_table(name, cat))
        for name, status in result["unmeasured"].items():
            console.print(f"[yellow]not measured[/yellow] {name}: {status}", highlight=False)
        failing = _failing_queries(result)
        if failing is not None:
            console.print(failing)
        if junit is not None:
            write_junit(result, junit)
            console.print(f"wrote {junit}", highlight=False)
        console.print(f"wrote {written}", highlight=False)
        bad = [n for n, c in result["categories"].items() if not c["passed"]]
        n, unmeasured = len(result["categories"]), len(result["unmeasured"])
        tail = f" ({unmeasured} not measured: {', '.join(result['unmeasured'])})" if unmeasured else ""
        if bad:
            console.print(
                f"[red]FAIL[/red] {result['suite']}: {len(bad)} of {n} {'measured ' if unmeasured else ''}"
                f"categories failed: {', '.join(bad)}{tail}",
                highlight=False,
            )
            raise typer.Exit(1)
        console.print(
            f"[green]PASS[/green] {result['suite']}: all {n} {'measured ' if unmeasured else ''}"
            f"categories passed{tail}",
            highlight=False,
        )
