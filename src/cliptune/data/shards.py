"""WebDataset shards as a catalogue: tar files of samples, each an image member plus a ``.json`` member.

The layout is the one open_clip and img2dataset read and write at scale: a sample is every member sharing a
*key* (the member name up to the first dot of its base name), e.g. ``000123.jpg`` + ``000123.json``. A
catalogue spec naming tar files (``shards/{00000..00099}.tar``, a local path or an fsspec URL such as
``s3://bucket/shards/{0..9}.tar``) is read by :func:`read_shards` into a normal
:class:`~cliptune.data.catalogue.Catalogue`:

- one sequential pass over each shard reads only the headers and the JSON members; image members are
  skipped by seeking and remembered as ``(offset, size)`` in a per-process member index, so no shard is
  ever extracted. A shard with a *sidecar index* beside it (``00003.tar.idx.json``, written by
  :func:`write_shards` and :func:`index_shards`) is not read at all: the sidecar records the member index
  and each sample's image member and JSON, and is trusted only when the size it records is the shard's
  size (one stat, or a HEAD request). Images interleave with the JSON members, so the pass over a remote
  shard fetches nearly all of it; the sidecar is a few hundred bytes per sample. A sidecar that is stale
  or damaged (other size, bad JSON, other version, a member outside the shard) is never used silently:
  a :class:`ShardIndexWarning` says why (once per process) and the shard is scanned as without one;
- each row's ``file_name`` is ``<shard file name>/<member name>`` (``00003.tar/000123.jpg``) and
  :meth:`Catalogue.image_path` turns it into ``<shard folder>/00003.tar/000123.jpg``: a path *through* the
  tar file. :func:`cliptune.data.images.read_image_bytes`, the one reader of image bytes, sends such paths
  to :func:`read_member`, which seeks to the member and reads its bytes (random access, so training
  shuffles over shards without extracting them). A worker process that never saw the pass rebuilds a
  shard's member index on first use, from the headers alone (JSON members are not read again);
- each process keeps its last :data:`OPEN_SHARDS` shards open for those reads (least recently used
  closed first, all closed at exit; entries keyed by process id, so a forked DataLoader worker opens its
  own and never moves its parent's file offset), so a remote shard is opened once per process, not once
  per image. That handle is the process's only open of the shard: a process that never saw the pass (a
  spawned DataLoader worker) rebuilds the member index through it, or from the sidecar when it fits.

Only metadata is held in memory: the rows, and per shard the member index (name -> offset, size).

Samples that cannot become a good row stay rows (reading never drops one) and are named by their
``file_name``, i.e. by shard and key: a sample without an image member gets ``<shard>/<key>`` and the
image check says so; a JSON member that is missing, unparseable or not an object becomes a row without a
caption whose problem :func:`~cliptune.data.check.check_catalogue` reports (``Catalogue.problems``). A tar
that is cut short or corrupt raises :class:`CorruptShardError` naming the shard and
the byte offset.

:func:`write_shards` converts a folder catalogue (``cliptune data shard``), with a sidecar per shard;
:func:`index_shards` writes the sidecars of shards made by other tools (``cliptune data index-shards``).

Example:
    >>> from cliptune.data.catalogue import read_catalogue
    >>> from cliptune.data.synthetic.fashion import render_fashion
    >>> folder = read_catalogue(render_fashion(Path("data/fashion"), n=4))
    >>> write_shards(folder, Path("data/fashion-shards"), shard_size=3)
    'data/fashion-shards/{00000..00001}.tar'
    >>> read_catalogue(Path("data/fashion-shards/{00000..00001}.tar")).rows["file_name"].tolist()
    ['00000.tar/000000.png', '00000.tar/000001.png', '00000.tar/000002.png', '00001.tar/000003.png']
"""

from __future__ import annotations

import atexit
import base64
import binascii
import json
import math
import os
import re
import tarfile
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, TypeGuard, cast

import numpy as np
import pandas as pd

from cliptune.data.catalogue import Catalogue, CatalogueError, attribute_columns, require_columns

__all__ = [
    "COMPRESSED_TAR_SUFFIXES",
    "IMAGE_EXTENSIONS",
    "OPEN_SHARDS",
    "INDEX_SUFFIX",
    "CompressedShardError",
    "CorruptShardError",
    "ShardIndexMismatchError",
    "ShardIndexWarning",
    "ShardOutputExistsError",
    "ShardWriteError",
    "ShardMemberError",
    "expand_pattern",
    "index_path",
    "index_shards",
    "is_shard_spec",
    "read_member",
    "read_shards",
    "shard_member",
    "write_shard_index",
    "write_shards",
]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
"""Member extensions read as a sample's image (WebDataset's names; other members such as ``.txt`` are ignored)."""

COMPRESSED_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
"""Compressed tars: recognised in a shard pattern only to be refused (:class:`CompressedShardError`)."""

INDEX_SUFFIX = ".idx.json"
"""A shard's sidecar index lies beside it under the shard's name plus this: ``00003.tar.idx.json``."""

_INDEX_FORMAT = "cliptune-shard-index"
_INDEX_VERSION = 1
_BLOCK = 512  # a tar header block
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):/+(.*)$")


