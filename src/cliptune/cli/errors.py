"""The CLI's one path from a library error to a red line and an exit code.

Library code raises a :class:`~cliptune.errors.CliptuneError` subclass whose message states the facts
(file, row, model); it never names a flag, because the library does not know it runs under a CLI. Here,
and only here, such an error becomes one line on stderr, plus a *hint* that names the flag or command
that fixes it, and a ``typer.Exit`` with the command's exit code. A user error never shows a traceback.

Errors a command did not catch itself reach :func:`user_errors`, which every command runs inside
(``cli/app.py`` wraps them all): a :class:`CliptuneError` and the standard errors a user can cause
(a missing or unreadable file, a file that is no image, text that is not UTF-8, broken YAML) become one
or two sentences and exit code 1 (2 for invalid config). ``cliptune --debug COMMAND`` also prints the
traceback of every such error, for a bug report.

Hints are looked up by the error's class (or a base class) without importing it, so ``cliptune --help``
stays instant and an error path never imports torch just to find its hint.

To add a hint for a new error type, add one line to :data:`HINTS`::

    "cliptune.train.state.TrainingError": "resume it with --resume RUN",

Example:
    >>> with exit_on_error(1):  # doctest: +SKIP
    ...     build_index(...)
"""

from __future__ import annotations

import functools
import re
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import typer
from rich.console import Console

from cliptune.errors import CliptuneError

__all__ = [
    "HINTS",
    "Hint",
    "err_console",
    "exit_on_error",
    "fail",
    "hint_for",
    "set_debug",
    "user_error_message",
    "user_errors",
    "with_hint",
]

err_console = Console(stderr=True, soft_wrap=True)

# A hint is a fixed sentence, or a function of the error (for hints that quote the error's facts).
Hint = str | Callable[[Any], str]


def _index_bad_rows(exc: Any) -> str:
    return f"fix them, or index a clean copy (`cliptune data check {exc.catalogue} --write-clean OUT`)"


def _by_message(*rules: tuple[str, str], default: str = "") -> Callable[[Any], str]:
    """A hint chosen by the first ``(words, hint)`` rule whose words are in the error's message.

    For one error class with several causes, each fixed by another flag; no rule matches: ``default``
    ("": no hint).
    """

    def hint(exc: Any) -> str:
        text = str(exc)
        return next((h for words, h in rules if words in text), default)

    return hint


def _augment(exc: Any) -> str:
    """``set data.augment.X to V`` in a problem becomes ``--set data.augment.X=V``; a bad suite file, its field."""
    fixes = [
        f"--set {field}={value}"
        for field, value in re.findall(r"set (data\.augment\.[\w.]+) to (\S+)", str(exc))
    ]
    if fixes:
        return "change the data.augment section of the config, or override it for one run with " + " ".join(
            fixes
        )
    if "data.augment.suite" in str(exc):
        return "point data.augment.suite at an existing suite YAML file, or set it to null"
    return ""


_INDEX_PARAMS = r"\b(hnsw_m|ef_construction|ef_search|nlist|pq_m|nprobe)\b"


def _index_parameter(exc: Any) -> str:
    """The ``cliptune index`` options behind an index parameter error (``pq_m`` -> ``--pq-m``)."""
    text = str(exc)
    flags = list(dict.fromkeys(f"--{n.replace('_', '-')}" for n in re.findall(_INDEX_PARAMS, text)))
    if text.startswith("index kind must"):
        return "choose --kind flat, hnsw or ivfpq"
    if "do not apply to index kind" in text:
        return (
            f"leave out {', '.join(flags)}, or choose the --kind they belong to (hnsw: --hnsw-m, "
            "--ef-construction, --ef-search; ivfpq: --nlist, --pq-m, --nprobe)"
        )
    if "needs at least" in text:
        return "build it with --kind hnsw (or --kind flat, exact)"
    if flags:
        return f"change {flags[0]} on `cliptune index`, or leave it out for its default"
    return ""


