"""The run directory's contract and the one atomic writer every part of cliptune uses.

A run directory is what every part of cliptune shares: ``train`` writes it, ``eval``, ``test``,
``report``, ``compare``, ``sweep`` and ``index`` read it and add to it. Its file names live here, once
(:class:`RunDir`), so a reader and a writer cannot disagree on them::

    runs/<name>/
      config.yaml       the resolved config (``cliptune config show`` format)
      splits.json       {split: [group ids]}; reused by a resumed run and by ``eval``
      rejected.csv      rows left out (``data.on_bad_row: skip``)
      metrics.jsonl     one JSON object per logged step / epoch
      summary.json      best and last metrics, written when training ends
      checkpoints/      resumable training state
      model/            the trained model (``load_model`` reads it)
      eval/<split>.json ``cliptune eval`` results
      suite/<name>.json ``cliptune test`` results
      report.html, report.md  ``cliptune report``

A reader (a resumed run, ``report``, ``search``, a second process) must see the old file or folder or
the new one, never half of one: every file and folder cliptune writes goes through this module.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cliptune.errors import CliptuneError

__all__ = [
    "CHECKPOINTS_DIR",
    "CONFIG_FILE",
    "EVALUATION_FILE",
    "EVAL_DIR",
    "METRICS_FILE",
    "MODEL_DIR",
    "MODEL_INIT_FILE",
    "REJECTED_FILE",
    "REPORT_HTML",
    "REPORT_MD",
    "SPLITS_FILE",
    "SUITE_DIR",
    "SUMMARY_FILE",
    "DamagedFileError",
    "RunDir",
    "atomic_folder",
    "clean_stale_temps",
    "is_run",
    "read_json",
    "read_jsonl",
    "read_metrics",
    "read_summary",
    "write_eval_json",
    "write_suite_json",
    "write_summary",
    "write_bytes_atomic",
    "write_text_atomic",
]

CONFIG_FILE = "config.yaml"
SPLITS_FILE = "splits.json"
REJECTED_FILE = "rejected.csv"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"
MODEL_INIT_FILE = "model_init.safetensors"
EVAL_DIR = "eval"
SUITE_DIR = "suite"
REPORT_HTML = "report.html"
REPORT_MD = "report.md"
# A model-evaluation folder (a bare model measured on a run's splits) is shaped like a run without
# training: this manifest, eval/ and suite/.
EVALUATION_FILE = "evaluation.json"


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory; building one touches no file.

    Attributes:
        path: The run directory (``runs/<name>``).

    Example:
        >>> RunDir(Path("runs/demo")).eval("test")
        PosixPath('runs/demo/eval/test.json')
    """

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))  # accept a str without a second type

    @property
    def config(self) -> Path:
        """``config.yaml``: the resolved config the run was trained with."""
        return self.path / CONFIG_FILE

    @property
    def splits(self) -> Path:
        """``splits.json``: the group ids of each split, so every later command sees the same split."""
        return self.path / SPLITS_FILE

    @property
    def rejected(self) -> Path:
        """``rejected.csv``: the catalogue rows the run left out."""
        return self.path / REJECTED_FILE

    @property
    def metrics(self) -> Path:
        """``metrics.jsonl``: one JSON object per logged step or epoch."""
        return self.path / METRICS_FILE

    @property
    def summary(self) -> Path:
        """``summary.json``: the best and last metrics, written when training ends."""
        return self.path / SUMMARY_FILE

    @property
    def checkpoints(self) -> Path:
        """``checkpoints/``: resumable training state."""
        return self.path / CHECKPOINTS_DIR

    @property
    def model(self) -> Path:
        """``model/``: the trained model folder."""
        return self.path / MODEL_DIR

    @property
    def model_init(self) -> Path:
        """``model_init.safetensors``: the trainable state (and buffers) of the untrained epoch-0 model,
        the "pretrained" end of a WiSE-FT interpolation (a new head has no pretrained weights elsewhere)."""
        return self.path / MODEL_INIT_FILE

    @property
    def evaluation(self) -> Path:
        """``evaluation.json``: the manifest of a model-evaluation folder (which model, whose splits)."""
        return self.path / EVALUATION_FILE

    @property
    def eval_dir(self) -> Path:
        """``eval/``: one ``<split>.json`` per evaluated split."""
        return self.path / EVAL_DIR

    def eval(self, split: str) -> Path:
        """``eval/<split>.json``: ``cliptune eval``'s result for one split."""
        return self.eval_dir / f"{split}.json"

    @property
    def suite_dir(self) -> Path:
        """``suite/``: one ``<suite name>.json`` per behavioural suite run on this model."""
        return self.path / SUITE_DIR

    def suite(self, name: str) -> Path:
        """``suite/<name>.json``: ``cliptune test``'s result for one suite."""
        return self.suite_dir / f"{name}.json"

    @property
    def report(self) -> Path:
        """``report.html``: ``cliptune report``'s page."""
        return self.path / REPORT_HTML

    @property
    def report_md(self) -> Path:
        """``report.md``: the Markdown twin of :attr:`report`."""
        return self.path / REPORT_MD


