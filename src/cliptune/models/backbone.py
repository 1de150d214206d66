"""The backbone contract every image-text model meets: ``Tower``, ``Backbone``, ``BackboneError``.

This module is the contract only (plus the saved-folder file names and writers every ``save`` shares);
it imports no implementation, so ``hf.py``, ``composed.py`` and ``freeze.py`` can import it without a
circle. Loading lives in ``cliptune.models.factory``.

A backbone is two towers, each split into a *feature* part and a *head*:

    image -> preprocess -> image_features (B, Fi) -> image_head -> (B, D)
    text  -> tokenize   -> text_features  (B, Ft) -> text_head  -> (B, D)

The split is what makes feature caching possible: with ``trainable_layers == 0`` and no LoRA only
the heads train, so the features can be computed once and cached under ``features_identity()``.
``model_identity()`` adds the heads: it names the embedding space an index lives in. Outputs of
``encode_*`` are *not* normalised; losses and retrieval normalise. The learned similarity
parameters of the source model (CLIP ``logit_scale``, SigLIP ``logit_scale``/``logit_bias``) are
not part of the contract (losses own their temperature); they are exposed as read-only numbers in
``similarity_init`` and never train.

Example:
    >>> from cliptune.models.factory import load_backbone
    >>> backbone = load_backbone("embedded")  # offline LiT-style default  # doctest: +SKIP
    >>> images = [Image.new("RGB", (64, 48), "red"), Image.new("RGB", (30, 30), "blue")]
    >>> pixels = backbone.preprocess(images)            # (B, 3, 224, 224) for "embedded"
    >>> image_emb = backbone.encode_image(pixels)       # (B, 256) for "embedded"
    >>> text_emb = backbone.encode_text(**backbone.tokenize(["a cat"]))
    >>> image_emb.shape[0], text_emb.shape[0], image_emb.shape[1] == text_emb.shape[1]
    (2, 1, True)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from cliptune.errors import CliptuneError
from cliptune.rundir import write_text_atomic

if TYPE_CHECKING:
    from cliptune.models.freeze import LoraSpec

__all__ = [
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "STATE_FILE",
    "Backbone",
    "BackboneError",
    "NoPixelRecipeError",
    "PixelRecipe",
    "Tower",
    "WeightsMismatchError",
    "load_state_strict",
    "normalise_uint8",
    "read_state",
    "save_state",
    "write_config",
]

CONFIG_FILE = "cliptune_backbone.json"
STATE_FILE = "cliptune_state.safetensors"
FORMAT_VERSION = 1


class BackboneError(CliptuneError, ValueError):
    """A backbone cannot be loaded, configured or saved; the message names the spec and reason."""


_SHOWN_KEYS = 5  # key names a WeightsMismatchError message lists per kind of problem; the rest are counted


class WeightsMismatchError(BackboneError):
    """Weights in a file or folder do not fit the architecture they are loaded into.

    Raised instead of leaving any tensor randomly initialised. The message names the source and a
    few keys of each kind (with the total count); the attributes carry all of them.

    Attributes:
        source: The weights file or model folder.
        missing: Keys the architecture needs that the source lacks, sorted.
        unexpected: Keys in the source the architecture does not have, sorted.
        mismatched: ``(key, shape in the source, shape in the architecture)``, sorted by key.

    Example:
        >>> str(WeightsMismatchError("m/model.safetensors", missing=["proj.bias"]))
        'm/model.safetensors: weights do not match the architecture: 1 missing: proj.bias'
    """

    def __init__(
        self,
        source: Path | str,
        *,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        mismatched: Iterable[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
    ) -> None:
        self.source = str(source)
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = sorted((k, tuple(a), tuple(b)) for k, a, b in mismatched)
        shapes = [f"{k} (file {list(a)}, model {list(b)})" for k, a, b in self.mismatched]
        parts = [
            _listed(count, label, names)
            for count, label, names in (
                (len(self.missing), "missing", self.missing),
                (len(self.unexpected), "unexpected", self.unexpected),
                (len(shapes), "with another shape", shapes),
            )
            if count
        ]
        super().__init__(f"{self.source}: weights do not match the architecture: {'; '.join(parts)}")


def _listed(count: int, label: str, names: list[str]) -> str:
    more = f" and {count - _SHOWN_KEYS} more" if count > _SHOWN_KEYS else ""
    return f"{count} {label}: {', '.join(names[:_SHOWN_KEYS])}{more}"


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


class NoPixelRecipeError(BackboneError):
    """A backbone's preprocess is not "resize/crop to uint8, then (x / 255 - mean) / std" as far as cliptune
    knows, so decoded uint8 pixels cannot be cached or normalised on the device for it (the message says why)."""


@dataclass(frozen=True)
class PixelRecipe:
    """A preprocess split at its uint8 step: ``preprocess(images)`` equals
    ``normalise_uint8(stack(to_uint8(image) for image in images), mean, std)``, exactly.

    The split lets the slow part (decode, resize, crop: ``to_uint8``) run once into the pixel cache
    (``models/pixel_cache.py``) and lets batches travel as uint8, a quarter of float32's bytes, with the
    normalisation on the forward's device.

    Attributes:
        to_uint8: RGB PIL image -> (H, W, 3) uint8 at the model's input size; picklable (DataLoader
            workers) and thread-safe (a batch decodes on several threads).
        mean: Per-channel mean on the 0-1 scale.
        std: Per-channel standard deviation on the 0-1 scale.
        identity: Everything ``to_uint8`` depends on (size, resize and crop mode, filter), as a stable
            string: part of the pixel cache's key. The mean and std are not (they apply after the cache).
    """

    to_uint8: Callable[[Image.Image], np.ndarray]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    identity: str


def normalise_uint8(pixels: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) as ``(x / 255 - mean) / std``, on ``pixels``' device.

    The same float32 operations in the same order as the backbones' CPU preprocess (divide by 255, subtract,
    divide) and the same memory layout, so the result and the features of a tower on it are bit-identical
    to the CPU preprocess's (``tests/test_pixel_cache.py``).
    """
    # contiguous NCHW like the CPU preprocess: a channels-last layout would change a tower's reduction order
    x = pixels.permute(0, 3, 1, 2).contiguous().float().div(255)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


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
        fast_decode: Decode JPEGs at a reduced DCT scale before ``preprocess`` (``data.fast_decode``).
            Set by training from its config and saved with the model, so every later command that embeds
            with this model (eval, index, embed, serve, export) decodes as training did.
        pixel_cache: Keep decoded, resized uint8 pixels in the pixel cache (``data.pixel_cache``). A speed
            setting only (cached pixels are the pixels): set from the config by train and eval, never saved.
    """

    kind: str = ""
    embed_dim: int = 0

    def __init__(self) -> None:
        super().__init__()
        self.trainable_layers = 0
        self.lora: LoraSpec | None = None
        self.similarity_init: dict[str, float] = {}
        self.fast_decode = False
        self.pixel_cache = False

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

    def pixel_recipe(self) -> PixelRecipe:
        """:meth:`preprocess` split at its uint8 step (see :class:`PixelRecipe`).

        Raises:
            NoPixelRecipeError: This backbone's preprocess is not of that form (or not known to be); the
                message says why. The default: only backbones that state their recipe have one.
        """
        raise NoPixelRecipeError(
            f"{type(self).__name__} ({self.kind}): its preprocess is not exposed as uint8 resize/crop + "
            "normalisation"
        )

    def count_truncated(self, texts: list[str]) -> tuple[int, int] | None:
        """``(how many of texts tokenize beyond the limit, the limit)``; None where the tokenizer cannot say.

        :meth:`tokenize` cuts such texts silently (the text tower has a fixed number of positions); this
        lets the caller tell the user.
        """
        return None

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

    def features_identity(self) -> str:
        """A stable hash of everything that determines ``*_features``: the feature-cache key prefix.

        It covers the architecture, preprocessing and tokenizer settings and every tensor of the
        feature part (parameters and buffers, heads excluded), so retraining a head keeps the key
        and touching a frozen weight changes it. It does not depend on where the model was loaded
        from: a saved and reloaded backbone has the same identity. Two runs that trained only their
        heads share it (and their cached features); :meth:`model_identity` tells them apart.

        Returns:
            A 16-hex-digit SHA-256 prefix.
        """
        digest = hashlib.sha256()
        digest.update(json.dumps(self._fingerprint(), sort_keys=True, default=str).encode())
        head_prefixes = self._prefixes(self.heads())
        _hash_tensors(digest, self._tensors(), lambda name: not name.startswith(head_prefixes))
        return digest.hexdigest()[:16]

    def identity(self) -> str:
        """The feature-cache key: the same as :meth:`features_identity` (the name existing callers use)."""
        return self.features_identity()

    def model_identity(self) -> str:
        """A stable hash of everything that determines ``encode_*``: which space the embeddings live in.

        It is :meth:`features_identity` (frozen and unfrozen tower weights, LoRA adapters, their
        buffers, preprocessing) combined with every tensor of the heads (parameters and buffers),
        so two runs that differ only in their trained projections get different identities. An index
        records it and refuses queries and rebuilds by a model with another one (``docs/search.md``).

        Returns:
            A 16-hex-digit SHA-256 prefix, different from :meth:`features_identity`.

        Example:
            >>> backbone = load_backbone("embedded")  # doctest: +SKIP
            >>> backbone.model_identity() != backbone.features_identity()  # doctest: +SKIP
            True
        """
        return self._model_identity(self.features_identity())

    def _model_identity(self, features_identity: str) -> str:
        digest = hashlib.sha256(f"cliptune-model-v1\0{features_identity}".encode())
        head_prefixes = self._prefixes(self.heads())
        _hash_tensors(digest, self._tensors(), lambda name: name.startswith(head_prefixes))
        return digest.hexdigest()[:16]

    def _tensors(self) -> dict[str, Tensor]:
        """Every parameter and buffer that can change an output, by name (``_unused_parameters`` left out)."""
        skip = {id(p) for p in self._unused_parameters()}
        named = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        return {name: t for name, t in named.items() if id(t) not in skip}

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


def _hash_tensors(digest: Any, named: dict[str, Tensor], keep: Callable[[str], bool]) -> None:
    """Feed the kept tensors to ``digest`` in name order: name, dtype, shape, then their raw bytes."""
    for name in sorted(named):
        if keep(name):
            tensor = named[name]
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _freeze_mode(module: nn.Module) -> None:
    """Put children whose parameters are all frozen into eval mode, recursing into the rest."""
    for child in module.children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            child.eval()
        else:
            _freeze_mode(child)


def write_config(directory: Path, backbone: Backbone, extra: dict[str, Any]) -> None:
    """Write ``cliptune_backbone.json`` for ``backbone`` (shared by every ``save``)."""
    features = backbone.features_identity()  # the tower's hash, once for both identities
    config = {
        "format_version": FORMAT_VERSION,
        "kind": backbone.kind,
        "embed_dim": backbone.embed_dim,
        "trainable_layers": backbone.trainable_layers,
        "lora": None if backbone.lora is None else backbone.lora.to_dict(),
        # hashed once here, at save time, from the weights being saved: provenance a reader can check
        # without torch, and what `load_model` must reproduce bit for bit (tests/test_model_identity.py)
        "features_identity": features,
        "model_identity": backbone._model_identity(features),
        "fast_decode": backbone.fast_decode,
        **extra,
    }
    write_text_atomic(directory / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_state(file: Path) -> dict[str, Tensor]:
    """Read a safetensors weights file onto the CPU.

    Args:
        file: A ``.safetensors`` file.

    Returns:
        Its tensors by key.

    Raises:
        BackboneError: The file is absent or not readable safetensors (names the file).
    """
    from safetensors.torch import load_file

    if not file.is_file():
        raise BackboneError(f"{file}: weights file missing")
    try:
        return load_file(str(file))
    except Exception as err:  # safetensors raises its own error types
        raise BackboneError(f"{file}: cannot read weights ({err})") from err


def load_state_strict(
    module: nn.Module, state: dict[str, Tensor], source: Path | str, *, keys: Iterable[str] | None = None
) -> None:
    """Load ``state`` into ``module`` only if it provides exactly the expected keys with the right shapes.

    Args:
        module: The architecture, modified in place.
        state: Tensors by key (e.g. from ``read_state``).
        source: The file the state came from, named in the error.
        keys: The keys of ``module.state_dict()`` the state must provide, exactly; None means all
            of them (a partial state: the rest was loaded from elsewhere).

    Raises:
        WeightsMismatchError: A key is missing, unexpected or has another shape; nothing was loaded.
    """
    own = module.state_dict()
    wanted = set(own) if keys is None else set(keys)
    mismatched = [
        (k, tuple(state[k].shape), tuple(own[k].shape))
        for k in wanted & set(state)
        if state[k].shape != own[k].shape
    ]
    missing, unexpected = wanted - set(state), set(state) - wanted
    if missing or unexpected or mismatched:
        raise WeightsMismatchError(source, missing=missing, unexpected=unexpected, mismatched=mismatched)
    module.load_state_dict(state, strict=keys is None)


def save_state(directory: Path, state: dict[str, Tensor]) -> None:
    """Write tensors to ``cliptune_state.safetensors`` (contiguous copies, as safetensors needs)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(directory / STATE_FILE))
