"""The run directory's contract and the one atomic writer every part of cliptune uses.

A reader (a resumed run, ``report``, ``search``, a second process) must see the old file or folder or
the new one, never half of one: every file and folder cliptune writes goes through this module.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_folder", "write_bytes_atomic", "write_text_atomic"]


def write_bytes_atomic(path: Path, data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to a unique temporary file beside ``path`` and rename it into place.

    The rename is atomic on POSIX, so a process killed mid-write leaves the previous file intact; the
    temporary file is removed if writing fails.

    Args:
        path: The destination (its folder must exist).
        data: The bytes to write.
        fsync: Flush the file to disk before the rename (for data that must survive a power cut, such as
            the feature cache's shards; run files are cheap to recompute and skip it).

    Returns:
        ``path``.

    Example:
        >>> write_bytes_atomic(tmp_path / "a.bin", b"abc").read_bytes()
        b'abc'
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: Path, text: str, *, fsync: bool = False) -> Path:
    """Write UTF-8 ``text`` atomically (see :func:`write_bytes_atomic`).

    Args:
        path: The destination (its folder must exist).
        text: The text to write.
        fsync: Flush to disk before the rename.

    Returns:
        ``path``.
    """
    return write_bytes_atomic(path, text.encode("utf-8"), fsync=fsync)


@contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """Build a folder under a temporary name beside ``final`` and swap it into place on success.

    The body writes into the yielded folder; when it returns, an existing ``final`` is renamed aside, the
    new folder renamed to ``final`` and the old one deleted (between the two renames, microseconds,
    ``final`` is absent; the old folder is restored if the second rename fails). If the body raises, the
    temporary folder is deleted and ``final`` is untouched.

    Args:
        final: Where the folder should end up (its parent must exist).

    Yields:
        The temporary folder to fill, with ordinary (umask) permissions.

    Example:
        >>> with atomic_folder(tmp_path / "index") as tmp:
        ...     _ = (tmp / "items.jsonl").write_text("{}")
    """
    final = Path(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes the folder private; a run or an index is not
    try:
        yield tmp
        _swap_into_place(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_into_place(tmp: Path, final: Path) -> None:
    if not final.exists():
        tmp.rename(final)
        return
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex}")
    final.rename(old)
    try:
        tmp.rename(final)
    except BaseException:
        old.rename(final)
        raise
    shutil.rmtree(old, ignore_errors=True)
