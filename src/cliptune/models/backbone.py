"""The backbone contract every image-text model meets, and `load_backbone`, its one entry point.

A backbone is two towers, each split into a *feature* part and a *head*:

    image -> preprocess -> image_features (B, Fi) -> image_head -> (B, D)
    text  -> tokenize   -> text_features  (B, Ft) -> text_head  -> (B, D)

The split is what makes feature caching possible: with ``trainable_layers == 0`` and no LoRA only
the heads train, so the features can be computed once and cached under ``identity()``. Outputs of
``encode_*`` are *not* normalised; losses and retrieval normalise. The learned similarity
parameters of the source model (CLIP ``logit_scale``, SigLIP ``logit_scale``/``logit_bias``) are
not part of the contract (losses own their temperature); they are exposed as read-only numbers in
``similarity_init`` and never train.

Example:
    >>> backbone = load_backbone("embedded")            # offline LiT-style default
    >>> pixels = backbone.preprocess(images)            # (B, 3, 224, 224)
    >>> image_emb = backbone.encode_image(pixels)       # (B, 256)
    >>> text_emb = backbone.encode_text(**backbone.tokenize(["a cat"]))
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch import Tensor, nn

from cliptune.errors import CliptuneError

if TYPE_CHECKING:
    from cliptune.models.freeze import LoraSpec

__all__ = ["CONFIG_FILE", "Backbone", "BackboneError", "Tower", "load_backbone"]

CONFIG_FILE = "cliptune_backbone.json"
STATE_FILE = "cliptune_state.safetensors"
FORMAT_VERSION = 1


class BackboneError(CliptuneError, ValueError):
    """A backbone cannot be loaded, configured or saved; the message names the spec and reason."""


@dataclass
class Tower:
    """Where the layers of one tower are, so freezing and LoRA treat every backbone alike.

    Attributes:
        name: ``"image"`` or ``"text"``.
        blocks: The repeated blocks in forward order (encoder layers, MBConv blocks); the last
            ``N`` of them train when ``trainable_layers == N``.
        final: Modules after the last block and before the head (final norms, a head conv);
            trainable whenever ``trainable_layers != 0``.
        body: The module LoRA adapters are injected into (it must not contain a head).
        lora_targets: Default LoRA target module names (the last component of a module name).
    """

    name: str
    blocks: list[nn.Module]
    final: list[nn.Module] = field(default_factory=list)
    body: nn.Module | None = None
    lora_targets: tuple[str, ...] = ()


class Backbone(nn.Module):
    """Base class of every backbone: an image tower and a text tower, each features -> head.

    Subclasses implement the ``*_features`` / ``*_head`` halves, preprocessing, tokenisation,
    ``towers``/``heads`` (the layer map used by ``freeze.py``) and ``save``. The base class
    provides ``encode_*``, ``features_frozen``, ``identity`` and a ``train`` that keeps frozen
    modules in eval mode, so BatchNorm statistics and dropout in frozen parts never change and
    cached features stay exact.

    Attributes:
        kind: ``"clip"``, ``"siglip"``, ``"auto"`` or ``"composed"``.
        embed_dim: Size D of ``encode_image`` / ``encode_text`` outputs.
        trainable_layers: The value last applied by ``apply_trainable_layers``.
        lora: The LoRA spec applied by ``apply_lora``, or None.
        similarity_init: Pretrained similarity parameters of the source model (may be empty).
    """

    kind: str = ""
    embed_dim: int = 0

    def __init__(self) -> None:
        super().__init__()
        self.trainable_layers = 0
        self.lora: LoraSpec | None = None
        self.similarity_init: dict[str, float] = {}

    # --- implemented by subclasses -------------------------------------------------------
    def image_features(self, pixel_values: Tensor) -> Tensor:
        """Output of the image tower before its head.

        Args:
            pixel_values: Preprocessed images.

        Returns:
            Features that ``image_head`` maps into the shared space.

        Shapes:
            pixel_values: (B, 3, H, W) -> (B, Fi)
        """
        raise NotImplementedError

    def text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Output of the text tower before its head.

        Args:
            input_ids: Token ids from ``tokenize``.
            attention_mask: 1 for real tokens, 0 for padding.

        Returns:
            Features that ``text_head`` maps into the shared space.

        Shapes:
            input_ids, attention_mask: (B, T) -> (B, Ft)
        """
        raise NotImplementedError

    def image_head(self, feats: Tensor) -> Tensor:
        """The trainable image projection/head. Shapes: (B, Fi) -> (B, D)."""
        raise NotImplementedError

    def text_head(self, feats: Tensor) -> Tensor:
        """The trainable text projection/head. Shapes: (B, Ft) -> (B, D)."""
        raise NotImplementedError

    def preprocess(self, images: list[Image.Image]) -> Tensor:
        """Turn PIL images into the pixel tensor the image tower expects. Returns (B, 3, H, W)."""
        raise NotImplementedError

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """Tokenise texts into ``input_ids`` and ``attention_mask``, both (B, T) long tensors."""
        raise NotImplementedError

    def towers(self) -> list[Tower]:
        """The layer map of both towers (image first) used by freezing and LoRA."""
        raise NotImplementedError

    def heads(self) -> list[nn.Module]:
        """The head modules; they train whenever anything trains."""
        raise NotImplementedError

    def save(self, directory: Path) -> None:
        """Write the backbone so that ``load_backbone(directory)`` restores it bit for bit."""
        raise NotImplementedError

    def _fingerprint(self) -> dict[str, Any]:
        """Architecture, preprocessing and tokenizer settings hashed by ``identity``."""
        raise NotImplementedError

    def _unused_parameters(self) -> list[nn.Parameter]:
        """Parameters no ``encode_*`` uses (similarity params, classifier heads): always frozen."""
        return []

    # --- provided ------------------------------------------------------------------------
    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """Embed images into the shared space (not normalised).

        Args:
            pixel_values: Output of ``preprocess``.

        Returns:
            ``image_head(image_features(pixel_values))``.

        Shapes:
            (B, 3, H, W) -> (B, D)
        """
        return self.image_head(self.image_features(pixel_values))

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Embed tokenised texts into the shared space (not normalised).

        Args:
            input_ids: Token ids from ``tokenize``.
            attention_mask: Padding mask from ``tokenize``.

        Returns:
            ``text_head(text_features(input_ids, attention_mask))``.

        Shapes:
            (B, T) -> (B, D)
        """
        return self.text_head(self.text_features(input_ids, attention_mask))

    @property
    def features_frozen(self) -> bool:
        """True when nothing before the heads trains, so cached features stay valid."""
        return not any(p.requires_grad for _, p in self._feature_parameters())

    def identity(self) -> str:
        """A stable hash of everything that determines ``*_features``: the feature-cache key prefix.

        It covers the architecture, preprocessing and tokenizer settings and every tensor of the
        feature part (parameters and buffers, heads excluded), so retraining a head keeps the key
        and touching a frozen weight changes it. It does not depend on where the model was loaded
        from: a saved and reloaded backbone has the same identity.

        Returns:
            A 16-hex-digit SHA-256 prefix.
        """
        digest = hashlib.sha256()
        digest.update(json.dumps(self._fingerprint(), sort_keys=True, default=str).encode())
        head_prefixes = self._prefixes(self.heads())
        skip = {id(p) for p in self._unused_parameters()}
        named = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        for name in sorted(named):
            tensor = named[name]
            if id(tensor) in skip or name.startswith(head_prefixes):
                continue
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]

    def train(self, mode: bool = True) -> Backbone:
        """Set train mode, but keep every fully frozen sub-module in eval mode.

        Args:
            mode: Train (True) or eval (False).

        Returns:
            self.
        """
        super().train(mode)
        if mode:
            _freeze_mode(self)
        return self

    def _feature_parameters(self) -> list[tuple[str, nn.Parameter]]:
        head_ids = {id(p) for head in self.heads() for p in head.parameters()}
        skip = head_ids | {id(p) for p in self._unused_parameters()}
        return [(n, p) for n, p in self.named_parameters() if id(p) not in skip]

    def _prefixes(self, modules: list[nn.Module]) -> tuple[str, ...]:
        wanted = {id(m) for m in modules}
        return tuple(f"{name}." for name, m in self.named_modules() if id(m) in wanted)


def _freeze_mode(module: nn.Module) -> None:
    """Put children whose parameters are all frozen into eval mode, recursing into the rest."""
    for child in module.children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            child.eval()
        else:
            _freeze_mode(child)


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

    1. ``"embedded"``: the offline default, EfficientNet-Lite0 (ImageNet) + all-MiniLM-L6-v2,
       each followed by a new trainable projection (``embed_dim``, default 256).
    2. ``"composed"``: explicit towers, ``image_tower=`` (``"efficientnet-lite0"`` or a local
       CLIP/SigLIP folder) and ``text_tower=`` (a local transformers encoder folder).
    3. A folder with ``cliptune_backbone.json`` (written by ``Backbone.save``): restored exactly.
    4. A local folder or hub id of a ``CLIPModel``, ``SiglipModel`` or any ``AutoModel`` with
       ``get_image_features`` / ``get_text_features`` (``kind="auto"`` forces the generic path).
       A hub id is tried from the local cache only when ``HF_HUB_OFFLINE`` is set.

    Args:
        spec: See above.
        trainable_layers: -1 trains everything, 0 only the heads, N > 0 the last N blocks of
            each tower plus final norms and heads (see ``apply_trainable_layers``).
        lora: LoRA adapters on the towers instead of unfreezing blocks (needs
            ``trainable_layers == 0``).
        embed_dim: Size of the shared space for backbones with new projections (composed,
            auto); for CLIP/SigLIP it must equal the pretrained projection size.
        **kwargs: Kind-specific options: ``image_tower``, ``text_tower``, ``image_size`` (composed), ``kind``
            (force ``"auto"``), ``seed`` (initialisation of new projections, default 0).

    Returns:
        The backbone in eval mode with the requested parameters trainable.

    Raises:
        BackboneError: The spec cannot be resolved or loaded (offline), or options conflict.

    Example:
        >>> backbone = load_backbone("runs/demo/model")
        >>> backbone = load_backbone("embedded", trainable_layers=1)
    """
    from cliptune.models import composed, hf
    from cliptune.models.freeze import apply_lora, apply_trainable_layers

    if lora is not None and trainable_layers != 0:
        raise BackboneError(
            f"backbone {spec!s}: lora and trainable_layers={trainable_layers} are alternatives; "
            "use trainable_layers=0 with lora"
        )
    path = Path(spec)
    saved = _read_saved_config(path) if path.is_dir() else None
    if saved is not None:
        _check_options(spec, kwargs, set())
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
    elif str(spec) in ("embedded", "composed"):
        _check_options(spec, kwargs, {"image_tower", "text_tower", "seed", "image_size"})
        backbone = composed.load_composed(str(spec), embed_dim=embed_dim, **kwargs)
    else:
        _check_options(spec, kwargs, {"kind", "seed"})
        backbone = hf.load_hf(spec, embed_dim=embed_dim, **kwargs)
    apply_trainable_layers(backbone, trainable_layers)
    if lora is not None:
        apply_lora(backbone, lora)
    return backbone.eval()


