"""Typed, validated run configuration: the one place where settings are defined and checked.

A run is reproducible from its ``config.yaml`` alone, so every setting that changes a result lives here,
with a description that doubles as ``--help`` text and as the generated ``docs/config.md``. YAML is only the
serialisation: everything is validated by pydantic before any work starts, and an invalid value fails with
the exact field path (``train.lr``) and the allowed values.

Example:
    >>> cfg = load_config(None, overrides=["train.lr=1e-4", "data.split.ratios={train: 0.8, val: 0.2}"])
    >>> cfg.train.lr
    0.0001
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from cliptune.errors import CliptuneError
from cliptune.rundir import write_text_atomic

__all__ = ["Config", "ConfigError", "load_config", "save_config", "apply_overrides", "config_markdown"]


class _Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads true as 1: `train.epochs=true` would train one epoch
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and _bool_for_number(field.annotation, value):
            raise ValueError("a number is needed, not a boolean")
        return value


def _bool_for_number(annotation: Any, value: Any) -> bool:
    """Whether ``value`` holds a bool where ``annotation`` wants an int or float (and no bool)."""
    if isinstance(value, bool):
        options = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
        return bool({int, float} & set(options)) and bool not in options and Any not in options
    if isinstance(value, Mapping) and get_origin(annotation) is dict:
        return any(_bool_for_number(get_args(annotation)[1], v) for v in value.values())
    if isinstance(value, list) and get_origin(annotation) is list:
        return any(_bool_for_number(get_args(annotation)[0], v) for v in value)
    return False


class SplitConfig(_Section):
    ratios: dict[str, float] = Field(
        default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1},
        description="Split names and their share of the catalogue's rows; must sum to 1 and include 'train' "
        "(e.g. {train: 0.8, val: 0.2} or {train: 0.7, val: 0.15, test: 0.15}). Without a 'val' share there "
        "is no validation (unless rows name a val split): then train.early_stopping must be null and "
        "train.scheduler cosine. Rows fixed to train/test get val carved from the train groups.",
    )
    seed: int = Field(
        0, description="Seed of the grouped split; the same seed and catalogue give the same split."
    )
    stratify: str | None = Field(
        None, description="Attribute column to stratify the split by (each group's majority value)."
    )
    min_groups: int = Field(
        5,
        ge=0,
        description="Each held-out split (val, test) gets at least this many groups while train keeps half "
        "of them, so small catalogues get metrics that can tell models apart; 0 follows the ratios alone.",
    )
    method: Literal["balanced", "hash"] = Field(
        "balanced",
        description="'balanced': groups shuffled with the seed and filled to the ratios of rows (exact up to "
        "a group; carving and min_groups apply). 'hash': each group's split from a SHA-256 of the seed and "
        "its id alone, so it never moves when other rows change and a streamed catalogue (shards) needs no "
        "global pass; ratios hold in expectation, on groups; stratify and min_groups do not apply.",
    )

    @model_validator(mode="after")
    def _hash_takes_no_minimum(self) -> SplitConfig:
        if self.method == "hash" and "min_groups" in self.model_fields_set and self.min_groups > 0:
            raise ValueError(
                "data.split.min_groups does not apply to data.split.method: hash (a group's split depends on "
                "its id alone); set data.split.min_groups: 0 or data.split.method: balanced"
            )
        if self.method == "hash" and self.stratify is not None:
            raise ValueError(
                "data.split.stratify does not apply to data.split.method: hash (a group's split depends on "
                "its id alone); set data.split.stratify: null or data.split.method: balanced"
            )
        return self

    @field_validator("ratios")
    @classmethod
    def _ratios_valid(cls, ratios: dict[str, float]) -> dict[str, float]:
        if "train" not in ratios:
            raise ValueError(f"must include a 'train' split, got {sorted(ratios)}")
        for name, share in ratios.items():
            if not name.strip():
                raise ValueError("split names must be non-empty")
            if not 0.0 < share <= 1.0:
                raise ValueError(f"share of split '{name}' must be in (0, 1], got {share}")
        total = math.fsum(ratios.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"ratios must sum to 1, got {total:g} ({ratios})")
        return ratios


COLOUR_WORDS = frozenset({"colour", "colours", "color", "colors", "hue", "hues", "tint", "shade"})
"""Words that make an attribute name colour-like (``colour``, ``main_color``, ``hue``): colour jitter
would change what such an attribute says about an image."""

ORIENTATION_WORDS = frozenset({"orientation", "direction", "facing", "side", "handedness", "handed"})
"""Words that make an attribute name orientation-like (``orientation``, ``facing``): a horizontal flip
would turn a left-facing item into a right-facing one."""


def _name_words(attribute: str) -> set[str]:
    return {w for w in "".join(c if c.isalpha() else " " for c in attribute.lower()).split() if w}


def colour_like(attribute: str) -> bool:
    """Whether an attribute name speaks of colour (``colour``, ``main_color``, ``hue``), word by word."""
    return bool(_name_words(attribute) & COLOUR_WORDS)


def orientation_like(attribute: str) -> bool:
    """Whether an attribute name speaks of orientation (``orientation``, ``facing``), word by word."""
    return bool(_name_words(attribute) & ORIENTATION_WORDS)


class ImageAugmentConfig(_Section):
    crop: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Random crop: each side keeps a random share in [1 - crop, 1] of its length and the crop "
        "is resized back to the image's size (0 = off).",
    )
    flip: bool = Field(False, description="Mirror left-right with probability 1/2.")
    blur: float = Field(
        0.0, ge=0, le=5, description="Gaussian blur with a radius drawn from [0, blur] pixels (0 = off)."
    )
    rotate: float = Field(
        0.0,
        ge=0,
        le=30,
        description="Small rotation by an angle drawn from [-rotate, rotate] degrees, corners filled with the "
        "image's border colour (0 = off).",
    )
    colour_jitter: float = Field(
        0.0,
        ge=0,
        le=0.5,
        description="Brightness, contrast and saturation factors drawn from [1 - j, 1 + j] and a hue shift "
        "from [-j / 2, j / 2] turns (0 = off); refused when a colour-like attribute is protected.",
    )

    @property
    def enabled(self) -> bool:
        """Whether any image augmentation is on."""
        return bool(self.crop or self.flip or self.blur or self.rotate or self.colour_jitter)


class TextAugmentConfig(_Section):
    templates: bool = Field(
        False, description="Wrap captions in a random template ('a photo of {}', 'product photo: {}', ...)."
    )
    synonyms: bool = Field(
        False,
        description="Replace words by a synonym ('jumper' -> 'pullover'); a word that spells one of the row's "
        "attribute values is never replaced.",
    )

    @property
    def enabled(self) -> bool:
        """Whether any caption augmentation is on."""
        return self.templates or self.synonyms


class AugmentConfig(_Section):
    image: ImageAugmentConfig = Field(
        default_factory=ImageAugmentConfig, description="Image augmentations (each off by default)."
    )
    text: TextAugmentConfig = Field(
        default_factory=TextAugmentConfig, description="Caption augmentations (each off by default)."
    )
    views: int = Field(
        4,
        ge=1,
        le=64,
        description="With frozen towers: augmented views per training image and caption, computed once "
        "through the feature cache; each epoch picks one view per item (seeded by train.seed and the epoch).",
    )
    seed: int = Field(
        0,
        description="Seed of the views themselves (part of their cache key), apart from train.seed so runs "
        "with other seeds reuse the cached views.",
    )
    protect: list[str] = Field(
        default_factory=list,
        description="Attributes augmentation must not change: a colour-like one (colour, color, hue) refuses "
        "image.colour_jitter, an orientation-like one (orientation, facing, side) refuses image.flip.",
    )
    suite: Path | None = Field(
        None,
        description="A behavioural suite YAML whose tested attributes (its selectors' keys) are protected "
        "too; checked when training starts.",
    )

    @property
    def enabled(self) -> bool:
        """Whether any augmentation is on."""
        return self.image.enabled or self.text.enabled


class DataConfig(_Section):
    catalogue: Path | None = Field(
        None, description="Catalogue folder (images + metadata.csv/.jsonl/.parquet, imagefolder convention)."
    )
    text_column: str = Field(
        "text",
        description="Caption column of the catalogue (e.g. title): trained on, evaluated, shown by search; "
        "required, while `text` then is not; never a filter attribute.",
    )
    group_column: str = Field("group", description="Column whose values must never be split across splits.")
    split: SplitConfig = Field(
        default_factory=SplitConfig, description="How rows are split (grouped, seeded)."
    )
    max_pixels: int = Field(
        89_478_485,
        gt=0,
        description="Decompression-bomb guard: images with more pixels than this are rejected.",
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error",
        description="What to do with a row that fails to load: 'error' stops; 'skip' records it in rejected.csv.",
    )
    num_workers: int | Literal["auto"] = Field(
        "auto",
        description="DataLoader worker processes for image decoding (0 = in process), or 'auto': 0 when the "
        "towers run on the CPU (they use every core; decoding runs on their threads between forwards) or "
        "for fewer than 2 batches of images; on a GPU the CPU cores this process may use, shared among the "
        "launch's processes on this machine, minus one, capped at 8, at least 1.",
    )

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers(cls, value: Any) -> Any:
        # one message for both branches of the union (pydantic would report each branch's failure)
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return value
        raise ValueError("must be a whole number >= 0 or 'auto'")

    fast_decode: bool = Field(
        False,
        description="Decode large JPEGs at a reduced DCT scale (1/2, 1/4 or 1/8, keeping the shorter side >= "
        "2x the model's input side): 2-4x faster decoding, but features change slightly (min cosine 0.9987 "
        "vs full decoding on the measured photos, mean pixel difference < 0.5/255 after the model's resize). "
        "Saved with the trained model so eval, index, embed, serve and export decode alike; part of the "
        "feature-cache key.",
    )
    pixel_cache: bool = Field(
        False,
        description="Keep every image decoded and resized to the model's input size as uint8 in a "
        "memory-mapped cache beside the feature cache (FEATURE_CACHE/pixels), so later runs skip decoding: "
        "150 KB of disk per image at 224 px (150 GB per million images). Off by default: frozen towers "
        "already reuse cached features; it pays off when features cannot be reused (fine-tuned towers, "
        "comparing models on one catalogue). Refused, with the reason, for a preprocess that is not "
        "uint8 resize/crop then normalise (e.g. a transformers image processor on its torchvision backend).",
    )
    augment: AugmentConfig = Field(
        default_factory=AugmentConfig,
        description="Training-time augmentation of images and captions (retrieval task; off by default).",
    )


class LoraConfig(_Section):
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch.")
    target_modules: list[str] | None = Field(
        None,
        description="Names of the layers that get adapters; null uses each tower's own defaults "
        "(attention q/v projections; EfficientNet's 1x1 convolutions).",
    )


class HeadConfig(_Section):
    width: int = Field(256, gt=0, description="Width of the Siamese fusion head's transformer.")
    depth: int = Field(2, gt=0, description="Number of transformer layers in the Siamese head.")
    heads: int = Field(4, gt=0, description="Attention heads in the Siamese head (must divide width).")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout in the Siamese head.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> HeadConfig:
        if self.width % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide width ({self.width})")
        return self


class ModelConfig(_Section):
    backbone: str = Field(
        "embedded",
        description="'embedded' (offline EfficientNet-Lite0 + MiniLM), a local folder, a hub id of a "
        "CLIP/SigLIP/AutoModel with get_image_features/get_text_features, or an open_clip checkpoint: "
        "'open_clip:hf-hub:ORG/NAME', 'open_clip:ARCH/PRETRAINED_TAG' or 'open_clip:FOLDER' "
        "(needs the open_clip extra).",
    )
    embed_dim: int | None = Field(
        None,
        gt=0,
        description="Shared embedding size of new projections (composed/auto backbones; default 256); "
        "CLIP/SigLIP keep their pretrained projection size.",
    )
    image_size: int | None = Field(
        None,
        gt=0,
        description="Input size of the embedded/composed EfficientNet image tower (default 224); e.g. 160 for "
        "160 px catalogue images, which gain nothing from upsampling (half the compute).",
    )
    trainable_layers: int = Field(
        0,
        ge=-1,
        description="-1 trains everything; 0 only projections/heads (towers frozen, features cached); "
        "N > 0 the last N blocks of each tower plus final norms and projections.",
    )
    lora: LoraConfig | None = Field(
        None,
        description="Train LoRA adapters in the towers instead of full layers (needs trainable_layers 0; "
        "not with the siamese task).",
    )
    head: HeadConfig = Field(default_factory=HeadConfig, description="Siamese fusion head (task: siamese).")
    embed_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Precision of frozen-tower embedding: 'auto' uses bf16 where the hardware supports it.",
    )
    cache_dir: Path | None = Field(
        None, description="Feature cache folder; defaults to ~/.cache/cliptune/features."
    )


def _default_siamese_weights() -> dict[Literal["image", "text", "fused", "cross"], float]:
    """Every Siamese term weighted 1 (a typed factory: a lambda's dict literal is inferred as dict[str, float])."""
    return {"image": 1.0, "text": 1.0, "fused": 1.0, "cross": 1.0}


class LossConfig(_Section):
    name: Literal["info_nce", "siglip", "triplet", "contrastive"] = Field(
        "info_nce",
        description="Training objective. train.task 'retrieval': info_nce, siglip, triplet or contrastive on "
        "image-text pairs; 'siamese': triplet, contrastive or info_nce over the triplets, per term (image, "
        "text, fused, cross). See docs/losses.md.",
    )
    temperature: float | None = Field(
        None,
        ge=0.01,
        le=1.0,
        description="InfoNCE temperature (initial value when learned), in [0.01, 1]: below 0.01 the logit "
        "scale passes 100, the ceiling CLIP (and a learned temperature here) clamps to; above 1 logits span "
        "less than the cosine range and the loss cannot separate pairs. Null: the backbone's pretrained one "
        "(CLIP: 1 / exp(logit_scale)), else 0.07. Also the temperature of the InfoNCE that eval reports. "
        "The siamese task's info_nce scores its own head's embeddings: null means 0.07 there.",
    )
    learn_temperature: bool = Field(
        False, description="Learn the InfoNCE temperature (log-parametrised, scale <= 100)."
    )
    siglip_scale: float | None = Field(
        None,
        gt=0,
        le=1000.0,
        description="Initial SigLIP multiplier (not its log), in (0, 1000]: ten times CLIP's logit-scale "
        "ceiling of 100; null: the backbone's pretrained exp(logit_scale), else 10.",
    )
    siglip_bias: float | None = Field(
        None,
        ge=-1000.0,
        le=1000.0,
        description="Initial SigLIP bias, in [-1000, 1000] (a bias beyond the largest scale fixes every "
        "pair's sign whatever its cosine); null: the backbone's pretrained logit_bias, else -10.",
    )
    margin: float = Field(
        0.2,
        ge=0,
        description="Margin of the triplet and contrastive losses; at most 2 with loss.distance 'cosine' "
        "(cosine distances lie in [0, 2], so a larger margin can never be met).",
    )
    distance: Literal["cosine", "euclidean"] = Field(
        "cosine",
        description="Distance of the triplet loss and of every Siamese loss (contrastive: d^2 and "
        "max(0, margin - d)^2; info_nce: logits -d / temperature).",
    )
    weights: dict[Literal["image", "text", "fused", "cross"], float] = Field(
        default_factory=_default_siamese_weights,
        description="Weights of the Siamese objective's terms.",
    )

    @field_validator("name", mode="before")
    @classmethod
    def _renamed_loss(cls, name: Any) -> Any:
        if name == "siamese":
            raise ValueError(
                "'siamese' is no longer a loss name: the Siamese task's triplet-margin objective is "
                "loss.name='triplet' with train.task='siamese' (also: contrastive, info_nce)"
            )
        return name

    @field_validator("weights")
    @classmethod
    def _weights_non_negative(cls, weights: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in weights.items() if v < 0}
        if bad:
            raise ValueError(f"weights must be >= 0, got {bad}")
        return weights


PRIMARY_METRIC: dict[str, str] = {"retrieval": "val/t2i/mrr", "siamese": "val/triplet/accuracy"}
"""What early stopping and the plateau schedule watch unless told otherwise: the task's headline validation
metric (compare ranks runs by the same one). Chosen by measurement over ``val/loss``: see docs/training.md,
"Why these defaults"."""

HEAD_ONLY_LR, TOWER_LR = 1e-3, 1e-5
"""Default ``train.lr`` when only heads train (measured, docs/training.md) and when tower weights train
(LoRA or ``model.trainable_layers`` > 0; not measured here, see docs/training.md)."""


def direction(metric: str) -> Literal["min", "max"]:
    """Whether a logged metric should go down (any loss) or up (recall, mrr, accuracy, ...)."""
    return "min" if "loss" in metric.split("/") else "max"


def _fill_default(section: BaseModel, field: str, value: Any) -> None:
    """Set a default that depends on other fields without marking it as set by the user.

    A later rule (the task's primary metric) may still refine an unmarked default, never a user's value;
    writing past ``validate_assignment`` keeps the section's own validators from running again.
    """
    section.__dict__[field] = value


class _WatchedMetric(_Section):
    """A metric watched over epochs; ``mode`` defaults to the metric's direction (losses down, others up)."""

    metric: str
    mode: Literal["min", "max"]

    @model_validator(mode="after")
    def _mode_follows_metric(self) -> _WatchedMetric:
        if "mode" not in self.model_fields_set:
            _fill_default(self, "mode", direction(self.metric))
        return self


class PlateauConfig(_WatchedMetric):
    metric: str = Field(
        "val/t2i/mrr",
        description="Logged metric the plateau scheduler watches (default: the task's primary metric, "
        "val/t2i/mrr for retrieval, val/triplet/accuracy for siamese).",
    )
    mode: Literal["min", "max"] = Field(
        "max", description="Whether the metric should go down or up (default: down for a loss, else up)."
    )
    factor: float = Field(0.5, gt=0, lt=1, description="LR multiplier on a plateau.")
    patience: int = Field(2, ge=0, description="Epochs without improvement before the LR is cut.")
    min_lr: float = Field(1e-6, ge=0, description="Lower bound of the learning rate.")
    cooldown: int = Field(0, ge=0, description="Epochs to wait after a cut before watching again.")


class EarlyStoppingConfig(_WatchedMetric):
    metric: str = Field(
        "val/t2i/mrr",
        description="Logged metric that decides early stopping and the best model (default: the task's "
        "primary metric, val/t2i/mrr for retrieval, val/triplet/accuracy for siamese).",
    )
    mode: Literal["min", "max"] = Field(
        "max", description="Whether the metric should go down or up (default: down for a loss, else up)."
    )
    patience: int = Field(5, ge=0, description="Epochs without improvement before stopping.")
    min_delta: float = Field(0.0, ge=0, description="Smallest change that counts as an improvement.")


class GradCacheConfig(_Section):
    chunk_size: int = Field(
        64,
        gt=0,
        description="Rows embedded at once; peak tower memory is that of one chunk, whatever "
        "train.batch_size (it must be below it: one chunk of the whole batch would only add a second "
        "forward pass).",
    )


class HardNegativesConfig(_Section):
    file: Path | None = Field(
        None,
        description="Required. Mined hard negatives (.parquet or .jsonl) written by `cliptune mine` on this catalogue's "
        "train split; each training caption's negatives join its batch as extra images (docs/training.md, "
        "Hard negatives).",
    )
    per_caption: int = Field(
        1,
        gt=0,
        description="Mined negatives of each caption added to its batch (the file's first ones, by rank): a "
        "batch of B captions scores B + B * per_caption images; a caption with fewer mined ones uses those.",
    )

    @model_validator(mode="after")
    def _file_given(self) -> HardNegativesConfig:
        if self.file is None:  # None only so that the generated reference can show the section
            raise ValueError("give the mined file: file=PATH (written by `cliptune mine`)")
        return self


class ForgettingConfig(_Section):
    catalogue: Path = Field(
        description="A general image-text catalogue (not the training domain) ranked zero-shot, all its rows, "
        "before training (epoch 0) and at every validation, logged as general/t2i/... and general/i2t/...: "
        "how much of what the pretrained model knew fine-tuning destroys."
    )
    text_column: str = Field("text", description="Caption column of the general catalogue.")
    group_column: str = Field("group", description="Group column of the general catalogue (relevant: group).")
    relevant: Literal["group", "item"] = Field(
        "item",
        description="A caption's relevant images in the general catalogue: its own image ('item', the "
        "zero-shot retrieval of the WiSE-FT paper) or its group's.",
    )


class TrainConfig(_Section):
    task: Literal["retrieval", "siamese"] = Field(
        "retrieval",
        description="'retrieval': dual encoder on image-text pairs; 'siamese': fusion head on triplets.",
    )
    epochs: int = Field(30, gt=0, description="Maximum number of epochs.")
    batch_size: int = Field(64, gt=0, description="Per-process batch size.")
    lr: float = Field(
        HEAD_ONLY_LR,
        gt=0,
        le=1.0,
        description="Peak learning rate of AdamW (default 1e-3 when only heads train, 1e-5 when tower "
        "weights train), in (0, 1]: AdamW moves each weight by about lr per step, "
        "so at 1 every step already moves weights by their whole initial scale (fine-tuning uses 1e-6 to "
        "1e-3).",
    )
    weight_decay: float = Field(
        0.01,
        ge=0,
        le=1.0,
        description="AdamW weight decay (never on biases, norms, temperatures), in [0, 1]: each step "
        "multiplies weights by 1 - lr * weight_decay, which must stay >= 0.",
    )
    scheduler: Literal["plateau", "cosine"] = Field("plateau", description="LR schedule.")
    plateau: PlateauConfig = Field(default_factory=PlateauConfig, description="ReduceLROnPlateau settings.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps (cosine schedule).")
    grad_clip: float | None = Field(1.0, gt=0, description="Max gradient norm; null disables clipping.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="Training precision.")
    gradient_checkpointing: bool = Field(
        False, description="Trade compute for memory where the backbone supports it."
    )
    seed: int = Field(0, description="Seed for model init, data order and every RNG.")
    early_stopping: EarlyStoppingConfig | None = Field(
        default_factory=EarlyStoppingConfig, description="Early stopping; null trains all epochs."
    )
    checkpoint_every: int = Field(1, ge=1, description="Write a resumable checkpoint every N epochs.")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept besides the best one.")
    val_every_steps: int | None = Field(
        None, gt=0, description="Validate every N steps instead of every epoch."
    )
    max_bad_steps: int = Field(0, ge=0, description="Non-finite losses skipped before training stops.")
    log_every_steps: int = Field(
        10, ge=1, description="Write a step record (loss, lr) to metrics.jsonl every N steps."
    )
    grad_cache: GradCacheConfig | None = Field(
        None,
        description="Gradient caching (Gao et al. 2021) for info_nce / siglip on train.task 'retrieval': "
        "the batch is embedded in chunks, the loss sees all of it, gradients equal a full-batch step's; "
        "null: off. See docs/training.md, 'Gradient caching'.",
    )
    hard_negatives: HardNegativesConfig | None = Field(
        None,
        description="Train with mined hard negatives as extra in-batch candidates (retrieval task, info_nce "
        "or siglip; with trainable towers their pixels go through the image tower too); null: in-batch "
        "negatives only.",
    )
    forgetting: ForgettingConfig | None = Field(
        None,
        description="The forgetting guard: a general catalogue evaluated with every validation (general/...); "
        "null: none.",
    )


class EvalConfig(_Section):
    k: list[int] = Field(default_factory=lambda: [1, 5, 10], description="Cut-offs for @k metrics.")
    bootstrap: int = Field(
        1000, ge=0, description="Bootstrap resamples for confidence intervals (0 disables)."
    )
    confidence: float = Field(0.95, gt=0, lt=1, description="Confidence level of the intervals.")
    seed: int = Field(0, description="Seed of the bootstrap.")
    relevant: Literal["group", "item"] = Field(
        "group", description="An image's relevant texts: those of its whole group, or only its own captions."
    )

    @field_validator("k")
    @classmethod
    def _k_positive(cls, ks: list[int]) -> list[int]:
        if not ks:
            raise ValueError("give at least one k")
        bad = [k for k in ks if k <= 0]
        if bad:
            raise ValueError(f"every k must be > 0, got {bad}")
        return sorted(set(ks))


class TrackConfig(_Section):
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="Experiment trackers besides metrics.jsonl (always written)."
    )
    project: str = Field("cliptune", description="Project / experiment name in the trackers.")

    @model_validator(mode="before")
    @classmethod
    def _list_shorthand(cls, value: Any) -> Any:
        # `track: [wandb, tensorboard]` is the natural thing to write; accept it as the trackers list.
        return {"trackers": value} if isinstance(value, list) else value


class SweepParam(_Section):
    type: Literal["float", "int", "categorical"] = Field(..., description="Kind of the searched value.")
    low: float | None = Field(None, description="Lower bound (float/int).")
    high: float | None = Field(None, description="Upper bound (float/int).")
    log: bool = Field(False, description="Sample on a log scale (float/int, low > 0).")
    choices: list[Any] | None = Field(None, description="Values to choose from (categorical).")

    @model_validator(mode="after")
    def _bounds(self) -> SweepParam:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs non-empty 'choices'")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(
                f"a {self.type} parameter needs low < high, got low={self.low}, high={self.high}"
            )
        elif self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0, got {self.low}")
        return self


