"""``cliptune index`` and ``cliptune search``: build a searchable index of a catalogue, query it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add the ``index`` and ``search`` commands to ``app``."""
    app.command("index")(index_cmd)
    app.command("search")(search_cmd)


def index_cmd(
    model: Annotated[str, typer.Argument(help="Run directory, model folder, or backbone spec (embedded).")],
    out: Annotated[Path, typer.Argument(help="Index folder to write (replaced atomically).")],
    data: Annotated[Path, typer.Option("--data", help="Catalogue folder to index.")],
    overwrite: Annotated[
        bool, typer.Option(help="Replace OUT even if another model built it, or it is not an index.")
    ] = False,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Feature cache folder.")] = None,  # noqa: UP045
    precision: Annotated[str, typer.Option(help="Tower precision: auto, fp32 or bf16.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per forward.", min=1)] = 64,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Embed a catalogue's images with a trained model into a FAISS index with their metadata.

    Examples:
        cliptune index runs/fashion-finetuned --data data/fashion indexes/fashion
        cliptune index runs/fashion-finetuned --data data/fashion indexes/fashion --overwrite -q
    """
    from cliptune.data.catalogue import CatalogueError, read_catalogue
    from cliptune.data.images import ImageLoadError
    from cliptune.models.backbone import BackboneError
    from cliptune.models.factory import load_model
    from cliptune.search import SearchIndexError, build_index

    if precision not in ("auto", "fp32", "bf16"):
        err_console.print(
            f"[red]--precision must be auto, fp32 or bf16, got {precision}[/red]", highlight=False
        )
        raise typer.Exit(2)
    try:
        catalogue = read_catalogue(data)
        loaded = load_model(model)
        path = build_index(
            loaded, catalogue, out, cache_dir=cache_dir, precision=precision, batch_size=batch_size,
            overwrite=overwrite, progress=not quiet,
        )  # fmt: skip
    except (CatalogueError, BackboneError, SearchIndexError, ImageLoadError) as exc:
        err_console.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(1) from None
    manifest = json.loads((path / "index.json").read_text())
    console.print(
        f"indexed {manifest['n_items']} images (dim {manifest['dim']}) with {loaded.name} into [bold]{path}[/bold]"
    )


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
) -> None:
    """Search an index by text or image, optionally filtered by attributes; print the ranked hits.

    Examples:
        cliptune search indexes/fashion "ripped blue jeans"
        cliptune search indexes/fashion "summer dress" -k 5 --where colour=red --where colour=pink
        cliptune search indexes/fashion --image query.png --where rips=true --json
    """
    from cliptune.data.images import ImageLoadError
    from cliptune.models.backbone import BackboneError
    from cliptune.models.factory import load_model
    from cliptune.search import SearchIndexError, load_index, search

    if (text is None) == (image is None):
        err_console.print("[red]give exactly one query: a TEXT argument or --image FILE[/red]")
        raise typer.Exit(2)
    filters = _parse_where(where or [])
    try:
        idx = load_index(index)
        loaded = load_model(model or idx.model_source)
        hits = search(idx, loaded, text=text, image=image, k=k, where=filters, cache_dir=cache_dir)
    except (BackboneError, SearchIndexError, ImageLoadError) as exc:
        err_console.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(1) from None
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
    for column, justify in (("rank", "right"), ("score", "right"), ("id", "left"), ("caption", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    table.add_column("attributes")
    for h in hits:
        attrs = ", ".join(f"{a}={v}" for a, v in h.attributes.items())
        table.add_row(str(h.rank), f"{h.score:.4f}", h.id, h.caption, attrs)
    console.print(table, highlight=False)


def _explain_empty(idx: Any, filters: dict[str, Any]) -> None:
    for attribute in filters:  # a typo in a value gives no result: show what the values are
        values = idx.values(attribute)
        shown = ", ".join(values[:20]) + (" ..." if len(values) > 20 else "")
        err_console.print(f"no result; {attribute} values in this index: {shown}", highlight=False)
