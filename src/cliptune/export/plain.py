"""``cliptune export --format safetensors``: the plain transformers / open_clip folder, loadable without cliptune.

What the plain formats can hold, and so what is refused (``PlainFormatError``, pointing to ONNX):

* transformers CLIP / SigLIP (``kind`` clip / siglip): ``save_pretrained`` of the model with LoRA merged
  and the trained projections in place (they are the model's own ``visual_projection`` /
  ``text_projection`` / heads), plus its image processor and tokenizer: ``CLIPModel.from_pretrained(OUT)``.
* open_clip: open_clip's folder (``open_clip_config.json`` + ``open_clip_model.safetensors``, projections
  under open_clip's names, LoRA merged): ``open_clip.create_model("local-dir:OUT")``.
* checked: the folder is reloaded as its library reads it and must embed as the model does (cosine
  >= 0.9999 on seeded pixels and fixed texts): merged LoRA and renamed projections are verified.
* refused: a Siamese head (no transformers or open_clip class has it), composed backbones (two separate
  towers with new projections: no single plain model class), and transformers ``auto`` backbones (their
  new projections sit outside the model class).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cliptune.export.errors import ExportExistsError, ParityError, PlainFormatError
from cliptune.models.backbone import CONFIG_FILE, STATE_FILE, Backbone
from cliptune.models.factory import LoadedModel
from cliptune.rundir import atomic_folder

__all__ = ["PLAIN_KINDS", "check_plain", "export_plain"]

PLAIN_KINDS = ("clip", "siglip", "open_clip")
"""Backbone kinds whose trained model fits the plain format of their library."""


def export_plain(
    model: LoadedModel, out: Path, *, overwrite: bool = False, min_cosine: float = 0.9999
) -> list[str]:
    """Write the plain model folder of ``model`` into ``out`` (atomically).

    Args:
        model: From :func:`cliptune.models.factory.load_model`.
        out: The folder to write.
        overwrite: Replace an existing ``out``.
        min_cosine: What :func:`check_plain` requires of the reloaded folder.

    Returns:
        The file names written, sorted.

    Raises:
        ExportExistsError: ``out`` exists and ``overwrite`` is False.
        PlainFormatError: The model has a part the plain format cannot hold (named).
        ParityError: The folder, reloaded, embeds differently (:func:`check_plain`); nothing is written.
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
        check_plain(model.backbone, tmp, min_cosine=min_cosine)
    return written


def check_plain(backbone: Backbone, folder: Path, *, min_cosine: float = 0.9999) -> dict[str, float]:
    """Reload the plain ``folder`` as its library reads it and compare its embeddings with ``backbone``'s.

    Merging LoRA adapters changes the float rounding, and a projection saved under a wrong name would load
    as a fresh one: both show here. The inputs are seeded random pixels and fixed texts (the check is of the
    weights, not of data), through the backbone's own preprocessing shape and tokenizer.

    Args:
        backbone: The model as cliptune runs it.
        folder: The plain folder just written.
        min_cosine: The cosine every embedding must reach.

    Returns:
        ``{"image": min cosine, "text": min cosine}``.

    Raises:
        ParityError: A modality below ``min_cosine`` (graph ``plain-image`` / ``plain-text``).
    """
    from PIL import Image

    from cliptune.models import hf, openclip

    plain = (
        openclip.load_open_clip(str(folder))
        if backbone.kind == "open_clip"
        else hf.load_hf(folder, kind=backbone.kind)
    ).eval()
    shape = backbone.preprocess([Image.new("RGB", (8, 8))]).shape[1:]
    pixels = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))
    tokens = backbone.tokenize(
        ["a photo of a cat", "a red dress", "ripped blue jeans", "an abstract painting"]
    )
    found = {}
    with torch.no_grad():
        pairs = {
            "image": (plain.encode_image(pixels), backbone.encode_image(pixels)),
            "text": (plain.encode_text(**tokens), backbone.encode_text(**tokens)),
        }
    for name, (got, want) in pairs.items():
        cosines = nn.functional.cosine_similarity(got.float(), want.float(), dim=-1)
        found[name] = float(cosines.min())
        if not found[name] >= min_cosine:
            diff = float((got - want).abs().max())
            raise ParityError(f"plain-{name}", found[name], diff, min_cosine, len(cosines))
    return found
