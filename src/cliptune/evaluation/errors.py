"""Errors of the evaluation area: typed, carrying the facts, free of CLI wording."""

from __future__ import annotations

from pathlib import Path

from cliptune.data.catalogue import CatalogueError
from cliptune.errors import CliptuneError

__all__ = ["EvalError", "RejectedRowsError"]


class EvalError(CliptuneError, ValueError):
    """An evaluation that cannot run as asked (unknown split, empty split, inconsistent inputs)."""


class RejectedRowsError(EvalError, CatalogueError):
    """A catalogue evaluated without a run has rows its check rejects; evaluation never drops rows.

    It is a :class:`~cliptune.data.catalogue.CatalogueError` too, so callers that handle bad catalogues
    keep handling it. The CLI adds how to clean the catalogue.

    Attributes:
        path: The catalogue's metadata file.
        rejected: ``(row, file_name, reason)`` of every rejected row.
    """

    def __init__(self, path: Path, rejected: list[tuple[int, str, str]]) -> None:
        self.path, self.rejected = path, rejected
        shown = "\n".join(f"  row {row} ({name}): {reason}" for row, name, reason in rejected[:10])
        more = f"\n  ... and {len(rejected) - 10} more" if len(rejected) > 10 else ""
        super().__init__(
            f"{len(rejected)} bad row(s) in {path}:\n{shown}{more}\n"
            "Fix or remove them before evaluating: evaluation never drops rows."
        )
