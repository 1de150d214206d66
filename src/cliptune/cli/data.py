"""``cliptune data``: render synthetic catalogues, validate a catalogue and write a clean copy of it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

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
    catalogue: Annotated[
        Path,
        typer.Argument(
            help="Catalogue folder (images + metadata file), or a shard pattern (OUT/{00000..00009}.tar)."
        ),
    ],
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
        cliptune data check 'data/fashion-shards/{00000..00002}.tar'
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


@data_app.command("shard")
def data_shard(
    catalogue: Annotated[Path, typer.Argument(help="Catalogue folder (images + metadata file) to convert.")],
    out: Annotated[Path, typer.Argument(help="Empty folder for the shards (OUT/00000.tar, ...).")],
    shard_size: Annotated[
        int, typer.Option("--shard-size", help="Images (samples) per shard.", min=1)
    ] = 10_000,
    text_column: Annotated[
        str, typer.Option(help="Caption column (your config's data.text_column).")
    ] = "text",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Convert a catalogue folder into WebDataset shards (tar files of image + JSON samples).

    Every row is converted (one sample per image, its rows in the JSON); check and clean the catalogue
    first to leave bad rows out. Prints the pattern to put in data.catalogue: the shards then train,
    evaluate, index and embed like the folder, with the same split.

    Examples:
        cliptune data shard data/fashion data/fashion-shards --shard-size 500
    """
    from rich.progress import track

    from cliptune.data.catalogue import read_catalogue
    from cliptune.data.shards import write_shards

    def bar(items: Any, total: int) -> Any:
        return track(items, total=total, description="Writing shards", disable=quiet, console=err_console)

    with exit_on_error(2):
        cat = read_catalogue(catalogue, text_column)
        pattern = write_shards(cat, out, shard_size, progress=bar)
    console.print(
        f"wrote {len(cat.rows)} row(s) as shards (each with its .idx.json index); put this in data.catalogue:"
    )
    console.print(pattern, highlight=False, markup=False)