def _check_options(spec: str | Path, kwargs: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise BackboneError(
            f"backbone {str(spec)!r}: unknown option(s) {unknown}; allowed here: {sorted(allowed)}"
        )


def _read_saved_config(path: Path) -> dict[str, Any] | None:
    file = path / CONFIG_FILE
    if not file.is_file():
        return None
    try:
        config = json.loads(file.read_text())
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
    from safetensors.torch import load_file

    from cliptune.models import composed, hf
    from cliptune.models.freeze import LoraSpec, apply_lora

    kind = saved["kind"]
    if kind == "composed":
        backbone: Backbone = composed.load_saved_composed(path, saved)
    elif kind in ("clip", "siglip", "auto"):
        backbone = hf.load_hf(path, kind=kind, embed_dim=saved.get("embed_dim"), seed=0)
    else:
        raise BackboneError(f"{path / CONFIG_FILE}: unknown kind {kind!r}")
    lora = LoraSpec(**saved["lora"]) if saved.get("lora") else None
    if lora is not None:  # the adapters must exist before their weights can be loaded
        apply_lora(backbone, lora)
    state_file = path / STATE_FILE
    if state_file.is_file():
        try:
            state = load_file(str(state_file))
        except Exception as err:  # safetensors raises its own error types
            raise BackboneError(f"{state_file}: cannot read weights ({err})") from err
        missing, unexpected = backbone.load_state_dict(state, strict=False)
        if unexpected or (saved.get("state") == "full" and missing):
            raise BackboneError(
                f"{state_file}: weights do not match the architecture "
                f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
    return backbone, lora


def write_config(directory: Path, backbone: Backbone, extra: dict[str, Any]) -> None:
    """Write ``cliptune_backbone.json`` for ``backbone`` (shared by every ``save``)."""
    config = {
        "format_version": FORMAT_VERSION,
        "kind": backbone.kind,
        "embed_dim": backbone.embed_dim,
        "trainable_layers": backbone.trainable_layers,
        "lora": None if backbone.lora is None else backbone.lora.to_dict(),
        **extra,
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_state(directory: Path, state: dict[str, Tensor]) -> None:
    """Write tensors to ``cliptune_state.safetensors`` (contiguous copies, as safetensors needs)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(directory / STATE_FILE))
