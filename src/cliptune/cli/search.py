"""``cliptune search``: query an index folder (``cliptune index``) by text or image, with filters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from cliptune.cli.errors import err_console, exit_on_error

__all__ = ["register", "search_cmd"]

console = Console(soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add ``cliptune search`` to ``app``."""
    app.command("search")(search_cmd)


def search_cmd(
    index: Annotated[Path, typer.Argument(help="Index folder written by `cliptune index`.")],
    text: Annotated[Optional[str], typer.Argument(help="Text query (omit with --image).")] = None,  # noqa: UP045
    k: Annotated[int, typer.Option("-k", "--k", help="Number of results.", min=1)] = 10,
    image: Annotated[Optional[Path], typer.Option(help="Image file as the query.")] = None,  # noqa: UP045
    where: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            help="Attribute filter ATTR=VALUE, applied before top-k (repeatable; the same ATTR twice = any of)."
        ),
    ] = None,
    model: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Model to embed the query with (default: the one recorded in the index)."),
    ] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Feature cache folder.")] = None,  # noqa: UP045
    as_json: Annotated[bool, typer.Option("--json", help="Print the hits as JSON.")] = False,
    info: Annotated[
        bool,
        typer.Option(
            "--info", help="Print the index's facts (model, kind, parameters, recall@10); no query."
        ),
    ] = False,
) -> None:
    """Search an index by text or image, optionally filtered by attributes; print the ranked hits.

    Examples:
        cliptune search indexes/fashion "ripped blue jeans"
        cliptune search indexes/fashion "summer dress" -k 5 --where colour=red --where colour=pink
        cliptune search indexes/fashion --image query.png --where rips=true --json
        cliptune search indexes/fashion --info
    """
    from cliptune.models.factory import load_model
    from cliptune.search import load_index, search

    if info:
        if text is not None or image is not None:
            err_console.print("[red]--info takes no query[/red]")
            raise typer.Exit(2)
        with exit_on_error(1):
            _print_info(load_index(index), as_json)
        return
    if (text is None) == (image is None):
        err_console.print("[red]give exactly one query: a TEXT argument or --image FILE[/red]")
        raise typer.Exit(2)
    filters = _parse_where(where or [])
    with exit_on_error(1):
        idx = load_index(index)
        loaded = load_model(model or idx.model_source)
        hits = search(idx, loaded, text=text, image=image, k=k, where=filters, cache_dir=cache_dir)
    if as_json:
        payload = {
            "index": str(index),
            "model": idx.model,
            "query": {"text": text, "image": None if image is None else str(image)},
            "k": k,
            "where": filters,
            "hits": [
                {
                    "rank": h.rank,
                    "id": h.id,
                    "score": h.score,
                    "caption": h.caption,
                    "attributes": h.attributes,
                }
                for h in hits
            ],
        }
        print(json.dumps(payload, ensure_ascii=False))  # plain print: no rich wrapping in machine output
    else:
        _print_table(hits, text if text is not None else f"image {image}")
    if not hits:
        _explain_empty(idx, filters)


def _print_info(idx: Any, as_json: bool) -> None:
    from cliptune.search.index import index_facts

    facts = index_facts(idx)
    if as_json:
        print(json.dumps(facts, ensure_ascii=False))
        return
    recall = facts["recall"]
    if recall.get("exact"):
        measured = "1.0 (exact search)"
    else:
        measured = (
            f"{recall['recall_at_10']:.4f} against exact search on {recall['image_queries']} image and "
            f"{recall['text_queries']} caption queries (images {recall['at_10_images']}, captions "
            f"{recall['at_10_texts']}; seed {recall['seed']})"
        )
    params = ", ".join(f"{p}={v}" for p, v in facts["params"].items()) or "none"
    lines = [
        f"index      {facts['path']}",
        f"items      {facts['n']} (dim {facts['dim']})",
        f"model      {facts['model']} (from {facts['model_source']})",
        f"catalogue  {facts['catalogue']}",
        f"created    {facts['created']}",
        f"kind       {facts['kind']}",
        f"params     {params}",
        f"recall@10  {measured}",
    ]
    console.print("\n".join(lines), highlight=False)


def _parse_where(items: list[str]) -> dict[str, Any]:
    filters: dict[str, Any] = {}
    for item in items:
        attribute, sep, value = item.partition("=")
        if not sep or not attribute.strip():
            err_console.print(f"[red]--where expects ATTR=VALUE, got '{item}'[/red]", highlight=False)
            raise typer.Exit(2)
        attribute = attribute.strip()
        if attribute in filters:  # the same attribute twice: any of the values
            previous = filters[attribute]
            filters[attribute] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            filters[attribute] = value
    return filters


def _print_table(hits: list[Any], query: str) -> None:
    table = Table(title=f"{len(hits)} result(s) for {query}", title_justify="left")
    table.add_column("rank", justify="right")
    table.add_column("score", justify="right")
    for column in ("id", "caption", "attributes"):  # folded, never cut: an id with "…" cannot be opened
        table.add_column(column, overflow="fold")
    for h in hits:
        attrs = ", ".join(f"{a}={v}" for a, v in h.attributes.items())
        table.add_row(str(h.rank), f"{h.score:.4f}", h.id, h.caption, attrs)
    console.print(table, highlight=False)


def _explain_empty(idx: Any, filters: dict[str, Any]) -> None:
    for attribute in filters:  # a typo in a value gives no result: show what the values are
        values = idx.values(attribute)
        shown = ", ".join(values[:20]) + (" ..." if len(values) > 20 else "")
        err_console.print(f"no result; {attribute} values in this index: {shown}", highlight=False)
