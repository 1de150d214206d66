"""Robust image loading: every image a catalogue can hold becomes an RGB picture or one clear error.

Pillow's defaults are wrong for training data in several quiet ways (measured here, see NOTES.md):
EXIF orientation is ignored, ``convert("RGB")`` turns transparent pixels black and 16-bit images white,
a truncated file opens fine and fails only when decoded, and the decompression-bomb error fires only at
twice the limit. :func:`load_image` fixes each of these; :func:`probe_image` runs the same checks without
keeping the pixels, so ``cliptune data check`` can validate a catalogue cheaply.

Example:
    >>> Image.new("L", (8, 6)).save("shirt.jpg")  # a greyscale JPEG
    >>> img = load_image(Path("shirt.jpg"), max_pixels=50_000_000)
    >>> img.mode, img.size
    ('RGB', (8, 6))
"""

from __future__ import annotations

import io
import re
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cliptune.errors import CliptuneError

__all__ = ["DEFAULT_MAX_PIXELS", "ImageLoadError", "load_image", "probe_image", "read_image_bytes"]

DEFAULT_MAX_PIXELS = 89_478_485
"""Pillow's own ``MAX_IMAGE_PIXELS`` (a 3-channel 8-bit image of ~256 MB), used as our default limit."""

_WHITE = (255, 255, 255)
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class ImageLoadError(CliptuneError):
    """An image that cannot be used, with the file and a short human reason.

    Args:
        path: The image file.
        reason: Why it cannot be used, e.g. ``"empty file (0 bytes)"``; shown verbatim in ``rejected.csv``.
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[type[ImageLoadError], tuple[Path, str]]:
        return type(self), (
            self.path,
            self.reason,
        )  # picklable (DataLoader workers) despite the custom __init__


def load_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None) -> Image.Image:
    """Decode an image file into an upright 8-bit RGB picture.

    EXIF orientation is applied; anything with transparency (RGBA, LA, PA, palette or greyscale with a
    transparent colour) is composited on white, because a model never sees alpha and black is what a
    naive ``convert`` would show; greyscale, CMYK and YCbCr are converted; 16-bit greyscale is scaled to
    8 bits (``value / 257``) instead of being clipped to white.

    With ``min_side``, a JPEG much larger than needed is decoded at a reduced scale (libjpeg's DCT-domain
    scaling through Pillow's ``draft``: 1/2, 1/4 or 1/8), the largest reduction that keeps the shorter side
    at least ``min_side`` and divides both sides exactly (a partial last block would shift the image by a
    fraction of a pixel after the model's resize; camera sizes are multiples of 8 or 16). A 12-megapixel photo headed for a 224 px model then decodes 4-8x faster, and the
    model's own resize sees nearly the same pixels (docs/benchmarks.md states the measured difference).
    Every guard runs as without it: the pixel limit is checked on the stored size, before any decoding.

    Args:
        path: Image file.
        max_pixels: Largest accepted ``width * height``, checked from the header before any decoding so a
            decompression bomb costs nothing.
        min_side: Shortest side the caller needs (the model's input side, or more); None decodes at full
            size. Formats other than JPEG always decode at full size.

    Returns:
        A fully loaded RGB image, independent of the file (which is closed).

    Raises:
        ImageLoadError: missing, empty, not an image, too large, truncated or corrupt.
    """
    img = _open_checked(path, max_pixels)
    with img:
        if min_side is not None and img.format == "JPEG":
            _draft(img, min_side)
        _decode(img, path)
        try:
            ImageOps.exif_transpose(img, in_place=True)  # a copy of the whole picture only if it is rotated
            rgb = _to_rgb(img)
        except (OSError, ValueError) as exc:
            raise ImageLoadError(path, f"cannot convert mode {img.mode} to RGB ({exc})") from exc
        return _detached(img) if rgb is img else rgb


def _detached(img: Image.Image) -> Image.Image:
    """``img.copy()`` without copying the pixels: a plain image holding the decoded pixels, which survives
    ``img.close()``; a real copy where Pillow memory-mapped the pixels from the file (closing unmaps them)."""
    return img._new(img.im) if getattr(img, "map", None) is None else img.copy()


def probe_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Check that an image would load, without keeping its pixels.

    The whole file is still decoded (truncation only shows then), but JPEGs are decoded at reduced scale
    (``draft``), which reads every byte yet is several times faster for large photos.

    Args:
        path: Image file.
        max_pixels: Largest accepted ``width * height`` (see :func:`load_image`).

    Returns:
        ``(width, height)`` of the stored image, before EXIF rotation.

    Raises:
        ImageLoadError: exactly when :func:`load_image` would.
    """
    img = _open_checked(path, max_pixels)
    with img:
        size = img.size
        if img.format == "JPEG":
            img.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
        _decode(img, path)
        try:
            _to_rgb(img)
        except (OSError, ValueError) as exc:
            raise ImageLoadError(path, f"cannot convert mode {img.mode} to RGB ({exc})") from exc
    return size


def _draft(img: Image.Image, min_side: int) -> None:
    """Ask the JPEG decoder for the largest exact 1/s reduction (s in 8, 4, 2) keeping both sides >= min_side."""
    width, height = img.size
    for s in (8, 4, 2):
        if width % s == 0 and height % s == 0 and min(width, height) // s >= min_side:
            # Pillow's draft picks s = min(width // w, height // h) rounded down to 8, 4, 2 or 1: exactly s here
            img.draft(None, (width // s, height // s))
            return


def read_image_bytes(path: Path) -> bytes:
    """The stored bytes of an image: a file's, or a WebDataset shard member's (``<dir>/00003.tar/000123.jpg``).

    The one reader of image bytes: decoding, the content hashes of the feature and augmentation caches,
    the shard converter and serve all read through it, so a catalogue read from shards
    (:mod:`cliptune.data.shards`) is used exactly like a folder.

    Raises:
        ImageLoadError: missing, not a regular file, unreadable, or a shard sample without that member.
    """
    data = _shard_bytes(path)
    if data is not None:
        return data
    _check_file(path)
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ImageLoadError(path, f"cannot read image ({exc.strerror or exc})") from exc


def _shard_bytes(path: Path) -> bytes | None:
    """A shard member's bytes when ``path`` runs through a tar (``<dir>/00003.tar/000123.jpg``), else None."""
    from cliptune.data import shards  # imports the catalogue reader, which does not need images

    found = shards.shard_member(path)
    if found is None:
        return None
    try:
        return shards.read_member(*found)
    except shards.ShardMemberError as exc:
        raise ImageLoadError(path, exc.reason) from exc


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ImageLoadError(path, "file not found")
    if not path.is_file():
        raise ImageLoadError(path, "not a regular file")


_OPEN_LOCK = threading.Lock()


def _open_checked(path: Path, max_pixels: int) -> Image.Image:
    # Pillow's own guard must never pre-empt ours: only ever raise its limit, never lower it.
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels
    data = _shard_bytes(path)  # a shard member is decoded from its bytes, a file from the file (lazily)
    if data is None:
        _check_file(path)
    source: Path | io.BytesIO = path if data is None else io.BytesIO(data)
    if (path.stat().st_size if data is None else len(data)) == 0:
        raise ImageLoadError(path, "empty file (0 bytes)")
    try:
        # catch_warnings swaps the process-wide filter list, which is not thread-safe (batches decode on
        # several threads); opening reads only the header, so serialising it costs next to nothing
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(source)
    except Image.DecompressionBombError as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{int(found.group(1)):,}" if found else "more"
        raise ImageLoadError(path, f"image too large: {pixels} pixels > limit {max_pixels:,}") from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(path, "not an image (unrecognised format)") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _decode_error(path, exc, "unreadable image header") from exc
    width, height = img.size
    if width * height > max_pixels:
        img.close()
        raise ImageLoadError(
            path, f"image too large: {width} x {height} = {width * height:,} pixels > limit {max_pixels:,}"
        )
    return img


def _decode(img: Image.Image, path: Path) -> None:
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _decode_error(path, exc, "corrupt image data") from exc


def _decode_error(path: Path, exc: Exception, otherwise: str) -> ImageLoadError:
    if "truncated" in str(exc).lower() or isinstance(exc, EOFError):
        return ImageLoadError(path, f"truncated image ({exc})")
    return ImageLoadError(path, f"{otherwise} ({exc})")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _SIXTEEN_BIT_MODES:
        # convert("L") clips 16-bit values at 255 (white); scale the 0..65535 range instead.
        wide = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")
