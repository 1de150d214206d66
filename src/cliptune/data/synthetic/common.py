"""Shared plumbing for the synthetic catalogues: byte-stable PNG/CSV writing and the contact sheet.

Determinism is the point of this module: the same seed must give the same bytes on any machine, so
PNGs are written with fixed options and no metadata chunks, CSVs with fixed line endings, and the
contact sheet uses Pillow's built-in bitmap font (no FreeType version can change its pixels).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from numpy.random import PCG64, Generator
from PIL import Image, ImageDraw, ImageFont

from cliptune.rundir import write_bytes_atomic, write_text_atomic

__all__ = [
    "clear_stale_images",
    "make_contact_sheet",
    "progress_iter",
    "save_png",
    "seeded_rng",
    "with_article",
    "write_csv",
]

T = TypeVar("T")

_SHEET_COLS = 8
_SHEET_THUMB = 120
_SHEET_TEXT_H = 26


def seeded_rng(*key: int) -> Generator:
    """An independent PCG64 stream for a key such as ``(seed, stream, item)``: the same key, the same draws.

    Args:
        key: Non-negative integers naming the stream.

    Returns:
        A numpy ``Generator`` seeded with ``list(key)``.
    """
    return Generator(PCG64(list(key)))


def with_article(phrase: str) -> str:
    """``phrase`` with its indefinite article: ``"an orange dress"``, ``"a red coat"`` (by first letter)."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def save_png(image: Image.Image, path: Path) -> None:
    """Write an RGB PNG with fixed options so equal pixels always give equal bytes.

    Args:
        image: The image; converted to RGB if needed.
        path: Destination file (parent folders must exist).
    """
    # No pnginfo, no optimize pass: Pillow then writes only IHDR/IDAT/IEND, no time or text chunks.
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG", compress_level=1)
    write_bytes_atomic(path, buf.getvalue())


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Write a UTF-8 CSV with '\\n' line endings (byte-identical on every OS).

    Args:
        path: Destination file.
        header: Column names.
        rows: One sequence per row, in header order.
    """
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def clear_stale_images(images_dir: Path, pattern: str) -> None:
    """Delete earlier renders in `images_dir` whose names match `pattern`, so metadata equals disk.

    Only files this module names (the regex `pattern`) are removed; anything else a user put there
    stays.

    Args:
        images_dir: The catalogue's `images/` folder (created if missing).
        pattern: Regular expression a file name must fully match to be deleted.
    """
    images_dir.mkdir(parents=True, exist_ok=True)
    name_re = re.compile(pattern)
    for path in images_dir.iterdir():
        if path.is_file() and name_re.fullmatch(path.name):
            path.unlink()


def progress_iter(items: Sequence[T], enabled: bool, description: str) -> Iterator[T]:
    """Iterate `items`, showing a rich progress bar on stderr when `enabled`.

    Args:
        items: What to iterate.
        enabled: False yields the items silently (library default; the CLI turns it on).
        description: Label of the bar.

    Returns:
        An iterator over `items`.
    """
    if not enabled:
        yield from items
        return
    from rich.console import Console
    from rich.progress import track

    yield from track(items, description=description, console=Console(stderr=True))


def make_contact_sheet(images_dir: Path, entries: Sequence[tuple[str, str, str]], out: Path) -> Path:
    """Tile the first images of a catalogue with two caption lines each, for a person to look at.

    Args:
        images_dir: Folder the file names are relative to (the catalogue root).
        entries: Up to 48 `(file_name, line1, line2)` triples, in display order.
        out: Destination PNG.

    Returns:
        `out`.
    """
    entries = list(entries)[:48]
    rows = max(1, -(-len(entries) // _SHEET_COLS))
    cell_h = _SHEET_THUMB + _SHEET_TEXT_H
    sheet = Image.new("RGB", (_SHEET_COLS * _SHEET_THUMB, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default_imagefont()  # bitmap font: identical pixels everywhere
    for i, (file_name, line1, line2) in enumerate(entries):
        x, y = (i % _SHEET_COLS) * _SHEET_THUMB, (i // _SHEET_COLS) * cell_h
        with Image.open(images_dir / file_name) as im:
            thumb = im.convert("RGB").resize((_SHEET_THUMB - 4, _SHEET_THUMB - 4), Image.Resampling.BILINEAR)
        sheet.paste(thumb, (x + 2, y + 2))
        draw.text((x + 3, y + _SHEET_THUMB), line1[:20], fill=(0, 0, 0), font=font)
        draw.text((x + 3, y + _SHEET_THUMB + 12), line2[:20], fill=(170, 0, 0), font=font)
    save_png(sheet, out)
    return out