def is_run(path: Path | str) -> bool:
    """Whether ``path`` is a finished run directory (a ``config.yaml`` file and a ``model/`` folder).

    Commands that take "a run directory or a model" (``eval``, ``test``) decide with this which one they
    were given; a bare model folder has no ``config.yaml`` beside its weights.
    """
    run = RunDir(Path(path))
    return run.config.is_file() and run.model.is_dir()


class DamagedFileError(CliptuneError, ValueError):
    """A run file cliptune wrote cannot be read back (truncated by a kill, edited, or a disk fault).

    A ``ValueError`` too, as the ``json`` error it replaces was, so older callers still catch it.

    Attributes:
        path: The damaged file.
        line: Its damaged line (1-based), or None for a whole-file format.
        reason: What is wrong with it.
    """

    def __init__(self, path: Path, reason: str, line: int | None = None) -> None:
        self.path, self.line, self.reason = Path(path), line, reason
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where} is damaged: {reason}")


def read_json(path: Path) -> Any:
    """Parse one JSON file (``summary.json``, ``eval/<split>.json``, ``suite/<name>.json``).

    Raises:
        DamagedFileError: The file is not valid JSON (it names the file and the line).
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        line = exc.lineno if isinstance(exc, json.JSONDecodeError) else None
        raise DamagedFileError(path, _reason(exc), line) from None


def read_jsonl(path: Path, *, torn_tail: bool = False) -> tuple[list[dict[str, Any]], int | None]:
    """Every JSON object of a JSON-lines file, in order (blank lines skipped).

    A process killed mid-append leaves a partial last line; with ``torn_tail`` such a last line is dropped
    and its number returned, so the caller can warn and rewrite the file. A bad line anywhere else is
    damage no kill makes, and always an error.

    Args:
        path: The file (``metrics.jsonl``).
        torn_tail: Tolerate (drop) an unreadable last line.

    Returns:
        ``(records, dropped_line)``: ``dropped_line`` is the 1-based number of the dropped last line, or None.

    Raises:
        DamagedFileError: A line is not a JSON object (the file and line are named).

    Example:
        >>> _ = (tmp_path / "m.jsonl").write_text('{"step": 1}\\n{"st')
        >>> read_jsonl(tmp_path / "m.jsonl", torn_tail=True)
        ([{'step': 1}], 2)
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DamagedFileError(path, _reason(exc)) from None
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    records: list[dict[str, Any]] = []
    for n, line in numbered:
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not an object")
        except ValueError as exc:
            if torn_tail and n == numbered[-1][0]:
                return records, n
            raise DamagedFileError(path, _reason(exc), n) from None
        records.append(record)
    return records, None