@data_app.command("index-shards")
def data_index_shards(
    pattern: Annotated[
        str, typer.Argument(help="Shard pattern, local or an fsspec URL (shards/{00000..00099}.tar).")
    ],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Write a sidecar index (SHARD.idx.json) beside each shard, for shards made by other tools.

    Reading a shard pattern then reads each shard's sidecar instead of walking the tar (on object storage
    that walk downloads nearly every byte). `cliptune data shard` writes the sidecars itself; rerun this
    after rewriting a shard (a sidecar whose recorded size no longer matches is not used).

    Examples:
        cliptune data index-shards 'laion-shards/{00000..00099}.tar'
        cliptune data index-shards 's3://bucket/shards/{00000..00099}.tar'
    """
    from rich.progress import track

    from cliptune.data.shards import index_shards

    def bar(items: Any, total: int) -> Any:
        return track(items, total=total, description="Indexing shards", disable=quiet, console=err_console)

    with exit_on_error(2):
        written = index_shards(pattern, progress=bar)
    console.print(f"wrote {len(written)} sidecar index(es), e.g. {written[0]}", highlight=False, markup=False)


@data_app.command("audit")
def data_audit(
    catalogue: Annotated[Path, typer.Argument(help="Catalogue folder (images + metadata file).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for audit.csv and audit.html.")] = Path("audit"),
    model: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--model", help="Run directory, model folder or backbone spec: also find re-shoots and crops."
        ),
    ] = None,
    threshold: Annotated[
        float, typer.Option(help="Smallest embedding cosine reported with --model (see docs/catalogues.md).")
    ] = 0.90,
    max_bits: Annotated[
        int, typer.Option(help="Largest pHash Hamming distance (of 256 bits) of a near copy.", min=0, max=255)
    ] = 24,
    splits_from: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--splits-from", help="Run directory whose splits.json says each image's split."),
    ] = None,
    fix: Annotated[
        bool,
        typer.Option("--fix", help="Write metadata.fixed.csv: each leaking pair's groups merged into one."),
    ] = False,
    fix_out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--fix-out", help="Where --fix writes (default CATALOGUE/metadata.fixed.csv)."),
    ] = None,
    text_column: Annotated[
        str, typer.Option(help="Caption column (your config's data.text_column).")
    ] = "text",
    cache_dir: Annotated[Optional[Path], typer.Option(help="Feature cache folder (--model).")] = None,  # noqa: UP045
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Find copies of one picture under several names, and the ones that cross splits (leaks).

    Exact copies (same pixels) and near copies (resized, re-encoded, mirrored: perceptual hash) need no
    model; --model adds re-shoots and crops by embedding cosine. Each image's split comes from
    --splits-from RUN, else from the split the default config would make (which honours a `split`
    column). Writes OUT/audit.csv and OUT/audit.html; exit 1 when a pair crosses splits, unless --fix
    wrote the metadata that keeps every such pair in one group (the next split is then leak-free).

    Examples:
        cliptune data audit data/fashion
        cliptune data audit my_catalogue --model runs/ft --splits-from runs/ft --out audit-ft
        cliptune data audit my_catalogue --fix
    """
    from cliptune.config import DataConfig
    from cliptune.data.audit import audit_table, hash_images, hash_pairs, merge_leaking_groups
    from cliptune.data.catalogue import read_catalogue
    from cliptune.data.splits import assign_rows, load_splits, make_splits
    from cliptune.report.audit import FINDINGS, audit_html
    from cliptune.rundir import RunDir, write_text_atomic
    from cliptune.search.duplicates import embedding_pairs

    if not -1.0 < threshold <= 1.0:
        err_console.print(f"[red]--threshold must be in (-1, 1], got {threshold}[/red]", highlight=False)
        raise typer.Exit(2)
    defaults = DataConfig()
    with exit_on_error(2, ValueError):
        cat = read_catalogue(catalogue, text_column)
        names = list(dict.fromkeys(cat.rows["file_name"].astype(str)))
        hashes = hash_images(
            [cat.image_path(n) for n in names], names, defaults.max_pixels, progress=not quiet
        )
        bad = {name for name, _ in hashes.bad}
        rows = cat.rows[~cat.rows["file_name"].astype(str).isin(bad)].reset_index(drop=True)
        if splits_from is not None:
            splits = load_splits(RunDir(splits_from).splits)
            where = f"{RunDir(splits_from).splits}"
        else:
            split = defaults.split
            splits = make_splits(
                rows, split.ratios, split.seed, min_groups=split.min_groups, method=split.method
            )
            where = "the default config's grouped split (data.split, honouring a split column)"
        split_of = assign_rows(rows, splits)
    pairs = {(p.a, p.b): p for p in hash_pairs(hashes, max_bits)}
    if model is not None:
        from cliptune.models.embed import embed_images_with
        from cliptune.models.factory import load_model

        with exit_on_error(1):
            loaded = load_model(model)
            paths = [cat.image_path(n) for n in hashes.file_names]
            vectors = embed_images_with(loaded, paths, cache_dir=cache_dir, progress=not quiet)
        for p in embedding_pairs(vectors, threshold):
            pairs.setdefault((p.a, p.b), p)  # a pixel copy keeps its hash kind
    table = audit_table(sorted(pairs.values(), key=lambda p: (p.a, p.b)), hashes.file_names, rows, split_of)

    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "audit.csv", table.to_csv(index=False))
    notes = [
        f"{len(hashes.file_names)} image(s) audited; splits from {where}.",
        f"exact: same pixels; near: pHash within {max_bits} of 256 bits (either orientation)"
        + (
            f"; embedding: cosine >= {threshold} with {model}."
            if model
            else "; no --model: no embedding pass."
        ),
    ]
    page = audit_html(table, cat.image_path, f"Near-duplicate audit of {catalogue}", notes)
    write_text_atomic(out / "audit.html", page)

    for name, reason in hashes.bad:
        err_console.print(f"[yellow]skipped {name}: {reason}[/yellow]", highlight=False)
    summary = Table(title=f"{len(table)} pair(s) among {len(hashes.file_names)} image(s)")
    summary.add_column("finding")
    for kind in ("exact", "near", "embedding"):
        summary.add_column(kind, justify="right")
    for finding in FINDINGS:
        part = table[table["finding"] == finding]
        summary.add_row(
            finding, *(str(int((part["kind"] == k).sum())) for k in ("exact", "near", "embedding"))
        )
    console.print(summary)
    console.print(f"wrote {out / 'audit.csv'} and {out / 'audit.html'}")
    n_leaks = int((table["finding"] == "leak").sum())
    if fix:
        target = fix_out or cat.metadata_path.parent / "metadata.fixed.csv"  # shards: beside them
        fixed, moved = merge_leaking_groups(cat.rows, table)
        write_text_atomic(target, fixed.to_csv(index=False))
        moved_note = f"; {moved} row(s) moved to their merged group's split" if moved else ""
        console.print(
            f"wrote {target}: the groups of {n_leaks} leaking pair(s) merged{moved_note}; "
            "use it as the catalogue's metadata file so the next split keeps each copy on one side"
        )
        return
    if n_leaks:
        raise typer.Exit(1)
