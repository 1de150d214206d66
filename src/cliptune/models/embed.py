"""Features and embeddings of image files and texts: the one place every command computes them.

Training, evaluation, indexing, search and suites all go through here, so they hit the same feature
cache entries and embed the same way: tower features through the cache when the towers are frozen, then
the trained heads; the Siamese head on top for siamese models. Final embeddings are L2-normalised
float32 on CPU.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import numpy as np
import torch
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from cliptune.config import AugmentConfig
from cliptune.data.augment import AugmentedLoader, caption_view, image_view_id
from cliptune.data.catalogue import Catalogue
from cliptune.data.images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image, read_image_bytes
from cliptune.models.backbone import Backbone, NoPixelRecipeError, PixelRecipe, normalise_uint8
from cliptune.models.cache import FeatureCache, Precision, feature_key
from cliptune.models.factory import LoadedModel
from cliptune.models.pixel_cache import PixelCache, pixel_key
from cliptune.models.siamese import SiameseHead, SiameseOutput

__all__ = [
    "TextsTruncatedWarning",
    "augmented_tower_features",
    "embed_images",
    "embed_texts",
    "resolve_precision",
    "catalogue_paths",
    "decode_min_side",
    "decode_workers",
    "default_cache_dir",
    "embed_images_with",
    "embed_texts_with",
    "embedding_device",
    "image_loader",
    "model_device",
    "model_input_side",
    "pixel_recipe_for",
    "siamese_embeddings",
    "tower_features",
    "warn_if_truncated",
    "Workers",
]


class TextsTruncatedWarning(UserWarning):
    """Texts longer than the tokenizer's limit were cut to it: the words after the limit are not embedded.

    Cutting is what CLIP does (its text tower has a fixed number of positions), so it is no error; but a
    user with long captions must know. The CLI sums these warnings into one notice per command.

    Attributes:
        count: How many (distinct) texts were cut.
        limit: The tokenizer's limit in tokens.
    """

    def __init__(self, count: int, limit: int) -> None:
        super().__init__(
            f"{count} text(s) longer than the tokenizer's limit of {limit} tokens were cut to it"
        )
        self.count, self.limit = count, limit


def warn_if_truncated(backbone: Backbone, texts: Sequence[str]) -> None:
    """Warn (:class:`TextsTruncatedWarning`) when some of ``texts`` exceed the backbone's token limit."""
    counted = backbone.count_truncated(sorted(set(texts)))
    if counted is not None and counted[0]:
        warnings.warn(TextsTruncatedWarning(*counted), stacklevel=2)


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
    num_workers: Workers = "auto",
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
        num_workers: DataLoader workers for decoding (the loader is a picklable partial); ``"auto"``:
            :func:`decode_workers` picks them for ``device``.
        device: Where the towers run.
        progress: Progress bars.

    Returns:
        ``(images (N, Fi), texts (M, Ft))`` float32 on CPU.
    """
    cache = FeatureCache(cache_dir or default_cache_dir(), backbone.identity())
    backbone.to(device)
    load, load_id = image_loader(backbone.preprocess, max_pixels, fast_decode=backbone.fast_decode)
    images = embed_images(
        list(paths),
        cache=cache,
        load=load,
        preprocess=backbone.preprocess,
        forward=backbone.image_features,
        precision=precision,
        num_workers=num_workers,
        device=device,
        preprocess_id=load_id,
        progress=progress,
        recipe=pixel_recipe_for(backbone),
        pixel_cache_dir=_pixel_dir(backbone, cache.root),
    )
    warn_if_truncated(backbone, texts)
    text_feats = embed_texts(
        list(texts),
        cache=cache,
        tokenize=backbone.tokenize,
        forward=backbone.text_features,
        precision=precision,
        device=device,
        progress=progress,
    )
    return images, text_feats


def augmented_tower_features(
    backbone: Backbone,
    paths: Sequence[Path],
    texts: Sequence[str],
    keep: Sequence[Iterable[str]],
    augment: AugmentConfig,
    *,
    cache_dir: Path | None = None,
    precision: Precision = "auto",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    num_workers: Workers = "auto",
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """``data.augment.views`` augmented views of every image and caption, through the feature cache.

    Each view is computed once and cached like any feature: an image view's key adds the augmentation
    settings, ``data.augment.seed`` and the view number (:func:`cliptune.data.augment.image_view_id`) to the
    file's sha256, a caption view is keyed by its own text. So frozen-tower training keeps its speed: the
    towers run ``views`` times per item once, then every epoch only picks a view. A modality whose
    augmentations are all off has one view, the plain feature.

    Args:
        backbone: Frozen towers.
        paths: Image files, one row each.
        texts: Captions, one row each.
        keep: Per row, the words caption synonyms must keep (the row's attribute values).
        augment: ``data.augment``.
        cache_dir: Feature cache folder (default :func:`default_cache_dir`).
        precision: Tower precision.
        max_pixels: Decompression-bomb limit of the image loader.
        num_workers: DataLoader workers for decoding; ``"auto"``: :func:`decode_workers` picks them for
            ``device``.
        device: Where the towers run.
        progress: Progress bars.

    Returns:
        ``(images (Vi, N, Fi), texts (Vt, N, Ft))`` float32 on CPU; ``Vi`` is ``augment.views`` when an
        image augmentation is on, else 1 (``Vt`` likewise for captions).
    """
    cache = FeatureCache(cache_dir or default_cache_dir(), backbone.identity())
    backbone.to(device)
    image_views = augment.views if augment.image.enabled else 1
    recipe = pixel_recipe_for(backbone)
    text_views = augment.views if augment.text.enabled else 1
    # = tower_features' entries
    plain_load, plain_id = image_loader(backbone.preprocess, max_pixels, fast_decode=backbone.fast_decode)
    min_side = decode_min_side(backbone.preprocess, backbone.fast_decode)  # views decode as the plain load
    images = [
        embed_images(
            list(paths),
            cache=cache,
            load=AugmentedLoader(augment.image, augment.seed, v, max_pixels, min_side)
            if augment.image.enabled
            else plain_load,
            preprocess=backbone.preprocess,
            forward=backbone.image_features,
            precision=precision,
            num_workers=num_workers,
            device=device,
            preprocess_id=image_view_id(augment.image, augment.seed, v, min_side)
            if augment.image.enabled
            else plain_id,
            progress=progress,
            recipe=recipe,
            pixel_cache_dir=None if augment.image.enabled else _pixel_dir(backbone, cache.root),
        )
        for v in range(image_views)
    ]
    captions = [
        [caption_view(t, augment.text, augment.seed, v, k) for t, k in zip(texts, keep, strict=True)]
        for v in range(text_views)
    ]
    warn_if_truncated(backbone, [c for view in captions for c in view])
    text_feats = [
        embed_texts(
            view,
            cache=cache,
            tokenize=backbone.tokenize,
            forward=backbone.text_features,
            precision=precision,
            device=device,
            progress=progress,
        )
        for view in captions
    ]
    return torch.stack(images), torch.stack(text_feats)


@torch.inference_mode()
def embed_images_with(
    model: LoadedModel,
    paths: Sequence[Path],
    *,
    cache_dir: Path | None = None,
    precision: Precision = "auto",
    batch_size: int = 64,
    num_workers: Workers = "auto",
    max_pixels: int | None = None,
    progress: bool = True,
    use_cache: bool = True,
    device: torch.device | str | None = None,
) -> Tensor:
    """Final, L2-normalised image embeddings of image files.

    With frozen towers (always the case for a loaded model) the tower features come from (and go to) the
    feature cache and only the heads run here; the cache key covers the tower weights, so fine-tuned towers
    never reuse pretrained features. For a Siamese model the head refines the image alone
    (text masked) and its ``image`` output is returned.

    The towers and heads run on ``device`` (:func:`embedding_device`: the process's accelerator unless one
    is given); the model is moved there once (a later call on the same device moves nothing) and the
    embeddings come back to the CPU.

    Args:
        model: From :func:`cliptune.models.factory.load_model`.
        paths: Image files.
        cache_dir: Feature cache folder (default :func:`default_cache_dir`).
        precision: ``auto``, ``fp32`` or ``bf16`` for the tower forward.
        batch_size: Images per forward.
        num_workers: DataLoader workers for decoding; ``"auto"``: :func:`decode_workers` picks them for
            the resolved ``device`` (0 on the CPU, several on an accelerator). One-off queries pass 0: one
            image needs no worker.
        max_pixels: Decompression-bomb limit of the loader (default: the loader's).
        progress: Progress bar.
        use_cache: False computes the tower features without reading or writing the cache: one-off
            queries (``cliptune serve``) would otherwise add an fsync'ed shard per request.
        device: Where the towers and heads run; None: :func:`embedding_device` (the accelerator of this
            process under ``accelerate launch``, else the machine's, else the CPU). Pass
            :func:`model_device` to keep the model where it is.

    Returns:
        (N, D) float32 on CPU.
    """
    dev = embedding_device(device)
    _place(model, dev)
    backbone = model.backbone
    load, load_id = image_loader(
        backbone.preprocess,
        DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels,
        fast_decode=backbone.fast_decode,
    )

    frozen = backbone.features_frozen
    cached = frozen and use_cache
    cache = FeatureCache(cache_dir or default_cache_dir(), backbone.identity()) if cached else None
    forward = backbone.image_features if frozen else backbone.encode_image
    feats = embed_images(
        list(paths),
        cache=cache,
        load=load,
        preprocess=backbone.preprocess,
        forward=forward,
        batch_size=batch_size,
        precision=precision,
        num_workers=num_workers,
        device=dev,
        preprocess_id=load_id,
        progress=progress,
        recipe=pixel_recipe_for(backbone),
        pixel_cache_dir=_pixel_dir(backbone, cache_dir or default_cache_dir()) if use_cache else None,
    )  # (N, F) float32 on CPU
    if model.head is not None:
        out = _siamese(model.head, image=feats, text=None, device=dev)
    else:
        out = _batched(backbone.image_head, feats, dev) if frozen else feats
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
    use_cache: bool = True,
    device: torch.device | str | None = None,
) -> Tensor:
    """Final, L2-normalised text embeddings (see :func:`embed_images_with`, also for ``device``).

    Returns (N, D) float32 on CPU.
    """
    dev = embedding_device(device)
    _place(model, dev)
    backbone = model.backbone
    frozen = backbone.features_frozen
    cached = frozen and use_cache
    cache = FeatureCache(cache_dir or default_cache_dir(), backbone.identity()) if cached else None
    forward = backbone.text_features if frozen else backbone.encode_text
    warn_if_truncated(backbone, texts)
    feats = embed_texts(
        list(texts),
        cache=cache,
        tokenize=backbone.tokenize,
        forward=forward,
        batch_size=batch_size,
        precision=precision,
        device=dev,
        progress=progress,
    )  # (N, F) float32 on CPU
    if model.head is not None:
        out = _siamese(model.head, image=None, text=feats, device=dev)
    else:
        out = _batched(backbone.text_head, feats, dev) if frozen else feats
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
    device: torch.device | str | None = None,
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
        device: Where the towers and the head run (see :func:`embed_images_with`).

    Returns:
        ``{"image", "text", "fused"}`` -> (N, D) embeddings as the head returns them, on CPU.

    Raises:
        ValueError: The model has no Siamese head.
    """
    if model.head is None:
        raise ValueError(f"{model.source}: siamese_embeddings needs a model with a Siamese head")
    dev = embedding_device(device)
    _place(model, dev)
    img, txt = tower_features(
        model.backbone, paths, texts, cache_dir=cache_dir, precision=precision, device=dev, progress=progress
    )
    parts = [
        model.head(img[i : i + _HEAD_CHUNK].float().to(dev), txt[i : i + _HEAD_CHUNK].float().to(dev))
        for i in range(0, len(img), _HEAD_CHUNK)
    ]
    return {k: torch.cat([getattr(p, k).cpu() for p in parts]) for k in ("image", "text", "fused")}


def _batched(fn: Callable[[Tensor], Tensor], x: Tensor, device: torch.device, size: int = 4096) -> Tensor:
    """Apply a head on ``device`` in chunks (CPU rows in, CPU rows out), so a large catalogue needs neither
    one huge activation nor all its features on the device at once."""
    if not len(x):
        return x
    return torch.cat([fn(x[i : i + size].to(device)).cpu() for i in range(0, len(x), size)])


def _siamese(head: SiameseHead, *, image: Tensor | None, text: Tensor | None, device: torch.device) -> Tensor:
    """One modality through the Siamese head on ``device``, the other masked out (zeros, ``has_*`` False);
    the result on CPU."""
    present = image if image is not None else text
    assert present is not None
    n = len(present)
    img = image if image is not None else torch.zeros(n, head.image_proj.in_features)
    txt = text if text is not None else torch.zeros(n, head.text_proj.in_features)
    has_image = torch.full((n,), image is not None, device=device)
    has_text = torch.full((n,), text is not None, device=device)
    out: SiameseOutput = head(img.to(device), txt.to(device), has_image=has_image, has_text=has_text)
    return (out.image if image is not None else out.text).cpu()


class _HasDevice(Protocol):
    """What :func:`embedding_device` reads of Accelerate's ``PartialState``: its ``device``."""

    @property
    def device(self) -> torch.device: ...


def embedding_device(
    device: torch.device | str | None = None, *, state: _HasDevice | None = None
) -> torch.device:
    """Where embedding forwards run: ``device`` when given, else this process's accelerator, else the CPU.

    Rule, first match wins:

    1. an explicit ``device``;
    2. a launch this process has joined: Accelerate's ``PartialState`` is already initialised
       (:func:`cliptune.search.sharded.launched_processes` joined the ``accelerate launch`` / ``torchrun``
       group, or training's ``Accelerator`` started it): its device, so with N GPUs each process embeds on
       its own GPU, and a CPU launch (gloo) or a CPU training run stays on the CPU;
    3. the machine's accelerator: CUDA (the GPU of ``LOCAL_RANK`` when a launcher set it, else the current
       one), else MPS;
    4. the CPU.

    It never constructs a ``PartialState`` itself: under a launcher that would start a process group (even
    for one process), and it would fix Accelerate's device before training's ``Accelerator`` chooses it.
    The device always carries an index (``cuda:0``, not ``cuda``), so a model already there is recognised
    and not moved again.

    Args:
        device: An explicit device (wins), or None.
        state: A ``PartialState``-like object to read instead of Accelerate's (tests); None: Accelerate's,
            if initialised.

    Returns:
        The device, with an index for accelerators.

    Example:
        >>> embedding_device("cpu")
        device(type='cpu')
    """
    if device is not None:
        return _indexed(torch.device(device))
    if state is None:
        state = _joined_launch()
    if state is not None:
        return _indexed(torch.device(state.device))
    if torch.cuda.is_available():
        local = os.environ.get("LOCAL_RANK")
        if local is not None and local.isdigit():
            return torch.device("cuda", int(local) % torch.cuda.device_count())
        return _indexed(torch.device("cuda"))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps", 0)
    return torch.device("cpu")


def model_device(model: LoadedModel) -> torch.device:
    """The device ``model``'s backbone is on (its first parameter's, else buffer's; CPU without tensors):
    what one-off queries pass as ``device`` to embed where the model already is (``cliptune serve``,
    ``search``)."""
    where = _module_device(model.backbone)
    return torch.device("cpu") if where is None else where


def _joined_launch() -> _HasDevice | None:
    """Accelerate's ``PartialState`` if something in this process already initialised it, else None."""
    from accelerate import PartialState

    if not PartialState._shared_state:  # reading the shared dict constructs nothing
        return None
    state: _HasDevice = PartialState()
    return state


def _indexed(device: torch.device) -> torch.device:
    """``device`` with an index where it needs one (``cuda`` -> ``cuda:<current>``, ``mps`` -> ``mps:0``)."""
    if device.index is not None or device.type == "cpu":
        return device
    if device.type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device.type, 0)


def _place(model: LoadedModel, device: torch.device) -> None:
    """Move the backbone and the Siamese head to ``device`` unless they are there already (then no-op)."""
    for module in (model.backbone, model.head):
        if module is None:
            continue
        where = _module_device(module)
        if where is not None and where != device:
            module.to(device)


def _module_device(module: nn.Module) -> torch.device | None:
    """The device of a module's first parameter (else first buffer); None when it holds no tensor."""
    first: Tensor | None = next(iter(module.parameters()), None)
    if first is None:
        first = next(iter(module.buffers()), None)
    return None if first is None else first.device


# Decoding for the model: with ``data.fast_decode``, JPEGs are decoded at a reduced DCT scale when far
# larger than the model's input. Opt-in, because it changes features slightly (docs/benchmarks.md).

DRAFT_OVERSAMPLE = 2
"""Fast-decoded JPEGs decode to at least this many times the model's input side. At 1x the model's resize
sees visibly different pixels on fine detail (a star field: max diff 39/255); at 2x they match within a
few levels (docs/benchmarks.md), and a 12-megapixel photo still decodes at 1/4 scale."""

FULL_DECODE_ID = ""
"""The ``preprocess_id`` of full decoding: the empty string older caches were written with."""


def model_input_side(preprocess: Callable[[list[Image.Image]], Tensor]) -> int | None:
    """The longer side of the fixed-size pixels ``preprocess`` makes, or None when its size follows the input's.

    Probed with two small blank pictures of different shapes: a preprocess that resizes to the model's
    input size gives both the same (B, 3, H, W) shape. This needs nothing from the backbone besides its
    preprocess, so every backbone family (and any future one) gets the fast decode without declaring it.
    """
    try:
        a = preprocess([Image.new("RGB", (37, 29))])
        b = preprocess([Image.new("RGB", (29, 53))])
    except Exception:  # a preprocess that cannot take tiny pictures: decode at full size, always correct
        return None
    if a.ndim != 4 or a.shape != b.shape:
        return None
    return int(max(a.shape[-2:]))


def image_loader(
    preprocess: Callable[[list[Image.Image]], Tensor],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    fast_decode: bool = False,
) -> tuple[Callable[[Path], Image.Image], str]:
    """The loader of plain (un-augmented) images for ``preprocess``, and its part of the feature-cache key.

    Full decoding (the default) has the key part :data:`FULL_DECODE_ID`. With ``fast_decode``
    (``data.fast_decode``, carried by ``Backbone.fast_decode`` so every command embedding with the
    model decodes alike), JPEGs decode at the largest exact DCT reduction keeping the shorter side at
    least :data:`DRAFT_OVERSAMPLE` x the model's input side (:func:`cliptune.data.images.load_image`'s
    ``min_side``), and the key part records that bound, so features of fast-decoded images are never
    served to a full-decode run, nor the other way round. A preprocess without a fixed input size
    always decodes fully.

    Returns:
        ``(load, preprocess_id)``: ``load`` is a picklable partial (DataLoader workers started with
        "spawn", on macOS and Windows, pickle it).
    """
    min_side = decode_min_side(preprocess, fast_decode)
    if min_side is None:
        return partial(load_image, max_pixels=max_pixels), FULL_DECODE_ID
    return partial(load_image, max_pixels=max_pixels, min_side=min_side), f"jpeg-min-side={min_side}"


def decode_min_side(preprocess: Callable[[list[Image.Image]], Tensor], fast_decode: bool) -> int | None:
    """The shorter side a fast-decoded JPEG keeps (``load_image``'s ``min_side``): :data:`DRAFT_OVERSAMPLE` x
    the model's input side; None (full decoding) without ``fast_decode`` or a fixed input size. The one rule
    the plain loader (:func:`image_loader`) and the augmented views (``AugmentedLoader``) share."""
    side = model_input_side(preprocess) if fast_decode else None
    return None if side is None else DRAFT_OVERSAMPLE * side


def pixel_recipe_for(backbone: Backbone) -> PixelRecipe | None:
    """The backbone's uint8 recipe (uint8 batches, normalised on the forward's device), or None.

    None means the float preprocess runs in the loader, as always; that is fine, except where the pixel
    cache was asked for (``backbone.pixel_cache``, from ``data.pixel_cache``): a cache that cannot promise
    the same pixels is refused, never silently skipped.

    Raises:
        NoPixelRecipeError: ``backbone.pixel_cache`` is on and the backbone has no uint8 recipe (says why).
    """
    try:
        return backbone.pixel_recipe()
    except NoPixelRecipeError as e:
        if backbone.pixel_cache:
            raise NoPixelRecipeError(f"data.pixel_cache is on, but it cannot be used here: {e}") from e
        return None


def _pixel_dir(backbone: Backbone, feature_cache_dir: Path) -> Path | None:
    """``<feature cache>/pixels`` when ``data.pixel_cache`` is on (the feature cache's own shards sit in
    16-hex-digit folders beside it), else None."""
    return Path(feature_cache_dir) / "pixels" if backbone.pixel_cache else None


def catalogue_paths(catalogue: Catalogue, file_names: Sequence[str]) -> list[Path]:
    """Image files of ``file_name`` values."""
    return [catalogue.image_path(f) for f in file_names]


# Batched tower forwards through the feature cache: what every function above ends up calling.

_FLUSH_ROWS = 4096  # rows buffered before a shard is written: bounds the work lost to a crash
_PIXEL_FLUSH_ROWS = 512  # decoded images per pixel-cache shard: 77 MB at 224 px, bounds a crash's loss


def resolve_precision(precision: Precision, device: torch.device | str = "cpu") -> Literal["fp32", "bf16"]:
    """Decide the compute precision of a frozen forward.

    Rule: "fp32" and "bf16" are taken as given (bf16 always works, but without hardware support it is
    emulated and slower). "auto" picks bf16 only where it is native: on CUDA when
    ``torch.cuda.is_bf16_supported()``; on CPU when the CPU has AVX512_BF16 or AMX tiles (what oneDNN uses
    for bf16 GEMMs, 2.5-3x faster than fp32 there); fp32 everywhere else (MPS, older CPUs).

    Args:
        precision: "fp32", "bf16" or "auto".
        device: the device the forward runs on.

    Returns:
        "fp32" or "bf16".
    """
    if precision not in ("fp32", "bf16", "auto"):
        raise ValueError(f"precision must be 'fp32', 'bf16' or 'auto', got {precision!r}")
    if precision != "auto":
        return precision
    kind = torch.device(device).type
    if kind == "cuda":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if kind == "cpu":
        cpu = torch.cpu
        avx512_bf16 = getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
        amx = getattr(cpu, "_is_amx_tile_supported", lambda: False)()
        return "bf16" if (avx512_bf16 or amx) else "fp32"
    return "fp32"


Workers = int | Literal["auto"]
"""A decoding-workers setting (``data.num_workers``): a count of DataLoader worker processes, or ``"auto"``
for :func:`decode_workers` to pick one for the device."""

MAX_AUTO_WORKERS = 8
"""The most worker processes ``"auto"`` starts: each holds a copy of the loader and its prefetched batches
(memory), and takes a second or more to start; past ~8 the decoding outruns the towers measured so far."""

_SMALL_JOB_BATCHES = 2  # fewer images than this many batches: starting workers costs more than it saves


def decode_workers(
    setting: Workers | None,
    device: torch.device | str,
    *,
    items: int | None = None,
    batch_size: int = 64,
    cores: int | None = None,
    processes: int | None = None,
) -> int:
    """The DataLoader worker processes that decode images for a forward on ``device``.

    A count is taken as given. ``"auto"`` (or None) decides by where the forward runs:

    * **on the CPU -> 0.** The forward already uses every core (``torch.get_num_threads()``); a worker would
      take cores from it. With 0 workers decoding runs between forwards on the forward's own threads
      (:func:`_decode_threads`), which is as fast as decoding gets there (measured on 2 cores: 0, 1 and 2
      workers within noise, docs/benchmarks.md).
    * **on an accelerator (cuda, mps, ...) -> the CPU cores this process may use, shared among the
      launch's processes on this machine, minus one for the main process** (it feeds the device), capped
      at :data:`MAX_AUTO_WORKERS`, at least 1. The forward runs on the device, so the CPU cores are free
      to decode while it runs, and decoding on too few cores is what capped the pipeline at 0.13x of the
      tower on an H100 (issue 17). The cap bounds memory and start-up cost.
    * **a small job -> 0**: fewer than ``2 x batch_size`` images to decode; starting workers (a second or
      more each) would cost more than the decoding they share.

    Args:
        setting: ``data.num_workers``: an int >= 0, ``"auto"``, or None (= ``"auto"``).
        device: Where the forward runs (only its type matters).
        items: Images to decode, when known (None: not a small job).
        batch_size: Images per forward.
        cores: CPU cores this process may use (default: ``os.sched_getaffinity`` where available, else
            ``os.cpu_count()``).
        processes: Processes of the launch on this machine (default: ``LOCAL_WORLD_SIZE``, which torchrun
            and ``accelerate launch`` set, else 1).

    Returns:
        The worker count (0 = decode in this process).

    Raises:
        ValueError: ``setting`` is a negative int or another string than ``"auto"``.

    Example:
        >>> decode_workers("auto", "cpu")
        0
        >>> decode_workers("auto", "cuda", cores=16, processes=4)  # 16 // 4 - 1
        3
        >>> decode_workers(2, "cpu")
        2
    """
    if isinstance(setting, int) and not isinstance(setting, bool):
        if setting < 0:
            raise ValueError(f"num_workers must be >= 0 or 'auto', got {setting}")
        return setting
    if setting not in (None, "auto"):
        raise ValueError(f"num_workers must be an int >= 0 or 'auto', got {setting!r}")
    if torch.device(device).type == "cpu":
        return 0
    if items is not None and items < _SMALL_JOB_BATCHES * batch_size:
        return 0
    cores = _usable_cores() if cores is None else cores
    processes = _local_processes() if processes is None else processes
    return max(1, min(MAX_AUTO_WORKERS, cores // max(1, processes) - 1))


def _usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask: a container's or taskset's limit)."""
    affinity = getattr(os, "sched_getaffinity", None)  # Linux; absent on macOS and Windows
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def _local_processes() -> int:
    """Processes the launcher started on this machine (torchrun / ``accelerate launch`` set it), else 1."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def embed_images(
    paths: Sequence[Path | str],
    *,
    cache: FeatureCache | None,
    load: Callable[[Path], Image.Image],
    preprocess: Callable[[list[Image.Image]], Tensor],
    forward: Callable[[Tensor], Tensor],
    batch_size: int = 64,
    precision: Precision = "auto",
    num_workers: Workers = "auto",
    device: torch.device | str = "cpu",
    preprocess_id: str = "",
    progress: bool = True,
    recipe: PixelRecipe | None = None,
    pixel_cache_dir: Path | None = None,
) -> Tensor:
    """Embed image files with a frozen tower, computing only what the cache lacks.

    Each file is keyed by the sha256 of its bytes (so an edited image is recomputed and a copy under another
    name is not), identical files are embedded once, and misses are decoded and preprocessed in a
    ``DataLoader`` (``num_workers`` processes; ``load`` and ``preprocess`` must then be picklable) so
    decoding does not starve the forward. New features are flushed to the cache every 4,096 rows and at the
    end, so an interrupted run keeps most of its work.

    Args:
        paths: image files, in the order of the returned rows.
        cache: where features are read from and written to; None computes everything (still de-duplicated).
        load: path -> RGB PIL image (the robust loader of ``cliptune.data``); its errors are re-raised
            naming the file. It must be thread-safe: with 0 workers a batch's files load on the
            forward's threads (``torch.get_num_threads()``), and the files are hashed on them too.
        preprocess: list of images -> (B, 3, H, W) pixel tensor; used as the DataLoader's collate function.
        forward: (B, 3, H, W) -> (B, F) frozen image features (``backbone.image_features``).
        batch_size: images per forward.
        precision: "fp32", "bf16" or "auto" (see :func:`resolve_precision`); features are returned as
            float32 either way.
        num_workers: DataLoader worker processes for decoding (0 = in this process), or ``"auto"`` (the
            default): :func:`decode_workers` picks them for ``device`` and the number of images to decode
            (0 on the CPU and for small jobs; up to 8 on an accelerator).
        device: where the forward runs; batches are moved there.
        preprocess_id: preprocessing settings not already part of ``cache.identity`` (and part of the
            pixel cache's identity: the decode bound, an augmented view).
        progress: show a rich progress bar over the items to compute.
        recipe: ``preprocess`` split at its uint8 step (``backbone.pixel_recipe()``): batches then travel
            as uint8 (pinned, non-blocking copies on CUDA) and are normalised on ``device``, with features
            equal to ``preprocess``'s; None runs ``preprocess`` in the loader.
        pixel_cache_dir: with ``recipe``, a :class:`PixelCache` root: decoded uint8 pixels are read from
            it and the missing ones decoded once and added (before their forward); None decodes every miss.

    Returns:
        (N, F) float32 features on CPU, row i for ``paths[i]``; (0, 0) when ``paths`` is empty.

    Example:
        >>> Image.new("RGB", (40, 30), "red").save("red.png")
        >>> paths = [Path("red.png"), Path("red.png")]  # the same file is embedded once
        >>> feats = embed_images(paths, cache=FeatureCache("cache", backbone.identity()), load=load_image,
        ...                      preprocess=backbone.preprocess, forward=backbone.image_features,
        ...                      progress=False)
        >>> feats.shape[0], torch.equal(feats[0], feats[1])
        (2, True)
    """
    resolved = resolve_precision(precision, device)
    identity = cache.identity if cache is not None else ""
    # hashlib releases the GIL on large inputs: the files hash on the forward's threads (nothing runs yet)
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        shas = list(pool.map(_file_sha256, (Path(p) for p in paths)))  # in order; the first error is raised
    keys = [
        feature_key(identity, "image", sha, preprocess_id=preprocess_id, precision=resolved) for sha in shas
    ]
    first: dict[str, tuple[Path, str]] = {}
    for k, p, sha in zip(keys, paths, shas, strict=True):
        first.setdefault(k, (Path(p), sha))
    found = cache.get_many(first) if cache is not None else {}
    misses = [k for k in first if k not in found]
    todo = [first[k] for k in misses]
    cuda = torch.device(device).type == "cuda"
    workers = decode_workers(num_workers, device, items=len(todo), batch_size=batch_size)  # for the misses
    batches: Iterable[tuple[dict[str, Any], Tensor | None]]
    if recipe is None:
        batches = (
            ({}, p) for p in _loaded([p for p, _ in todo], load, preprocess, batch_size, workers, cuda)
        )
    else:
        forward = partial(_normalised_forward, forward, recipe.mean, recipe.std)
        if pixel_cache_dir is None:
            batches = (
                ({}, p) for p in _loaded([p for p, _ in todo], load, recipe, batch_size, workers, cuda)
            )
        else:
            pixel_id = f"{recipe.identity}\0{preprocess_id}"
            batches = (
                ({}, p)
                for p in _cached_uint8(
                    todo, load, recipe, pixel_id, pixel_cache_dir, batch_size, workers, cuda
                )
            )
    _compute_misses(batches, misses, found, cache, forward, resolved, device, progress, "images")
    return _assemble(keys, found)


def _loaded(
    paths: list[Path],
    load: Callable[[Path], Image.Image],
    prepare: Callable[[list[Image.Image]], Tensor] | PixelRecipe,
    batch_size: int,
    num_workers: int,
    pin: bool,
) -> Iterable[Tensor]:
    """Decoded batches in ``paths`` order: ``prepare`` float pixels, or a recipe's uint8 (B, H, W, 3).

    With a recipe, each image is decoded *and* resized to uint8 per item (:func:`_load_uint8`), so both
    steps run on :func:`_decode_threads` threads; a float ``prepare`` takes the whole batch in the collate.
    """
    files: _ImageFiles[Any]
    if isinstance(prepare, PixelRecipe):
        files = _ImageFiles(paths, partial(_load_uint8, load, prepare.to_uint8), _decode_threads(num_workers))
        collate: Callable[[list[Any]], Tensor] = _stack_uint8
    else:
        files, collate = _ImageFiles(paths, load, _decode_threads(num_workers)), prepare
    loader = DataLoader(
        files,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=partial(_collate_or_error, collate),
        pin_memory=pin,  # page-locked host batches: the copy to the GPU can be non-blocking
    )
    return (_raised(pixels) for pixels in loader)


def _decode_threads(num_workers: int) -> int:
    """Threads that decode one batch in this process: torch's thread count with 0 workers, else 1.

    With 0 workers the loader runs between forwards, on the cores the forward just left idle, so it may use
    as many threads as the forward does without taking a core from it (Pillow releases the GIL while it
    decodes and resizes, so on an idle machine a batch decodes up to that many times faster; the estimate
    and the measurements are in docs/benchmarks.md). Worker processes already decode in parallel,
    alongside the forward, so each keeps one thread.
    """
    return max(1, torch.get_num_threads()) if num_workers == 0 else 1


def _cached_uint8(
    todo: list[tuple[Path, str]],
    load: Callable[[Path], Image.Image],
    recipe: PixelRecipe,
    pixel_id: str,
    root: Path,
    batch_size: int,
    num_workers: int,
    pin: bool,
) -> Iterable[Tensor]:
    """uint8 batches of ``todo`` (path, sha256) through the pixel cache, in ``todo`` order.

    Cached images are read from the memory maps; the missing ones are decoded by a DataLoader (``num_workers``
    processes) *as the batches that need them come up*, so a cold pass decodes while the forward of the
    previous batch runs instead of decoding everything first. New pixels are stored every
    ``_PIXEL_FLUSH_ROWS`` and when the pass ends (also when it stops early: ``finally``).
    """
    if not todo:
        return
    probe = recipe.to_uint8(Image.new("RGB", (37, 29)))
    pixels = PixelCache(root, pixel_id, (probe.shape[0], probe.shape[1], probe.shape[2]))
    keys = [pixel_key(pixel_id, sha) for _, sha in todo]
    have = pixels.get_many(keys)
    missing = list(dict.fromkeys(k for k in keys if k not in have))
    path_of = dict(zip(keys, (p for p, _ in todo), strict=True))
    decoded = _rows(
        missing, _loaded([path_of[k] for k in missing], load, recipe, batch_size, num_workers, False)
    )
    fresh: dict[str, np.ndarray] = {}  # decoded, not yet in a batch
    pending: dict[str, np.ndarray] = {}  # decoded, not yet stored
    try:
        for start in range(0, len(keys), batch_size):
            chunk = keys[start : start + batch_size]
            rows = []
            for k in chunk:
                while k not in have and k not in fresh:  # missing is in keys order: pull up to k
                    key, row = next(decoded)
                    fresh[key] = pending[key] = row
                rows.append(have[k] if k in have else fresh[k])
            for (
                k
            ) in chunk:  # each key comes once (todo holds one row per sha256): drop it, memory stays bounded
                fresh.pop(k, None)
            batch_u8 = torch.from_numpy(np.stack(rows))  # (B, H, W, 3)
            yield batch_u8.pin_memory() if pin else batch_u8
            if len(pending) >= _PIXEL_FLUSH_ROWS:
                pixels.put_many(pending)
                pending = {}
    finally:
        pixels.put_many(pending)


def _rows(keys: list[str], batches: Iterable[Tensor]) -> Iterator[tuple[str, np.ndarray]]:
    """``(key, (H, W, 3) uint8 row)`` of decoded ``batches`` lined up with ``keys``."""
    done = 0
    for batch in batches:
        rows = batch.numpy()
        yield from zip(keys[done : done + len(rows)], rows, strict=True)
        done += len(rows)


def _load_uint8(
    load: Callable[[Path], Image.Image], to_uint8: Callable[[Image.Image], np.ndarray], path: Path
) -> np.ndarray:
    """One file decoded and brought to a recipe's (H, W, 3) uint8 (a loader item: runs on a decode thread)."""
    return to_uint8(load(path))


def _stack_uint8(rows: list[np.ndarray]) -> Tensor:
    """A recipe's collate: (H, W, 3) uint8 rows stacked to (B, H, W, 3)."""
    return torch.from_numpy(np.stack(rows))


def _normalised_forward(
    forward: Callable[[Tensor], Tensor], mean: tuple[float, ...], std: tuple[float, ...], pixels: Tensor
) -> Tensor:
    """``forward`` of uint8 (B, H, W, 3) pixels, normalised where they are (the forward's device)."""
    return forward(normalise_uint8(pixels, mean, std))


def embed_texts(
    texts: Sequence[str],
    *,
    cache: FeatureCache | None,
    tokenize: Callable[[list[str]], Mapping[str, Tensor]],
    forward: Callable[..., Tensor],
    batch_size: int = 256,
    precision: Precision = "auto",
    device: torch.device | str = "cpu",
    preprocess_id: str = "",
    progress: bool = True,
) -> Tensor:
    """Embed texts with a frozen tower, computing only what the cache lacks.

    Each text is keyed by the sha256 of its UTF-8 bytes; identical texts are embedded once.

    Args:
        texts: the texts, in the order of the returned rows.
        cache: where features are read from and written to; None computes everything (still de-duplicated).
        tokenize: list of texts -> dict of (B, L) tensors (``backbone.tokenize``).
        forward: called as ``forward(**tokens)`` -> (B, F) frozen text features (``backbone.text_features``).
        batch_size: texts per forward.
        precision: "fp32", "bf16" or "auto" (see :func:`resolve_precision`); features are float32 either way.
        device: where the forward runs; token tensors are moved there.
        preprocess_id: tokeniser settings (e.g. max length) not already part of ``cache.identity``.
        progress: show a rich progress bar over the items to compute.

    Returns:
        (N, F) float32 features on CPU, row i for ``texts[i]``; (0, 0) when ``texts`` is empty.

    Example:
        >>> cache = FeatureCache("cache", backbone.identity())
        >>> feats = embed_texts(["red dress", "blue jeans"], cache=cache, tokenize=backbone.tokenize,
        ...                     forward=backbone.text_features, progress=False)
        >>> feats.shape[0], feats.dtype
        (2, torch.float32)
    """
    resolved = resolve_precision(precision, device)
    identity = cache.identity if cache is not None else ""
    keys = [
        feature_key(
            identity,
            "text",
            hashlib.sha256(t.encode("utf-8")).hexdigest(),
            preprocess_id=preprocess_id,
            precision=resolved,
        )
        for t in texts
    ]
    first_text: dict[str, str] = {}
    for k, t in zip(keys, texts, strict=True):
        first_text.setdefault(k, t)
    found = cache.get_many(first_text) if cache is not None else {}
    misses = [k for k in first_text if k not in found]
    chunks = (misses[i : i + batch_size] for i in range(0, len(misses), batch_size))
    batches = ((dict(tokenize([first_text[k] for k in chunk])), None) for chunk in chunks)
    _compute_misses(batches, misses, found, cache, forward, resolved, device, progress, "texts")
    return _assemble(keys, found)


def _collate_or_error(preprocess: Callable[[list[Any]], Tensor], items: list[Any]) -> Tensor | ImageLoadError:
    # A worker process re-raises an exception as a RuntimeError holding a traceback text when the type
    # takes more than a message (ImageLoadError takes path and reason): hand the error over as a value.
    for item in items:
        if isinstance(item, ImageLoadError):
            return item
    return preprocess(items)


def _raised(pixels: Tensor | ImageLoadError) -> Tensor:
    if isinstance(pixels, ImageLoadError):
        raise pixels
    return pixels


_Item = TypeVar("_Item")


class _ImageFiles(Dataset[_Item | ImageLoadError]):
    """``load(path)`` per file, a failure handed over as its ImageLoadError; a batch's files are loaded on
    ``threads`` threads (``__getitems__``, which the DataLoader calls with a batch's indices)."""

    def __init__(self, paths: list[Path], load: Callable[[Path], _Item], threads: int = 1) -> None:
        self.paths, self.load, self.threads = paths, load, threads

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> _Item | ImageLoadError:
        try:
            return self.load(self.paths[i])
        except ImageLoadError as e:
            return e  # already names the file and the reason; raised in the main process (_raised)
        except Exception as e:
            error = ImageLoadError(self.paths[i], f"cannot load image ({e})")
            error.__cause__ = e  # what `raise ... from e` would record, for --debug
            return error

    def __getitems__(self, indices: list[int]) -> list[_Item | ImageLoadError]:
        if self.threads < 2 or len(indices) < 2:
            return [self[i] for i in indices]
        with ThreadPoolExecutor(min(self.threads, len(indices))) as pool:  # results in ``indices`` order
            return list(pool.map(self.__getitem__, indices))


def _compute_misses(
    batches: Iterable[tuple[dict[str, Any], Tensor | None]],
    misses: list[str],
    found: dict[str, Tensor],
    cache: FeatureCache | None,
    forward: Callable[..., Tensor],
    precision: Literal["fp32", "bf16"],
    device: torch.device | str,
    progress: bool,
    what: str,
) -> None:
    """Run ``forward`` over batches (kwargs, positional) lined up with ``misses``; fill ``found``, flush cache."""
    dev = torch.device(device)
    pending: dict[str, Tensor] = {}
    done = 0
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress or not misses) as bar:
        task = bar.add_task(f"embedding {what} ({len(found)} cached)", total=len(misses))
        for kwargs, positional in batches:
            kwargs = {
                k: v.to(dev, non_blocking=True) if isinstance(v, Tensor) else v for k, v in kwargs.items()
            }
            args = () if positional is None else (positional.to(dev, non_blocking=True),)
            with (
                torch.inference_mode(),
                torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"),
            ):
                out = forward(*args, **kwargs)  # (B, F)
            batch_keys = misses[done : done + out.shape[0]]
            if out.ndim != 2 or out.shape[0] != len(batch_keys):
                raise ValueError(
                    f"embedding {what}: forward returned shape {tuple(out.shape)} for a batch of "
                    f"{len(batch_keys)} items; expected (batch, features)"
                )
            out = out.float().cpu()  # (B, F) float32 whatever the autocast dtype
            for k, row in zip(batch_keys, out, strict=True):
                found[k] = row
                pending[k] = row
            done += len(batch_keys)
            bar.advance(task, len(batch_keys))
            if cache is not None and len(pending) >= _FLUSH_ROWS:
                cache.put_many(pending)
                pending = {}
    if cache is not None and pending:
        cache.put_many(pending)


def _assemble(keys: list[str], found: dict[str, Tensor]) -> Tensor:
    if not keys:
        return torch.empty(0, 0)
    return torch.stack([found[k] for k in keys]).float()  # (N, F)


def _file_sha256(path: Path) -> str:
    # read_image_bytes: the one reader of image bytes (a file, or a WebDataset shard member)
    return hashlib.sha256(read_image_bytes(path)).hexdigest()
