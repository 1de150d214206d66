"""``cliptune eval``: metrics with confidence intervals and per-query files for a run or a model."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from cliptune.cli.errors import err_console, exit_on_error

if TYPE_CHECKING:  # annotations only: the command imports torch lazily
    from cliptune.evaluation.retrieval import Relevant

__all__ = ["default_evaluation_folder", "metrics_table", "parse_ks", "register", "split_warnings"]

_RETRIEVAL_COLUMNS = ("recall@{k}", "mrr", "precision@{p}")
_TRIPLET_COLUMNS = (
    "accuracy",
    "accuracy/image",
    "accuracy/text",
    "accuracy/cross",
    "accuracy/i2t",
    "accuracy/t2i",
)


def parse_ks(text: str) -> list[int]:
    """``"1,5,10"`` -> ``[1, 5, 10]``; raises ``typer.BadParameter`` naming the bad item."""
    try:
        ks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated positive integers, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise typer.BadParameter(f"expected comma-separated positive integers, got {text!r}")
    return ks


def _cell(entry: dict[str, Any] | None) -> str:
    from cliptune.ranking.bootstrap import format_interval

    return "-" if entry is None else format_interval(entry, digits=2)


def metrics_table(results: dict[str, dict[str, Any]], direction: str) -> Table:
    """A rich table of one direction (``t2i``, ``i2t`` or ``triplet``), one row per split.

    Cells read ``mean [low, high]``; ``n`` is the number of queries (triplets). Retrieval columns: loss,
    recall@k for every k, MRR, precision@5 (or @ the largest k when 5 is not among them).

    Args:
        results: split name -> the ``eval/<split>.json`` object.
        direction: ``t2i``, ``i2t`` or ``triplet``.

    Returns:
        The table.
    """
    first = next(iter(results.values()))
    ks = first["ks"]
    p = 5 if 5 in ks else ks[-1]
    if direction == "triplet":
        columns = [f"triplet/{c}" for c in _TRIPLET_COLUMNS]
    else:
        columns = [*(f"{direction}/recall@{k}" for k in ks), f"{direction}/mrr", f"{direction}/precision@{p}"]
    columns = ["loss", *columns]
    what = "triplet accuracy" if direction == "triplet" else f"{direction}, {first['relevant']} relevance"
    table = Table(title=f"{what}, {first['confidence']:.0%} intervals, n = queries")
    table.add_column("split")
    table.add_column("n", justify="right")
    for column in columns:  # "t2i/recall@5" -> "recall@5"; "triplet/accuracy/image" -> "image"
        label = column.split("/")[-1] if direction == "triplet" else column.split("/", 1)[-1]
        table.add_column("fused" if label == "accuracy" else label, justify="right")
    for split, result in results.items():
        metrics = result["metrics"]
        n = metrics.get(columns[1], {}).get("n", "-")
        table.add_row(split, str(n), *(_cell(metrics.get(c)) for c in columns))
    return table


def register(app: typer.Typer) -> None:
    """Add ``cliptune eval`` to ``app``."""

    @app.command("eval")
    def eval_cmd(
        target: Annotated[
            str, typer.Argument(help="A run directory, a saved model folder, a hub id, or 'embedded'.")
        ],
        data: Annotated[
            Optional[Path],  # noqa: UP045
            typer.Option("--data", help="Catalogue folder; default for a run: the run's own catalogue."),
        ] = None,
        splits_from: Annotated[
            Optional[Path],  # noqa: UP045
            typer.Option(
                "--splits-from",
                help="Evaluate the model on this run's split: its catalogue, splits.json and eval settings "
                "(the same queries as the run's own eval, for compare).",
            ),
        ] = None,
        split: Annotated[
            Optional[str],  # noqa: UP045
            typer.Option(
                help="Split to evaluate (default 'test'; 'all' for a catalogue without a split column)."
            ),
        ] = None,
        k: Annotated[
            Optional[str],  # noqa: UP045
            typer.Option("--k", help="Cut-offs, comma-separated (default: the run's eval.k, else 1,5,10)."),
        ] = None,
        bootstrap: Annotated[
            Optional[int],  # noqa: UP045
            typer.Option(help="Bootstrap resamples for the intervals (0: none; default 1000).", min=0),
        ] = None,
        relevant: Annotated[
            Optional[str],  # noqa: UP045
            typer.Option(help="Relevance: 'group' (default) or 'item' (only an image's own captions)."),
        ] = None,
        all_splits: Annotated[
            bool, typer.Option("--all-splits", help="Evaluate every split (train, val, test).")
        ] = False,
        out: Annotated[
            Optional[Path],  # noqa: UP045
            typer.Option(
                help="Folder for <split>.json (default: RUN/eval, or ./eval for a bare model); with "
                "--splits-from, the evaluation folder of evaluation.json + eval/<split>.json (default: "
                "evals/<model>-on-<run>)."
            ),
        ] = None,
        cache_dir: Annotated[
            Optional[Path],  # noqa: UP045
            typer.Option(help="Feature cache folder (default: the run's, else ~/.cache/cliptune/features)."),
        ] = None,
        as_json: Annotated[
            bool, typer.Option("--json", help="Print {split: metrics} as JSON instead of tables.")
        ] = False,
        text_column: Annotated[
            Optional[str],  # noqa: UP045
            typer.Option(
                help="Caption column of the queries (default: the run's data.text_column, else 'text')."
            ),
        ] = None,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    ) -> None:
        """Evaluate a run or model on a split: metrics with 95% intervals, per-query files, a table.

        A run directory is evaluated on its own split (splits.json) with its config; a bare model folder
        (or 'embedded') needs --data, and the split comes from the catalogue's `split` column, else the
        whole catalogue is the split 'all'. Writes <split>.json per split.

        With --splits-from RUN, any model (a zero-shot baseline, another run's model) is measured on that
        run's split, on the same queries as the run's own eval, and written to an evaluation folder that
        `cliptune compare` takes beside runs.

        Examples:
            cliptune eval runs/demo-finetuned
            cliptune eval runs/demo-finetuned --all-splits --k 1,5,10 --bootstrap 2000
            cliptune eval runs/demo-finetuned --split val --json
            cliptune eval embedded --data data/fashion --out eval/base
            cliptune eval runs/a/model --splits-from runs/b --split test --out evals/base
        """
        from cliptune.rundir import RunDir, write_eval_json
        from cliptune.rundir import is_run as is_run_dir

        ks = parse_ks(k) if k is not None else None
        relevance = _parse_relevant(relevant)
        path = Path(target)
        if splits_from is not None:
            _eval_on_run(
                target,
                splits_from,
                data,
                split,
                all_splits,
                ks,
                bootstrap,
                relevance,
                out,
                cache_dir,
                as_json,
                text_column,
                quiet,
            )
            return
        is_run = is_run_dir(path)
        if not is_run and data is None:
            err_console.print(
                f"[red]{target} is not a run directory (no config.yaml + model/): give the catalogue to "
                "evaluate on with --data CATALOGUE[/red]",
                highlight=False,
            )
            raise typer.Exit(2)
        with exit_on_error(1, ValueError, FileNotFoundError):
            results = _evaluate(
                path, is_run, data, split, all_splits, ks, bootstrap, relevance, cache_dir, quiet, text_column
            )
        folder = out if out is not None else (RunDir(path).eval_dir if is_run else Path("eval"))
        written = [write_eval_json(folder, r) for r in results.values()]
        _print_results(results, written, as_json, path if is_run else None)


def _print_results(
    results: dict[str, dict[str, Any]], written: list[Path], as_json: bool, run: Path | None = None
) -> None:
    if as_json:
        sys.stdout.write(json.dumps({s: r["metrics"] for s, r in results.items()}, indent=1) + "\n")
        for line in split_warnings(results, run):  # stdout stays JSON
            err_console.print(f"[yellow]warning:[/yellow] {line}", highlight=False)
        return
    console = Console(soft_wrap=True)
    if not console.is_terminal:  # piped or captured: no terminal width to fit, keep rows on one line
        console.width = 200
    directions = ["t2i", "i2t"] + (
        ["triplet"] if any("triplet" in r["per_query"] for r in results.values()) else []
    )
    for direction in directions:
        console.print(metrics_table(results, direction))
    for name, r in results.items():
        if "loss" not in r["metrics"]:
            console.print(f"{name}: no loss ({r['loss'].get('reason')})", highlight=False)
    for line in split_warnings(results, run):
        console.print(f"[yellow]warning:[/yellow] {line}", highlight=False)
    console.print("wrote " + ", ".join(str(p) for p in written), highlight=False)


def split_warnings(results: dict[str, dict[str, Any]], run: Path | None = None) -> list[str]:
    """One sentence per evaluated split whose metrics cannot tell models apart, with a split that would.

    The suggestion is sized from ``run``'s ``splits.json`` (every group of its catalogue) when there is a
    run; otherwise it names the flags that change what is ranked.
    """
    from cliptune.data.split_health import judge_eval, suggest_split
    from cliptune.data.splits import load_splits
    from cliptune.rundir import RunDir

    splits = load_splits(RunDir(run).splits) if run is not None and RunDir(run).splits.exists() else None
    summary = RunDir(run).summary if run is not None else None
    info = json.loads(summary.read_text()).get("info", {}) if summary is not None and summary.exists() else {}
    fixed_by_rows = set(info.get("splits", {}).get("fixed", []))  # splits the catalogue's rows name
    out = []
    for r in results.values():
        health = judge_eval(r)
        if health is None or health.warning is None:
            continue
        if splits is not None:
            held_out = [n for n in splits if n != "train"]
            fixed = health.split if health.split in fixed_by_rows else None
            advice = suggest_split(sum(map(len, splits.values())), held_out, 0, fixed)
        else:
            advice = (
                "evaluate on a split with more groups, or rank each image on its own with --relevant item"
            )
        out.append(f"{health.warning}; {advice}")
    return out


def _eval_on_run(
    target: str,
    run: Path,
    data: Path | None,
    split: str | None,
    all_splits: bool,
    ks: list[int] | None,
    bootstrap: int | None,
    relevant: Relevant | None,
    out: Path | None,
    cache_dir: Path | None,
    as_json: bool,
    text_column: str | None,
    quiet: bool,
) -> None:
    """A model on a run's own split(s), written to an evaluation folder (evaluation.json + eval/)."""
    from cliptune.evaluation.run import evaluate_model_on_run, write_model_evaluation

    with exit_on_error(1, ValueError, FileNotFoundError):
        results = evaluate_model_on_run(
            target,
            run,
            None if all_splits else [split or "test"],
            catalogue=data,
            ks=ks,
            bootstrap=bootstrap,
            relevant=relevant,
            cache_dir=cache_dir,
            text_column=text_column,
            progress=not quiet,
        )
        folder = out if out is not None else default_evaluation_folder(target, run)
        written = write_model_evaluation(folder, target, run, evals=results)
    _print_results(results, written, as_json, run)


def default_evaluation_folder(model: str, run: Path) -> Path:
    """``evals/<model>-on-<run name>``: ``RUN_A/model`` -> ``evals/RUN_A-model-on-RUN_B``."""
    path = Path(model)
    parts = path.parts[-2:] if path.name == "model" else path.parts[-1:]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(parts)).strip("-") or "model"
    return Path("evals") / f"{slug}-on-{Path(run).resolve().name}"