class SweepConfig(_Section):
    objective: str = Field(
        "val/t2i/mrr", description="Logged metric the sweep optimises (best epoch's value)."
    )
    direction: Literal["maximize", "minimize"] = Field("maximize", description="Whether higher is better.")
    space: dict[str, SweepParam] = Field(
        default_factory=dict,
        description="Config paths to search, e.g. {train.lr: {type: float, low: 1e-5, high: 1e-2, log: true}}.",
    )
    trials: int = Field(20, gt=0, description="Number of trials (a resumed sweep counts finished ones).")
    storage: str | None = Field(
        None,
        description="Optuna storage URL; default sqlite:///<runs>/<name>/sweep.db (any RDB URL to share).",
    )
    pruner: Literal["median", "none"] = Field(
        "median", description="Stop unpromising trials on intermediate values."
    )
    seed: int = Field(0, description="Seed of the sampler.")


class Config(_Section):
    """The whole run configuration; `config.yaml` in a run directory is this, fully resolved."""

    name: str | None = Field(None, description="Run name (the run directory is runs/<name>).")
    data: DataConfig = Field(default_factory=DataConfig, description="Catalogue and splits.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Backbone, trainable layers, heads.")
    loss: LossConfig = Field(default_factory=LossConfig, description="Training objective.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation and checkpoints.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation metrics and intervals.")
    track: TrackConfig = Field(default_factory=TrackConfig, description="Experiment tracking.")
    sweep: SweepConfig = Field(
        default_factory=SweepConfig, description="Hyper-parameter search (cliptune sweep)."
    )

    @model_validator(mode="after")
    def _fields_fit_together(self) -> Config:
        _task_defaults(self)
        problems = cross_field_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self


