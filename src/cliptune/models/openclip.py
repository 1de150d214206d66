"""open_clip checkpoints as a backbone: hub ids, pretrained tags and local open_clip folders.

open_clip (the optional extra ``cliptune[open_clip]``) builds and loads the towers; this module splits
them into cliptune's features and heads and does the preprocessing with PIL (open_clip's own
transforms need torchvision). Specs, after the ``open_clip:`` prefix that ``load_backbone`` strips:

* ``hf-hub:Marqo/marqo-fashionSigLIP``: open_clip's own hub loading (``open_clip_config.json`` +
  weights); from the local cache only when offline.
* ``ViT-B-32/laion2b_s34b_b79k``: a built-in architecture with a pretrained tag (downloaded by open_clip).
* a folder in the layout ``open_clip.push_to_hf_hub`` writes: ``open_clip_config.json`` (``model_cfg``
  + ``preprocess_cfg``), ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``, and the
  tokenizer files when the config names an ``hf_tokenizer_name``.

The features/head split (``encode_*`` equals open_clip's ``encode_image`` / ``encode_text``):

* native ViT image tower: features = the pooled token after ``ln_post`` (B, width); head = ``proj``.
* timm image tower (SigLIP): features = ``trunk.forward_features`` tokens flattened to (B, N * C); head =
  ``trunk.forward_head`` (MAP attention pooling, norm) and open_clip's adapter head, as for HF SigLIP.
* text tower (CLIP's or a ``CustomTextCLIP``'s ``TextTransformer``): features = the pooled token after
  ``ln_final`` (B, width); head = ``text_projection``.

The projections that open_clip keeps as bare ``nn.Parameter`` s (``visual.proj``, ``text_projection``)
are moved out of the open_clip model into :class:`Projection` modules, so ``heads()`` are modules and
retraining them never changes ``identity()``; ``save`` puts them back under open_clip's names. So
``backbone.model.encode_*`` alone no longer projects: use the backbone's ``encode_*``.
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from cliptune.models.backbone import (
    Backbone,
    BackboneError,
    PixelRecipe,
    Tower,
    save_state,
    write_config,
)

__all__ = ["OPEN_CLIP_CONFIG", "OPEN_CLIP_WEIGHTS", "OpenClipBackbone", "import_open_clip", "load_open_clip"]

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
_EXTRA = "cliptune[open_clip]"
# PIL filters for open_clip's preprocess_cfg["interpolation"] names.
_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def import_open_clip(spec: str = "open_clip") -> Any:
    """Import open_clip (with a stand-in torchvision where the real one does not load).

    Args:
        spec: The backbone spec that needs it, for the error message.

    Returns:
        The ``open_clip`` module.

    Raises:
        BackboneError: open_clip (or timm) is not installed; the message names the pip extra.
    """
    import transformers  # noqa: F401  (records torchvision's real absence before any stand-in exists)

    from cliptune.models.torchvision_standin import standin_torchvision

    try:
        with standin_torchvision():
            import open_clip
            import timm  # noqa: F401  (imported here, under the stand-in, for timm image towers)
    except ImportError as err:
        raise BackboneError(
            f"backbone {spec!r}: needs the open_clip_torch and timm packages, which are not installed "
            f"({err}); install the optional extra {_EXTRA}"
        ) from err
    return open_clip


class Projection(nn.Module):
    """An open_clip projection as a module: a bare ``(in, out)`` matrix (``x @ weight``) or a Linear.

    Args:
        source: Its name in open_clip's state dict (``visual.proj``, ``text_projection``, ...).
        projection: The ``nn.Parameter`` matrix or the ``nn.Linear``, taken out of the open_clip model.
    """

    def __init__(self, source: str, projection: nn.Parameter | nn.Linear) -> None:
        super().__init__()
        self.source = source
        self.linear = projection if isinstance(projection, nn.Linear) else None
        self.weight = None if isinstance(projection, nn.Linear) else projection

    def forward(self, x: Tensor) -> Tensor:
        """Shapes: (B, in) -> (B, out)."""
        if self.linear is not None:
            out: Tensor = self.linear(x)
            return out
        assert self.weight is not None
        return x @ self.weight

    def exported(self) -> dict[str, Tensor]:
        """Its tensors under open_clip's state-dict names."""
        if self.linear is not None:
            return {f"{self.source}.{k}": v for k, v in self.linear.state_dict().items()}
        assert self.weight is not None
        return {self.source: self.weight.detach()}