class CorruptShardError(CatalogueError):
    """A shard that is cut short or damaged: what was read of it cannot be trusted to hold every sample.

    Attributes:
        shard: The shard (path or URL).
        offset: The byte offset where reading failed.
    """

    def __init__(self, shard: str, offset: int, detail: str) -> None:
        super().__init__(f"{shard}: {detail}")
        self.shard, self.offset, self.detail = shard, offset, detail

    def __reduce__(self) -> tuple[type[CorruptShardError], tuple[str, int, str]]:
        return type(self), (self.shard, self.offset, self.detail)


class CompressedShardError(CatalogueError):
    """A shard that is a compressed tar (``.tar.gz``, ``.tgz``, ...), which cannot be read as a shard.

    Images are read by seeking to their member (random access, so training shuffles without extracting);
    a compressed stream has no offsets to seek to: each read would decompress everything before its
    member, so a shuffled epoch over a 1 GB shard would decompress terabytes. Refused up front, with the
    plain ``.tar`` name decompressing gives, rather than read that slowly.

    Attributes:
        shard: The compressed shard (path or URL).
        plain: The name of the same shard decompressed, e.g. ``00003.tar`` for ``00003.tar.gz``.
    """

    def __init__(self, shard: str) -> None:
        name = _base(shard)
        suffix = next(x for x in COMPRESSED_TAR_SUFFIXES if name.lower().endswith(x))
        self.shard, self.plain = shard, name[: -len(suffix)] + ".tar"
        super().__init__(
            f"{shard}: a compressed tar cannot be read as a shard (images are read by seeking to their "
            f"member, which a compressed stream cannot do); shards must be plain .tar files: decompress it "
            f"(to {self.plain}) and name the .tar files"
        )

    def __reduce__(self) -> tuple[type[CompressedShardError], tuple[str]]:
        return type(self), (self.shard,)


class ShardWriteError(CatalogueError):
    """A folder catalogue that cannot be written as shards (an image format WebDataset does not name, an
    output folder that already holds shards)."""


class ShardOutputExistsError(ShardWriteError):
    """The output folder already holds ``.tar`` files: new shards would mix with (or overwrite) old ones."""


class ShardMemberError(CatalogueError):
    """A shard member that cannot be read: the shard is gone, or the sample has no such member.

    Attributes:
        shard: The shard (path or URL).
        member: The member name inside it.
        reason: Why, e.g. ``"sample has no image member (.jpg, .jpeg, .png, .webp)"``.
    """

    def __init__(self, shard: str, member: str, reason: str) -> None:
        super().__init__(f"{shard}: {member}: {reason}")
        self.shard, self.member, self.reason = shard, member, reason

    def __reduce__(self) -> tuple[type[ShardMemberError], tuple[str, str, str]]:
        return type(self), (self.shard, self.member, self.reason)  # picklable (DataLoader workers)


class ShardIndexWarning(UserWarning):
    """A shard's sidecar index that is not used, because it is stale or damaged: the shard is scanned instead.

    Scanning is always right (the tar is the truth), only slower, so a bad sidecar costs time, never rows;
    it is said once per process and sidecar, so the user can rewrite it (``cliptune data index-shards``).

    Attributes:
        shard: The shard (path or URL).
        sidecar: The sidecar index (path or URL).
        reason: Why it was not used, e.g. ``"made for a shard of 1024 bytes, the shard has 2048"``.
    """

    def __init__(self, shard: str, sidecar: str, reason: str) -> None:
        super().__init__(f"{sidecar}: not used, scanning {shard} instead: {reason}")
        self.shard, self.sidecar, self.reason = shard, sidecar, reason


class ShardIndexMismatchError(CatalogueError):
    """A shard whose sidecar index does not describe it: the header before a member's recorded offset is not
    that member's. The shard was rewritten to the very size the sidecar records (tar pads to 10 KiB
    records, so this can happen); the catalogue read from that sidecar cannot be trusted either.

    Attributes:
        shard: The shard (path or URL).
        member: The member read.
        offset: The data offset the sidecar gives for it.
    """

    def __init__(self, shard: str, member: str, offset: int) -> None:
        super().__init__(
            f"{index_path(shard)}: does not match the shard: no header of {member} before offset {offset} "
            "(the shard was rewritten after its sidecar index)"
        )
        self.shard, self.member, self.offset = shard, member, offset

    def __reduce__(self) -> tuple[type[ShardIndexMismatchError], tuple[str, str, int]]:
        return type(self), (self.shard, self.member, self.offset)


def expand_pattern(spec: str | Path) -> list[str]:
    """The shards a spec names: brace patterns expanded (``{00000..00002}`` gives three), in order.

    A local spec stays a path; an fsspec URL (``memory://``, ``s3://``, ...) stays a URL, even after a
    ``Path`` folded its ``//`` into ``/`` (config fields are paths); ``file://`` URLs become plain paths.

    Example:
        >>> expand_pattern("shards/{00000..00002}.tar")
        ['shards/00000.tar', 'shards/00001.tar', 'shards/00002.tar']
    """
    from braceexpand import braceexpand

    return [_location(s) for s in braceexpand(str(spec))]