TASK_LOSSES: dict[str, tuple[str, ...]] = {
    "retrieval": ("info_nce", "siglip", "triplet", "contrastive"),
    "siamese": ("triplet", "contrastive", "info_nce"),
}
"""Values of ``loss.name`` each ``train.task`` trains. The retrieval task calls its loss on (image, text)
pairs; the siamese task applies the named loss to each term of its objective over (anchor, positive,
negative) triplets (``cliptune.losses.SIAMESE_LOSSES``, kept equal by a test), which has no SigLIP form."""

NAMED_BACKBONES_WITH_IMAGE_SIZE = ("embedded", "composed")
"""Backbone specs built here with an EfficientNet tower, the only ones ``model.image_size`` applies to;
mirrors ``cliptune.models.factory.NAMED_SPECS`` (kept import-free so loading a config stays cheap)."""


def _task_defaults(config: Config) -> None:
    """Fill the defaults that depend on other sections; a value the user set is never touched.

    The watched metric is the task's primary one (a siamese run has no ``val/t2i/mrr``); pretrained
    tower weights get a learning rate a hundred times smaller than fresh heads; without a val share there
    is no early stopping and the schedule is cosine (a user who sets either is told why it cannot work).
    """
    train, model = config.train, config.model
    for section in (train.early_stopping, train.plateau):
        if section is not None and "metric" not in section.model_fields_set:
            _fill_default(section, "metric", PRIMARY_METRIC[train.task])
            if "mode" not in section.model_fields_set:
                _fill_default(section, "mode", direction(section.metric))
    if "lr" not in train.model_fields_set and (model.trainable_layers > 0 or model.lora is not None):
        _fill_default(train, "lr", TOWER_LR)
    if "val" not in config.data.split.ratios:  # no validation: nothing to watch, a fixed schedule instead
        if "early_stopping" not in train.model_fields_set:
            _fill_default(train, "early_stopping", None)
        if "scheduler" not in train.model_fields_set:
            _fill_default(train, "scheduler", "cosine")