def _reason(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON ({exc.msg} at column {exc.colno})"
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text (byte {exc.start})"
    return f"not a JSON object ({exc})"


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """Every record of ``metrics.jsonl``, in order (blank lines skipped); ``[]`` when there is none.

    Raises:
        DamagedFileError: A line is not a JSON object (named as ``metrics.jsonl:LINE``).
    """
    path = RunDir(run).metrics
    if not path.is_file():
        return []
    return read_jsonl(path)[0]


def read_summary(run: Path) -> dict[str, Any]:
    """The run's ``summary.json``."""
    data: dict[str, Any] = read_json(RunDir(run).summary)
    return data


def write_summary(run: Path, summary: Mapping[str, Any]) -> Path:
    """Write ``summary.json`` atomically (values JSON cannot hold, such as paths, as strings)."""
    return write_text_atomic(RunDir(run).summary, json.dumps(summary, indent=2, default=str))


def write_eval_json(folder: Path, result: Mapping[str, Any]) -> Path:
    """Write one split's evaluation as ``folder/<split>.json`` atomically (``RUN/eval`` or ``--out``).

    NaN and infinity are refused (``ValueError``): the file must be strict JSON for other tools.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(folder / f"{result['split']}.json", json.dumps(result, allow_nan=False) + "\n")


def write_suite_json(folder: Path, result: Mapping[str, Any]) -> Path:
    """Write one suite's result as ``folder/<suite>.json`` atomically (``RUN/suite`` or ``--out``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(folder / f"{result['suite']}.json", json.dumps(result, indent=1) + "\n")


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


# The names the two atomic writers give their temporary files and folders, and the one an old folder
# takes while it is swapped out; `tmp-` followed by 8 characters is what tempfile.mkdtemp made before.
_TEMP_NAME = re.compile(r"^\.(.+)\.(?:[0-9a-f]{32}\.tmp|tmp-[0-9a-f]{32}|tmp-[a-z0-9_]{8}|old-[0-9a-f]{32})$")


def clean_stale_temps(folder: Path, name: str | None = None) -> list[Path]:
    """Delete what interrupted atomic writes left in ``folder`` (and below); the paths cleaned.

    A process killed inside :func:`write_bytes_atomic` or :func:`atomic_folder` leaves its hidden
    temporary file or folder (``.model.tmp-<hex>``, ``.trainer.json.<hex>.tmp``, ``.index.old-<hex>``),
    possibly hundreds of MB of weights. An old folder whose replacement never arrived (a kill between the
    two renames of a swap, where an atomic exchange is not available) is put back under its name instead.
    Only names these writers make are touched, so a user's own hidden files are safe. Call it when
    nothing else writes there: at the start or resume of a run, before an index build.

    Args:
        folder: A run directory (walked with its subfolders), or the folder holding an index.
            Missing is fine.
        name: Only the temporaries of this one file or folder, directly in ``folder`` (an index beside
            other files the user owns); the walk does not go below ``folder`` then.

    Returns:
        The removed (or restored) temporary paths, sorted.

    Example:
        >>> _ = (tmp_path / f".summary.json.{'0' * 32}.tmp").write_text("{")
        >>> [p.name for p in clean_stale_temps(tmp_path)]
        ['.summary.json.00000000000000000000000000000000.tmp']
    """
    cleaned: list[Path] = []
    for root, dirs, files in os.walk(folder):
        for entry in sorted([*dirs, *files]):
            match = _TEMP_NAME.match(entry)
            if not match or (name is not None and match.group(1) != name):
                continue
            path, kept = Path(root) / entry, Path(root) / match.group(1)
            if ".old-" in entry[len(match.group(1)) + 1 :] and not kept.exists():
                path.rename(kept)  # killed between a swap's two renames: the old folder is the one
            elif path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            cleaned.append(path)
        dirs[:] = [] if name is not None else [d for d in dirs if not _TEMP_NAME.match(d)]
    return sorted(cleaned)


@contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """Build a folder under a temporary name beside ``final`` and swap it into place on success.

    The body writes into the yielded folder; when it returns, an existing ``final`` is renamed aside, the
    new folder renamed to ``final`` and the old one deleted (between the two renames, microseconds,
    ``final`` is absent; the old folder is restored if the second rename fails). If the body raises, the
    temporary folder is deleted and ``final`` is untouched. A process killed meanwhile leaves the
    temporary folder behind: :func:`clean_stale_temps` removes it on the next start.

    Args:
        final: Where the folder should end up (its parent must exist).

    Yields:
        The temporary folder to fill, made with ``os.mkdir`` so it and everything in it follow the umask
        like every other file cliptune writes (``tempfile.mkdtemp`` would make it private).

    Example:
        >>> with atomic_folder(tmp_path / "index") as tmp:
        ...     _ = (tmp / "items.jsonl").write_text("{}")
    """
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex}")
    tmp.mkdir()
    try:
        yield tmp
        _swap_into_place(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_into_place(tmp: Path, final: Path) -> None:
    if not final.exists():
        tmp.rename(final)
        return
    if _exchange(tmp, final):  # one atomic step: `final` is the old folder, then the new, never absent
        old = tmp
    else:  # two renames: a kill between them leaves `final` absent; clean_stale_temps puts `old` back
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex}")
        final.rename(old)
        try:
            tmp.rename(final)
        except BaseException:
            old.rename(final)
            raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:  # a file (or link) that stood where the folder goes: replaced on purpose by the caller
        old.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is unavailable."""
    rename = getattr(_LIBC, "renameat2", None) if _LIBC is not None else None
    if rename is None:
        return False
    at_cwd, exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE
    return int(rename(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), exchange)) == 0


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # no C library to load (not POSIX): two renames it is
        return None


_LIBC = _libc()