_debug = False  # set by the root callback from `cliptune --debug`, for each invocation


def set_debug(on: bool) -> None:
    """Show (True) or hide (False) the traceback of user errors; ``cliptune --debug`` turns it on."""
    global _debug
    _debug = on


def _config_overrides(exc: Any) -> str:
    if not exc.overrides:
        return ""
    return f"the bad value(s) came from --set ({', '.join(exc.overrides)})"


# "module.ClassName" of a CliptuneError subclass -> the hint that names the flags fixing it. A subclass
# without an entry of its own takes its nearest base class's. tests/test_cli.py checks every key imports.
HINTS: dict[str, Hint] = {
    "cliptune.config.ConfigError": _config_overrides,
    "cliptune.data.catalogue.MissingCaptionError": (
        "name the caption column: data.text_column in the config, or --text-column on data check, data "
        "audit, suite generate, eval, test, index, embed and mine"
    ),
    "cliptune.data.prepare.BadRowsError": (
        "Fix them, clean the catalogue with `cliptune data check --write-clean`, or set "
        "data.on_bad_row=skip to train without them (they are then listed in rejected.csv)."
    ),
    "cliptune.data.shards.CorruptShardError": (
        "copy the shard again, or write the shards afresh with `cliptune data shard CATALOGUE OUT`"
    ),
    "cliptune.data.shards.ShardIndexMismatchError": (
        "rewrite the shards' sidecar indexes with `cliptune data index-shards PATTERN` (or delete them: "
        "shards without one are scanned)"
    ),
    "cliptune.data.shards.CompressedShardError": (
        "decompress the shards (e.g. `gunzip -k 00000.tar.gz`) and give the .tar pattern, or write plain .tar "
        "shards from a folder catalogue with `cliptune data shard CATALOGUE OUT`"
    ),
    "cliptune.data.shards.ShardWriteError": (
        "every row needs a file_name and images must be .jpg, .jpeg, .png or .webp (convert others, or "
        "leave their rows out with `cliptune data check --write-clean`)"
    ),
    "cliptune.data.shards.ShardOutputExistsError": (
        "give `cliptune data shard` an empty OUT folder (or delete the old shards first)"
    ),
    "cliptune.search.index.IndexExistsError": "use a new folder or --overwrite",
    "cliptune.export.errors.ExportExistsError": "use a new folder or --overwrite",
    "cliptune.export.errors.PlainFormatError": "export it with --format onnx",
    "cliptune.report.wise.NoGeneralCatalogueError": "give one with --general CATALOGUE",
    "cliptune.export.hub.PushError": lambda e: "pass --token or set HF_TOKEN" if "token" in e.reason else "",
    "cliptune.report.splits_analysis.NoSharedHeldoutError": (
        "compare without --heldout (the verdicts are then unpaired, on each run's own queries), or train "
        "the runs with one data.split.seed so their test groups are shared"
    ),
    "cliptune.search.index.IndexBadRowsError": _index_bad_rows,
    "cliptune.search.vectors.EmbedBadRowsError": lambda e: (
        f"fix them, or embed a clean copy (`cliptune data check {e.catalogue} --write-clean OUT`)"
    ),
    "cliptune.evaluation.errors.RejectedRowsError": (
        "Or clean the catalogue with `cliptune data check --write-clean` first."
    ),
    "cliptune.train.errors.MissingRunNameError": "or pass --name",
    "cliptune.train.errors.RunExistsError": lambda e: f"pass --resume {e.run_dir}, or another --name",
    "cliptune.train.errors.LauncherMismatchError": (
        "launch with `torchrun --nproc_per_node N -m cliptune train ...` or "
        "`accelerate launch --multi_gpu --num_processes N -m cliptune train ...` (also on CPU)"
    ),
    "cliptune.train.errors.WorldSizeMismatchError": lambda e: (
        f"launch it the same way (e.g. torchrun --nproc_per_node {e.saved}) or start a new run"
    ),
    "cliptune.suites.heldout.RankedSplitError": lambda e: (
        "give a run's splits with --splits-from RUN, or rank every image with --split all"
        if e.run_dir is None
        else f"choose the images with --split ({', '.join([*e.available, 'all'])})"
    ),
    "cliptune.suites.run.EmptySplitError": (
        "rank more images with --split (e.g. --split all), or add queries whose relevant images are in it"
    ),
    "cliptune.evaluation.errors.NonFiniteEmbeddingsError": lambda e: (
        "if the model is a training run, find the step where its loss became NaN or grew in its "
        "metrics.jsonl and train it again with a lower train.lr, train.grad_clip on (e.g. "
        "--set train.grad_clip=1.0) or more train.warmup_steps; if its weights file may be damaged, restore "
        "or retrain it"
        + ("" if e.precision == "fp32" else "; to rule out overflow, embed at fp32 (model.embed_precision)")
    ),
    "cliptune.sweep.MissingSweepNameError": "or pass --name",
    "cliptune.sweep.TrialRunExistsError": "or use another --name",
    "cliptune.sweep.StudyDirectionMismatchError": "use another --name",
    "cliptune.sweep.StudyConfigMismatchError": "or use another --name",
    "cliptune.data.augment.AugmentError": _augment,
    "cliptune.suites.generate.SuiteGenerateError": _by_message(
        ("unknown attribute(s)", "choose --attributes among them"),
        ("fewer than 2 distinct values", "leave them out of --attributes"),
        ("no attribute column has", "name the attributes to query with --attributes a,b,..."),
        ("no query has", "lower --min-relevant, or count more images (--split all, or another --split)"),
        ("no split column", "give the run whose splits to use with --splits-from RUN, or leave out --split"),
        ("no row has split", "choose --split among the splits in the column"),
    ),
    "cliptune.suites.phrases.PhraseError": (
        "edit the file given with --phrases (keys order, template, phrases; attributes and values as the "
        "catalogue spells them; docs/suites.md)"
    ),
    "cliptune.search.ann.IndexParameterError": _index_parameter,
    "cliptune.train.mining.MiningError": _by_message(
        ("to mine; the data has", "choose one with --split (cliptune mine)"),
        ("nothing to mine negatives from", "mine a larger split with --split (e.g. --split all)"),
        ("mining window:", "change --per-caption, --range-min, --range-max, --margin or --relative-margin"),
        ("select_hard_negatives:", ""),  # arrays of different lengths: a bug, no flag fixes it
        # the rest are the mined file train.hard_negatives.file names: missing, unreadable, another run's
        default=(
            "mine it again with `cliptune mine` on this run's catalogue and caption column (--split train) "
            "and set train.hard_negatives.file to the new file"
        ),
    ),
    "cliptune.report.wise.WiseError": _by_message(
        ("alpha 0", "add 0 to --alphas (e.g. --alphas 0,0.25,0.5,0.75,1)"),
        ("no alphas", "give them with --alphas (e.g. --alphas 0,0.25,0.5,0.75,1)"),
        ("no metric", "choose one with --metric"),
        ("tolerance must", "give --tolerance >= 0"),
        ("not a run directory", "give a training run's folder (runs/<name>)"),
    ),
}