def cross_field_problems(config: Config) -> list[str]:
    """Combinations of fields that cannot work together, each naming the fields: checked before any work.

    These rules used to surface deep inside model loading or training, after data preparation; here they
    fail at validation with every field path named.

    Args:
        config: A config whose sections are each valid.

    Returns:
        One message per broken rule (empty when the config is consistent).
    """
    problems = []
    model, task = config.model, config.train.task
    if model.lora is not None and model.trainable_layers != 0:
        problems.append(
            f"model.lora and model.trainable_layers={model.trainable_layers} are alternatives: LoRA trains "
            "adapters in frozen towers, so set model.trainable_layers to 0 or model.lora to null"
        )
    if config.loss.name not in TASK_LOSSES[task]:
        problems.append(
            f"loss.name={config.loss.name!r} does not fit train.task={task!r}; "
            f"that task takes loss.name {', '.join(TASK_LOSSES[task])}"
        )
    if task == "siamese" and config.loss.learn_temperature:
        problems.append(
            "loss.learn_temperature=true does not fit train.task='siamese': its info_nce uses the fixed "
            "loss.temperature; set loss.learn_temperature to false"
        )
    if task == "siamese" and config.loss.temperature is not None and config.loss.name != "info_nce":
        problems.append(
            f"loss.temperature={config.loss.temperature:g} applies to train.task='siamese' only with "
            f"loss.name='info_nce', got loss.name={config.loss.name!r}; set loss.temperature to null"
        )
    siglip_set = [f"loss.{k}" for k in ("siglip_scale", "siglip_bias") if getattr(config.loss, k) is not None]
    if siglip_set and config.loss.name != "siglip":
        problems.append(
            f"{' and '.join(siglip_set)} apply only to loss.name='siglip', got loss.name={config.loss.name!r}; "
            "set them to null or the loss to siglip"
        )
    if task == "siamese" and (model.trainable_layers != 0 or model.lora is not None):
        problems.append(
            "train.task='siamese' trains a head on frozen towers: it needs model.trainable_layers=0 and "
            f"model.lora=null, got model.trainable_layers={model.trainable_layers} and "
            f"model.lora={'set' if model.lora is not None else 'null'}"
        )
    problems.extend(_hard_negatives_problems(config))
    if task == "siamese" and config.train.forgetting is not None:
        problems.append(
            "train.forgetting ranks a general catalogue with the dual encoder, which train.task='siamese' "
            "does not train (its towers are frozen); set train.forgetting to null"
        )
    if config.loss.distance == "cosine" and config.loss.margin > 2:
        problems.append(
            f"loss.margin={config.loss.margin:g} can never be met with loss.distance='cosine' (cosine "
            "distances lie in [0, 2]): set loss.margin to at most 2"
        )
    problems.extend(_no_validation_problems(config))
    problems.extend(_grad_cache_problems(config))
    problems.extend(
        augment_protect_problems(config.data.augment, config.data.augment.protect, "data.augment.protect")
    )
    if config.data.augment.enabled and task != "retrieval":
        problems.append(
            f"data.augment applies to train.task='retrieval' only, got train.task={task!r}; switch its "
            "image and text augmentations off"
        )
    if model.image_size is not None and model.backbone not in NAMED_BACKBONES_WITH_IMAGE_SIZE:
        problems.append(
            f"model.image_size applies only to model.backbone {' or '.join(NAMED_BACKBONES_WITH_IMAGE_SIZE)}, "
            f"got model.backbone={model.backbone!r} (its image size is fixed by the model)"
        )
    return problems


