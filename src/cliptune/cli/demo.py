"""``cliptune demo``: run the offline demo step by step and summarise what it showed."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

console = Console(soft_wrap=True)


def _run_step(app: typer.Typer, args: list[str]) -> int:
    """Run one CLI command in this process; return its exit code."""
    import click

    try:
        app(args, standalone_mode=False)
    except SystemExit as exc:  # typer.Exit inside commands
        return int(exc.code or 0)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    return 0


def _load(path: Path) -> dict[str, Any] | None:
    from cliptune.rundir import read_json

    data: dict[str, Any] | None = read_json(path) if path.exists() else None
    return data


def _fmt(m: dict[str, Any] | None) -> str:
    from cliptune.ranking.bootstrap import format_interval

    return "-" if m is None else format_interval(m)


# The shipped suite's categories -> the generated suite's (demo_steps.GENERATED_ATTRIBUTES); "+" stands
# for every combination category the generator wrote (rips+style, ...), the counterpart of "combinations".
SHIPPED_TO_GENERATED = {
    "rips": "rips",
    "styles": "style",
    "garments": "garment",
    "colours": "colour",
    "patterns": "pattern",
    "combinations": "+",
}


def _suite_result(run: Path, suite_file: Path) -> dict[str, Any] | None:
    """``RUN/suite/<name>.json`` of the suite in ``suite_file`` (None when either is missing)."""
    from cliptune.rundir import RunDir
    from cliptune.suites import load_suite

    if not suite_file.exists():
        return None
    return _load(RunDir(run).suite_dir / f"{load_suite(suite_file).suite}.json")


def _verdict(result: dict[str, Any], names: list[str]) -> tuple[bool | None, str]:
    """(passed, words) of the categories ``names`` in a suite result; passed is None when none was measured."""
    cats = [result["categories"][n] for n in names if n in result.get("categories", {})]
    if not cats:
        unmeasured = [n for n in names if n in result.get("unmeasured", {})]
        return None, "not measured" if unmeasured else "not in the suite"
    failed = [n for n in names if n in result["categories"] and not result["categories"][n]["passed"]]
    if len(names) > 1:
        if not failed:
            return True, f"PASS (all {len(cats)} categories)"
        return False, f"FAIL ({len(failed)} of {len(cats)} categories: {', '.join(failed)})"
    if not failed:
        return True, "PASS"
    return False, f"FAIL ({'; '.join(cats[0].get('failures', []))})"


def _mean_yellow(result: dict[str, Any], names: list[str]) -> float:
    """Mean number of yellow (acceptable) images per scored query of the categories ``names``."""
    counts = [q.get("n_yellow", 0) for q in result.get("queries", []) if q["category"] in names]
    return sum(counts) / len(counts) if counts else 0.0


def suite_comparison(
    shipped: dict[str, Any], generated: dict[str, Any], descriptions: dict[str, str]
) -> list[str]:
    """One line per shipped category: its verdict next to the generated suite's, and why they differ.

    Nothing is typed in: the verdicts, failures and yellow counts come from the two result files, the
    rule from the shipped category's own description.
    """
    lines = []
    generated_names = list(generated.get("categories", {})) + list(generated.get("unmeasured", {}))
    for cat in [*shipped.get("categories", {}), *shipped.get("unmeasured", {})]:
        target = SHIPPED_TO_GENERATED.get(cat)
        if target == "+":
            names = [n for n in generated_names if "+" in n]
            label = f"{len(names)} combination categories"
        else:
            names = [target] if target is not None else []
            label = target or "-"
        ok_s, words_s = _verdict(shipped, [cat])
        ok_g, words_g = _verdict(generated, names) if names else (None, "no counterpart")
        line = f"{cat}: shipped {words_s}; generated ({label}) {words_g}"
        if ok_s is not None and ok_g is not None and ok_s != ok_g:
            line += (
                f". They DIFFER: the shipped rule is '{descriptions.get(cat, '')}' "
                f"({_mean_yellow(shipped, [cat]):.0f} yellow images per query); the generated suite knows "
                f"no neighbouring values ({_mean_yellow(generated, names):.0f} yellow per query)"
            )
        elif ok_s is not None and ok_s == ok_g:
            line += " (same verdict)"
        lines.append(line)
    return lines


def _audit_line(audit_csv: Path) -> str | None:
    """The audit's finding counts from its CSV (None when the audit wrote none)."""
    import pandas as pd

    if not audit_csv.exists():
        return None
    table = pd.read_csv(audit_csv)
    counts = table["finding"].value_counts().to_dict() if len(table) else {}
    leaks = int(counts.get("leak", 0))
    others = ", ".join(f"{int(n)} {k}" for k, n in sorted(counts.items()) if k != "leak")
    return (
        f"data audit: {leaks} leak(s) across the fine-tuned run's splits among {len(table)} near-duplicate "
        f"pair(s){f' ({others})' if others else ''}"
    )


