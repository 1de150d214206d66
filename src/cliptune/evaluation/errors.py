"""Errors of the evaluation area: typed, carrying the facts, free of CLI wording."""

from __future__ import annotations

from pathlib import Path

from cliptune.data.catalogue import CatalogueError
from cliptune.errors import CliptuneError

__all__ = ["EvalError", "NonFiniteEmbeddingsError", "RejectedRowsError"]


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


class NonFiniteEmbeddingsError(EvalError):
    """A model's embeddings of a split hold NaN or infinite values, so nothing can be ranked.

    Raised by the evaluation layer before ranking, which would only say "scores contain NaN" without
    knowing the split or the model.

    Attributes:
        split: The split being evaluated.
        model: The model's name.
        source: Where the model was loaded from.
        tower: ``"image"`` or ``"text"``: the first tower found with non-finite embeddings.
        count: How many of that tower's embeddings are non-finite.
        total: How many embeddings that tower made.
        first: The first affected input (an image file or a caption).
        precision: The tower precision used.
    """

    def __init__(
        self,
        split: str,
        model: str,
        source: str,
        tower: str,
        count: int,
        total: int,
        first: str,
        precision: str,
    ) -> None:
        self.split, self.model, self.source, self.tower = split, model, source, tower
        self.count, self.total, self.first, self.precision = count, total, first, precision
        super().__init__(
            f"cannot evaluate split '{split}' with model {model} ({source}): {count} of its {total} {tower} "
            f"embeddings contain NaN or infinite values (the first for {first!r}), most likely because the "
            "model's weights do (a training run that diverged, or a damaged weights file) or the tower "
            f"overflows at precision '{precision}'"
        )