def augment_protect_problems(augment: AugmentConfig, attributes: Iterable[str], source: str) -> list[str]:
    """Augmentations that would change a protected attribute, each naming the fields and the attribute.

    Refused rather than switched off: ``config.yaml`` then says exactly what training did, and a user who
    asked for colour jitter on a catalogue whose colours are tested learns why it cannot be.

    Args:
        augment: The ``data.augment`` section.
        attributes: Protected attribute names.
        source: Where the names come from (``data.augment.protect``, or a suite file), for the message.

    Returns:
        One message per refused augmentation (empty when none is).
    """
    names = list(dict.fromkeys(attributes))
    problems = []
    colours = [a for a in names if colour_like(a)]
    if augment.image.colour_jitter and colours:
        problems.append(
            f"data.augment.image.colour_jitter={augment.image.colour_jitter:g} would change the colour-like "
            f"attribute(s) {', '.join(colours)} protected by {source}; set data.augment.image.colour_jitter to 0"
        )
    turned = [a for a in names if orientation_like(a)]
    if augment.image.flip and turned:
        problems.append(
            f"data.augment.image.flip=true would mirror the orientation-like attribute(s) {', '.join(turned)} "
            f"protected by {source}; set data.augment.image.flip to false"
        )
    return problems


GRAD_CACHE_LOSSES = ("info_nce", "siglip")
"""Losses gradient caching serves: a softmax (InfoNCE) or a learned scale and bias (SigLIP) couples every pair
of the batch, so only a whole large batch gives the large-batch gradient. The margin losses (triplet batch-all,
contrastive) are means of independent pair terms, whose expected value does not depend on the batch size, so
``train.grad_accum`` already gives their large-batch gradient without a second forward pass."""


