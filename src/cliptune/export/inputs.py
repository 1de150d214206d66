"""What a client does before the graphs: the image preprocessing as data, and the tokenizer as a file.

Both are read from the backbone (its tower's preprocessing, its image processor, its open_clip
``preprocess_cfg``, its tokenizer), never guessed; :mod:`cliptune.export.client` replays them without
torch, and the export's parity check compares that replay with ``backbone.preprocess`` on real images,
so a description that does not reproduce the backbone fails the export instead of shipping.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cliptune.export.client import TOKENIZER_FILE
from cliptune.export.errors import ExportError
from cliptune.models.backbone import Backbone

__all__ = ["describe_preprocess", "write_tokenizer"]

_PIL_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# image-processor switches that a client would have to replay but the description cannot express
_UNSUPPORTED_FLAGS = ("do_pad", "do_reduce_labels", "do_flip_channel_order")


def describe_preprocess(backbone: Backbone) -> dict[str, Any]:
    """The image preprocessing of ``backbone`` as ``preprocess.json`` (see ``client.preprocess_image``).

    Args:
        backbone: A composed (EfficientNet-Lite0 or an HF vision tower), transformers or open_clip backbone.

    Returns:
        ``resize``, ``crop`` (or None), ``rescale``, ``mean``, ``std``, ``channel_order``, ``layout``, ``dtype``.

    Raises:
        ExportError: The preprocessing has a step the description cannot express (named).
    """
    from cliptune.models.composed import (
        IMAGENET_MEAN,
        IMAGENET_STD,
        ComposedBackbone,
        _EfficientNetLite0,
        _HFVisionTower,
    )
    from cliptune.models.hf import HFBackbone
    from cliptune.models.openclip import OpenClipBackbone

    if isinstance(backbone, ComposedBackbone):
        tower = backbone.image_tower
        if isinstance(tower, _EfficientNetLite0):  # composed._imagenet_tensor
            size = tower.size
            resize = {"mode": "shortest", "size": size, "long_side": "round", "interpolation": "bicubic"}
            crop = {"height": size, "width": size, "offset": "floor", "fill": 0}
            return _spec(resize, crop, 1 / 255, IMAGENET_MEAN, IMAGENET_STD)
        if isinstance(tower, _HFVisionTower):
            return _hf_processor(tower.image_processor)
    if isinstance(backbone, HFBackbone):
        return _hf_processor(backbone.image_processor)
    if isinstance(backbone, OpenClipBackbone):
        return _open_clip(backbone.preprocess_cfg)
    raise ExportError(
        f"{type(backbone).__name__} ({type(getattr(backbone, 'image_tower', None)).__name__}): no known preprocessing description for this backbone"
    )


def _spec(
    resize: dict[str, Any], crop: dict[str, Any] | None, rescale: float, mean: Any, std: Any
) -> dict[str, Any]:
    return {
        "resize": resize,
        "crop": crop,
        "rescale": float(rescale),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "channel_order": "RGB",
        "layout": "NCHW",
        "dtype": "float32",
    }


def _hf_processor(processor: Any) -> dict[str, Any]:
    name = type(processor).__name__
    for flag in _UNSUPPORTED_FLAGS:
        if getattr(processor, flag, False):
            raise ExportError(f"image processor {name}: {flag}=True cannot be described for a client")
    if not getattr(processor, "do_resize", True) or not getattr(processor, "do_normalize", True):
        raise ExportError(
            f"image processor {name}: without resizing or normalising, the pixel size is not fixed"
        )
    size = dict(processor.size)
    interpolation = _PIL_NAMES.get(int(getattr(processor, "resample", 2)))
    if interpolation is None:
        raise ExportError(f"image processor {name}: unknown resample {processor.resample!r}")
    if size.get("shortest_edge") and not size.get("longest_edge"):
        resize = {"mode": "shortest", "size": int(size["shortest_edge"]), "long_side": "floor"}
    elif size.get("height") and size.get("width"):
        resize = {"mode": "exact", "height": int(size["height"]), "width": int(size["width"])}
    else:
        raise ExportError(f"image processor {name}: size {size} cannot be described for a client")
    crop = None
    if getattr(processor, "do_center_crop", False):
        crop_size = dict(processor.crop_size)
        crop = {
            "height": int(crop_size["height"]),
            "width": int(crop_size["width"]),
            "offset": "floor",
            "fill": 0,
        }
    rescale = float(processor.rescale_factor) if getattr(processor, "do_rescale", True) else 1.0
    return _spec(
        {**resize, "interpolation": interpolation}, crop, rescale, processor.image_mean, processor.image_std
    )


def _open_clip(cfg: dict[str, Any]) -> dict[str, Any]:
    """open_clip's eval transform as ``openclip.preprocess_image`` replays it."""
    height, width = (
        (int(cfg["size"]), int(cfg["size"])) if isinstance(cfg["size"], int) else map(int, cfg["size"])
    )
    mode = cfg.get("resize_mode", "shortest")
    interpolation = cfg.get("interpolation", "bicubic")
    fill = int(cfg.get("fill_color", 0))
    crop: dict[str, Any] | None = {"height": height, "width": width, "offset": "round", "fill": fill}
    if mode == "squash":
        resize: dict[str, Any] = {"mode": "exact", "height": height, "width": width}
        crop = None
    elif mode == "longest":
        resize = {"mode": "longest", "height": height, "width": width}
    elif mode == "shortest" and height == width:
        resize = {"mode": "shortest", "size": height, "long_side": "floor"}
        crop = {**(crop or {}), "fill": 0}
    else:
        raise ExportError(
            f"open_clip preprocess_cfg: resize_mode {mode!r} at {height}x{width} (non-square 'shortest' "
            "uses open_clip's own ratio rounding) cannot be described for a client"
        )
    return _spec({**resize, "interpolation": interpolation}, crop, 1 / 255, cfg["mean"], cfg["std"])


def write_tokenizer(backbone: Backbone, folder: Path) -> dict[str, Any] | None:
    """Write ``tokenizer.json`` (the tokenizers pipeline) and return the settings a client applies.

    Args:
        backbone: The backbone whose ``tokenize`` the client must reproduce.
        folder: The export folder.

    Returns:
        ``{"file", "max_length", "padding" ("longest" or "max_length"), "pad_id", "pad_token",
        "truncation"}``, or None for open_clip backbones, whose tokenizers are not a tokenizers pipeline
        (open_clip's BPE with ftfy cleaning, or its own text cleaning before an HF tokenizer): their
        text graph takes ids the caller makes with open_clip.
    """
    from cliptune.models.composed import ComposedBackbone
    from cliptune.models.hf import HFBackbone

    if isinstance(backbone, ComposedBackbone):
        tokenizer, limit, padding = backbone.text_tower.tokenizer, backbone.text_tower.max_length, "longest"
    elif isinstance(backbone, HFBackbone):
        tokenizer, limit = backbone.tokenizer, backbone._max_length()
        padding = "max_length" if backbone.kind == "siglip" else "longest"
    else:
        return None
    pipeline = json.loads(tokenizer.backend_tokenizer.to_str())
    pipeline["padding"] = pipeline["truncation"] = None  # the settings below are the client's to apply
    (folder / TOKENIZER_FILE).write_text(json.dumps(pipeline, ensure_ascii=False), encoding="utf-8")
    return {
        "file": TOKENIZER_FILE,
        "max_length": int(limit),
        "padding": padding,
        "pad_id": int(tokenizer.pad_token_id),
        "pad_token": str(tokenizer.pad_token),
        "truncation": "longest_first",
    }