def _summary(out: Path) -> list[str]:
    """The demo's conclusions, computed from the files it wrote (no number is typed in here)."""
    from cliptune.rundir import RunDir

    runs = out / "runs"
    shipped_file = out / "data" / "fashion" / "suite.yaml"
    generated_file = out / "data" / "fashion" / "generated-suite.yaml"
    lines: list[str] = []
    # no vertical borders and short headers: the table fits 80 columns without wrapping an interval
    table = Table(
        title="Fashion: base vs fine-tuned on the same held-out test queries",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for col in ("run", "t2i recall@5", "t2i mrr", "suite", "rips"):
        table.add_column(col, no_wrap=True)
    evals = {}
    for name in ("fashion-base", "fashion-finetuned"):
        run = RunDir(runs / name)
        ev = _load(run.eval("test"))
        suite = _suite_result(runs / name, shipped_file)
        evals[name] = ev
        rips = (suite or {}).get("categories", {}).get("rips", {})
        table.add_row(
            name,
            _fmt((ev or {}).get("metrics", {}).get("t2i/recall@5")),
            _fmt((ev or {}).get("metrics", {}).get("t2i/mrr")),
            "-" if suite is None else ("PASS" if suite["passed"] else "FAIL"),
            "-" if not rips else ("PASS" if rips["passed"] else "FAIL"),
        )
    console.print(table)
    base, tuned = evals.get("fashion-base"), evals.get("fashion-finetuned")
    if base and tuned:
        for key in ("t2i/recall@5", "t2i/mrr"):
            b, t = base["metrics"][key], tuned["metrics"][key]
            if t["low"] > b["high"]:
                lines.append(
                    f"fine-tuned beats base on {key}: intervals do not overlap ({_fmt(t)} vs {_fmt(b)})"
                )
            elif t["mean"] > b["mean"]:
                lines.append(
                    f"fine-tuned is ahead on {key} but the intervals overlap ({_fmt(t)} vs {_fmt(b)})"
                )
            else:
                lines.append(f"fine-tuned does NOT beat base on {key} ({_fmt(t)} vs {_fmt(b)})")
    shipped = _suite_result(runs / "fashion-finetuned", shipped_file)
    generated = _suite_result(runs / "fashion-finetuned", generated_file)
    if shipped and generated:
        from cliptune.suites import load_suite

        descriptions = {n: c.description or "" for n, c in load_suite(shipped_file).categories.items()}
        lines.append("fine-tuned run, shipped suite vs the suite generated from the catalogue:")
        lines += [f"  {line}" for line in suite_comparison(shipped, generated, descriptions)]
    audit = _audit_line(out / "audit" / "audit.csv")
    if audit:
        lines.append(audit)
    for line in lines:  # an indented line belongs to the line above it
        console.print(f"      {line.strip()}" if line.startswith("  ") else f"  - {line}", highlight=False)
    console.print("\nOpen:")
    for path in (
        RunDir(runs / "fashion-finetuned").report,
        out / "compare" / "compare.html",
        RunDir(runs / "art-siamese").report,
        out / "data" / "fashion" / "contact_sheet.png",
        generated_file,
        out / "audit" / "audit.html",
    ):
        console.print(f"  {path}{'' if path.exists() else '  (not written)'}")
    return lines


def register(app: typer.Typer) -> None:
    """Add ``demo`` to ``app``."""

    @app.command("demo")
    def demo(
        out: Annotated[Path, typer.Option(help="Folder for catalogues, configs, runs, index.")] = Path(
            "runs/demo"
        ),
        fast: Annotated[
            bool, typer.Option(help="Smaller catalogues and fewer epochs (about a minute).")
        ] = False,
    ) -> None:
        """Run the offline end-to-end demo on the embedded default, printing each command as it runs.

        Examples:
            cliptune demo
            cliptune demo --out /tmp/demo --fast
        """
        from cliptune.cli.demo_steps import demo_steps, write_demo_configs

        write_demo_configs(out, fast=fast)
        timings = []
        started = time.perf_counter()
        for i, step in enumerate(demo_steps(out, fast=fast), start=1):
            console.rule(f"[bold]{i}. {step.title}")
            console.print(f"[dim]$ {step.command}[/dim]", highlight=False)
            tic = time.perf_counter()
            code = _run_step(app, step.args)
            timings.append((step.title, time.perf_counter() - tic, code))
            if code != 0 and not (step.may_fail and code == 1):
                console.print(f"[red]step {i} failed with exit code {code}: {step.command}[/red]")
                raise typer.Exit(code)
            if code == 1:
                console.print("[yellow]a behavioural gate failed (see above): the demo goes on[/yellow]")
        console.rule("[bold]Summary")
        _summary(out)
        console.print(f"\ndemo finished in {time.perf_counter() - started:.0f} s")
