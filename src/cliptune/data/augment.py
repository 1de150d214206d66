"""Augmentations that respect the labels: image views and caption views, each seeded and switchable.

Augmenting a fine-tuning catalogue is only safe when it leaves every attribute a caption or a suite relies
on intact: colour jitter turns a red dress into an orange one, a flip turns a left-facing shoe into a
right-facing one. So colour jitter and flips are refused where ``data.augment.protect`` or a suite names
such an attribute (``config.augment_protect_problems``), and caption synonyms never replace a word that
spells one of the row's attribute values.

Every view is a pure function of ``(seed, item, view)`` (and the epoch only chooses among views), drawn
from its own ``numpy`` generator: no global RNG is touched, so a resumed run sees exactly the views an
uninterrupted one saw, and a view cached once (``models/embed.augmented_tower_features``) is the view that
would be computed again. Pure PIL and numpy: torchvision cannot be imported here.

Example:
    >>> params = ImageAugmentConfig(flip=True, crop=0.2)
    >>> view = augment_image(Image.new("RGB", (40, 30), "red"), params, view_rng(0, "item", 1))
    >>> view.size
    (40, 30)
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from cliptune.config import AugmentConfig, ImageAugmentConfig, TextAugmentConfig, augment_protect_problems
from cliptune.data.images import DEFAULT_MAX_PIXELS, load_image, read_image_bytes
from cliptune.errors import CliptuneError

__all__ = [
    "SYNONYMS",
    "TEMPLATES",
    "AugmentError",
    "AugmentedLoader",
    "augment_caption",
    "augment_image",
    "caption_view",
    "check_suite_protection",
    "epoch_views",
    "image_view_id",
    "suite_attributes",
    "view_rng",
]

TEMPLATES = (
    "{}",
    "a photo of {}",
    "a picture of {}",
    "product photo: {}",
    "studio shot of {}",
    "{}, product photo",
)
"""Caption templates, in the spirit of the synthetic catalogue's prefixes ("a photo of ", "studio shot of ")."""

SYNONYMS: tuple[tuple[str, ...], ...] = (
    ("ripped", "distressed", "torn"),
    ("t-shirt", "tee"),
    ("sweater", "jumper", "pullover"),
    ("coat", "overcoat"),
    ("grey", "gray"),
    ("purple", "violet"),
    ("checked", "plaid", "checkered"),
    ("dotted", "polka-dot", "spotted"),
    ("plain", "solid"),
    ("oversized", "loose-fit"),
    ("slim-fit", "fitted"),
    ("intact", "undamaged", "pristine"),
)
"""Groups of interchangeable words: the synthetic fashion catalogue's own synonyms (its caption vocabulary)."""

_SYNONYM_OF: dict[str, tuple[str, ...]] = {w: g for g in SYNONYMS for w in g}
_WORD = re.compile(r"[A-Za-z][A-Za-z-]*")
_PREFIXES = tuple(t.removesuffix("{}") for t in TEMPLATES if t.endswith("{}") and t != "{}")
_SUFFIXES = tuple(t.removeprefix("{}") for t in TEMPLATES if t.startswith("{}") and t != "{}")


