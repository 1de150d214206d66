"""Transformers backbones: CLIP, SigLIP and any AutoModel with ``get_image_features`` / ``get_text_features``.

The features/head split per kind (``encode_*`` equals the model's own ``get_*_features``):

* ``clip``: features = ``vision_model`` pooled output (post-layernorm CLS) and ``text_model``
  pooled output (final-layernorm EOS token); heads = ``visual_projection`` / ``text_projection``.
* ``siglip``: text features = final-layernorm hidden state of the last token (SigLIP pools the
  last position; text is padded to ``max_length`` and no attention mask is used, as in training),
  text head = ``text_model.head``. Image head = the MAP attention-pooling head
  (``vision_model.head``), so image features are the post-layernorm *patch tokens*, flattened to
  ``(B, N * H)`` to keep the 2-D contract. That is the honest split (the MAP head is SigLIP's only
  image-side head) at the cost of large cached features (ViT-B/16 at 224 px: 196 x 768 floats,
  588 KB per image in fp32).
* ``auto``: the whole model is the feature part (``get_*_features``); each head is a new Linear
  initialised to the identity (so ``encode_*`` equals the model's output until it trains) or a
  random ``Linear(D, embed_dim)`` when ``embed_dim`` is given.
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from cliptune.models.backbone import (
    Backbone,
    BackboneError,
    NoPixelRecipeError,
    PixelRecipe,
    Tower,
    WeightsMismatchError,
    normalise_uint8,
    save_state,
    write_config,
)

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel

__all__ = [
    "HFBackbone",
    "from_pretrained_strict",
    "load_hf",
    "processor_pixels",
    "processor_recipe",
    "processor_uint8",
]

_KINDS = ("clip", "siglip", "auto")
# Keys of a transformers config that do not change what the model computes.
_CONFIG_NOISE = ("_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype")


class HFBackbone(Backbone):
    """A transformers dual encoder split into features and heads (see the module docstring).

    Args:
        model: A loaded ``CLIPModel``, ``SiglipModel`` or generic dual-encoder ``PreTrainedModel``.
        image_processor: Its image processor (callable on a list of PIL images).
        tokenizer: Its tokenizer.
        kind: ``"clip"``, ``"siglip"`` or ``"auto"``.
        embed_dim: Output size of new heads (``auto`` only); None keeps the model's size.
        seed: Seed for new head weights when ``embed_dim`` changes the size.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        image_processor: Any,
        tokenizer: Any,
        kind: str,
        embed_dim: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.model = model
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.similarity_init = {
            name: float(getattr(model, name).detach().reshape(-1)[0])
            for name in ("logit_scale", "logit_bias")
            if isinstance(getattr(model, name, None), torch.Tensor)
        }
        if kind == "clip":
            self.embed_dim = _int_attr(model.config, "projection_dim")
        elif kind == "siglip":
            if not model.config.vision_config.vision_use_head:
                raise BackboneError("SigLIP without a vision head (vision_use_head=False) is not supported")
            vision = model.get_submodule("vision_model")
            self.embed_dim = _int_attr(_config(vision), "hidden_size")
            self._tokens = (_int_attr(vision.get_submodule("embeddings"), "num_patches"), self.embed_dim)
        else:
            dim = self._auto_dim(model)
            self.embed_dim = embed_dim or dim
            generator = torch.Generator().manual_seed(seed)
            self.image_proj = _identity_or_random(dim, self.embed_dim, generator)
            self.text_proj = _identity_or_random(dim, self.embed_dim, generator)
        if kind != "auto" and embed_dim not in (None, self.embed_dim):
            raise BackboneError(
                f"{kind} backbone: embed_dim={embed_dim} differs from the pretrained projection size "
                f"{self.embed_dim}; the pretrained heads define the shared space (use kind='auto' or "
                "a composed backbone for a new one)"
            )

    # --- features and heads --------------------------------------------------------------
    def image_features(self, pixel_values: Tensor) -> Tensor:
        """See ``Backbone.image_features``. Shapes: (B, 3, H, W) -> (B, Fi)."""
        if self.kind == "clip":
            pooled: Tensor = self.model.get_submodule("vision_model")(pixel_values=pixel_values).pooler_output
            return pooled  # (B, Hv)
        if self.kind == "siglip":
            vm = self.model.get_submodule("vision_model")
            embedded = vm.get_submodule("embeddings")(pixel_values)
            hidden = vm.get_submodule("encoder")(inputs_embeds=embedded).last_hidden_state
            normed: Tensor = vm.get_submodule("post_layernorm")(hidden)
            return normed.flatten(1)  # (B, N * H)
        return _model_features(self.model, "get_image_features", pixel_values=pixel_values)  # (B, D)

    def text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """See ``Backbone.text_features``; SigLIP ignores the mask. Shapes: (B, T) -> (B, Ft)."""
        if self.kind == "clip":
            text_model = self.model.get_submodule("text_model")
            pooled: Tensor = text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
            return pooled
        if self.kind == "siglip":
            tm = self.model.get_submodule("text_model")
            embedded = tm.get_submodule("embeddings")(input_ids=input_ids)
            hidden = tm.get_submodule("encoder")(inputs_embeds=embedded).last_hidden_state
            normed: Tensor = tm.get_submodule("final_layer_norm")(hidden)
            return normed[:, -1, :]  # (B, H): SigLIP pools the last position
        return _model_features(
            self.model, "get_text_features", input_ids=input_ids, attention_mask=attention_mask
        )

    def image_head(self, feats: Tensor) -> Tensor:
        """See ``Backbone.image_head``. Shapes: (B, Fi) -> (B, D)."""
        if self.kind == "clip":
            out: Tensor = self.model.get_submodule("visual_projection")(feats)
        elif self.kind == "siglip":
            tokens = feats.view(feats.shape[0], *self._tokens)
            out = self.model.get_submodule("vision_model.head")(tokens)  # (B, N, H) -> (B, H)
        else:
            out = self.image_proj(feats)
        return out

    def text_head(self, feats: Tensor) -> Tensor:
        """See ``Backbone.text_head``. Shapes: (B, Ft) -> (B, D)."""
        if self.kind == "clip":
            out: Tensor = self.model.get_submodule("text_projection")(feats)
        elif self.kind == "siglip":
            out = self.model.get_submodule("text_model.head")(feats)
        else:
            out = self.text_proj(feats)
        return out

    # --- pre-processing ------------------------------------------------------------------
    def preprocess(self, images: list[Image.Image]) -> Tensor:
        """The model's own image processor (:func:`processor_pixels`). Returns (B, 3, H, W) float32."""
        return processor_pixels(self.image_processor, images)

    def pixel_recipe(self) -> PixelRecipe:
        """The image processor's uint8 recipe (:func:`processor_recipe`; see :class:`Backbone`).

        Raises:
            NoPixelRecipeError: The processor has a step or setting the recipe cannot replay (named).
        """
        try:
            return processor_recipe(self.image_processor)
        except NoPixelRecipeError as e:
            raise NoPixelRecipeError(f"{self.kind} backbone: {e}") from e

    def count_truncated(self, texts: list[str]) -> tuple[int, int] | None:
        """How many of ``texts`` :meth:`tokenize` cuts, and its limit (see :class:`Backbone`)."""
        limit = self._max_length()
        lengths = [
            len(ids) for ids in self.tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]
        ]
        return sum(n > limit for n in lengths), limit

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """Tokenise with the model's tokenizer; SigLIP pads to ``max_length`` as it was trained."""
        encoded = self.tokenizer(
            list(texts),
            padding="max_length" if self.kind == "siglip" else True,
            truncation=True,
            max_length=self._max_length(),
            return_tensors="pt",
        )
        ids = encoded["input_ids"]
        mask = encoded.get("attention_mask")
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids) if mask is None else mask}

    # --- layer map -----------------------------------------------------------------------
    def heads(self) -> list[nn.Module]:
        """CLIP projections, SigLIP MAP/text heads, or the new auto projections."""
        if self.kind == "clip":
            return [
                self.model.get_submodule("visual_projection"),
                self.model.get_submodule("text_projection"),
            ]
        if self.kind == "siglip":
            return [
                self.model.get_submodule("vision_model.head"),
                self.model.get_submodule("text_model.head"),
            ]
        return [self.image_proj, self.text_proj]

    def towers(self) -> list[Tower]:
        """Encoder layers, final norms and (auto) the model's own projections per tower."""
        towers = []
        for name, sub_name in (("image", "vision_model"), ("text", "text_model")):
            sub = getattr(self.model, sub_name, None)
            encoder = getattr(sub, "encoder", None)
            blocks = getattr(encoder, "layers", None) or getattr(encoder, "layer", None)
            if blocks is None:
                raise BackboneError(
                    f"{self.kind} backbone {type(self.model).__name__}: no {sub_name}.encoder.layers; "
                    "only trainable_layers 0 or -1 are possible"
                )
            final = [getattr(sub, n) for n in ("post_layernorm", "final_layer_norm") if hasattr(sub, n)]
            if self.kind == "auto":
                own_heads = ("visual_projection",) if name == "image" else ("text_projection",)
                final += [getattr(self.model, n) for n in own_heads if hasattr(self.model, n)]
                head = getattr(sub, "head", None)
                final += [head] if isinstance(head, nn.Module) else []
            towers.append(Tower(name, list(blocks), final, encoder, ("q_proj", "v_proj")))
        return towers

    def _unused_parameters(self) -> list[nn.Parameter]:
        return [
            p
            for n in ("logit_scale", "logit_bias")
            if isinstance(p := getattr(self.model, n, None), nn.Parameter)
        ]

    # --- save / identity -----------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Write a transformers folder (LoRA merged) + processor + tokenizer + cliptune config.

        ``directory`` loads with plain transformers (``CLIPModel.from_pretrained``). Exact
        cliptune state that transformers cannot hold goes to ``cliptune_state.safetensors``: the
        new heads of ``auto`` backbones, or, with LoRA, the full unmerged state (so a LoRA save is
        about twice the model size).

        Args:
            directory: Output folder (created).
        """
        from cliptune.models.freeze import merged_copy

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        export = merged_copy(self.model) if self.lora is not None else self.model
        export.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        state = self.state_dict()
        if self.lora is not None:
            save_state(directory, state)
        elif self.kind == "auto":
            save_state(directory, {k: v for k, v in state.items() if not k.startswith("model.")})
        write_config(directory, self, {"state": "full" if self.lora is not None else "partial"})

    def _fingerprint(self) -> dict[str, Any]:
        config = {k: v for k, v in self.model.config.to_dict().items() if k not in _CONFIG_NOISE}
        return {
            "kind": self.kind,
            "class": type(self.model).__name__,
            "config": _strip(config),
            "preprocess": _strip(self.image_processor.to_dict()),
            "tokenizer": _tokenizer_fingerprint(self.tokenizer),
            "max_length": self._max_length(),
        }

    def _max_length(self) -> int:
        positions = self.model.config.text_config.max_position_embeddings
        return int(min(positions, getattr(self.tokenizer, "model_max_length", positions)))

    @staticmethod
    def _auto_dim(model: nn.Module) -> int:
        """Probe with one token: configs name the embedding size differently per model."""
        ids = torch.ones(1, 2, dtype=torch.long)
        with torch.no_grad():
            features = _model_features(
                model, "get_text_features", input_ids=ids, attention_mask=torch.ones_like(ids)
            )
            return int(features.shape[-1])


def load_hf(
    spec: str | Path, *, kind: str | None = None, embed_dim: int | None = None, seed: int = 0
) -> HFBackbone:
    """Load a transformers dual encoder from a local folder or (cache-only when offline) a hub id.

    Args:
        spec: Folder written by ``save_pretrained`` or a hub id.
        kind: Force ``"clip"``, ``"siglip"`` or ``"auto"``; None reads ``model_type`` from config.json.
        embed_dim: See ``HFBackbone``.
        seed: See ``HFBackbone``.

    Returns:
        The backbone (every parameter trainable; ``load_backbone`` applies freezing).

    Raises:
        BackboneError: Not a folder and not loadable offline, an unsupported model, or a kind mismatch.
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel, SiglipModel

    if kind is not None and kind not in _KINDS:
        raise BackboneError(f"backbone {spec!s}: kind must be one of {_KINDS}, got {kind!r}")
    local = Path(spec).is_dir()
    local_only = local or _offline()
    try:
        config = AutoConfig.from_pretrained(str(spec), local_files_only=local_only)
    except (OSError, ValueError) as err:
        if local:
            raise BackboneError(f"{spec}: not a transformers model folder ({err})") from err
        raise BackboneError(
            f"backbone {spec!r}: not a local folder, and the hub id could not be loaded offline "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r}; it is not in the local cache). "
            "Point the spec at a local folder written by `model.save_pretrained(folder)` together with "
            "its processor and tokenizer, or use 'embedded'."
        ) from err
    model_type = getattr(config, "model_type", "")
    kind = kind or (model_type if model_type in ("clip", "siglip") else "auto")
    model_class: type[CLIPModel] | type[SiglipModel] | type[AutoModel] = (
        CLIPModel if kind == "clip" else SiglipModel if kind == "siglip" else AutoModel
    )
    if kind in ("clip", "siglip") and model_type != kind:
        raise BackboneError(
            f"backbone {spec!s}: kind={kind!r} but config.json says model_type={model_type!r}"
        )
    model = from_pretrained_strict(model_class, spec, local_files_only=local_only)
    try:
        # transformers leaves AutoImageProcessor.from_pretrained unannotated
        image_processor = AutoImageProcessor.from_pretrained(str(spec), local_files_only=local_only)  # type: ignore[no-untyped-call]
        tokenizer = AutoTokenizer.from_pretrained(str(spec), local_files_only=local_only)
    except (OSError, ValueError) as err:
        raise BackboneError(f"backbone {spec!s}: cannot load image processor or tokenizer ({err})") from err
    if kind == "auto" and not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
        raise BackboneError(
            f"backbone {spec!s}: {type(model).__name__} has no get_image_features/get_text_features; "
            "it is not an image-text dual encoder (use 'composed' to pair separate towers)"
        )
    return HFBackbone(model, image_processor, tokenizer, kind, embed_dim=embed_dim, seed=seed).eval()