class OpenClipBackbone(Backbone):
    """An open_clip ``CLIP`` / ``CustomTextCLIP`` split into features and heads (see the module docstring).

    Args:
        model: The open_clip model (weights loaded); its projections are moved into this backbone.
        tokenizer: open_clip's tokenizer for it (``SimpleTokenizer`` or ``HFTokenizer``).
        model_cfg: The architecture config (``open_clip_config.json``'s ``model_cfg``).
        preprocess_cfg: ``size``, ``mean``, ``std``, ``interpolation``, ``resize_mode``, ``fill_color``.
    """

    kind = "open_clip"

    def __init__(
        self, model: nn.Module, tokenizer: Any, model_cfg: dict[str, Any], preprocess_cfg: dict[str, Any]
    ) -> None:
        super().__init__()
        self.model_cfg = model_cfg
        self.preprocess_cfg = preprocess_cfg
        self.tokenizer = tokenizer
        visual = model.get_submodule("visual")
        self._timm = hasattr(visual, "trunk")
        # CLIP keeps its text tower's parts on the model itself, CustomTextCLIP (SigLIP) in `.text`
        self._text_path = "text" if isinstance(getattr(model, "text", None), nn.Module) else ""
        text_owner = model.get_submodule(self._text_path)
        if not hasattr(text_owner, "transformer") or not hasattr(text_owner, "ln_final"):
            raise BackboneError(
                f"open_clip {type(model).__name__} with text tower {type(text_owner).__name__}: only "
                "open_clip's own text transformer is supported (not Hugging Face text towers)"
            )
        if getattr(text_owner, "cls_emb", None) is not None:
            raise BackboneError("open_clip text tower with a CLS embedding (CoCa) is not supported")
        if type(tokenizer).__name__ not in ("SimpleTokenizer", "HFTokenizer"):  # what local-dir reloads
            raise BackboneError(
                f"open_clip tokenizer {type(tokenizer).__name__}: a saved model could not reload it; only "
                "checkpoints with open_clip's BPE tokenizer or an hf_tokenizer_name are supported"
            )
        if not self._timm and not hasattr(visual, "transformer"):
            raise BackboneError(
                f"open_clip image tower {type(visual).__name__}: only ViT and timm towers are supported"
            )
        # Moved out before registering the model, so that each parameter has one name.
        self.image_proj = None if self._timm else Projection("visual.proj", _take(visual, "proj"))
        prefix = f"{self._text_path}." if self._text_path else ""
        self.text_proj = Projection(f"{prefix}text_projection", _take(text_owner, "text_projection"))
        self.model = model
        self.similarity_init = {
            name: float(value.detach().reshape(-1)[0])
            for name in ("logit_scale", "logit_bias")
            if isinstance(value := getattr(model, name, None), Tensor)
        }
        self.embed_dim = int(model_cfg["embed_dim"])
        if self._timm:  # the token grid the head pools; probed because timm trunks differ
            size = _pair(preprocess_cfg["size"])
            with torch.no_grad():
                trunk: Any = visual.get_submodule("trunk")  # open_clip and timm modules are untyped
                tokens = trunk.forward_features(torch.zeros(1, 3, *size))
            self._tokens = tuple(tokens.shape[1:])

    # --- features and heads --------------------------------------------------------------
    def image_features(self, pixel_values: Tensor) -> Tensor:
        """See ``Backbone.image_features``. Shapes: (B, 3, H, W) -> (B, Fi)."""
        visual: Any = self.model.get_submodule("visual")
        if self._timm:
            tokens: Tensor = visual.trunk.forward_features(pixel_values)
            return tokens.flatten(1)  # (B, N * C)
        x = visual._embeds(pixel_values)  # (B, 1 + N, width)
        x = visual.transformer(x)
        pooled: Tensor = visual._pool(x)[0]
        return pooled  # (B, width)

    def text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """See ``Backbone.text_features``; the mask is unused (open_clip pools by position). (B, T) -> (B, Ft)."""
        from open_clip.transformer import text_global_pool

        owner: Any = self._text_owner()
        transformer = owner.transformer
        if not self._text_path:  # CLIP
            cast = transformer.get_cast_dtype()
            x = owner.token_embedding(input_ids).to(cast)
            x = x + owner.positional_embedding.to(cast)
            x = transformer(x, attn_mask=owner.attn_mask)
            pool_type, eos = owner.text_pool_type, getattr(owner, "text_eos_id", None)
        else:  # TextTransformer (CustomTextCLIP, SigLIP)
            x, mask = owner._embeds(input_ids)
            x = transformer(x, attn_mask=mask)
            pool_type, eos = owner.pool_type, getattr(owner, "eos_id", None)
        x = owner.ln_final(x)
        pooled: Tensor = text_global_pool(x, input_ids, pool_type, eos_token_id=eos)
        return pooled  # (B, width)

    def image_head(self, feats: Tensor) -> Tensor:
        """See ``Backbone.image_head``. Shapes: (B, Fi) -> (B, D)."""
        if self.image_proj is not None:
            projected: Tensor = self.image_proj(feats)
            return projected
        visual: Any = self.model.get_submodule("visual")
        tokens = feats.view(feats.shape[0], *self._tokens)  # (B, N, C)
        pooled = visual.trunk.forward_head(tokens)
        out: Tensor = visual.head(pooled)
        return out

    def text_head(self, feats: Tensor) -> Tensor:
        """See ``Backbone.text_head``. Shapes: (B, Ft) -> (B, D)."""
        out: Tensor = self.text_proj(feats)
        return out

    # --- pre-processing ------------------------------------------------------------------
    def preprocess(self, images: list[Image.Image]) -> Tensor:
        """open_clip's eval transform for ``preprocess_cfg``, in PIL. Returns (B, 3, H, W) float32."""
        return torch.stack([preprocess_image(image, self.preprocess_cfg) for image in images])

    def pixel_recipe(self) -> PixelRecipe:
        """``preprocess`` split at its uint8 step: :func:`uint8_image`, then ``preprocess_cfg``'s mean/std."""
        cfg = self.preprocess_cfg
        mean, std = tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
        if len(mean) != 3 or len(std) != 3:
            raise BackboneError(f"open_clip preprocess_cfg: mean {mean} / std {std} are not 3 channels")
        pixel_cfg = {k: v for k, v in cfg.items() if k not in ("mean", "std")}
        return PixelRecipe(
            to_uint8=partial(uint8_image, cfg=pixel_cfg),
            mean=(mean[0], mean[1], mean[2]),
            std=(std[0], std[1], std[2]),
            identity="open_clip:" + json.dumps(pixel_cfg, sort_keys=True, default=str),
        )

    def count_truncated(self, texts: list[str]) -> tuple[int, int] | None:
        """How many of ``texts`` open_clip's tokenizer cuts to its context length (see :class:`Backbone`)."""
        limit = getattr(self.tokenizer, "context_length", None)
        hf_tokenizer: Any = getattr(self.tokenizer, "tokenizer", None)
        encode = getattr(self.tokenizer, "encode", None)
        if limit is None:
            return None
        if hf_tokenizer is not None:
            lengths = [
                len(ids) for ids in hf_tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]
            ]
        elif encode is not None:  # SimpleTokenizer: BPE ids without the start and end tokens
            lengths = [len(encode(t)) + 2 for t in texts]
        else:
            return None
        return sum(n > int(limit) for n in lengths), int(limit)

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """open_clip's tokenizer: ids padded to the context length; the mask marks the real tokens."""
        ids = self.tokenizer(list(texts)).long()  # (B, context_length)
        if self._pool_type() == "argmax":  # CLIP BPE: the end token has the largest id, padding follows it
            last = ids.argmax(dim=-1, keepdim=True)
            mask = torch.arange(ids.shape[1]).unsqueeze(0) <= last
        else:
            mask = ids != _pad_id(self.tokenizer)
        return {"input_ids": ids, "attention_mask": mask.long()}

    # --- layer map -----------------------------------------------------------------------
    def heads(self) -> list[nn.Module]:
        """The projections, and for timm towers the trunk's pooling head and open_clip's adapter head."""
        heads: list[nn.Module] = [self.text_proj]
        if self.image_proj is not None:
            return [self.image_proj, *heads]
        visual = self.model.get_submodule("visual")
        trunk = visual.get_submodule("trunk")
        image = [
            m for n in ("attn_pool", "fc_norm", "head") if isinstance(m := getattr(trunk, n, None), nn.Module)
        ]
        return [*image, visual.get_submodule("head"), *heads]

    def towers(self) -> list[Tower]:
        """Transformer blocks and final norms per tower; LoRA goes into the blocks only."""
        visual = self.model.get_submodule("visual")
        if self._timm:
            trunk = visual.get_submodule("trunk")
            blocks = getattr(trunk, "blocks", None) or getattr(trunk, "stages", None)
            if not isinstance(blocks, nn.Module):
                raise BackboneError(f"timm trunk {type(trunk).__name__}: no blocks or stages to train")
            final = [norm] if isinstance(norm := getattr(trunk, "norm", None), nn.Module) else []
            image = Tower("image", list(blocks.children()), final, blocks, ("qkv",))
        else:
            body = visual.get_submodule("transformer")
            final = [
                m
                for n in ("attn_pool", "attn_pool_contrastive", "ln_post")
                if isinstance(m := getattr(visual, n, None), nn.Module)
            ]
            blocks = body.get_submodule("resblocks")
            image = Tower("image", list(blocks.children()), final, body, ("c_fc", "c_proj"))
        text_body = self._text_owner().get_submodule("transformer")
        text = Tower(
            "text",
            list(text_body.get_submodule("resblocks").children()),
            [self._text_owner().get_submodule("ln_final")],
            text_body,
            ("c_fc", "c_proj"),
        )
        return [image, text]

    def _unused_parameters(self) -> list[nn.Parameter]:
        return [
            p
            for n in ("logit_scale", "logit_bias")
            if isinstance(p := getattr(self.model, n, None), nn.Parameter)
        ]

    # --- save / identity -----------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Write an open_clip folder (LoRA merged) + tokenizer files + cliptune config.

        ``directory`` loads with plain open_clip (``create_model("local-dir:" + directory)``). With LoRA
        the open_clip weights are the merged model and ``cliptune_state.safetensors`` holds the exact
        unmerged state that cliptune restores.

        Args:
            directory: Output folder (created).
        """
        from safetensors.torch import save_file

        from cliptune.models.freeze import merged_copy
        from cliptune.rundir import write_text_atomic

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        export = merged_copy(self.model) if self.lora is not None else self.model
        state = {k: v.detach() for k, v in export.state_dict().items()}
        for head in (self.image_proj, self.text_proj):
            if head is not None:
                state |= head.exported()
        save_file({k: v.contiguous() for k, v in state.items()}, str(directory / OPEN_CLIP_WEIGHTS))
        hf_tokenizer: Any = getattr(self.tokenizer, "tokenizer", None)
        if hasattr(hf_tokenizer, "save_pretrained"):  # open_clip reads HF tokenizers from the folder
            hf_tokenizer.save_pretrained(directory)
        config = {"model_cfg": self.model_cfg, "preprocess_cfg": self.preprocess_cfg}
        write_text_atomic(directory / OPEN_CLIP_CONFIG, json.dumps(config, indent=2) + "\n")
        if self.lora is not None:
            save_state(directory, self.state_dict())
        # without LoRA the open_clip folder holds every weight (projections included) and open_clip loads
        # it strictly: there is no cliptune state file to expect
        write_config(directory, self, {"state": "full" if self.lora is not None else "none"})

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "class": type(self.model).__name__,
            "model_cfg": self.model_cfg,
            "preprocess": self.preprocess_cfg,
            "tokenizer": _tokenizer_fingerprint(self.tokenizer),
        }

    def _pool_type(self) -> str:
        owner = self._text_owner()
        return str(owner.pool_type if self._text_path else owner.text_pool_type)

    def _text_owner(self) -> nn.Module:
        return self.model.get_submodule(self._text_path)


def load_open_clip(spec: str) -> OpenClipBackbone:
    """Load an open_clip checkpoint: a local open_clip folder, ``hf-hub:org/name`` or ``Name/pretrained-tag``.

    Args:
        spec: The part after ``open_clip:`` (see the module docstring).

    Returns:
        The backbone (every parameter trainable; ``load_backbone`` applies freezing).

    Raises:
        BackboneError: open_clip is not installed, the folder is not an open_clip folder, or the
            checkpoint cannot be loaded (a hub id or tag offline and not cached).
    """
    open_clip = import_open_clip(f"open_clip:{spec}")
    path = Path(spec)
    if path.is_dir():
        if not (path / OPEN_CLIP_CONFIG).is_file():
            raise BackboneError(f"{path}: not an open_clip folder (no {OPEN_CLIP_CONFIG})")
        name, pretrained = f"local-dir:{path}", None
    elif spec.startswith("hf-hub:"):
        name, pretrained = spec, None
    elif "/" in spec:
        name, _, pretrained = spec.partition("/")
    else:
        raise BackboneError(
            f"backbone 'open_clip:{spec}': expected a local open_clip folder, 'hf-hub:<org>/<name>' or "
            f"'<architecture>/<pretrained tag>' (e.g. 'ViT-B-32/laion2b_s34b_b79k'); {spec!r} is none of them"
        )
    try:
        model_cfg = open_clip.get_model_config(name)
        model = open_clip.create_model(name, pretrained=pretrained, load_weights=True)
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as err:  # open_clip raises RuntimeError/ValueError/OSError/hub errors
        offline = os.environ.get("HF_HUB_OFFLINE", "")
        raise BackboneError(
            f"backbone 'open_clip:{spec}': open_clip could not load it ({type(err).__name__}: {err}); "
            f"HF_HUB_OFFLINE={offline!r}. A hub id or pretrained tag needs the network or the local cache; "
            "a local folder needs open_clip_config.json and its weights."
        ) from err
    if model_cfg is None:
        raise BackboneError(f"backbone 'open_clip:{spec}': open_clip has no architecture {name!r}")
    preprocess_cfg = dict(model.get_submodule("visual").preprocess_cfg)
    preprocess_cfg["size"] = list(_pair(preprocess_cfg["size"]))
    preprocess_cfg["mean"], preprocess_cfg["std"] = list(preprocess_cfg["mean"]), list(preprocess_cfg["std"])
    return OpenClipBackbone(model.float(), tokenizer, dict(model_cfg), preprocess_cfg).eval()


def preprocess_image(image: Image.Image, cfg: dict[str, Any]) -> Tensor:
    """open_clip's eval transform (``image_transform(is_train=False)``) with PIL and torch only.

    :func:`uint8_image`, then ``/ 255`` and ``(x - mean) / std`` (``cfg["mean"]``, ``cfg["std"]``).

    Args:
        image: Any PIL image.
        cfg: open_clip's ``preprocess_cfg``.

    Returns:
        (3, H, W) float32.
    """
    pixels = torch.from_numpy(uint8_image(image, cfg).copy()).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(cfg["std"], dtype=torch.float32).view(3, 1, 1)
    return (pixels - mean) / std  # (3, H, W)


def uint8_image(image: Image.Image, cfg: dict[str, Any]) -> np.ndarray:
    """The uint8 half of open_clip's eval transform: resize and crop/pad to ``cfg["size"]``, as (H, W, 3).

    ``resize_mode`` ``shortest``: resize the short side to the target (``Resize`` semantics: the long
    side is truncated) and centre-crop; ``longest``: fit the long side, then centre-pad with
    ``fill_color``; ``squash``: resize to the exact size.
    The image is converted to RGB first (open_clip converts after resizing; identical for RGB/L).

    Args:
        image: Any PIL image.
        cfg: open_clip's ``preprocess_cfg``.

    Returns:
        (H, W, 3) uint8.
    """
    height, width = _pair(cfg["size"])
    mode = cfg.get("resize_mode", "shortest")
    interpolation = _FILTERS[cfg.get("interpolation", "bicubic")]
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    w, h = rgb.size
    if mode == "squash":
        rgb = rgb.resize((width, height), interpolation)
    elif mode == "longest":  # ResizeKeepRatio(longest=1) + CenterCropOrPad
        ratio = max(h / height, w / width)
        rgb = rgb.resize((round(w / ratio), round(h / ratio)), interpolation)
        rgb = _center_crop_or_pad(rgb, height, width, int(cfg.get("fill_color", 0)))
    elif mode == "shortest":
        if height == width:  # torchvision Resize(int): short side -> size, long side truncated
            short, long = min(w, h), max(w, h)
            new_long = int(height * long / short)
            size = (height, new_long) if w <= h else (new_long, height)
        else:  # open_clip's ResizeKeepRatio(size) for non-square targets, with its default bilinear
            ratio = min(h / height, w / width)
            size = (round(w / ratio), round(h / ratio))
            interpolation = Image.Resampling.BILINEAR
        rgb = rgb.resize(size, interpolation)
        rgb = _center_crop_or_pad(rgb, height, width, 0)
    else:
        raise BackboneError(f"open_clip preprocess_cfg: unknown resize_mode {mode!r}")
    return np.asarray(rgb, dtype=np.uint8)  # (H, W, 3)


def _center_crop_or_pad(image: Image.Image, height: int, width: int, fill: int) -> Image.Image:
    """torchvision ``center_crop`` (pads with ``fill`` when smaller, then crops at the rounded centre)."""
    w, h = image.size
    if w < width or h < height:
        canvas = Image.new("RGB", (max(w, width), max(h, height)), (fill, fill, fill))
        left, top = (max(width - w, 0)) // 2, (max(height - h, 0)) // 2
        canvas.paste(image, (left, top))
        image, (w, h) = canvas, canvas.size
    top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    return image.crop((left, top, left + width, top + height))


def _take(owner: nn.Module, name: str) -> nn.Parameter | nn.Linear:
    """Remove the projection ``owner.<name>`` from ``owner`` and return it."""
    projection = getattr(owner, name, None)
    if not isinstance(projection, (nn.Parameter, nn.Linear)):
        raise BackboneError(
            f"open_clip {type(owner).__name__}.{name} is {type(projection).__name__}, not a projection "
            "matrix or Linear; this open_clip architecture is not supported"
        )
    setattr(owner, name, None)
    return projection


def _pair(size: Any) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _pad_id(tokenizer: Any) -> int:
    hf = getattr(tokenizer, "tokenizer", None)
    pad = getattr(hf, "pad_token_id", None)
    return int(pad) if isinstance(pad, int) else 0


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    """Class, context length and (HF tokenizers) the tokenizer pipeline without its padding state."""
    data: Any = None
    backend = getattr(getattr(tokenizer, "tokenizer", None), "backend_tokenizer", None)
    if backend is not None:
        data = json.loads(backend.to_str())
        data.pop("padding", None)
        data.pop("truncation", None)
    else:
        data = len(getattr(tokenizer, "encoder", {}))
    return json.dumps(
        [type(tokenizer).__name__, getattr(tokenizer, "context_length", None), data], sort_keys=True
    )