class AugmentError(CliptuneError):
    """Augmentation that cannot run as configured: a suite file missing or unreadable, or an augmentation
    that would change an attribute the suite tests. ``problems`` holds one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def view_rng(seed: int, item: str, view: int, epoch: int | None = None) -> np.random.Generator:
    """The generator of one view of one item: a pure function of its arguments (no global RNG).

    Args:
        seed: ``data.augment.seed`` (views) or ``train.seed`` (per-epoch choices).
        item: What the view is of: an image file's sha256, a caption.
        view: View number in ``[0, data.augment.views)``.
        epoch: Set where the draw changes every epoch (towers that train see a fresh view each epoch).

    Returns:
        A ``numpy`` PCG64 generator.
    """
    text = f"{seed}\0{item}\0{view}\0{'' if epoch is None else epoch}"
    return np.random.default_rng(int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:16], "big"))


def augment_image(image: Image.Image, params: ImageAugmentConfig, rng: np.random.Generator) -> Image.Image:
    """One augmented view of an RGB image, the same size as the input.

    Order: crop -> rotate -> flip -> blur -> colour jitter; an augmentation that is off draws nothing.

    Args:
        image: An RGB image (``load_image``'s output).
        params: ``data.augment.image``.
        rng: From :func:`view_rng`.

    Returns:
        A new RGB image of ``image.size``.
    """
    out = image.convert("RGB")
    w, h = out.size
    if params.crop:
        share = rng.uniform(1.0 - params.crop, 1.0, size=2)  # kept share of width, height
        cw, ch = max(1, round(w * share[0])), max(1, round(h * share[1]))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        out = out.crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.BICUBIC)
    if params.rotate:
        angle = float(rng.uniform(-params.rotate, params.rotate))
        out = out.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=_border_colour(out))
    if params.flip and rng.random() < 0.5:
        out = ImageOps.mirror(out)
    if params.blur:
        out = out.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.0, params.blur))))
    if params.colour_jitter:
        out = _colour_jitter(out, params.colour_jitter, rng)
    return out


def _border_colour(image: Image.Image) -> tuple[int, int, int]:
    """Mean colour of the outermost pixels: rotated corners get the background, not black."""
    a = np.asarray(image, dtype=np.float64)  # (H, W, 3)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])  # (2W + 2H, 3)
    r, g, b = (int(round(v)) for v in border.mean(axis=0))
    return r, g, b


def _colour_jitter(image: Image.Image, strength: float, rng: np.random.Generator) -> Image.Image:
    brightness, contrast, saturation = rng.uniform(1.0 - strength, 1.0 + strength, size=3)
    shift = float(rng.uniform(-strength / 2, strength / 2))  # in turns of the hue circle
    out = ImageEnhance.Brightness(image).enhance(float(brightness))
    out = ImageEnhance.Contrast(out).enhance(float(contrast))
    out = ImageEnhance.Color(out).enhance(float(saturation))
    hsv = np.asarray(out.convert("HSV")).copy()  # (H, W, 3) uint8, hue in 0..255
    hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + round(shift * 256)) % 256).astype(np.uint8)
    return Image.fromarray(hsv, mode="HSV").convert("RGB")


def image_view_id(params: ImageAugmentConfig, seed: int, view: int, min_side: int | None = None) -> str:
    """What makes view ``view`` of every image: part of its feature-cache key (``preprocess_id``).

    ``min_side`` is :class:`AugmentedLoader`'s decode bound (``data.fast_decode``): a fast-decoded view is
    another picture, so it gets another key; full decoding keeps the key views always had.
    """
    settings = json.dumps(params.model_dump(mode="json"), sort_keys=True)
    fast = "" if min_side is None else f":jpeg-min-side={min_side}"
    return f"augment-v1:{settings}:seed={seed}:view={view}{fast}"


@dataclass(frozen=True)
class AugmentedLoader:
    """``path -> view`` of an image file: the loader of one view, picklable for DataLoader workers.

    The view is seeded by the file's sha256 (what the feature cache keys an image by), so a cached view and
    a recomputed one are the same picture wherever the catalogue lies. ``min_side`` decodes JPEGs at a
    reduced DCT scale exactly as the plain loader does with ``data.fast_decode``
    (:func:`cliptune.data.images.load_image`), so augmented training sees the pictures eval sees; None
    decodes at full size.
    """

    params: ImageAugmentConfig
    seed: int
    view: int
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int | None = None

    def __call__(self, path: Path) -> Image.Image:
        image = load_image(path, max_pixels=self.max_pixels, min_side=self.min_side)
        item = hashlib.sha256(read_image_bytes(Path(path))).hexdigest()
        return augment_image(image, self.params, view_rng(self.seed, item, self.view))


def augment_caption(
    text: str, params: TextAugmentConfig, rng: np.random.Generator, keep: Iterable[str] = ()
) -> str:
    """One augmented view of a caption: synonyms, then a template.

    Args:
        text: The caption.
        params: ``data.augment.text``.
        rng: From :func:`view_rng`.
        keep: Words never replaced (lower case): the row's attribute values, so "grey" stays "grey".

    Returns:
        The augmented caption (``text`` itself when both are off).

    Example:
        >>> augment_caption("grey jumper", TextAugmentConfig(synonyms=True), view_rng(0, "x", 0), keep={"grey"})
        'grey pullover'
    """
    kept = {k.lower() for k in keep}
    out = text
    if params.templates:  # the caption's own template first comes off ("a photo of a photo of ...")
        for prefix in _PREFIXES:
            if out.lower().startswith(prefix):
                out = out[len(prefix) :]
        for suffix in _SUFFIXES:
            if out.lower().endswith(suffix):
                out = out[: -len(suffix)]
    if params.synonyms:

        def swap(match: re.Match[str]) -> str:
            word = match.group(0)
            group = _SYNONYM_OF.get(word.lower())
            if group is None or word.lower() in kept:
                return word
            others = [g for g in group if g != word.lower()]
            return others[int(rng.integers(0, len(others)))] if rng.random() < 0.5 else word

        out = _WORD.sub(swap, out)
    if params.templates:
        out = TEMPLATES[int(rng.integers(0, len(TEMPLATES)))].format(out)
    return out


def caption_view(text: str, params: TextAugmentConfig, seed: int, view: int, keep: Iterable[str] = ()) -> str:
    """View ``view`` of a caption (see :func:`augment_caption`), seeded by the caption and ``keep``."""
    kept = sorted({k.lower() for k in keep})
    return augment_caption(text, params, view_rng(seed, text + "\0" + "\0".join(kept), view), kept)


def keep_words(row: Mapping[str, Any], attributes: Iterable[str]) -> frozenset[str]:
    """The words of a row's attribute values (``colour: dark blue`` -> ``{"dark", "blue", "dark blue"}``)."""
    words: set[str] = set()
    for attribute in attributes:
        value = row.get(attribute)
        if value is None or (isinstance(value, float) and value != value):  # missing, NaN
            continue
        text = str(value).lower()
        words.add(text)
        words.update(_WORD.findall(text))
    return frozenset(words)


def epoch_views(seed: int, epoch: int, n: int, views: int) -> np.ndarray:
    """Which view each of ``n`` items shows in ``epoch``: a pure function of its arguments.

    Returns:
        (n,) int64 in ``[0, views)``.
    """
    return view_rng(seed, "epoch-views", n, epoch).integers(0, views, size=n)


def suite_attributes(path: Path) -> list[str]:
    """The attribute names a suite file's selectors test (the keys of its ``relevant``/``yellow``/``red``
    filters), read from the YAML alone: the data layer cannot use ``cliptune.suites``.

    Raises:
        AugmentError: The file is missing or not YAML.
    """
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AugmentError([f"data.augment.suite: {path}: file not found"]) from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise AugmentError([f"data.augment.suite: {path}: cannot read it as YAML ({e})"]) from None
    found: dict[str, None] = {}
    _selector_keys(raw, found, in_selector=False)
    return list(found)


def _selector_keys(node: Any, found: dict[str, None], *, in_selector: bool) -> None:
    if isinstance(node, Mapping):
        for key, value in node.items():
            if in_selector:
                found.setdefault(str(key), None)  # a filter: its keys are attributes
            else:
                _selector_keys(value, found, in_selector=key in ("relevant", "yellow", "red"))
    elif isinstance(node, list):
        for item in node:
            _selector_keys(item, found, in_selector=in_selector)


def check_suite_protection(augment: AugmentConfig) -> list[str]:
    """Refuse augmentations that would change an attribute ``data.augment.suite`` tests.

    Returns:
        The attributes the suite tests (empty without a suite).

    Raises:
        AugmentError: Colour jitter with a colour-like tested attribute, or a flip with an orientation-like
            one (each problem names the fields, the attribute and the suite file).
    """
    if augment.suite is None:
        return []
    tested = suite_attributes(augment.suite)
    problems = augment_protect_problems(augment, tested, f"the suite {augment.suite}")
    if problems:
        raise AugmentError(problems)
    return tested
