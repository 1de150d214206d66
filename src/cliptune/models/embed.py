"""Features and embeddings of image files and texts: the one place every command computes them.

Training, evaluation, indexing, search and suites all go through here, so they hit the same feature
cache entries and embed the same way: tower features through the cache when the towers are frozen, then
the trained heads; the Siamese head on top for siamese models. Final embeddings are L2-normalised
float32 on CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from cliptune.data.catalogue import Catalogue
from cliptune.data.images import DEFAULT_MAX_PIXELS, load_image
from cliptune.models.backbone import Backbone
from cliptune.models.cache import FeatureCache, Precision, embed_images, embed_texts
from cliptune.models.factory import LoadedModel
from cliptune.models.siamese import SiameseHead, SiameseOutput

__all__ = [
    "catalogue_paths",
    "default_cache_dir",
    "embed_images_with",
    "embed_texts_with",
    "siamese_embeddings",
    "tower_features",
]

_HEAD_CHUNK = 1024  # rows per Siamese head forward in siamese_embeddings: bounded memory on large splits


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


@torch.inference_mode()
def embed_images_with(
    model: LoadedModel,
    paths: Sequence[Path],
    *,
    cache_dir: Path | None = None,
    precision: Precision = "auto",
    batch_size: int = 64,
    num_workers: int = 0,
    max_pixels: int | None = None,
    progress: bool = True,
) -> Tensor:
    """Final, L2-normalised image embeddings of image files.

    With frozen towers (always the case for a loaded model) the tower features come from (and go to) the
    feature cache and only the heads run here; the cache key covers the tower weights, so fine-tuned towers
    never reuse pretrained features. For a Siamese model the head refines the image alone
    (text masked) and its ``image`` output is returned.

    Args:
        model: From :func:`cliptune.models.factory.load_model`.
        paths: Image files.
        cache_dir: Feature cache folder (default :func:`default_cache_dir`).
        precision: ``auto``, ``fp32`` or ``bf16`` for the tower forward.
        batch_size: Images per forward.
        num_workers: DataLoader workers for decoding.
        max_pixels: Decompression-bomb limit of the loader (default: the loader's).
        progress: Progress bar.

    Returns:
        (N, D) float32.
    """
    backbone = model.backbone
    # a partial, not a closure: DataLoader workers started with "spawn" (macOS, Windows) pickle it
    load = partial(load_image) if max_pixels is None else partial(load_image, max_pixels=max_pixels)

    frozen = backbone.features_frozen
    cache = FeatureCache(cache_dir or default_cache_dir(), backbone.identity()) if frozen else None
    forward = backbone.image_features if frozen else backbone.encode_image
    feats = embed_images(
        list(paths), cache=cache, load=load, preprocess=backbone.preprocess, forward=forward,
        batch_size=batch_size, precision=precision, num_workers=num_workers, progress=progress,
    )  # fmt: skip
    if model.head is not None:
        out = _siamese(model.head, image=feats, text=None)
    else:
        out = _batched(backbone.image_head, feats) if frozen else feats
    return nn.functional.normalize(out.float(), dim=-1)


@torch.inference_mode()
def embed_texts_with(
    model: LoadedModel,
    texts: Sequence[str],
    *,
    cache_dir: Path | None = None,
    precision: Precision = "auto",
    batch_size: int = 256,
    progress: bool = True,
) -> Tensor:
    """Final, L2-normalised text embeddings (see :func:`embed_images_with`). Returns (N, D) float32."""
    backbone = model.backbone
    frozen = backbone.features_frozen
    cache = FeatureCache(cache_dir or default_cache_dir(), backbone.identity()) if frozen else None
    forward = backbone.text_features if frozen else backbone.encode_text
    feats = embed_texts(
        list(texts), cache=cache, tokenize=backbone.tokenize, forward=forward, batch_size=batch_size,
        precision=precision, progress=progress,
    )  # fmt: skip
    if model.head is not None:
        out = _siamese(model.head, image=None, text=feats)
    else:
        out = _batched(backbone.text_head, feats) if frozen else feats
    return nn.functional.normalize(out.float(), dim=-1)


@torch.inference_mode()
def siamese_embeddings(
    model: LoadedModel,
    paths: Sequence[Path],
    texts: Sequence[str],
    *,
    cache_dir: Path | None = None,
    precision: Precision = "auto",
    progress: bool = True,
) -> dict[str, Tensor]:
    """The Siamese head's ``image`` / ``text`` / ``fused`` embeddings of items that have both modalities.

    Item ``i`` is the image ``paths[i]`` with the text ``texts[i]``; both go through the head together
    (unlike :func:`embed_images_with` / :func:`embed_texts_with`, which mask the other modality), in chunks
    of 1024 rows. Triplet evaluation compares these, as training's loss did.

    Args:
        model: A model with a Siamese head and frozen towers.
        paths: Image files, one per item.
        texts: Texts, one per item.
        cache_dir: Feature cache folder (default :func:`default_cache_dir`).
        precision: Tower precision.
        progress: Progress bars.

    Returns:
        ``{"image", "text", "fused"}`` -> (N, D) embeddings as the head returns them.

    Raises:
        ValueError: The model has no Siamese head.
    """
    if model.head is None:
        raise ValueError(f"{model.source}: siamese_embeddings needs a model with a Siamese head")
    img, txt = tower_features(
        model.backbone, paths, texts, cache_dir=cache_dir, precision=precision, progress=progress
    )
    parts = [
        model.head(img[i : i + _HEAD_CHUNK].float(), txt[i : i + _HEAD_CHUNK].float())
        for i in range(0, len(img), _HEAD_CHUNK)
    ]
    return {k: torch.cat([getattr(p, k) for p in parts]) for k in ("image", "text", "fused")}


def _batched(fn: Callable[[Tensor], Tensor], x: Tensor, size: int = 4096) -> Tensor:
    """Apply a head in chunks so a large catalogue does not need one huge activation."""
    return torch.cat([fn(x[i : i + size]) for i in range(0, len(x), size)]) if len(x) else x


def _siamese(head: SiameseHead, *, image: Tensor | None, text: Tensor | None) -> Tensor:
    """One modality through the Siamese head, the other masked out (zeros, ``has_*`` False)."""
    present = image if image is not None else text
    assert present is not None
    n = len(present)
    img = image if image is not None else torch.zeros(n, head.image_proj.in_features)
    txt = text if text is not None else torch.zeros(n, head.text_proj.in_features)
    has_image = torch.full((n,), image is not None)
    has_text = torch.full((n,), text is not None)
    out: SiameseOutput = head(img, txt, has_image=has_image, has_text=has_text)
    return out.image if image is not None else out.text


def catalogue_paths(catalogue: Catalogue, file_names: Sequence[str]) -> list[Path]:
    """Image files of ``file_name`` values."""
    return [catalogue.image_path(f) for f in file_names]
