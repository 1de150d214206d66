"""Typed errors of ``cliptune export``: each names the model, the graph or format, and the reason."""

from __future__ import annotations

from cliptune.errors import CliptuneError

__all__ = ["ExportError", "ExportExistsError", "ParityError", "PlainFormatError"]


class ExportError(CliptuneError):
    """A model cannot be exported as asked; the message names the model part and the reason."""


class ExportExistsError(ExportError):
    """The output folder exists and replacing it was not asked for.

    Attributes:
        out: The existing folder.
    """

    def __init__(self, out: str) -> None:
        super().__init__(f"{out}: already exists; not replaced")
        self.out = out


class ParityError(ExportError):
    """onnxruntime's embeddings differ from PyTorch's beyond the tolerance: the export is not written.

    Attributes:
        graph: ``image``, ``text`` or ``head``.
        min_cosine: The smallest cosine between an onnxruntime row and its PyTorch row.
        max_abs_diff: The largest absolute difference of one coordinate.
        threshold: The cosine the export needs.
        n: How many rows were compared.
    """

    def __init__(self, graph: str, min_cosine: float, max_abs_diff: float, threshold: float, n: int) -> None:
        super().__init__(
            f"{graph} graph: onnxruntime differs from PyTorch on {n} sample(s): min cosine {min_cosine:.6f} "
            f"< {threshold} (max abs diff {max_abs_diff:.3g}); nothing was written"
        )
        self.graph, self.min_cosine, self.max_abs_diff = graph, min_cosine, max_abs_diff
        self.threshold, self.n = threshold, n


class PlainFormatError(ExportError):
    """The model has a part the plain transformers / open_clip folder cannot hold (named); ONNX can."""
