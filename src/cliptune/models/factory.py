"""The one entry point for getting a model: ``load_backbone(spec)`` and ``load_model(path)``.

``load_backbone`` resolves a backbone spec (a named spec, a saved folder, a transformers folder or hub
id) through explicit registries of kinds; ``load_model`` adds what a training run saves around a
backbone (the Siamese head) and knows the folder layouts runs write. Keeping both here, and only here,
means the backbone contract (``backbone.py``) never imports the implementations (``hf.py``,
``composed.py``, ``freeze.py``), so there is no import circle.

Example:
    >>> backbone = load_backbone("embedded", trainable_layers=1)
    >>> model = load_model("runs/demo")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from cliptune.models import composed, hf, openclip
from cliptune.models.backbone import (
    CONFIG_FILE,
    FORMAT_VERSION,
    STATE_FILE,
    Backbone,
    BackboneError,
    WeightsMismatchError,
    load_state_strict,
    read_state,
)
from cliptune.models.freeze import LoraSpec, apply_lora, apply_trainable_layers
from cliptune.models.siamese import SiameseHead
from cliptune.rundir import MODEL_DIR, RunDir

__all__ = [
    "BACKBONE_DIR",
    "HEAD_DIR",
    "MODEL_DIR",
    "NAMED_SPECS",
    "OPEN_CLIP_PREFIX",
    "SAVED_KINDS",
    "LoadedModel",
    "is_siamese_folder",
    "load_backbone",
    "load_model",
    "model_folder",
]

# --- folder layouts written by training (train/checkpoint.py, train/tasks/siamese.py) --------------
# MODEL_DIR, the run directory's model folder, is cliptune.rundir's (re-exported here).
HEAD_DIR = "head"
"""Sub-folder of a Siamese model folder holding the :class:`SiameseHead`."""
BACKBONE_DIR = "backbone"
"""Sub-folder of a Siamese model folder holding the frozen backbone the head was trained on."""


@dataclass(frozen=True)
class _NamedSpec:
    """A spec resolved by name rather than by folder: how to build it and which options it takes."""

    build: Callable[..., Backbone]
    options: frozenset[str]


def _build_composed(spec: str, *, embed_dim: int | None, **kwargs: Any) -> Backbone:
    return composed.load_composed(spec, embed_dim=embed_dim, **kwargs)


def _saved_composed(path: Path, saved: dict[str, Any]) -> Backbone:
    return composed.load_saved_composed(path, saved)


def _saved_hf(path: Path, saved: dict[str, Any]) -> Backbone:
    return hf.load_hf(path, kind=saved["kind"], embed_dim=saved.get("embed_dim"), seed=0)


def _saved_open_clip(path: Path, saved: dict[str, Any]) -> Backbone:
    return openclip.load_open_clip(str(path))


OPEN_CLIP_PREFIX = "open_clip:"
"""Spec prefix of open_clip checkpoints: ``open_clip:hf-hub:org/name``, ``open_clip:ViT-B-32/tag``, ``open_clip:DIR``."""


NAMED_SPECS: dict[str, _NamedSpec] = {
    "embedded": _NamedSpec(_build_composed, frozenset({"image_tower", "text_tower", "seed", "image_size"})),
    "composed": _NamedSpec(_build_composed, frozenset({"image_tower", "text_tower", "seed", "image_size"})),
}
"""Specs that are names, not folders; anything else is a saved folder or a transformers model."""

SAVED_KINDS: dict[str, Callable[[Path, dict[str, Any]], Backbone]] = {
    "composed": _saved_composed,
    "clip": _saved_hf,
    "siglip": _saved_hf,
    "auto": _saved_hf,
    "open_clip": _saved_open_clip,
}
"""How each ``kind`` of ``cliptune_backbone.json`` rebuilds its architecture before weights load."""

_HF_OPTIONS = frozenset({"kind", "seed"})


def load_backbone(
    spec: str | Path,
    *,
    trainable_layers: int = 0,
    lora: LoraSpec | None = None,
    embed_dim: int | None = None,
    **kwargs: Any,
) -> Backbone:
    """Load any supported image-text backbone: the one entry point.

    ``spec`` is resolved in this order:

    1. A folder with ``cliptune_backbone.json`` (written by ``Backbone.save``): restored exactly,
       through :data:`SAVED_KINDS`.
    2. A name in :data:`NAMED_SPECS`: ``"embedded"`` (the offline default, EfficientNet-Lite0 +
       all-MiniLM-L6-v2, each followed by a new trainable projection of size ``embed_dim``, default
       256) or ``"composed"`` (explicit ``image_tower=`` and ``text_tower=``).
    3. A local folder or hub id of a ``CLIPModel``, ``SiglipModel`` or any ``AutoModel`` with
       ``get_image_features`` / ``get_text_features`` (``kind="auto"`` forces the generic path).
       A hub id is tried from the local cache only when ``HF_HUB_OFFLINE`` is set.
    4. ``open_clip:`` + an open_clip folder, ``hf-hub:org/name`` or ``Name/pretrained-tag``
       (needs the optional extra ``cliptune[open_clip]``; see ``cliptune.models.openclip``).

    Args:
        spec: See above.
        trainable_layers: -1 trains everything, 0 only the heads, N > 0 the last N blocks of
            each tower plus final norms and heads (see ``apply_trainable_layers``).
        lora: LoRA adapters on the towers instead of unfreezing blocks (needs
            ``trainable_layers == 0``).
        embed_dim: Size of the shared space for backbones with new projections (composed,
            auto); for CLIP/SigLIP it must equal the pretrained projection size.
        **kwargs: Kind-specific options: ``image_tower``, ``text_tower``, ``image_size`` (composed),
            ``kind`` (force ``"auto"``), ``seed`` (initialisation of new projections, default 0).

    Returns:
        The backbone in eval mode with the requested parameters trainable.

    Raises:
        BackboneError: The spec cannot be resolved or loaded (offline), or options conflict.

    Example:
        >>> backbone = load_backbone("runs/demo/model")  # doctest: +SKIP
        >>> backbone = load_backbone("embedded", trainable_layers=1)
    """
    # Kept although Config checks it too: this is a public entry point reachable without a Config.
    if lora is not None and trainable_layers != 0:
        raise BackboneError(
            f"backbone {spec!s}: lora and trainable_layers={trainable_layers} are alternatives; "
            "use trainable_layers=0 with lora"
        )
    path = Path(spec)
    saved = _read_saved_config(path) if path.is_dir() else None
    if saved is not None:
        _check_options(spec, kwargs, frozenset())
        if embed_dim is not None and embed_dim != saved.get("embed_dim"):
            raise BackboneError(
                f"{path}: saved with embed_dim={saved.get('embed_dim')}, asked for {embed_dim}"
            )
        backbone, saved_lora = _load_saved(path, saved)
        if saved_lora is not None:
            if lora is not None and lora != saved_lora:
                raise BackboneError(f"{path}: saved with LoRA {saved_lora}, asked for a different {lora}")
            if trainable_layers != 0:
                raise BackboneError(
                    f"{path}: saved with LoRA, so trainable_layers must be 0, got {trainable_layers}"
                )
            return backbone.eval()
    elif str(spec) in NAMED_SPECS:
        named = NAMED_SPECS[str(spec)]
        _check_options(spec, kwargs, named.options)
        backbone = named.build(str(spec), embed_dim=embed_dim, **kwargs)
    elif str(spec).startswith(OPEN_CLIP_PREFIX):
        backbone = _build_open_clip(str(spec), embed_dim, kwargs)
    else:
        _check_options(spec, kwargs, _HF_OPTIONS)
        backbone = hf.load_hf(spec, embed_dim=embed_dim, **kwargs)
    apply_trainable_layers(backbone, trainable_layers)
    if lora is not None:
        apply_lora(backbone, lora)
    return backbone.eval()


def _build_open_clip(spec: str, embed_dim: int | None, kwargs: dict[str, Any]) -> Backbone:
    _check_options(spec, kwargs, frozenset())
    backbone = openclip.load_open_clip(spec.removeprefix(OPEN_CLIP_PREFIX))
    if embed_dim not in (None, backbone.embed_dim):
        raise BackboneError(
            f"backbone {spec!r}: embed_dim={embed_dim} differs from the pretrained projection size "
            f"{backbone.embed_dim}; the pretrained heads define the shared space"
        )
    return backbone


def _check_options(spec: str | Path, kwargs: dict[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise BackboneError(
            f"backbone {str(spec)!r}: unknown option(s) {unknown}; allowed here: {sorted(allowed)}"
        )


def _read_saved_config(path: Path) -> dict[str, Any] | None:
    """``cliptune_backbone.json`` of a saved folder, checked; None when ``path`` is not one."""
    file = path / CONFIG_FILE
    if not file.is_file():
        return None
    try:
        config: dict[str, Any] = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise BackboneError(f"{file}: not valid JSON ({err})") from err
    for key in ("kind", "format_version"):
        if key not in config:
            raise BackboneError(f"{file}: missing field {key!r}")
    if config["format_version"] > FORMAT_VERSION:
        raise BackboneError(
            f"{file}: format_version {config['format_version']} is newer than this cliptune "
            f"understands ({FORMAT_VERSION}); upgrade cliptune"
        )
    return config


def _load_saved(path: Path, saved: dict[str, Any]) -> tuple[Backbone, LoraSpec | None]:
    """Rebuild a saved backbone: architecture, trainable state and LoRA, then its exact weights."""
    kind = saved["kind"]
    if kind not in SAVED_KINDS:
        raise BackboneError(f"{path / CONFIG_FILE}: unknown kind {kind!r}")
    backbone = SAVED_KINDS[kind](path, saved)
    backbone.fast_decode = bool(saved.get("fast_decode", False))  # how it was trained to see images
    lora = LoraSpec(**saved["lora"]) if saved.get("lora") else None
    if lora is not None:  # the adapters must exist before their weights can be loaded
        apply_lora(backbone, lora)
    state_file = path / STATE_FILE
    keys = _state_keys(backbone, saved)
    if keys is None or keys or state_file.is_file():
        load_state_strict(backbone, read_state(state_file), state_file, keys=keys)
    return backbone, lora


def _state_keys(backbone: Backbone, saved: dict[str, Any]) -> set[str] | None:
    """Keys the state file must hold exactly: all (None) for a full state, else those outside ``model.``."""
    if saved.get("state", "full") == "full":
        return None
    if saved["state"] == "none":  # the architecture's own folder holds every weight (an open_clip save)
        return set()
    # a partial state is an HF save: the transformers folder held `model.*` (loaded strictly by hf.load_hf),
    # the state file holds the rest (an auto backbone's new heads; nothing for CLIP / SigLIP)
    return {k for k in backbone.state_dict() if not k.startswith("model.")}


@dataclass
class LoadedModel:
    """A trained model ready to embed.

    Attributes:
        backbone: The dual encoder (towers + heads).
        head: The Siamese fusion head for siamese runs, else None.
        source: The folder it was loaded from.
        name: The model identity an index records to refuse mixing embedding spaces:
            ``backbone.model_identity()`` (tower and heads), plus the Siamese head's hash for siamese runs.
            Not the feature-cache key (``backbone.features_identity()``, heads excluded).
    """

    backbone: Backbone
    head: SiameseHead | None
    source: Path
    name: str


def model_folder(path: Path) -> Path:
    """The model folder of ``path``: ``path/model`` for a run directory, else ``path`` itself."""
    model = RunDir(path).model
    return model if model.is_dir() else path


def is_siamese_folder(folder: Path) -> bool:
    """True for a model folder a siamese run wrote (``head/`` + ``backbone/``)."""
    return (folder / HEAD_DIR).is_dir() and (folder / BACKBONE_DIR).is_dir()


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
    folder = model_folder(path)
    head = None
    if is_siamese_folder(folder):
        head = SiameseHead.load(folder / HEAD_DIR).eval()
        backbone = load_backbone(folder / BACKBONE_DIR)
    else:
        try:
            backbone = load_backbone(folder if folder.exists() else str(path))
        except WeightsMismatchError:
            raise  # it was loadable, its weights are wrong: say so, not "nothing loadable"
        except BackboneError as exc:
            raise BackboneError(
                f"{path}: not a run directory, model folder or backbone spec ({exc})"
            ) from None
    # recomputed from the loaded tensors, never read from the folder's metadata: a name must describe the
    # weights that will embed (the head tensors are small; the tower hash is the one the feature cache needs)
    name = backbone.model_identity() + (f"+head:{_head_hash(head)}" if head is not None else "")
    return LoadedModel(backbone=backbone.eval(), head=head, source=folder, name=name)


def _head_hash(module: nn.Module) -> str:
    """Hash of a head's weights and buffers: two heads on one backbone must not share an index."""
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