def is_shard_spec(spec: str | Path) -> bool:
    """Whether a catalogue spec names WebDataset shards (every name it expands to ends with ``.tar``, or
    with one of :data:`COMPRESSED_TAR_SUFFIXES`, which :func:`read_shards` then refuses by name)."""
    text = str(spec)
    if ".tar" not in text and ".tgz" not in text:
        return False
    try:
        names = expand_pattern(text)
    except Exception:  # braceexpand's UnbalancedBracesError and friends: not a pattern we understand
        return False
    return bool(names) and all(n.endswith(".tar") or _compressed(n) for n in names)


def shard_member(path: str | Path) -> tuple[str, str] | None:
    """``(shard, member)`` when a path points through a tar file (``<dir>/00003.tar/000123.jpg``), else None.

    Cheap for ordinary paths (a string test), so every image read may ask.
    """
    parts = PurePosixPath(str(path)).parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i].endswith(".tar"):
            shard = _location(_join(parts[: i + 1]))
            if _is_url(shard) or os.path.isfile(shard):
                return shard, "/".join(parts[i + 1 :])
    return None


def read_member(shard: str, member: str) -> bytes:
    """The bytes of one member of a shard, by seeking to it (the shard's member index is built once).

    The shard stays open between reads: each process keeps its last :data:`OPEN_SHARDS` shards open
    (least recently used closed first, all closed at exit), so random reads of a remote shard cost one
    range request each, not an open (and, for a URL, a metadata request) each.

    Raises:
        ShardMemberError: the shard cannot be opened, or has no such member (the reason says which).
        CorruptShardError: the shard is truncated or corrupt (naming the byte offset).
    """
    while True:
        handle = _handle(shard)
        with handle.lock:  # one seek + read at a time per handle (serve reads from a thread pool)
            if handle.closed:  # evicted by another thread between the look-up and here: take a fresh one
                continue
            found = _member_index(shard, handle).get(member)  # built through this handle if need be
            # a sidecar's offset is checked against the member's own header, the block just before its data
            # (one read, the same request): a shard rewritten to the very same size is caught, not misread
            checked = handle.key in _FROM_SIDECAR
            if found is not None:
                start = found[0] - _BLOCK if checked else found[0]
                handle.file.seek(start)
                data = handle.file.read(found[0] + found[1] - start)
        break
    if found is None:
        if "." not in PurePosixPath(member).name:  # the key alone: the reader found no image member
            reason = f"sample has no image member ({', '.join('.' + e for e in IMAGE_EXTENSIONS)})"
        else:
            reason = "no such member in the shard"
        raise ShardMemberError(shard, member, reason)
    offset, size = found
    header, data = (data[:_BLOCK], data[_BLOCK:]) if checked else (b"", data)
    if len(data) != size:
        raise CorruptShardError(
            shard, offset + len(data), f"truncated at offset {offset + len(data)} (member {member})"
        )
    if checked and not _header_fits(header, member, size):
        raise ShardIndexMismatchError(shard, member, offset)
    return bytes(data)


