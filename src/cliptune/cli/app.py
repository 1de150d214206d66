"""The ``cliptune`` command line: builds the app and registers one module per command, in --help order.

Each command lives in ``cliptune.cli.<command>`` (``data``, ``config`` and ``suite`` are groups) and parses its
arguments, builds typed objects, calls the library and prints; library errors become exit codes in
:mod:`cliptune.cli.errors` only. Heavy imports (torch, transformers) happen inside commands so that
``cliptune --help`` stays instant.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import typer
from rich.console import Console

from cliptune import __version__
from cliptune.cli import (
    compare,
    config,
    data,
    demo,
    embed,
    eval,  # noqa: A004 (the module of `cliptune eval`)
    export,
    index,
    mine,
    push,
    report,
    search,
    serve,
    suite,
    sweep,
    test,
    train,
    wise,
)
from cliptune.cli.errors import err_console, set_debug, user_errors

__all__ = ["app", "main"]

app = typer.Typer(
    name="cliptune",
    help="Fine-tune, evaluate, gate and compare CLIP-family image-text models.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

console = Console(soft_wrap=True)

# --help order: commands in this order, then the groups (typer lists groups after commands)
COMMANDS = (
    train,
    demo,
    eval,
    test,
    report,
    compare,
    wise,
    sweep,
    mine,
    index,
    embed,
    search,
    serve,
    export,
    push,
    config,
    data,
    suite,
)


def _version(value: bool) -> None:
    if value:
        console.print(f"cliptune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the Python traceback of an error (for a bug report).")
    ] = False,
) -> None:
    """Fine-tune, evaluate, gate and compare CLIP-family image-text models."""
    set_debug(debug)


@contextlib.contextmanager
def silence_libraries() -> Iterator[None]:
    """Quiet the libraries' own output for ``-q``: transformers' and the hub's progress bars and notices.

    ``-q`` promises no progress bars, but transformers draws its own ("Loading weights" on every load)
    through its logging module, which no command touches. Before transformers is imported the hub switch
    and the verbosity variable are enough (transformers reads both on import); after, its own switches.
    Every switch is restored on exit: a command run in-process (a notebook, a test) must not leave the
    libraries silenced for what runs next.
    """
    from huggingface_hub.utils import (  # type: ignore[attr-defined]  # lazily exported
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    hub_was_disabled = are_progress_bars_disabled()
    env_before = os.environ.get("TRANSFORMERS_VERBOSITY")
    hf_before: tuple[bool, int] | None = None
    disable_progress_bars()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_before = (hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity())
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # transformers leaves it unannotated
        hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # likewise
    try:
        yield
    finally:
        if not hub_was_disabled:
            enable_progress_bars()
        if env_before is None:
            os.environ.pop("TRANSFORMERS_VERBOSITY", None)
        if hf_before is not None:
            from transformers.utils import logging as hf_logging

            if hf_before[0]:
                hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
            hf_logging.set_verbosity(hf_before[1])


def _quiet_aware(command: Callable[..., Any]) -> Callable[..., Any]:
    """``command`` that silences the libraries while it runs when called with ``quiet=True`` (its ``-q``)."""

    @functools.wraps(command)  # keeps the signature typer reads the options from
    def run(*args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("quiet"):
            return command(*args, **kwargs)
        with silence_libraries():
            return command(*args, **kwargs)

    return run


_TRUNCATED = "cliptune.models.embed.TextsTruncatedWarning"


@contextlib.contextmanager
def truncation_notice() -> Iterator[None]:
    """Sum the library's "texts cut to the tokenizer's limit" warnings of one command into one notice.

    Captions and queries are embedded in several calls per command (train, val, the queries of a suite);
    one line at the end with the total count and the limit says what a line per call would, without noise.
    cliptune's other warnings print as one ``warning:`` line (their message states the facts; Python's
    format would add a line of our source code); other libraries' warnings pass through unchanged.
    """
    cut: dict[int, int] = {}  # limit -> texts cut
    with warnings.catch_warnings():
        # every call's warning, not only the first per code location (the default filter)
        warnings.filterwarnings("always", message=r"\d+ text\(s\) longer than the tokenizer")
        shown = warnings.showwarning

        def collect(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
            if f"{category.__module__}.{category.__qualname__}" == _TRUNCATED:
                limit, count = getattr(message, "limit", 0), getattr(message, "count", 0)
                cut[limit] = cut.get(limit, 0) + count
                return
            if category.__module__.startswith("cliptune."):
                err_console.print(f"warning: {message}", highlight=False, markup=False)
                return
            shown(message, category, *args, **kwargs)

        warnings.showwarning = collect
        try:
            yield
        finally:
            for limit, count in cut.items():
                err_console.print(
                    f"note: {count} text(s) were longer than the tokenizer's limit of {limit} tokens "
                    "and were cut to it (the words after it were not used)",
                    highlight=False,
                    markup=False,
                )


def _guarded(command: Callable[..., Any]) -> Callable[..., Any]:
    """``command`` with one truncation notice and user errors as sentences (see cli.errors.user_errors)."""

    checked = user_errors(command)

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        with truncation_notice():
            return checked(*args, **kwargs)

    return run


def _wrap(group: typer.Typer) -> None:
    for info in group.registered_commands:
        if info.callback is not None:
            info.callback = _guarded(_quiet_aware(info.callback))
    for sub in group.registered_groups:
        if sub.typer_instance is not None:
            _wrap(sub.typer_instance)


for _module in COMMANDS:
    _module.register(app)
# one place gives every command: -q quiets the libraries too, user errors end in a sentence, one notice
_wrap(app)


def main() -> None:
    """Console-script entry point."""
    app()