def hint_for(exc: BaseException) -> str | None:
    """The hint of ``exc``'s class or its nearest base class in :data:`HINTS`, or None."""
    for cls in type(exc).__mro__:
        hint = HINTS.get(f"{cls.__module__}.{cls.__qualname__}")
        if hint is not None:
            return (hint if isinstance(hint, str) else hint(exc)) or None  # "": no hint for this one
    return None


def with_hint(exc: BaseException) -> str:
    """The error's message followed by its hint.

    The hint goes on a line of its own after a multi-line message (a list of bad rows), and after
    ``": "`` on a one-line message, so it reads as the end of the sentence.
    """
    message = str(exc)
    hint = hint_for(exc)
    if hint is None:
        return message
    if "\n" in message:
        return f"{message}\n{hint}"
    # "... in the config" + "or pass --name" reads as one sentence; other hints follow a colon
    return f"{message}{' ' if hint.startswith('or ') else ': '}{hint}"


def fail(exc: BaseException, code: int, prefix: str = "") -> NoReturn:
    """Print ``exc`` (with its hint) as one red line on stderr and exit with ``code``.

    Args:
        exc: The error; its message is printed as rich markup, as every command always has.
        code: The exit code (1: the command could not do its work; 2: invalid input).
        prefix: Words before the message, e.g. ``"report failed: "``.

    Raises:
        typer.Exit: Always, with ``code``.
    """
    if _debug:
        err_console.print(
            "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)), markup=False
        )
    err_console.print(f"[red]{prefix}{with_hint(exc)}[/red]", highlight=False)
    raise typer.Exit(code) from None


