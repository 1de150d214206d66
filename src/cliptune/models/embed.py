"""Frozen-tower features of image files and texts, through the feature cache: the one way every
command (training, evaluation, inference) computes them, so they all hit the same cache entries."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from cliptune.data.images import DEFAULT_MAX_PIXELS, load_image
from cliptune.models.backbone import Backbone
from cliptune.models.cache import FeatureCache, Precision, embed_images, embed_texts

__all__ = ["default_cache_dir", "tower_features"]


def default_cache_dir() -> Path:
    """``~/.cache/cliptune/features``: shared by every run, keyed by backbone identity."""
    return Path.home() / ".cache" / "cliptune" / "features"


def tower_features(
    backbone: Backbone,
    paths: Sequence[Path],
    texts: Sequence[str],
    *,
    cache_dir: Path | None = None,
    precision: Precision = "auto",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """Image and text tower features (before the heads), computing only what the cache lacks.

    Args:
        backbone: Its ``image_features`` / ``text_features`` are the frozen part being cached.
        paths: Image files, one row each.
        texts: Texts, one row each.
        cache_dir: Feature cache folder (default :func:`default_cache_dir`).
        precision: Tower precision (``auto`` = bf16 where the hardware has it).
        max_pixels: Decompression-bomb limit of the image loader.
        num_workers: DataLoader workers for decoding (the loader is a picklable partial).
        device: Where the towers run.
        progress: Progress bars.

    Returns:
        ``(images (N, Fi), texts (M, Ft))`` float32 on CPU.
    """
    cache = FeatureCache(cache_dir or default_cache_dir(), backbone.identity())
    backbone.to(device)
    images = embed_images(
        list(paths), cache=cache, load=partial(load_image, max_pixels=max_pixels), preprocess=backbone.preprocess,
        forward=backbone.image_features, precision=precision, num_workers=num_workers, device=device,
        progress=progress,
    )  # fmt: skip
    text_feats = embed_texts(
        list(texts), cache=cache, tokenize=backbone.tokenize, forward=backbone.text_features,
        precision=precision, device=device, progress=progress,
    )  # fmt: skip
    return images, text_feats