def from_pretrained_strict(
    model_class: Any, source: str | Path, *, local_files_only: bool, allow_missing: tuple[str, ...] = ()
) -> PreTrainedModel:
    """``model_class.from_pretrained(source)``, refusing any weight transformers would initialise randomly.

    transformers only warns about missing, unexpected and (with ``ignore_mismatched_sizes``)
    wrong-shaped weights and initialises them randomly; here each is an error. What transformers
    itself knows to be legitimately absent is already dropped from its report (the model's
    ``_keys_to_ignore_on_load_*`` patterns, non-persistent ``position_ids`` / ``inv_freq`` buffers
    of old checkpoints, weights tied to others), so no key is allowed here unless the caller
    discards the module it belongs to.

    Args:
        model_class: ``CLIPModel``, ``SiglipModel``, ``AutoModel`` or another transformers model class.
        source: A local folder or a hub id.
        local_files_only: Never download.
        allow_missing: Key prefixes the caller discards after loading (e.g. the text tower of a
            CLIP folder used as an image tower), so a checkpoint without them is complete.

    Returns:
        The model with every weight from ``source``.

    Raises:
        WeightsMismatchError: A missing (outside ``allow_missing``), unexpected or wrong-shaped
            weight, naming the keys and ``source``.
        BackboneError: transformers cannot load ``source`` at all.
    """
    try:
        # shape mismatches are reported in the loading info (and then refused) rather than raised unnamed
        model, info = model_class.from_pretrained(
            str(source),
            local_files_only=local_files_only,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise BackboneError(f"backbone {source!s}: cannot load the model ({err})") from err
    missing = [k for k in info["missing_keys"] if not k.startswith(allow_missing)]
    mismatched = [(k, tuple(a), tuple(b)) for k, a, b in info["mismatched_keys"]]
    if missing or info["unexpected_keys"] or mismatched:
        raise WeightsMismatchError(
            source, missing=missing, unexpected=info["unexpected_keys"], mismatched=mismatched
        )
    if info["error_msgs"]:
        raise BackboneError(
            f"backbone {source!s}: weights did not load ({'; '.join(info['error_msgs'][:3])})"
        )
    loaded: PreTrainedModel = model
    return loaded


def _offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return constants.HF_HUB_OFFLINE or any(f.upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def _model_features(model: nn.Module, method: str, **inputs: Tensor | None) -> Tensor:
    """``model.<method>(**inputs)`` (``get_image_features`` / ``get_text_features``) as a tensor."""
    return _pooled(getattr(model, method)(**inputs))


def _pooled(output: Any) -> Tensor:
    """transformers 5 returns a ModelOutput from ``get_*_features``; older versions a tensor."""
    if isinstance(output, Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if not isinstance(pooled, Tensor):
        raise BackboneError(f"get_*_features returned {type(output).__name__} without pooler_output")
    return pooled


def _config(module: nn.Module) -> PreTrainedConfig:
    """The transformers config a (sub)model carries: ``nn.Module`` types unknown attributes as ``Tensor | Module``."""
    from transformers import PreTrainedConfig

    config = getattr(module, "config", None)
    if not isinstance(config, PreTrainedConfig):
        raise BackboneError(f"{type(module).__name__} has no transformers config")
    return config


def _int_attr(owner: object, name: str) -> int:
    """``owner.<name>`` checked to be an int (transformers configs and modules type their attributes as Any)."""
    value = getattr(owner, name)
    if not isinstance(value, int):
        raise BackboneError(f"{type(owner).__name__}.{name} is {value!r}, not an int")
    return value


def _identity_or_random(dim: int, out_dim: int, generator: torch.Generator) -> nn.Linear:
    layer = nn.Linear(dim, out_dim)
    with torch.no_grad():
        if out_dim == dim:
            layer.weight.copy_(torch.eye(dim))
            layer.bias.zero_()
        else:
            bound = dim**-0.5
            layer.weight.uniform_(-bound, bound, generator=generator)
            layer.bias.uniform_(-bound, bound, generator=generator)
    return layer


def _strip(config: dict[str, Any]) -> dict[str, Any]:
    """Drop path- and version-dependent keys (recursively) so identity survives save/load."""
    return {
        k: _strip(v) if isinstance(v, dict) else v
        for k, v in config.items()
        if k not in _CONFIG_NOISE and not str(k).startswith("_")
    }


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    """The tokenizer's pipeline (normaliser, model, vocab) without its mutable padding state."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        data = json.loads(backend.to_str())
        data.pop("padding", None)
        data.pop("truncation", None)
    else:
        data = sorted(tokenizer.get_vocab().items())
    return json.dumps([type(tokenizer).__name__, data], sort_keys=True)


# --- the uint8 recipe of a transformers image processor ---------------------------------------------------
# The steps of transformers' PIL backend (``PilBackend._preprocess``) that this replays, in its order:
# convert to RGB, resize (PIL, no reducing gap), centre crop (numpy slice), rescale, normalise.
_KNOWN_STEPS = ("do_convert_rgb", "do_resize", "do_center_crop", "do_rescale", "do_normalize")
_PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_REPLAYED_METHODS = ("process_image", "convert_to_rgb", "resize", "center_crop", "_preprocess")


def processor_recipe(processor: Any) -> PixelRecipe:
    """The uint8 recipe of a transformers image processor: what it does before ``rescale``/``normalize``.

    transformers' PIL backend (``CLIPImageProcessorPil``: resize the shortest side, bicubic, centre crop;
    ``SiglipImageProcessorPil``: resize to a fixed size) resizes a uint8 image with PIL and crops it with a
    numpy slice, so those steps are replayed here exactly (:func:`processor_uint8`, tested against the
    processor's own ``pixel_values``); its ``rescale`` then ``normalize`` in float64/float32 differ from
    :func:`~cliptune.models.backbone.normalise_uint8` by at most a float32 rounding (< 1e-6). Anything this
    replay does not cover is refused, never approximated.

    Args:
        processor: A transformers image processor.

    Returns:
        The recipe (its ``to_uint8`` holds plain settings, not the processor: cheap to pickle to workers).

    Raises:
        NoPixelRecipeError: The processor is not the PIL backend, overrides one of its steps, or has a
            setting the replay cannot represent; the message names it.

    Example:
        >>> from PIL import Image
        >>> from transformers import CLIPImageProcessorPil
        >>> recipe = processor_recipe(CLIPImageProcessorPil(size={"shortest_edge": 32},
        ...                                                  crop_size={"height": 32, "width": 32}))
        >>> recipe.to_uint8(Image.new("RGB", (64, 48))).shape
        (32, 32, 3)
    """
    settings = _processor_settings(processor)
    mean, std = _three(processor, "image_mean", 0.0), _three(processor, "image_std", 1.0)
    return PixelRecipe(
        to_uint8=partial(processor_uint8, **settings),
        mean=mean,
        std=std,
        identity="hf-pil:" + json.dumps(settings, sort_keys=True),
    )


def processor_uint8(
    image: Image.Image, *, mode: str, size: list[int], crop: list[int] | None, resample: int
) -> np.ndarray:
    """The uint8 half of a transformers PIL-backend processor (settings from :func:`processor_recipe`).

    ``mode`` ``shortest``: the short side becomes ``size[0]`` and the long side ``int(size * long / short)``
    (truncated, as ``get_resize_output_image_size``); ``exact``: ``size`` is (height, width). Then the
    centre crop (height, width) at ``(side - crop) // 2``, as ``center_crop`` (the recipe refuses crops
    that would pad).

    Returns:
        (H, W, 3) uint8.
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    width, height = rgb.size
    if mode == "shortest":
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(size[0] * long / short)
        new_w, new_h = (size[0], new_long) if width <= height else (new_long, size[0])
    else:
        new_h, new_w = size
    pixels = np.array(rgb.resize((new_w, new_h), resample=resample), dtype=np.uint8)  # (H, W, 3), writable
    if crop is not None:
        top, left = (new_h - crop[0]) // 2, (new_w - crop[1]) // 2
        pixels = pixels[top : top + crop[0], left : left + crop[1]]
    return np.ascontiguousarray(pixels)


def _processor_settings(processor: Any) -> dict[str, Any]:
    """What :func:`processor_uint8` needs of ``processor``; NoPixelRecipeError naming what does not fit."""
    from transformers.image_processing_backends import PilBackend

    name = type(processor).__name__

    def refuse(reason: str) -> NoPixelRecipeError:
        return NoPixelRecipeError(f"image processor {name}: {reason}")

    # a helper, not isinstance: `processor` stays Any (its settings are per class, not on PilBackend)
    if not _is_pil_backend(processor):
        raise refuse(
            "not transformers' PIL backend (its pixels come from another resize, e.g. torchvision's, "
            "which cliptune does not replay)"
        )
    for method in _REPLAYED_METHODS:
        if getattr(type(processor), method) is not getattr(PilBackend, method):
            raise refuse(f"overrides the PIL backend's {method}, which cliptune does not replay")
    steps = {k: v for k, v in vars(processor).items() if k.startswith("do_") and v}
    steps["do_pad"] = getattr(processor, "do_pad", False)  # the one other step of PilBackend._preprocess
    steps.update({k: getattr(processor, k, False) for k in _KNOWN_STEPS})
    unknown = sorted(k for k, v in steps.items() if v and k not in _KNOWN_STEPS)
    if unknown:
        raise refuse(f"{', '.join(f'{k}=True' for k in unknown)} is a step cliptune does not replay")
    if not steps["do_convert_rgb"]:
        raise refuse("do_convert_rgb=False (cliptune's uint8 pixels are always RGB)")
    if not steps["do_resize"]:
        raise refuse("do_resize=False (images would keep their own sizes)")
    factor = float(processor.rescale_factor) if steps["do_rescale"] else 1.0
    if abs(factor - 1 / 255) > 1e-12:
        raise refuse(f"rescale by {factor} (the uint8 pixels are rescaled by 1/255)")
    resample = processor.resample
    if resample is None or int(resample) not in _PIL_FILTERS:
        raise refuse(f"resample {resample!r} is not a PIL filter")
    size = {k: v for k, v in dict(processor.size).items() if v is not None}
    # pair: the smallest (height, width) the resize can give (shortest: both sides are at least the edge)
    if set(size) == {"shortest_edge"}:
        mode, pair = "shortest", [int(size["shortest_edge"])] * 2
    elif set(size) == {"height", "width"}:
        mode, pair = "exact", [int(size["height"]), int(size["width"])]
    else:
        raise refuse(f"size {size} (only shortest_edge, or height and width, are replayed)")
    crop: list[int] | None = None
    if steps["do_center_crop"]:
        crop_size = dict(processor.crop_size)
        crop = [int(crop_size["height"]), int(crop_size["width"])]
        if crop[0] > pair[0] or crop[1] > pair[1]:
            raise refuse(f"crop {crop} larger than the resized image {pair} (the processor pads)")
    elif mode == "shortest":
        raise refuse("resizes the shortest side without a centre crop (images would keep their aspect ratio)")
    return {
        "mode": mode,
        "size": pair if mode == "exact" else pair[:1],
        "crop": crop,
        "resample": int(resample),
    }


def _is_pil_backend(processor: Any) -> bool:
    from transformers.image_processing_backends import PilBackend

    return isinstance(processor, PilBackend)


def _three(processor: Any, attr: str, off: float) -> tuple[float, float, float]:
    """``image_mean``/``image_std`` as 3 floats (``off`` when ``do_normalize`` is False)."""
    value = getattr(processor, attr) if processor.do_normalize else off
    values = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * 3
    if len(values) != 3:
        raise NoPixelRecipeError(
            f"image processor {type(processor).__name__}: {attr} {values} is not 3 channels"
        )
    return values[0], values[1], values[2]


def processor_pixels(processor: Any, images: list[Image.Image]) -> Tensor:
    """A transformers processor's ``pixel_values`` for ``images``, (B, 3, H, W) float32.

    Through :func:`processor_recipe` where it has one, so ``preprocess`` equals the pixel-cache path bit for
    bit (the recipe's contract); the processor itself otherwise.
    """
    rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
    try:
        recipe = processor_recipe(processor)
    except NoPixelRecipeError:
        pixels: Tensor = processor(images=rgb, return_tensors="pt")["pixel_values"]
        return pixels
    batch = torch.from_numpy(np.stack([recipe.to_uint8(im) for im in rgb]))  # (B, H, W, 3)
    return normalise_uint8(batch, recipe.mean, recipe.std)
