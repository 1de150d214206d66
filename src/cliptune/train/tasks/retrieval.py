"""The ``retrieval`` task: fine-tune a dual encoder on image-text pairs (seed 002).

With frozen towers (``trainable_layers: 0``, no LoRA) every image and caption is embedded once through
the feature cache and training runs the heads only, on cached features: an epoch takes seconds on a CPU.
Otherwise batches carry pixels and tokens and the unfrozen blocks train too. Validation embeds the val
split, ranks both directions and reports the loss, recall@k, precision@k and MRR for t2i and i2t. With
``train.hard_negatives`` each item also carries its mined negatives (``cliptune mine``): cached features,
or paths whose pixels the collate loads; the loss scores them as extra images of every caption in the
batch (docs/training.md, "Hard negatives"). With
``train.forgetting`` it also ranks every row of a general catalogue (``general/...``, the forgetting guard).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pandas as pd
import torch
from accelerate import Accelerator
from torch import Tensor, nn

from cliptune.config import AugmentConfig, Config
from cliptune.data.augment import (
    augment_caption,
    augment_image,
    check_suite_protection,
    epoch_views,
    keep_words,
    view_rng,
)
from cliptune.data.images import read_image_bytes
from cliptune.data.prepare import PreparedData
from cliptune.data.splits import group_ids
from cliptune.evaluation.catalogue import prepare_catalogue
from cliptune.evaluation.validation import general_validation, retrieval_validation
from cliptune.losses import InfoNCELoss, initial_siglip, initial_temperature, make_loss
from cliptune.models.backbone import Backbone
from cliptune.models.embed import (
    augmented_tower_features,
    image_loader,
    tower_features,
    warn_if_truncated,
)
from cliptune.train.batches import collate_dicts, shard_indices
from cliptune.train.grad_cache import REPLAY_KEY, replay_objective
from cliptune.train.mining import negatives_of_rows, read_mined
from cliptune.train.tasks.bundle import TaskBundle

__all__ = ["EpochViews", "RetrievalModel", "build_retrieval", "loss_init", "loss_kwargs"]


class RetrievalModel(nn.Module):
    """Backbone + pair loss; ``forward(batch)`` returns the loss's named terms.

    A batch holds either cached tower features (``image_features``, ``text_features``) or raw inputs
    (``pixel_values``, ``input_ids``, ``attention_mask``); the heads run in both cases.
    """

    def __init__(self, backbone: Backbone, loss: nn.Module) -> None:
        super().__init__()
        self.backbone, self.loss = backbone, loss

    def embed(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(image, text) embeddings of a batch, each (B, D), not normalised."""
        if "image_features" in batch:
            return self.backbone.image_head(batch["image_features"]), self.backbone.text_head(
                batch["text_features"]
            )
        image = self.backbone.encode_image(batch["pixel_values"])
        text = self.backbone.encode_text(batch["input_ids"], batch.get("attention_mask"))
        return image, text

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if REPLAY_KEY in batch:  # pass 2 of gradient caching (train/grad_cache.py): one chunk's objective
            return {"loss": replay_objective(self, batch)}
        image, text = self.embed(batch)
        extra = self.hard_negatives(batch) if "negative_mask" in batch else ()
        terms: dict[str, Tensor] = self.loss(image, text, *extra)  # every loss returns its named terms
        return terms

    def hard_negatives(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Mined negatives of the batch as extra images (B*K, D), and which caption may use which (B, B*K).

        Every caption may use every item's mined negatives except padding and images of its own group (one
        caption's negative can be another caption's positive in the same batch).
        """
        if "negative_features" in batch:  # cached tower features (B, K, F): the head only
            extra = self.backbone.image_head(batch["negative_features"].flatten(0, 1))  # (B*K, D)
        else:  # pixels of the B*K images: through the trainable tower too
            extra = self.backbone.encode_image(batch["negative_pixels"])  # (B*K, D)
        groups = batch["negative_groups"].flatten()[None, :]  # (1, B*K)
        usable = batch["negative_mask"].flatten()[None, :] & (groups != batch["group"][:, None])  # (B, B*K)
        return extra, usable


def loss_init(cfg: Config, similarity_init: Mapping[str, float]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Constructor arguments of the configured loss, and what its similarity starts from, for ``info``.

    An unset ``loss.temperature`` (``loss.siglip_scale`` / ``loss.siglip_bias``) starts from the backbone's
    pretrained similarity when it has one of the loss's form, else from the default (0.07; 10 / -10); see
    :mod:`cliptune.losses.similarity_init`.

    Args:
        cfg: The whole config (its ``loss`` section).
        similarity_init: ``Backbone.similarity_init`` of the backbone being fine-tuned.

    Returns:
        ``(kwargs, start)``: ``make_loss(cfg.loss.name, **kwargs)`` builds the loss; ``start`` holds the
        starting values and their sources (``config``, ``pretrained``, ``default``), empty for the margin losses.

    Example:
        >>> from cliptune.config import load_config
        >>> start = loss_init(load_config(None), {"logit_scale": math.log(50.0)})[1]
        >>> round(start["temperature"], 12), start["source"]
        (0.02, 'pretrained')
    """
    name, c = cfg.loss.name, cfg.loss
    if name == "info_nce":
        max_scale = InfoNCELoss.DEFAULT_MAX_LOGIT_SCALE if c.learn_temperature else None
        temperature, source = initial_temperature(c.temperature, similarity_init, max_scale)
        kwargs = {"temperature": temperature, "learn_temperature": c.learn_temperature}
        return kwargs, {"temperature": temperature, "source": source}
    if name == "siglip":
        scale, bias, sources = initial_siglip(c.siglip_scale, c.siglip_bias, similarity_init)
        return {"init_logit_scale": math.log(scale), "init_logit_bias": bias}, {
            "scale": scale,
            "bias": bias,
            "source": sources,
        }
    if name == "triplet":
        return {"margin": c.margin, "distance": c.distance}, {}
    if name == "contrastive":
        return {"margin": c.margin}, {}
    return {}, {}