def _grad_cache_problems(config: Config) -> list[str]:
    """Gradient caching splits the retrieval task's (image, text) embeddings; it needs a contrastive loss."""
    cache, train, loss = config.train.grad_cache, config.train, config.loss.name
    if cache is None:
        return []
    problems = []
    if train.task != "retrieval":
        problems.append(
            f"train.grad_cache applies only to train.task='retrieval', got train.task={train.task!r}: the "
            "siamese task trains a fusion head on cached tower features, with no tower activations to save; "
            "set train.grad_cache to null"
        )
    elif loss not in GRAD_CACHE_LOSSES:
        problems.append(
            f"train.grad_cache applies only to loss.name {' or '.join(GRAD_CACHE_LOSSES)}, got "
            f"loss.name={loss!r}: that loss is a mean of independent pair terms, so train.grad_accum already "
            "gives its large-batch gradient; set train.grad_cache to null (and raise train.grad_accum)"
        )
    if cache.chunk_size >= train.batch_size:
        problems.append(
            f"train.grad_cache.chunk_size={cache.chunk_size} is not below train.batch_size="
            f"{train.batch_size}: one chunk would hold the whole batch and caching would only add a second "
            "forward pass; lower the chunk size or set train.grad_cache to null"
        )
    if config.train.hard_negatives is not None:
        problems.append(
            "train.grad_cache and train.hard_negatives cannot be combined yet: the gradient cache embeds the "
            "batch's (image, text) pairs only, so the mined negatives would silently be left out; set one of "
            "them to null"
        )
    return problems