def _evaluate(
    path: Path,
    is_run: bool,
    data: Path | None,
    split: str | None,
    all_splits: bool,
    ks: list[int] | None,
    bootstrap: int | None,
    relevant: Relevant | None,
    cache_dir: Path | None,
    quiet: bool,
    text_column: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate a run on its own split(s), or a bare model on a catalogue's; library errors propagate."""
    from cliptune.evaluation.catalogue import prepare_catalogue, split_order
    from cliptune.evaluation.errors import EvalError
    from cliptune.evaluation.run import evaluate_run
    from cliptune.evaluation.split import evaluate_split
    from cliptune.models.factory import load_model

    if is_run:
        names = None if all_splits else [split or "test"]
        return evaluate_run(
            path,
            names,
            catalogue=data,
            ks=ks,
            bootstrap=bootstrap,
            relevant=relevant,
            cache_dir=cache_dir,
            text_column=text_column,
            progress=not quiet,
        )
    assert data is not None
    column = text_column or "text"  # a bare model has no config: the catalogue's `text` unless told
    prepared = prepare_catalogue(data, text_column=column, progress=not quiet)
    names = split_order(prepared.splits) if all_splits else [split or _default_split(prepared.splits)]
    unknown = [n for n in names if n not in prepared.splits]
    if unknown:
        raise EvalError(f"{data}: no split '{unknown[0]}'; splits: {', '.join(split_order(prepared.splits))}")
    model = load_model(path)
    return {
        name: evaluate_split(
            model,
            prepared,
            name,
            ks=ks or (1, 5, 10),
            relevant=relevant or "group",
            bootstrap=1000 if bootstrap is None else bootstrap,
            text_column=column,
            cache_dir=cache_dir,
            progress=not quiet,
        )
        for name in names
    }


def _parse_relevant(value: str | None) -> Relevant | None:
    """``--relevant`` as the library's type; anything but 'group' or 'item' exits 2."""
    if value == "group":
        return "group"
    if value == "item":
        return "item"
    if value is None:
        return None
    err_console.print(f"[red]--relevant must be 'group' or 'item', got {value!r}[/red]", highlight=False)
    raise typer.Exit(2)


def _default_split(splits: dict[str, list[str]]) -> str:
    return "all" if list(splits) == ["all"] else "test"