def loss_kwargs(cfg: Config, similarity_init: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Constructor arguments of the configured loss (see :func:`loss_init`; no backbone: the defaults)."""
    return loss_init(cfg, similarity_init or {})[0]


def cached_features(
    backbone: Backbone, data: PreparedData, cfg: Config, device: torch.device, progress: bool
) -> tuple[Tensor, Tensor]:
    """Tower features of every catalogue row (image, caption) through the feature cache."""
    return tower_features(
        backbone,
        [data.catalogue.image_path(f) for f in data.rows["file_name"]],
        data.rows[cfg.data.text_column].astype(str).tolist(),
        cache_dir=cfg.model.cache_dir,
        precision=cfg.model.embed_precision,
        max_pixels=cfg.data.max_pixels,
        num_workers=cfg.data.num_workers,
        device=device,
        progress=progress,
    )


class EpochViews:
    """Cached augmented views of the training rows; each epoch shows one image and one caption view per row.

    The pick is :func:`cliptune.data.augment.epoch_views` of ``(train.seed, epoch)``, so a resumed run
    trains on exactly the views an uninterrupted one did (``train.batches.EpochData``).

    Args:
        images: (Vi, N, Fi) image-tower features of the views.
        texts: (Vt, N, Ft) text-tower features of the views.
        seed: ``train.seed``.
        extras: Per row, what else its item holds (mined negatives), kept as it is in every epoch.
    """

    def __init__(
        self, images: Tensor, texts: Tensor, seed: int, extras: Sequence[dict[str, Any]] | None = None
    ) -> None:
        self.images, self.texts, self.seed = images, texts, seed
        self.extras = extras if extras is not None else [{} for _ in range(int(images.shape[1]))]

    def __len__(self) -> int:
        return int(self.images.shape[1])

    def for_epoch(self, epoch: int) -> list[dict[str, Any]]:
        """Epoch ``epoch``'s items: row i with its image view and caption view of that epoch."""
        n = len(self)
        image_view = epoch_views(self.seed, epoch, n, int(self.images.shape[0]))
        # seed + 1: a row's caption view is drawn apart from its image view, not tied to the same number
        text_view = epoch_views(self.seed + 1, epoch, n, int(self.texts.shape[0]))
        return [
            {
                **self.extras[i],
                "image_features": self.images[image_view[i], i],
                "text_features": self.texts[text_view[i], i],
            }
            for i in range(n)
        ]


class _FreshViews:
    """Training rows as paths and captions, each epoch a fresh augmentation (towers that train)."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def for_epoch(self, epoch: int) -> list[dict[str, Any]]:
        return [{**item, "epoch": epoch} for item in self.items]


def _keep(data: PreparedData, rows: Sequence[int]) -> list[frozenset[str]]:
    """Per training row, the words caption synonyms keep: its attribute values."""
    attributes = [a for a in data.catalogue.attributes if a in data.rows.columns]
    records = data.rows.iloc[list(rows)][attributes].to_dict("records")
    return [keep_words(r, attributes) for r in records]


def _augmented_train_items(
    backbone: Backbone,
    data: PreparedData,
    cfg: Config,
    train_idx: list[int],
    device: torch.device,
    progress: bool,
    *,
    extras: Sequence[dict[str, Any]],
) -> EpochViews:
    """``data.augment.views`` cached views of the training rows (frozen towers); ``extras`` ride along."""
    images, texts = augmented_tower_features(
        backbone,
        [data.catalogue.image_path(data.rows["file_name"].iloc[i]) for i in train_idx],
        [str(data.rows[cfg.data.text_column].iloc[i]) for i in train_idx],
        _keep(data, train_idx),
        cfg.data.augment,
        cache_dir=cfg.model.cache_dir,
        precision=cfg.model.embed_precision,
        max_pixels=cfg.data.max_pixels,
        num_workers=cfg.data.num_workers,
        device=device,
        progress=progress,
    )
    return EpochViews(images, texts, cfg.train.seed, extras)


def _augment_raw(
    item: dict[str, Any], augment: AugmentConfig, load: Callable[[Path], Any]
) -> tuple[Any, str]:
    """An item's image and caption as this epoch shows them (fresh views seeded by item and epoch)."""
    path, text, epoch = Path(item["path"]), str(item["text"]), item.get("epoch")
    image = load(path)
    if epoch is None:  # validation: the plain picture and caption
        return image, text
    if augment.image.enabled:
        sha = hashlib.sha256(read_image_bytes(path)).hexdigest()
        image = augment_image(image, augment.image, view_rng(augment.seed, sha, 0, epoch))
    if augment.text.enabled:
        keep = item["keep"]
        text = augment_caption(text, augment.text, view_rng(augment.seed, text, 0, epoch), keep)
    return image, text


def _raw_collate(
    backbone: Backbone, max_pixels: int, augment: AugmentConfig
) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    # the embedding's loader: data.fast_decode (backbone.fast_decode) decodes training images as eval does
    load, _ = image_loader(backbone.preprocess, max_pixels, fast_decode=backbone.fast_decode)

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        images, texts = zip(*(_augment_raw(item, augment, load) for item in items), strict=True)
        tokens = backbone.tokenize(list(texts))
        batch = {"pixel_values": backbone.preprocess(list(images)), **tokens}
        if "negative_paths" in items[0]:  # mined negatives, item by item: (B*K, C, H, W) + their masks
            paths = [Path(p) for item in items for p in item["negative_paths"]]
            batch["negative_pixels"] = backbone.preprocess([load(p) for p in paths])
            batch.update(collate_dicts([{k: item[k] for k in _NEGATIVE_KEYS} for item in items]))
        return batch

    return collate


def build_retrieval(
    cfg: Config, data: PreparedData, backbone: Backbone, accelerator: Accelerator, *, progress: bool = True
) -> TaskBundle:
    """Assemble model, training items, validation and saving for the retrieval task.

    Args:
        cfg: The whole config.
        data: Checked, split catalogue rows (needs ``train`` and ``val`` splits).
        backbone: From ``load_backbone`` with the configured trainable layers / LoRA.
        accelerator: Used for the device and to shard and gather validation embeddings.
        progress: Progress bars while features are cached.

    Returns:
        The :class:`TaskBundle` the loop trains.
    """
    kwargs, start = loss_init(cfg, backbone.similarity_init)
    model = RetrievalModel(backbone, make_loss(cfg.loss.name, **kwargs))
    split = data.rows["split"].to_numpy()
    gids = group_ids(data.rows, cfg.data.group_column).to_numpy()
    info: dict[str, Any] = {"split_rows": {s: int((split == s).sum()) for s in sorted(data.splits)}}
    if start:  # summary.json's info: which temperature / scale and bias step 0 used, and why
        info["loss_init"] = start
    train_idx = [i for i in range(len(split)) if split[i] == "train"]
    val_idx = [i for i in range(len(split)) if split[i] == "val"]
    collate = None
    augment = cfg.data.augment
    if augment.enabled:  # refused before any embedding when the suite tests what augmentation changes
        tested = check_suite_protection(augment)
        info["augment"] = {
            "views": augment.views if backbone.features_frozen else "fresh each epoch",
            "protected": sorted({*augment.protect, *tested}),
        }
    train_items: list[dict[str, Any]] | EpochViews | _FreshViews  # features, their views, or paths
    if backbone.features_frozen:
        show = progress and accelerator.is_main_process
        images, texts = cached_features(backbone, data, cfg, accelerator.device, show)
        train_items = [{"image_features": images[i], "text_features": texts[i]} for i in train_idx]
        if cfg.train.hard_negatives is not None:
            info["hard_negatives"] = _add_hard_negatives(
                train_items, train_idx, gids, data, cfg, ("negative_features", lambda rows: images[rows])
            )
        if augment.enabled:  # validation keeps the plain features; training picks a cached view per epoch
            train_items = _augmented_train_items(
                backbone, data, cfg, train_idx, accelerator.device, show, extras=train_items
            )
        val_inputs = {"image_features": images[val_idx], "text_features": texts[val_idx]}
        info["feature_dims"] = [int(images.shape[1]), int(texts.shape[1])]
    else:
        text_col = cfg.data.text_column
        if accelerator.is_main_process:  # collate cuts long captions batch by batch: say so once, up front
            warn_if_truncated(backbone, data.rows[text_col].astype(str).tolist())
        paths = [str(data.catalogue.image_path(f)) for f in data.rows["file_name"]]
        train_items = [{"path": paths[i], "text": str(data.rows[text_col].iloc[i])} for i in train_idx]
        if cfg.train.hard_negatives is not None:
            info["hard_negatives"] = _add_hard_negatives(
                train_items,
                train_idx,
                gids,
                data,
                cfg,
                ("negative_paths", lambda rows: [paths[r] for r in rows]),
            )
        if augment.enabled:
            keeps = _keep(data, train_idx)
            train_items = _FreshViews(
                [{**item, "keep": k} for item, k in zip(train_items, keeps, strict=True)]
            )
        collate = _raw_collate(backbone, cfg.data.max_pixels, augment)
        val_items = [{"path": paths[i], "text": str(data.rows[text_col].iloc[i])} for i in val_idx]
        val_inputs = collate(val_items) if val_items else {}
    val_groups = [str(gids[i]) for i in val_idx]
    val_files = [str(data.rows["file_name"].iloc[i]) for i in val_idx]

    general = _general_set(cfg, backbone, accelerator, progress) if cfg.train.forgetting else None

    def evaluate(m: nn.Module) -> dict[str, float]:
        inner = accelerator.unwrap_model(m)
        out: dict[str, float] = {}
        if val_idx:  # no val split (data.split.ratios without val): no val/... values to log
            image, text = _embed_sharded(inner, val_inputs, cfg.train.batch_size, accelerator)
            out = retrieval_validation(
                image,
                text,
                groups=val_groups,
                files=val_files,
                ks=cfg.eval.k,
                relevant=cfg.eval.relevant,
                loss_fn=inner.loss,
                batch_size=cfg.train.batch_size * accelerator.num_processes,
            )
        if general is not None and cfg.train.forgetting is not None:  # the forgetting guard: general/...
            image, text = _embed_sharded(inner, general.inputs, cfg.train.batch_size, accelerator)
            out |= general_validation(
                image,
                text,
                groups=general.groups,
                files=general.files,
                ks=cfg.eval.k,
                relevant=cfg.train.forgetting.relevant,
            )
        return out

    def save_model(m: nn.Module, directory: Path) -> None:
        inner = cast(RetrievalModel, m)  # the loop passes back the unwrapped model of this bundle
        inner.backbone.save(directory)
        torch.save(
            {k: v.detach().cpu() for k, v in inner.loss.state_dict().items()}, directory / "loss_state.pt"
        )

    return TaskBundle(
        model=model,
        train_data=train_items,
        evaluate=evaluate,
        save_model=save_model,
        collate=collate,
        info=info,
    )


_NEGATIVE_KEYS = ("negative_mask", "negative_groups", "group")


def _add_hard_negatives(
    items: list[dict[str, Any]],
    train_idx: list[int],
    gids: Any,
    data: PreparedData,
    cfg: Config,
    images: tuple[str, Callable[[list[int]], Any]],
) -> dict[str, Any]:
    """Give each training item its mined negatives, padded to K with a mask; say how many.

    ``images`` names the item key and turns row positions into what the batch needs there: cached
    features (frozen towers) or image paths (the collate loads them for the trainable towers).
    """
    hard = cfg.train.hard_negatives
    assert hard is not None and hard.file is not None  # the caller checked; the config requires a file
    k = hard.per_caption
    mined = read_mined(hard.file)
    negatives = negatives_of_rows(mined, data.rows, train_idx, cfg.data.text_column, hard.file, k)
    groups = torch.as_tensor(pd.factorize(pd.Series(gids, dtype=str))[0], dtype=torch.long)
    for item, own, rows in zip(items, train_idx, negatives, strict=True):
        padded = rows + [own] * (k - len(rows))  # padding: masked out, any image of the right shape
        item[images[0]] = images[1](padded)  # (K, F) features or K paths
        item["negative_mask"] = torch.arange(k) < len(rows)  # (K,)
        item["negative_groups"] = groups[padded]  # (K,)
        item["group"] = groups[own]
    return {
        "file": str(hard.file),
        "per_caption": k,
        "captions_with_negatives": sum(1 for rows in negatives if rows),
        "negatives": sum(len(rows) for rows in negatives),
    }


@dataclass(frozen=True)
class _GeneralSet:
    """The forgetting guard's catalogue, ready to embed like the val split: inputs, group and file per row."""

    inputs: dict[str, Tensor]
    groups: list[str]
    files: list[str]


def _general_set(cfg: Config, backbone: Backbone, accelerator: Accelerator, progress: bool) -> _GeneralSet:
    """Every row of ``train.forgetting.catalogue``: cached tower features (frozen towers) or pixels and tokens."""
    forgetting = cfg.train.forgetting
    assert forgetting is not None  # only called when the guard is configured
    data = prepare_catalogue(
        forgetting.catalogue,
        group_column=forgetting.group_column,
        text_column=forgetting.text_column,
        max_pixels=cfg.data.max_pixels,
    )
    files = data.rows["file_name"].astype(str).tolist()
    texts = data.rows[forgetting.text_column].astype(str).tolist()
    paths = [data.catalogue.image_path(f) for f in files]
    inputs: dict[str, Tensor]
    if backbone.features_frozen:
        images, captions = tower_features(
            backbone,
            paths,
            texts,
            cache_dir=cfg.model.cache_dir,
            precision=cfg.model.embed_precision,
            max_pixels=cfg.data.max_pixels,
            num_workers=cfg.data.num_workers,
            device=accelerator.device,
            progress=progress and accelerator.is_main_process,
        )
        inputs = {"image_features": images, "text_features": captions}
    else:
        items = [{"path": str(p), "text": t} for p, t in zip(paths, texts, strict=True)]
        # no "epoch" in these items: the collate shows the plain pictures and captions, as for validation
        inputs = _raw_collate(backbone, cfg.data.max_pixels, cfg.data.augment)(items)
    groups = group_ids(data.rows, forgetting.group_column).astype(str).tolist()
    return _GeneralSet(inputs=inputs, groups=groups, files=files)


def _embed_sharded(
    model: RetrievalModel, inputs: dict[str, Tensor], batch_size: int, accelerator: Accelerator
) -> tuple[Tensor, Tensor]:
    """Embed the validation inputs, each process a shard, gathered in order on every process."""
    n = len(next(iter(inputs.values())))
    mine = shard_indices(n, accelerator.process_index, accelerator.num_processes)
    images, texts = [], []
    for start in range(0, len(mine), batch_size):
        idx = mine[start : start + batch_size]
        batch = {k: v[idx].to(accelerator.device) for k, v in inputs.items()}
        image, text = model.embed(batch)
        images.append(image.float())
        texts.append(text.float())
    image, text = torch.cat(images), torch.cat(texts)
    if accelerator.num_processes > 1:
        image, text = accelerator.gather(image), accelerator.gather(text)
    return image[:n].cpu(), text[:n].cpu()
