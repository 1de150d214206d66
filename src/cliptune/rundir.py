"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

__all__ = ["write_text_atomic"]


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to a unique temporary file beside ``path`` and rename it into place.

    The rename is atomic on POSIX, so a run killed mid-write leaves the previous file intact; the
    temporary file is removed if writing fails.

    Args:
        path: The destination (its folder must exist).
        text: UTF-8 text to write.

    Returns:
        ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
