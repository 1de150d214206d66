"""Tiny tar shards for the shard tests: PNG members and tars written (or appended to) member by member."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from PIL import Image


def png(colour: tuple[int, int, int], size: int = 8) -> bytes:
    """A ``size`` x ``size`` PNG of one colour."""
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def add_members(tar: tarfile.TarFile, members: list[tuple[str, bytes]]) -> None:
    """Add ``(name, bytes)`` file members to an open tar, in order."""
    for name, data in members:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A ustar tar at ``path`` holding ``members`` in order."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        add_members(tar, members)
    return path