HARD_NEGATIVE_LOSSES = ("info_nce", "siglip")
"""Losses that take mined negatives as extra images (``extra_image``): the margin losses have no such input."""


def _hard_negatives_problems(config: Config) -> list[str]:
    """Mined negatives extend the batch of the retrieval task's InfoNCE / SigLIP (extra images)."""
    if config.train.hard_negatives is None:
        return []
    problems = []
    if config.train.task != "retrieval":
        problems.append(
            f"train.hard_negatives applies to train.task='retrieval', got train.task={config.train.task!r}; "
            "set train.hard_negatives to null"
        )
    elif config.loss.name not in HARD_NEGATIVE_LOSSES:
        problems.append(
            f"train.hard_negatives needs loss.name {' or '.join(HARD_NEGATIVE_LOSSES)} (extra images in the "
            f"batch), got loss.name={config.loss.name!r}"
        )
    return problems


def _no_validation_problems(config: Config) -> list[str]:
    """Without a val share there is no validation metric: nothing may watch one."""
    if "val" in config.data.split.ratios:
        return []
    train, ratios = config.train, dict(config.data.split.ratios)
    watching = []
    if train.early_stopping is not None:  # epoch 0, its first candidate, has no train values either
        watching.append(f"train.early_stopping.metric={train.early_stopping.metric!r}")
    if train.scheduler == "plateau":
        watching.append(f"train.scheduler='plateau' (train.plateau.metric={train.plateau.metric!r})")
    if not watching:
        return []
    return [
        f"data.split.ratios={ratios} has no 'val' share, so training has no validation metric, but "
        f"{' and '.join(watching)} watch one; add a val share to data.split.ratios, or set "
        "train.early_stopping to null and train.scheduler to 'cosine'"
    ]


class ConfigError(CliptuneError, ValueError):
    """An invalid configuration: ``errors`` holds one ``"field.path: reason"`` line per problem.

    ``source`` is the YAML file when a problem is in it; ``overrides`` are the override items
    (``"train.epochs=true"``) that set a bad value, so the message blames them and not the file.
    """

    def __init__(self, errors: list[str], source: str | None = None, overrides: Iterable[str] = ()) -> None:
        self.errors = errors
        self.overrides = list(overrides)
        head = f"invalid config{f' in {source}' if source else ''}:"
        super().__init__("\n".join([head, *(f"  {e}" for e in errors)]))


