"""Read an uploaded query image safely: a size limit while streaming, and a real decode before any use.

The body is counted as it arrives, so a 2 GB upload is refused after the limit's worth of bytes instead of
being spooled to disk first. Whether it is an image is decided by decoding it with the catalogue's loader
(:func:`cliptune.data.images.load_image`: header pixel limit before decoding, truncation, EXIF), never by
its file name or content type: an HTML page named ``photo.jpg`` is refused with 415.

The embedding functions read image files, so an upload is written to a private temporary file with a
random name (never the client's file name) that :func:`uploaded_image` deletes when its block ends. The
bytes are decoded once, by the embedding's own loader in the worker thread (the server passes its pixel
limit), not first by a separate check on the event loop; its :class:`ImageLoadError` becomes the 415 here.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

from cliptune.data.images import ImageLoadError
from cliptune.serve.errors import NotAnImageError, UploadTooLargeError

__all__ = ["read_limited", "uploaded_image"]


async def read_limited(chunks: AsyncIterator[bytes], limit: int, what: str) -> bytes:
    """Concatenate ``chunks``, refusing as soon as more than ``limit`` bytes arrived.

    Raises:
        UploadTooLargeError: more than ``limit`` bytes (413).
    """
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise UploadTooLargeError(f"{what} exceeds the limit of {limit:,} bytes")
        parts.append(chunk)
    return b"".join(parts)


@contextmanager
def uploaded_image(data: bytes, name: str, folder: Path) -> Iterator[Path]:
    """A temporary file holding ``data`` for the block to embed; deleted when the block ends.

    The block loads the file with :func:`cliptune.data.images.load_image` (through the embedding), and an
    :class:`ImageLoadError` it raises is turned into the 415 answer naming the client's file.

    Args:
        data: The uploaded bytes.
        name: The client's file name, used in messages only.
        folder: Where the temporary file goes (the server's private folder).

    Raises:
        NotAnImageError: empty, or (raised by the block's loading) not an image, truncated, or too many
            pixels (415), naming the reason.
    """
    if not data:
        raise NotAnImageError(f"the uploaded file {name!r} is empty")
    fd, raw = tempfile.mkstemp(dir=folder, prefix="upload-")
    path = Path(raw)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            yield path
        except ImageLoadError as exc:
            raise NotAnImageError(f"the uploaded file {name!r} is not a usable image: {exc.reason}") from None
    finally:
        path.unlink(missing_ok=True)