@contextmanager
def exit_on_error(code: int, *also: type[Exception], prefix: str = "") -> Iterator[None]:
    """Turn a :class:`CliptuneError` (and the ``also`` types) raised in the body into :func:`fail`.

    Args:
        code: The exit code for these errors.
        *also: Built-in types the command has always reported this way (``ValueError`` from a library
            that predates :class:`CliptuneError`).
        prefix: Words before the message.

    Raises:
        typer.Exit: With ``code``, after printing the error.
    """
    caught: tuple[type[Exception], ...] = (CliptuneError, *also)
    try:
        yield
    except caught as exc:
        fail(exc, code, prefix)


def user_error_message(exc: BaseException) -> tuple[str, int] | None:
    """The sentence and exit code for an error a user can cause, or None for a bug (which keeps its traceback).

    Covers :class:`CliptuneError` (with its hint) and the standard errors bad input raises in any library:
    missing or unreadable files (``OSError``: Pillow's truncated image is one), a file that is no image,
    text that is not UTF-8, and broken YAML. Exit code 2 for an invalid config or YAML, 1 otherwise.
    """
    import yaml
    from PIL import UnidentifiedImageError

    if isinstance(exc, CliptuneError):
        from cliptune.config import ConfigError

        return with_hint(exc), 2 if isinstance(exc, ConfigError) else 1
    if isinstance(exc, UnidentifiedImageError):  # an OSError: before the generic case
        return f"not an image: {exc}", 1
    if isinstance(exc, FileNotFoundError) and exc.filename:
        from pathlib import Path

        parent = Path(str(exc.filename)).parent
        if not parent.is_dir():  # writing into a folder that is not there (names no temp file)
            return f"folder not found: {parent}", 1
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}", 1
    if isinstance(exc, UnicodeDecodeError):
        return (
            f"text is not UTF-8 ({exc.reason}: byte 0x{exc.object[exc.start]:02x} at offset {exc.start})",
            1,
        )
    if isinstance(exc, yaml.YAMLError):
        return f"not valid YAML: {' '.join(str(exc).split())}", 2
    return None


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """``command`` with every user error it lets through printed as a sentence and an exit code.

    The last line of defence behind the commands' own :func:`exit_on_error`: whatever a command does not
    catch and :func:`user_error_message` recognises ends as one red line, never a traceback (unless
    ``--debug``). Anything else is a bug and keeps its traceback.
    """

    @functools.wraps(command)  # keeps the signature typer reads the options from
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:
            known = user_error_message(exc)
            if known is None:
                raise
            message, code = known
            if _debug:
                err_console.print(
                    "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)), markup=False
                )
            err_console.print(message, style="red", highlight=False, markup=False)
            sys.stderr.flush()
            raise typer.Exit(code) from None

    return run