def _allowed_keys(loc: tuple[int | str, ...]) -> list[str]:
    """The field names allowed at the parent of ``loc`` (for 'unknown key' messages)."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        sub = _section_type(field.annotation)
        if sub is None:
            return []
        model = sub
    return sorted(model.model_fields)


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) not in (Union, UnionType):  # only Optional[Section], not dict[str, Section]
        return None
    for arg in get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _format_errors(
    exc: ValidationError, overrides: Mapping[tuple[str, ...], str] | None = None
) -> tuple[list[str], list[str]]:
    """One line per problem, and the override items that set a bad value (named in their lines)."""
    lines, blamed = [], []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if p not in ("function-after[_list_shorthand(), TrackConfig]",))
        msg = err["msg"].removeprefix("Value error, ")
        if not loc and err["type"] == "value_error":  # whole-config rules: each line names its fields
            lines.extend(msg.splitlines())
            continue
        path = ".".join(str(p) for p in loc) or "<root>"
        if err["type"] == "extra_forbidden":
            msg = f"unknown key; allowed keys: {', '.join(_allowed_keys(loc))}"
        elif "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], dict):
            msg = f"{msg} (got {err['input']!r})"
        allowed = _allowed_range(loc) if err["type"] in _BOUND_ERRORS else None
        if allowed:  # name the whole allowed range, not only the side that failed
            msg = f"{msg}; allowed: {allowed}"
        item = _override_of(tuple(str(p) for p in loc), overrides or {})
        if item is not None:
            msg = f"{msg}, set by override {item!r}"
            blamed.append(item)
        lines.append(f"{path}: {msg}")
    return lines, list(dict.fromkeys(blamed))


def _override_of(loc: tuple[str, ...], overrides: Mapping[tuple[str, ...], str]) -> str | None:
    """The last override that set ``loc`` or a section holding it (later overrides win, as applied)."""
    for path, item in reversed(list(overrides.items())):
        if loc[: len(path)] == path:
            return item
    return None


_BOUND_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _allowed_range(loc: tuple[int | str, ...]) -> str | None:
    """The range of the bounded field at ``loc`` as an interval, e.g. ``(0, 1]``; None if not a field."""
    model: type[BaseModel] | None = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if model else None
        model = _section_type(field.annotation) if field else None
    field = model.model_fields.get(str(loc[-1])) if model else None
    metadata = field.metadata if field else []
    bounds = {k: getattr(m, k) for m in metadata for k in ("gt", "ge", "lt", "le") if hasattr(m, k)}
    if not bounds:
        return None
    low = f"({bounds['gt']:g}" if "gt" in bounds else f"[{bounds['ge']:g}" if "ge" in bounds else "(-inf"
    high = f"{bounds['lt']:g})" if "lt" in bounds else f"{bounds['le']:g}]" if "le" in bounds else "inf)"
    return f"{low}, {high}"


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"override {item!r}: expected KEY=VALUE, e.g. train.lr=1e-4"], overrides=[item])
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        problem = " ".join(str(exc).split())
        raise ConfigError(
            [f"override {item!r}: value is not valid YAML ({problem})"], overrides=[item]
        ) from exc
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with ``a.b.c=value`` overrides applied (values parsed as YAML).

    Args:
        raw: The config as plain nested dicts (e.g. from YAML).
        overrides: Items like ``"train.lr=1e-4"`` or ``"track=[wandb]"``.

    Returns:
        A new nested dict; validation happens later, so an unknown key is reported by path.
    """
    out: dict[str, Any] = _deep_copy(raw)
    for item in overrides:
        path, value = _parse_override(item)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return out


def _deep_copy(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in raw.items()}


def load_config(path: Path | str | None, overrides: Iterable[str] = ()) -> Config:
    """Load, override and validate a config; fail before any work with every bad field named.

    Args:
        path: A YAML file, or None for the defaults.
        overrides: ``KEY=VALUE`` items as given to ``--set`` (repeatable), applied after the file.

    Returns:
        The validated :class:`Config`.

    Raises:
        ConfigError: Unreadable YAML, unknown keys, wrong types or out-of-range values, one line per field.

    Example:
        >>> load_config(None, ["train.epochs=3"]).train.epochs
        3
    """
    source = str(path) if path is not None else None
    raw: Any = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError as exc:
            raise ConfigError([f"file not found: {path}"], source) from exc
        except yaml.YAMLError as exc:
            raise ConfigError([f"not valid YAML: {exc}"], source) from exc
        if not isinstance(raw, dict):
            raise ConfigError([f"top level must be a mapping of sections, got {type(raw).__name__}"], source)
    overrides = list(overrides)
    raw = apply_overrides(raw, overrides)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        by_path = {tuple(_parse_override(item)[0]): item for item in overrides}
        lines, blamed = _format_errors(exc, by_path)
        # the file is named only when a problem may be in it, not when every bad value came from overrides
        in_file = any(", set by override " not in line for line in lines)
        raise ConfigError(lines, source if in_file else None, blamed) from None


def dump_config(config: Config) -> str:
    """The fully resolved config as YAML text (every default written out)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def save_config(config: Config, path: Path) -> Path:
    """Write the fully resolved config to ``path`` (YAML); loading it back gives an equal Config."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, dump_config(config))


def _field_rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = _section_type(field.annotation)
        if sub is not None:
            rows.extend(_field_rows(sub, f"{key}."))
            continue
        if field.is_required():  # a field of an optional section (train.forgetting.catalogue): no default
            rows.append(f"| `{key}` | required | {field.description or ''} |")
            continue
        default = field.get_default(call_default_factory=True)
        default_text = (
            yaml.safe_dump(_jsonable(default), default_flow_style=True, sort_keys=False)
            .strip()
            .removesuffix("...")
            .strip()
        )
        rows.append(f"| `{key}` | `{default_text}` | {field.description or ''} |")
    return rows


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Path):
        return str(value)
    return value


def config_markdown() -> str:
    """The config reference as Markdown, generated from the field descriptions (docs/config.md)."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- generated by `cliptune config docs`; do not edit by hand -->",
        "",
        "A run is configured by one YAML file with the sections below; any field can be overridden on the",
        "command line with `--set section.field=value` (repeatable; values are parsed as YAML). Unknown keys,",
        "wrong types and out-of-range values fail before any work starts, naming the field and the allowed",
        "values. `cliptune config show CONFIG.yaml` prints the resolved config and `cliptune config schema`",
        "the JSON schema.",
        "",
        "| field | default | description |",
        "| --- | --- | --- |",
        *_field_rows(Config, ""),
        "",
    ]
    return "\n".join(lines)
