"""``cliptune export --format safetensors``: the plain transformers / open_clip folder, loadable without cliptune.

What the plain formats can hold, and so what is refused (``PlainFormatError``, pointing to ONNX):

* transformers CLIP / SigLIP (``kind`` clip / siglip): ``save_pretrained`` of the model with LoRA merged
  and the trained projections in place (they are the model's own ``visual_projection`` /
  ``text_projection`` / heads), plus its image processor and tokenizer: ``CLIPModel.from_pretrained(OUT)``.
* open_clip: open_clip's folder (``open_clip_config.json`` + ``open_clip_model.safetensors``, projections
  under open_clip's names, LoRA merged): ``open_clip.create_model("local-dir:OUT")``.
* refused: a Siamese head (no transformers or open_clip class has it), composed backbones (two separate
  towers with new projections: no single plain model class), and transformers ``auto`` backbones (their
  new projections sit outside the model class).
"""

from __future__ import annotations

from pathlib import Path

from cliptune.export.errors import ExportExistsError, PlainFormatError
from cliptune.models.backbone import CONFIG_FILE, STATE_FILE
from cliptune.models.factory import LoadedModel
from cliptune.rundir import atomic_folder

__all__ = ["PLAIN_KINDS", "export_plain"]

PLAIN_KINDS = ("clip", "siglip", "open_clip")
"""Backbone kinds whose trained model fits the plain format of their library."""


def export_plain(model: LoadedModel, out: Path, *, overwrite: bool = False) -> list[str]:
    """Write the plain model folder of ``model`` into ``out`` (atomically).

    Args:
        model: From :func:`cliptune.models.factory.load_model`.
        out: The folder to write.
        overwrite: Replace an existing ``out``.

    Returns:
        The file names written, sorted.

    Raises:
        ExportExistsError: ``out`` exists and ``overwrite`` is False.
        PlainFormatError: The model has a part the plain format cannot hold (named).
    """
    kind = model.backbone.kind
    if model.head is not None:
        raise PlainFormatError(
            f"{model.source}: a Siamese head cannot be expressed in a plain transformers or open_clip "
            "folder; the ONNX export holds it"
        )
    if kind not in PLAIN_KINDS:
        why = {
            "composed": "its two separate towers and new projections are no single transformers or open_clip model",
            "auto": "its new projections sit outside the transformers model class",
        }.get(kind, f"kind {kind!r} has no plain format")
        raise PlainFormatError(
            f"{model.source}: a {kind} backbone cannot be written as a plain folder: {why}; "
            "the ONNX export holds it"
        )
    if out.exists() and not overwrite:
        raise ExportExistsError(str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out) as tmp:
        model.backbone.save(tmp)  # the library's own folder (LoRA merged) plus cliptune's files, dropped next
        for name in (CONFIG_FILE, STATE_FILE):
            (tmp / name).unlink(missing_ok=True)
        written = sorted(p.name for p in tmp.iterdir())
    return written
