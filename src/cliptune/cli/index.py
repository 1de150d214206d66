"""``cliptune index``: embed a catalogue's images with a model into a searchable index folder."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console

from cliptune.cli.errors import err_console, exit_on_error

if TYPE_CHECKING:
    from cliptune.models.cache import Precision
    from cliptune.search.sharded import Processes

__all__ = ["index_cmd", "main_process_speaks", "register"]

console = Console(soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add ``cliptune index`` to ``app``."""
    app.command("index")(index_cmd)


@contextmanager
def main_process_speaks() -> Iterator[Processes]:
    """The launched processes (one without a launcher); errors are printed by the main process only.

    Every error of a multi-process ``index`` / ``embed`` reaches the main process (the steps are the same
    on every process, and embedding failures are relayed to it), so the others exit 1 without repeating it.
    """
    from cliptune.errors import CliptuneError
    from cliptune.search.sharded import launched_processes

    with exit_on_error(1), launched_processes() as processes:
        try:
            yield processes
        except CliptuneError:
            if processes.main:
                raise
            raise typer.Exit(1) from None


def index_cmd(
    model: Annotated[str, typer.Argument(help="Run directory, model folder, or backbone spec (embedded).")],
    out: Annotated[Path, typer.Argument(help="Index folder to write (replaced atomically).")],
    data: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--data", help="Catalogue folder to index; default for a run: its data.catalogue."),
    ] = None,
    text_column: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Caption column (default: the run's data.text_column, else 'text')."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace OUT even if another model built it, or it is not an index.")
    ] = False,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Feature cache folder.")] = None,  # noqa: UP045
    precision: Annotated[str, typer.Option(help="Tower precision: auto, fp32 or bf16.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per forward.", min=1)] = 64,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    kind: Annotated[
        str, typer.Option(help="flat (exact, default), hnsw or ivfpq (approximate; recall@10 is measured).")
    ] = "flat",
    hnsw_m: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option("--hnsw-m", help="hnsw: graph neighbours per node (default 32).", min=1),
    ] = None,
    ef_construction: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="hnsw: candidate list while building (default 40).", min=1),
    ] = None,
    ef_search: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="hnsw: candidate list per query (default 64; at least k + 16 is used).", min=1),
    ] = None,
    nlist: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="ivfpq: k-means cells (default 4 sqrt(N), >= 39 items per cell).", min=1),
    ] = None,
    pq_m: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option("--pq-m", help="ivfpq: bytes per vector, must divide D (default: D / 4).", min=1),
    ] = None,
    nprobe: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="ivfpq: cells visited per query (default nlist / 16, at least 1).", min=1),
    ] = None,
) -> None:
    """Embed a catalogue's images with a trained model into a FAISS index with their metadata.

    A run indexes its own catalogue with its own caption column unless --data / --text-column say
    otherwise; a bare model (folder, hub id, 'embedded') needs --data. --kind hnsw or ivfpq builds an
    approximate index for large catalogues and stores its recall@10 against exact search (docs/search.md).
    Under torchrun / accelerate launch each process embeds a shard of the images and the main process
    builds and writes the index, identical to one process's.

    Examples:
        cliptune index runs/fashion-finetuned indexes/fashion
        cliptune index runs/fashion-finetuned indexes/fashion --data data/fashion-2 --overwrite -q
        cliptune index embedded indexes/base --data data/fashion --text-column text_generic
        cliptune index runs/fashion-finetuned indexes/fashion-hnsw --kind hnsw --ef-search 128
        torchrun --standalone --nproc_per_node 2 -m cliptune index runs/fashion-finetuned indexes/fashion
    """
    from cliptune.cli.rundata import data_for
    from cliptune.data.catalogue import read_catalogue
    from cliptune.models.factory import load_model
    from cliptune.search.index import build_index, read_manifest

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
        path = build_index(
            loaded,
            catalogue,
            out,
            cache_dir=cache_dir,
            precision=precisions[precision],
            batch_size=batch_size,
            overwrite=overwrite,
            progress=not quiet,
            kind=kind,
            params={
                "hnsw_m": hnsw_m,
                "ef_construction": ef_construction,
                "ef_search": ef_search,
                "nlist": nlist,
                "pq_m": pq_m,
                "nprobe": nprobe,
            },
            processes=processes,
        )
    if not processes.main:
        return
    manifest = read_manifest(path)
    assert manifest is not None  # build_index has just written it
    console.print(
        f"indexed {manifest['n_items']} images (dim {manifest['dim']}) with {loaded.name} into [bold]{path}[/bold]"
    )
    if manifest["kind"] != "flat":
        recall = manifest["recall"]
        console.print(
            f"{manifest['kind']} index {manifest['params']}: recall@10 {recall['recall_at_10']:.4f} against "
            f"exact search ({recall['image_queries']} image and {recall['text_queries']} caption queries)",
            highlight=False,
        )
