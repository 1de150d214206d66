"""``cliptune suite``: behavioural suites from the user's own catalogue (``generate``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from cliptune.cli.errors import exit_on_error

__all__ = ["register"]

console = Console(soft_wrap=True)

suite_app = typer.Typer(
    help="Behavioural suites: generate one from a catalogue's attributes.", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    """Add the ``suite`` group to ``app``."""
    app.add_typer(suite_app, name="suite")


@suite_app.command("generate")
def suite_generate(
    catalogue: Annotated[
        Path, typer.Argument(help="Catalogue folder (images + metadata with attribute columns).")
    ],
    out: Annotated[Path, typer.Option("--out", help="The suite YAML file to write.")],
    attributes: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--attributes",
            help="Comma-separated attributes, in order (a combination's first is its tested attribute); "
            "default: every attribute with 2..50 distinct values shared by several images, not id-like.",
        ),
    ] = None,
    combinations: Annotated[
        int,
        typer.Option(
            help="Largest combination: 1 single attributes only, 2 also pairs, 3 also triples.", min=1
        ),
    ] = 2,
    max_queries: Annotated[
        int,
        typer.Option(
            "--max-queries-per-category", help="Queries per category at most (most frequent first).", min=1
        ),
    ] = 8,
    min_relevant: Annotated[
        int,
        typer.Option(
            help="Drop (and list) queries with fewer relevant images among the counted ones.", min=1
        ),
    ] = 2,
    phrases: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--phrases", help="YAML of value phrases and synonyms, word order and a template."),
    ] = None,
    split: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="Count relevant images on this split only: with --splits-from, the run's (default its "
            "held-out split); else the catalogue's split column. Default: every image."
        ),
    ] = None,
    splits_from: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--splits-from", help="A run whose splits.json says which images are held out."),
    ] = None,
    text_column: Annotated[str, typer.Option(help="The caption column (never an attribute).")] = "text",
    name: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="The suite's name (default: <catalogue folder>-generated)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Orders equally frequent values and picks synonyms.")] = 0,
) -> None:
    """Write a behavioural suite built from the catalogue's attribute columns (deterministic for a seed).

    One category per attribute and per combination; relevant = every queried attribute matches, yellow =
    all but one (not the tested attribute), red = the tested attribute differs. See docs/suites.md.

    Examples:
        cliptune suite generate data/fashion --out suite.yaml
        cliptune suite generate data/fashion --out suite.yaml --splits-from runs/fashion-finetuned --phrases phrases.yaml
    """
    from cliptune.data.catalogue import read_catalogue
    from cliptune.rundir import write_text_atomic
    from cliptune.suites.generate import counted_items, generate_suite
    from cliptune.suites.phrases import load_phrases
    from cliptune.suites.selectors import CatalogueItems

    with exit_on_error(2):
        cat = read_catalogue(catalogue, text_column=text_column)
        chosen = [a.strip() for a in attributes.split(",") if a.strip()] if attributes is not None else None
        items = CatalogueItems(cat)
        values = {a: items.values(a) for a in cat.attributes}
        words = load_phrases(phrases, values)
        counted = counted_items(cat, split, splits_from)
        gen = generate_suite(
            cat,
            attributes=chosen,
            combinations=combinations,
            max_queries=max_queries,
            min_relevant=min_relevant,
            seed=seed,
            phrases=words,
            counted=counted,
            name=name,
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, gen.yaml)
    n_queries = sum(len(c["queries"]) for c in gen.document["categories"].values())
    console.print(
        f"wrote [bold]{out}[/bold]: {n_queries} queries in {len(gen.document['categories'])} categories "
        f"from {', '.join(gen.attributes)}; relevant images counted on {gen.counted} ({gen.n_counted} images)"
    )
    if gen.dropped:
        console.print(
            f"dropped {len(gen.dropped)} queries (fewer than {min_relevant} relevant images, or a conflict):"
        )
        for d in gen.dropped:
            console.print(f"  {d.category}: {d.text!r} ({d.reason})", highlight=False, markup=False)
    console.print(f"run it: cliptune test RUN --suite {out}", highlight=False)