def _header_fits(header: bytes, member: str, size: int) -> bool:
    """Whether a tar header block is ``member``'s: a valid header of its size whose name it starts with
    (a long name is cut in the header; a PAX tar's non-ASCII name is replaced there, so only sizes count)."""
    try:
        info = tarfile.TarInfo.frombuf(header, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError:
        return False
    return info.size == size and bool(info.name) and (member.startswith(info.name) or not member.isascii())


@dataclass(frozen=True)
class _Sample:
    shard: str
    key: str
    image: str | None  # member name
    meta: bytes | None  # the JSON member's bytes


def read_shards(spec: str | Path, text_column: str = "text") -> Catalogue:
    """Read a catalogue from WebDataset shards: one pass per shard over headers and JSON members.

    Each sample becomes one row per metadata object: a JSON member holding an object is one row, one holding
    a list of objects (an image with several captions, as :func:`write_shards` writes it) one row per
    object. Rows are numbered 1.. in shard and member order. A broken sample is a row too (see the module
    docstring), never dropped.

    Args:
        spec: Shard pattern, e.g. ``shards/{00000..00099}.tar`` or ``memory://cat/{0..2}.tar``.
        text_column: The caption column.

    Returns:
        A :class:`Catalogue` whose ``root`` and ``metadata_path`` are the spec, ``image_root`` the folder of
        the shards (``file_name`` values are ``<shard file name>/<member>``), and ``problems`` the samples'
        own faults by row number.

    Raises:
        CompressedShardError: a shard is a compressed tar (``.tar.gz``, ...), naming the first one.
        CorruptShardError: a shard is truncated or corrupt (naming shard and offset).
        CatalogueError: a shard is missing, or the shards lie in several folders.
    """
    shards = expand_pattern(spec)
    compressed = [s for s in shards if _compressed(s)]
    if compressed:
        raise CompressedShardError(compressed[0])
    folders = {_parent(s) for s in shards}
    if len(folders) != 1:
        raise CatalogueError(f"{spec}: shards must lie in one folder, found {', '.join(sorted(folders))}")
    records: list[dict[str, Any]] = []
    problems: dict[int, str] = {}
    for shard in shards:
        for sample in _samples(shard):
            name = _base(shard) + "/" + (sample.image or sample.key)
            metas, problem = _metadata(sample.meta)
            for meta in metas:
                records.append({**meta, "file_name": name})
                if problem:
                    problems[len(records)] = problem
    rows: pd.DataFrame = pd.DataFrame.from_records(records) if records else pd.DataFrame({"file_name": []})
    rows = rows[["file_name", *[c for c in rows.columns if c != "file_name"]]]
    rows = rows.where(rows.notna(), np.nan)  # JSON null is a missing value, as an empty CSV cell
    rows.insert(0, "row", pd.Series(np.arange(1, len(rows) + 1), dtype="int64"))
    spec_path = Path(str(spec))
    if text_column not in rows.columns:
        rows[text_column] = np.nan  # every sample lacks it: each row is then rejected, naming its sample
    require_columns(rows, ("file_name",), spec_path)
    return Catalogue(
        root=spec_path,
        metadata_path=spec_path,
        rows=rows,
        attributes=attribute_columns(rows, text_column),
        image_root=Path(next(iter(folders))),
        text_column=text_column,
        problems=problems,
    )


def write_shards(
    catalogue: Catalogue,
    out: Path,
    shard_size: int,
    group_column: str = "group",
    progress: Callable[[Iterator[Any], int], Iterator[Any]] | None = None,
) -> str:
    """Convert a folder catalogue into WebDataset shards, ``out/00000.tar`` onwards.

    One sample per image (in the order of each image's first row), key ``000000``, ``000001``, ...: the
    image member keeps the file's bytes and its extension (``.jpg``, ``.png``, ...), the JSON member holds
    the image's row (all columns but ``row`` and ``file_name``), or the list of its rows when the image has
    several captions. Empty cells are JSON nulls. A row without a group gets its original ``file_name`` as
    group, which is the group it had (:func:`~cliptune.data.splits.group_ids`), so the shards split like
    the folder. An image that cannot be read is written as a sample without an image member: the check
    then names it by shard and key.

    Args:
        catalogue: The folder catalogue (every row is converted; run the check first to drop bad rows).
        out: Folder for the shards (created).
        shard_size: Samples (images) per shard, >= 1.
        group_column: The column whose missing values get the original ``file_name``.
        progress: Wraps the iteration over images (``(items, total) -> items``), e.g. a progress bar.

    Returns:
        The pattern naming the shards, e.g. ``out/{00000..00002}.tar``, to put in ``data.catalogue``.

    Raises:
        ValueError: ``shard_size`` < 1.
        ShardWriteError: a row without a ``file_name``, an image whose extension is not one of
            :data:`IMAGE_EXTENSIONS`, or an ``out`` that already holds ``.tar`` files.
    """
    from webdataset import TarWriter  # imported here: it pulls in torch's data utilities

    from cliptune.data.images import ImageLoadError, read_image_bytes

    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    rows = catalogue.rows
    by_image: dict[str, list[dict[str, Any]]] = {}
    for record in rows.to_dict("records"):
        number, name = record.pop("row"), record.pop("file_name")
        if not isinstance(name, str) or not name.strip():
            raise ShardWriteError(f"{catalogue.metadata_path}: row {number} has no file_name")
        meta = {str(k): _plain(v) for k, v in record.items()}
        if meta.get(group_column) is None:
            meta[group_column] = str(name)
        by_image.setdefault(str(name), []).append(meta)
    names = list(by_image)
    for name in names:
        if PurePosixPath(name).suffix.lower().lstrip(".") not in IMAGE_EXTENSIONS:
            raise ShardWriteError(
                f"{catalogue.metadata_path}: {name}: a shard sample's image must be "
                f"{', '.join('.' + e for e in IMAGE_EXTENSIONS)}"
            )
    n_shards = max(1, math.ceil(len(names) / shard_size))
    width = max(6, len(str(len(names) - 1)))
    shard_width = max(5, len(str(n_shards - 1)))
    out = Path(out)
    if out.is_dir() and any(out.glob("*.tar")):
        raise ShardOutputExistsError(f"{out}: already holds .tar files")
    out.mkdir(parents=True, exist_ok=True)
    items: Iterator[tuple[int, str]] = iter(enumerate(names))
    if progress is not None:
        items = progress(items, len(names))
    writer: Any = None
    written: list[Path] = []
    try:
        for i, name in items:
            if i % shard_size == 0:
                if writer is not None:
                    writer.close()
                written.append(out / f"{i // shard_size:0{shard_width}d}.tar")
                writer = TarWriter(str(written[-1]), encoder=False, mtime=0)
            metas = by_image[name]
            sample: dict[str, Any] = {"__key__": f"{i:0{width}d}"}
            sample["json"] = json.dumps(metas[0] if len(metas) == 1 else metas, ensure_ascii=False).encode()
            try:
                sample[PurePosixPath(name).suffix.lower().lstrip(".")] = read_image_bytes(
                    catalogue.image_path(name)
                )
            except ImageLoadError:
                pass  # a sample without an image: the check names it by shard and key
            writer.write(sample)
    finally:
        if writer is not None:
            writer.close()
    if not names:  # an empty catalogue is one empty shard, so the pattern still names a file
        written.append(out / f"{0:0{shard_width}d}.tar")
        TarWriter(str(written[-1]), encoder=False, mtime=0).close()
    for shard in written:  # each shard complete on disk: its sidecar describes exactly those bytes
        write_shard_index(shard)
    last = f"{n_shards - 1:0{shard_width}d}"
    first = f"{0:0{shard_width}d}"
    return str(out / (f"{first}.tar" if n_shards == 1 else f"{{{first}..{last}}}.tar"))


def index_path(shard: str | Path) -> str:
    """Where a shard's sidecar index lies: beside it, its name plus :data:`INDEX_SUFFIX`.

    Example:
        >>> index_path("s3://bucket/shards/00003.tar")
        's3://bucket/shards/00003.tar.idx.json'
    """
    return _location(str(shard)) + INDEX_SUFFIX


def write_shard_index(shard: str | Path) -> str:
    """Scan one shard (headers and JSON members, as the reading pass does) and write its sidecar index.

    The sidecar (JSON, see docs/catalogues.md) records a format tag and version, the shard's size in bytes,
    every file member's ``(name, data offset, size)`` and each sample's key, image member and raw JSON
    metadata: all the reading pass needs, so a later pass reads the sidecar and one stat of the shard
    instead of walking the tar (which, with images interleaved, downloads a remote shard whole). Written
    atomically: a local file by rename, a URL by one upload.

    Args:
        shard: The shard (path or fsspec URL).

    Returns:
        The sidecar's location, ``<shard>.idx.json``.

    Raises:
        CompressedShardError: a compressed tar.
        CorruptShardError: the shard is truncated or corrupt.
        CatalogueError: the shard is missing.
    """
    location = _location(str(shard))
    if _compressed(location):
        raise CompressedShardError(location)
    ends: list[int] = []
    with _open(location) as f:
        size = f.seek(0, os.SEEK_END)  # the size of the bytes scanned, from the same open file
        index, grouped = _scan(location, f, metadata=True, ends=ends)
    document = {
        "format": _INDEX_FORMAT,
        "version": _INDEX_VERSION,
        "shard_bytes": size,
        "end": ends[0],
        "members": [[name, offset, length] for name, (offset, length) in index.items()],
        "samples": [
            {"key": key, "image": e["image"], **_meta_field(e["meta"])} for key, e in grouped.items()
        ],
    }
    data = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    target = index_path(location)
    if _is_url(target):
        import fsspec

        fs, path = fsspec.core.url_to_fs(target)
        fs.pipe_file(path, data)  # one upload: an object store shows the old object or the new, never half
    else:
        from cliptune.rundir import write_bytes_atomic

        write_bytes_atomic(Path(target), data)
    return target


def index_shards(
    spec: str | Path, progress: Callable[[Iterator[Any], int], Iterator[Any]] | None = None
) -> list[str]:
    """Write the sidecar index of every shard a pattern names (shards made by img2dataset, webdataset's
    ``TarWriter`` or any other tool; :func:`write_shards` writes its own).

    Args:
        spec: Shard pattern, e.g. ``shards/{00000..00099}.tar`` or ``s3://bucket/{0..9}.tar``.
        progress: Wraps the iteration over shards (``(items, total) -> items``), e.g. a progress bar.

    Returns:
        The sidecars written, in shard order.

    Raises:
        CatalogueError: ``spec`` is not a shard pattern, or a shard is missing.
        CompressedShardError: a shard is a compressed tar (checked before any is read).
        CorruptShardError: a shard is truncated or corrupt (the sidecars before it are written).
    """
    if not is_shard_spec(spec):
        raise CatalogueError(f"{spec}: not a shard pattern (every name it expands to must end in .tar)")
    shards = expand_pattern(spec)
    compressed = [s for s in shards if _compressed(s)]
    if compressed:
        raise CompressedShardError(compressed[0])
    items: Iterator[str] = iter(shards)
    if progress is not None:
        items = progress(items, len(shards))
    return [write_shard_index(shard) for shard in items]


# ---------------------------------------------------------------------------------------------------------
# reading


def _samples(shard: str) -> Iterator[_Sample]:
    """The samples of one shard in member order; records every member's data offset in the index.

    From the shard's sidecar index when it has one that fits (a read of the sidecar and a stat of the
    shard, no byte of the shard), else from a pass over the shard."""
    indexed = None
    raw = _sidecar_bytes(shard)
    if raw is not None:
        try:
            key = _cache_key(shard)  # the one stat (a HEAD request, remote) that vouches for the sidecar
        except ShardMemberError as exc:
            raise CatalogueError(f"{shard}: shard not found") from exc
        indexed = _from_sidecar(shard, raw, key[1])
        if indexed is not None:
            _FROM_SIDECAR.add(key)
    if indexed is None:
        with _open(shard) as f:
            indexed = _scan(shard, f, metadata=True)
        key = _cache_key(shard)
        _FROM_SIDECAR.discard(key)
    index, grouped = indexed
    _INDEX[key] = index
    for key_, entry in grouped.items():
        yield _Sample(shard, key_, entry["image"], entry["meta"])


def _scan(
    shard: str, f: IO[bytes], *, metadata: bool, ends: list[int] | None = None
) -> tuple[dict[str, tuple[int, int]], dict[str, dict[str, Any]]]:
    """One pass over a shard's headers: its member index, and its samples' image member and JSON bytes
    (read only with ``metadata``; a worker rebuilding the index needs none). ``ends`` receives the offset
    of the end-of-archive marker."""
    index: dict[str, tuple[int, int]] = {}
    grouped: dict[str, dict[str, Any]] = {}
    for info in _members(shard, f, ends):
        name = info.name
        index[name] = (info.offset_data, info.size)
        key, ext = _key(name), _ext(name)
        entry = grouped.setdefault(key, {"image": None, "meta": None})
        if ext == "json" and metadata:
            f.seek(info.offset_data)
            entry["meta"] = f.read(info.size)
        elif ext in IMAGE_EXTENSIONS and entry["image"] is None:
            entry["image"] = name
    return index, grouped


def _members(shard: str, f: IO[bytes], ends: list[int] | None = None) -> Iterator[tarfile.TarInfo]:
    """The file members of a tar, headers only (data is skipped by seeking); refuses a cut or corrupt one.
    Appends the offset of the end-of-archive marker to ``ends`` once the last member is past."""
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    try:
        tar = tarfile.open(fileobj=f, mode="r:")  # closed below; the file is the caller's
    except tarfile.ReadError as exc:
        raise CorruptShardError(shard, 0, f"not a tar file, or corrupt at offset 0 ({exc})") from exc
    try:
        while True:
            try:
                info = tar.next()
            except (tarfile.TarError, EOFError, OSError) as exc:
                raise CorruptShardError(
                    shard, tar.offset, f"corrupt tar at offset {tar.offset} ({exc})"
                ) from exc
            if info is None:
                break
            if info.offset_data + info.size > size:
                raise CorruptShardError(
                    shard,
                    size,
                    f"truncated at offset {size}: member {info.name} needs bytes "
                    f"{info.offset_data}..{info.offset_data + info.size}",
                )
            if info.isfile():
                yield info
        # tarfile stops quietly at a header it cannot read, or at the end of a file cut between members:
        # a whole tar ends with two zero blocks (the end-of-archive marker), and only zeros follow them.
        end = tar.offset
        f.seek(end)
        rest = f.read(min(size - end, 64 * _BLOCK))
        if size - end < 2 * _BLOCK or rest.strip(b"\0"):
            raise CorruptShardError(shard, end, f"corrupt or truncated tar header at offset {end}")
        if ends is not None:
            ends.append(end)
    finally:
        tar.close()


def _metadata(raw: bytes | None) -> tuple[list[dict[str, Any]], str | None]:
    """A sample's metadata objects, or one empty object and the problem that left it empty."""
    if raw is None:
        return [{}], "sample has no .json metadata member"
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return [{}], f"invalid JSON metadata ({exc})"
    if isinstance(value, dict):
        return [_without_reserved(value)], None
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [_without_reserved(v) for v in value], None
    return [{}], f"JSON metadata is not an object ({type(value).__name__})"


def _without_reserved(meta: dict[str, Any]) -> dict[str, Any]:
    # `row` is the reader's number and `file_name` names the member: a sample cannot set them.
    return {k: v for k, v in meta.items() if k not in ("row", "file_name")}


_INDEX: dict[tuple[str, int, str], dict[str, tuple[int, int]]] = {}
"""Per-process member index: (shard, size, mtime) -> {member name: (data offset, size)}."""
_FROM_SIDECAR: set[tuple[str, int, str]] = set()
"""The :data:`_INDEX` keys whose index came from a sidecar: their reads check each member's header."""


def _member_index(shard: str, handle: _Handle) -> dict[str, tuple[int, int]]:
    """The shard's member index; a process that never read the shard (a spawned DataLoader worker, a fresh
    serve process) builds it from the headers through ``handle``, its one open of the shard. Call with
    ``handle.lock`` held: the pass moves the handle's offset."""
    index = _INDEX.get(handle.key)
    if index is None:
        raw = _sidecar_bytes(shard)
        # a local shard's end is checked through this handle (no second open); a URL's by its own ranged
        # request, which opens nothing and fetches the 1 KiB alone (the handle would read ahead to the end)
        file = None if _is_url(shard) else handle.file
        indexed = _from_sidecar(shard, raw, handle.key[1], file) if raw is not None else None
        (_FROM_SIDECAR.add if indexed is not None else _FROM_SIDECAR.discard)(handle.key)
        index = indexed[0] if indexed is not None else _scan(shard, handle.file, metadata=False)[0]
        _INDEX[handle.key] = index
    return index


# ---------------------------------------------------------------------------------------------------------
# sidecar index

_Indexed = tuple[dict[str, tuple[int, int]], dict[str, dict[str, Any]]]
_WARNED: set[tuple[str, str]] = set()
"""(sidecar, reason) pairs this process has warned about: one warning each, not one per worker read."""


def _meta_field(raw: bytes | None) -> dict[str, str | None]:
    """A JSON member's bytes as sidecar fields: its text, or base64 when it is not UTF-8 (a bad sample the
    reader must still report as the scan would)."""
    if raw is None:
        return {"meta": None}
    try:
        return {"meta": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"meta_base64": base64.b64encode(raw).decode("ascii")}


def _sidecar_bytes(shard: str) -> bytes | None:
    """The shard's sidecar index, or None when it has none (or it cannot be read: said once)."""
    target = index_path(shard)
    try:
        if _is_url(target):
            import fsspec

            fs, path = fsspec.core.url_to_fs(target)
            return bytes(fs.cat_file(path))
        return Path(target).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        _warn_once(shard, f"cannot be read ({exc})")
        return None


def _from_sidecar(shard: str, raw: bytes, size: int, file: IO[bytes] | None = None) -> _Indexed | None:
    """The member index and samples a sidecar records, if it fits the shard (``size`` bytes now); else
    None, after a :class:`ShardIndexWarning` saying why, and the caller scans. ``file``: an open handle of
    the shard to check its end through (the caller holds its lock), so a worker opens the shard once."""
    parsed = _parse_sidecar(raw, size)
    if isinstance(parsed, str):
        _warn_once(shard, parsed)
        return None
    indexed, end = parsed
    # tar pads an archive to 10 KiB records, so a sample appended in the padding keeps the size: it would
    # be written where the end-of-archive marker was. One 1 KiB read there (zeros, or the sidecar is stale)
    # catches that; rewritten members are caught by the header check of every member read.
    try:
        tail = _read_range(shard, end, 2 * _BLOCK, file)
    except OSError as exc:
        _warn_once(shard, f"the shard cannot be read at offset {end} ({exc})")
        return None
    if len(tail) != 2 * _BLOCK or tail.strip(b"\0"):
        _warn_once(shard, f"no end-of-archive marker at offset {end}: members were added since")
        return None
    return indexed


def _read_range(shard: str, start: int, length: int, file: IO[bytes] | None = None) -> bytes:
    """``length`` bytes of a shard from ``start``: through ``file`` when given, else one ranged request for a
    URL (no read-ahead) or a short open of a local file."""
    if file is not None:
        file.seek(start)
        return file.read(length)
    if _is_url(shard):
        import fsspec

        fs, path = fsspec.core.url_to_fs(shard)
        return bytes(fs.cat_file(path, start=start, end=start + length))
    with open(shard, "rb") as f:
        f.seek(start)
        return f.read(length)


def _parse_sidecar(raw: bytes, size: int) -> tuple[_Indexed, int] | str:
    """A sidecar's member index and samples, or the reason it cannot be trusted."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"not valid JSON ({exc})"
    if not isinstance(doc, dict) or doc.get("format") != _INDEX_FORMAT:
        return f"not a {_INDEX_FORMAT} file"
    if doc.get("version") != _INDEX_VERSION:
        return f"version {doc.get('version')!r}; this cliptune reads version {_INDEX_VERSION}"
    if doc.get("shard_bytes") != size:
        return f"made for a shard of {doc.get('shard_bytes')} bytes, the shard has {size} (rewritten since)"
    end = doc.get("end")
    if not _count(end) or end + 2 * _BLOCK > size:
        return f"end-of-archive offset {end!r} is not inside the shard's {size} bytes"
    index: dict[str, tuple[int, int]] = {}
    grouped: dict[str, dict[str, Any]] = {}
    try:
        for name, offset, length in doc["members"]:
            if not (isinstance(name, str) and _count(offset) and _count(length)):
                return f"malformed member entry {[name, offset, length]!r}"
            if offset < _BLOCK or offset + length > end:  # a header block precedes every member's data
                return f"member {name} at bytes {offset}..{offset + length} lies outside the archive's {end}"
            index[name] = (offset, length)
        for sample in doc["samples"]:
            key, image, text, b64 = (
                sample["key"],
                sample["image"],
                sample.get("meta"),
                sample.get("meta_base64"),
            )
            if not isinstance(key, str) or not (image is None or image in index):
                return f"malformed sample entry for key {key!r}"
            if not (text is None or isinstance(text, str)) or not (b64 is None or isinstance(b64, str)):
                return f"malformed metadata of sample {key}"
            meta = text.encode("utf-8") if text is not None else None
            if b64 is not None:
                meta = base64.b64decode(b64, validate=True)
            grouped[key] = {"image": image, "meta": meta}
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:  # wrong shapes, bad base64
        return f"malformed ({type(exc).__name__}: {exc})"
    return (index, grouped), end


def _count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _warn_once(shard: str, reason: str) -> None:
    sidecar = index_path(shard)
    if (sidecar, reason) not in _WARNED:
        _WARNED.add((sidecar, reason))
        warnings.warn(ShardIndexWarning(shard, sidecar, reason), stacklevel=3)


def _cache_key(shard: str) -> tuple[str, int, str]:
    """Identifies a shard's current content, so a rewritten shard is indexed afresh."""
    try:
        if _is_url(shard):
            import fsspec

            fs, path = fsspec.core.url_to_fs(shard)
            info = fs.info(path)
            return shard, int(info.get("size") or 0), str(info.get("mtime") or info.get("created"))
        st = os.stat(shard)
    except OSError as exc:
        raise ShardMemberError(shard, "", f"cannot open shard ({exc})") from exc
    return shard, st.st_size, str(st.st_mtime_ns)


OPEN_SHARDS = 8
"""Shards each process keeps open for member reads (a file descriptor, or a remote file with its read-ahead
buffer, each)."""


@dataclass
class _Handle:
    key: tuple[str, int, str]  # the shard's identity when opened (see _cache_key)
    file: IO[bytes]
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.file.close()


_READ_AHEAD = 1 << 20
_HANDLES: dict[int, OrderedDict[str, _Handle]] = {}
"""Open shards by process id, then by shard, least recently used first. A forked child (a DataLoader
worker) inherits its parent's entries but never reads through or closes them: a forked file descriptor
shares its file offset with the parent, so a seek in one would move the other's read."""
_HANDLES_LOCK = threading.Lock()


def _handle(shard: str) -> _Handle:
    """This process's open handle on ``shard``, opened (and the oldest evicted) if it has none.

    A local shard is stat'ed on every read (cheap) and reopened when it was rewritten; a remote one is
    trusted for as long as it stays open, so a read costs no metadata request.
    """
    with _HANDLES_LOCK:
        mine = _HANDLES.setdefault(os.getpid(), OrderedDict())
        handle = mine.get(shard)
        key = _cache_key(shard) if handle is None or not _is_url(shard) else handle.key
        if handle is not None and handle.key == key:
            mine.move_to_end(shard)
            return handle
        evicted = [mine.pop(shard)] if handle is not None else []
        mine[shard] = handle = _Handle(key, _open_file(shard))
        while len(mine) > max(1, OPEN_SHARDS):
            evicted.append(mine.popitem(last=False)[1])
    for old in evicted:
        old.close()
    return handle


def _close_handles() -> None:
    """Close this process's open shards (at exit, and in tests)."""
    with _HANDLES_LOCK:
        mine = _HANDLES.pop(os.getpid(), OrderedDict())
    for handle in mine.values():
        handle.close()


def _after_fork_in_child() -> None:
    global _HANDLES_LOCK
    _HANDLES_LOCK = threading.Lock()  # another thread of the parent may have held it at the fork


atexit.register(_close_handles)
os.register_at_fork(after_in_child=_after_fork_in_child)


def _open_file(shard: str) -> IO[bytes]:
    try:
        if _is_url(shard):
            import fsspec

            fs, path = fsspec.core.url_to_fs(shard)
            # read-ahead of 1 MiB, not the filesystem's block (fsspec's default 5 MiB): a random member read
            # fetches its member and at most 1 MiB more, and reads in member order share requests
            return cast(IO[bytes], fs.open(path, "rb", block_size=_READ_AHEAD))
        return open(shard, "rb")
    except FileNotFoundError as exc:
        raise ShardMemberError(shard, "", f"cannot open shard ({exc})") from exc


@contextmanager
def _open(shard: str) -> Iterator[IO[bytes]]:
    try:
        if _is_url(shard):
            import fsspec

            with fsspec.open(shard, "rb") as f:
                yield f
        else:
            with open(shard, "rb") as f:
                yield f
    except FileNotFoundError as exc:
        raise CatalogueError(f"{shard}: shard not found") from exc


# ---------------------------------------------------------------------------------------------------------
# names


def _key(name: str) -> str:
    """WebDataset's sample key: the member's folders plus its base name up to the first dot."""
    folder, _, base = name.rpartition("/")
    stem = base.split(".", 1)[0]
    return f"{folder}/{stem}" if folder else stem


def _ext(name: str) -> str:
    base = name.rpartition("/")[2]
    return base.split(".", 1)[1].lower() if "." in base else ""


def _compressed(location: str) -> bool:
    return location.lower().endswith(COMPRESSED_TAR_SUFFIXES)


def _is_url(location: str) -> bool:
    return "://" in location


def _location(text: str) -> str:
    """A shard location: a URL (``memory://x/0.tar``, also when a Path folded it to ``memory:/x``) or a path.

    ``file://`` URLs become plain paths; a path made absolute around a folded URL (``/cwd/memory:/x``) is
    a URL again.
    """
    if ":" not in text:
        return text
    parts = PurePosixPath(text).parts
    for i, part in enumerate(parts):
        if part.endswith(":") and _is_protocol(part[:-1]):
            text = part + "//" + "/".join(parts[i + 1 :]) if i else text
            break
    found = _URL.match(text)
    if not found or not _is_protocol(found.group(1)):  # a folder named "backup:" stays a folder
        return text
    scheme, rest = found.group(1).lower(), found.group(2)
    if scheme == "file":
        return "/" + rest
    return f"{scheme}://{rest}"


def _is_protocol(scheme: str) -> bool:
    import fsspec

    return scheme.lower() in fsspec.available_protocols()


def _join(parts: tuple[str, ...]) -> str:
    return str(PurePosixPath(*parts))


def _parent(location: str) -> str:
    return location.rpartition("/")[0] or "."


def _base(location: str) -> str:
    return location.rpartition("/")[2]


def _plain(value: Any) -> Any:
    """A cell as a JSON value: numpy scalars unwrapped, missing values (NaN, None, NA) as null."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return value
