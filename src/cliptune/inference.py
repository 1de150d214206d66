"""Load a trained model (a run directory or a model folder) and embed catalogue rows with it.

Every command after training (``eval``, ``test``, ``index``, ``search``) goes through here, so that all of
them embed the same way: tower features through the feature cache when the towers are frozen, then the
trained heads; the Siamese head on top for siamese runs. Embeddings are L2-normalised float32 on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from cliptune.data.catalogue import Catalogue
from cliptune.data.images import load_image
from cliptune.models.backbone import Backbone, BackboneError, load_backbone
from cliptune.models.cache import FeatureCache, embed_images, embed_texts
from cliptune.models.embed import default_cache_dir
from cliptune.models.siamese import SiameseHead

__all__ = [
    "LoadedModel",
    "load_model",
    "embed_images_with",
    "embed_texts_with",
    "default_cache_dir",
    "catalogue_paths",
]


@dataclass
class LoadedModel:
    """A trained model ready to embed.

    Attributes:
        backbone: The dual encoder (towers + heads).
        head: The Siamese fusion head for siamese runs, else None.
        source: The folder it was loaded from.
        name: A short identity used to refuse mixing models in one index (``backbone identity`` + head).
    """

    backbone: Backbone
    head: SiameseHead | None
    source: Path
    name: str


def load_model(path: Path | str) -> LoadedModel:
    """Load a run directory (``RUN/model``), a saved model folder, or any ``load_backbone`` spec.

    Args:
        path: ``runs/<name>``, ``runs/<name>/model``, a ``save_pretrained`` folder, ``embedded``, or a hub id.

    Returns:
        The :class:`LoadedModel` in eval mode.

    Raises:
        BackboneError: Nothing loadable there (the message lists what was tried).

    Example:
        >>> model = load_model("runs/demo-finetuned")  # doctest: +SKIP
    """
    path = Path(path)
    folder = path / "model" if (path / "model").is_dir() else path
    head = None
    if (folder / "head").is_dir() and (folder / "backbone").is_dir():
        head = SiameseHead.load(folder / "head").eval()
        backbone = load_backbone(folder / "backbone")
    else:
        try:
            backbone = load_backbone(folder if folder.exists() else str(path))
        except BackboneError as exc:
            raise BackboneError(
                f"{path}: not a run directory, model folder or backbone spec ({exc})"
            ) from None
    name = backbone.identity() + (f"+head:{_head_hash(head)}" if head is not None else "")
    return LoadedModel(backbone=backbone.eval(), head=head, source=folder, name=name)


def _head_hash(module: nn.Module) -> str:
    import hashlib

    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.inference_mode()
def embed_images_with(
    model: LoadedModel,
    paths: Sequence[Path],
    *,
    cache_dir: Path | None = None,
    precision: str = "auto",
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
        model: From :func:`load_model`.
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
    load = partial(load_image, **({} if max_pixels is None else {"max_pixels": max_pixels}))

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
    precision: str = "auto",
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


def _batched(fn, x: Tensor, size: int = 4096) -> Tensor:
    return torch.cat([fn(x[i : i + size]) for i in range(0, len(x), size)]) if len(x) else x


def _siamese(head: SiameseHead, *, image: Tensor | None, text: Tensor | None) -> Tensor:
    n = len(image if image is not None else text)
    img = image if image is not None else torch.zeros(n, head.image_proj.in_features)
    txt = text if text is not None else torch.zeros(n, head.text_proj.in_features)
    has_image = torch.full((n,), image is not None)
    has_text = torch.full((n,), text is not None)
    out = head(img, txt, has_image=has_image, has_text=has_text)
    return out.image if image is not None else out.text


def catalogue_paths(catalogue: Catalogue, file_names: Sequence[str]) -> list[Path]:
    """Image files of ``file_name`` values."""
    return [catalogue.image_path(f) for f in file_names]
