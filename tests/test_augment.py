"""Augmentation that respects the labels: each image augmentation on a hand-made picture, the rules that
protect colour and orientation, caption views that keep attribute words, seeded views, the feature cache
of views, and a tiny augmented training run whose resume equals the uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from cliptune.cli.app import app
from cliptune.config import (
    AugmentConfig,
    ConfigError,
    ImageAugmentConfig,
    TextAugmentConfig,
    load_config,
)
from cliptune.data.augment import (
    AugmentedLoader,
    AugmentError,
    augment_image,
    caption_view,
    check_suite_protection,
    epoch_views,
    keep_words,
    suite_attributes,
    view_rng,
)
from cliptune.data.synthetic import render_fashion
from cliptune.models.cache import FeatureCache
from cliptune.models.embed import augmented_tower_features
from cliptune.models.factory import load_backbone
from cliptune.train.tasks.retrieval import EpochViews
from tests.tiny_models import make_tiny_clip

runner = CliRunner()
_VIEWS = range(24)


@pytest.fixture(scope="module")
def fashion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render_fashion(tmp_path_factory.mktemp("cat") / "fashion", n=40, seed=0)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int64)  # (H, W, 3)


def _hand_made() -> Image.Image:
    """An asymmetric 12 x 8 picture: every pixel differs from its mirror image."""
    a = np.zeros((8, 12, 3), dtype=np.uint8)
    a[..., 0] = np.arange(12)[None, :] * 20  # red ramps left to right
    a[..., 1] = np.arange(8)[:, None] * 30
    a[2:4, 1:3] = (250, 250, 0)
    return Image.fromarray(a)


def test_flip_mirrors_pixels_exactly_or_leaves_them() -> None:
    image = _hand_made()
    original, mirrored = _pixels(image), _pixels(image)[:, ::-1]
    outcomes = []
    for v in _VIEWS:
        out = _pixels(augment_image(image, ImageAugmentConfig(flip=True), view_rng(0, "item", v)))
        assert np.array_equal(out, original) or np.array_equal(out, mirrored)
        outcomes.append(np.array_equal(out, mirrored))
    assert 0 < sum(outcomes) < len(outcomes)  # probability 1/2: both happen over 24 views


def test_crop_keeps_the_size_and_a_share_of_the_content() -> None:
    # a 256-wide horizontal ramp 0..255: a crop keeping share s of the width spans about s * 255 values
    ramp = np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (64, 1, 3))
    image = Image.fromarray(ramp)
    spans = []
    for v in _VIEWS:
        out = augment_image(image, ImageAugmentConfig(crop=0.4), view_rng(0, "ramp", v))
        assert out.size == image.size
        row = _pixels(out)[32, :, 0]
        spans.append(int(row.max() - row.min()))
    # kept share in [0.6, 1]: span in [0.6 * 255 - 3, 255] (3 for bicubic resampling at the ends)
    assert all(0.6 * 255 - 3 <= s <= 255 for s in spans), spans
    assert min(spans) < 240  # something was cut away


def _dot_angle(image: Image.Image) -> float:
    a = _pixels(image)[..., 0].astype(float)
    ys, xs = np.nonzero(a > 128)
    # the dot's centroid relative to the centre (50, 50), y pointing up
    return math.degrees(math.atan2(-(ys.mean() - 50), xs.mean() - 50))


def test_rotation_is_small_and_about_the_centre() -> None:
    a = np.zeros((101, 101, 3), dtype=np.uint8)
    a[49:52, 84:87] = 255  # a white dot on the horizontal through the centre: angle 0
    image = Image.fromarray(a)
    angles = [
        _dot_angle(augment_image(image, ImageAugmentConfig(rotate=10), view_rng(0, "dot", v))) for v in _VIEWS
    ]
    assert all(abs(angle) <= 10.5 for angle in angles), angles  # within the configured 10 degrees
    assert max(abs(angle) for angle in angles) > 3  # and it does rotate


def _high_frequency_energy(image: Image.Image) -> float:
    a = _pixels(image).astype(float)
    return float((np.diff(a, axis=0) ** 2).sum() + (np.diff(a, axis=1) ** 2).sum())


def test_blur_reduces_high_frequency_energy() -> None:
    checker = ((np.indices((32, 32)).sum(axis=0) % 2) * 255).astype(np.uint8)
    image = Image.fromarray(np.stack([checker] * 3, axis=-1))
    before = _high_frequency_energy(image)
    after = [
        _high_frequency_energy(augment_image(image, ImageAugmentConfig(blur=2), view_rng(0, "c", v)))
        for v in _VIEWS
    ]
    assert all(e <= before for e in after)
    assert sorted(after)[len(after) // 2] < 0.5 * before  # the median view loses over half of it


def _hue_histogram(image: Image.Image) -> np.ndarray:
    return np.bincount(np.asarray(image.convert("HSV"))[..., 0].ravel(), minlength=256)


def test_colour_jitter_changes_hue_and_protection_leaves_colours_untouched() -> None:
    red = Image.new("RGB", (40, 30), (200, 30, 35))  # the fashion catalogue's red
    jittered = [
        augment_image(red, ImageAugmentConfig(colour_jitter=0.3), view_rng(0, "r", v)) for v in _VIEWS
    ]
    assert any(not np.array_equal(_hue_histogram(j), _hue_histogram(red)) for j in jittered)

    # protecting colour refuses the jitter, naming the fields ...
    with pytest.raises(ConfigError) as refused:
        load_config(None, ["data.augment.protect=[colour]", "data.augment.image.colour_jitter=0.2"])
    assert "data.augment.image.colour_jitter=0.2 would change the colour-like attribute(s) colour" in str(
        refused.value
    )
    # ... and everything else that is on leaves every pixel's colour as it was
    cfg = load_config(
        None,
        [
            "data.augment.protect=[main_color]",
            "data.augment.image={crop: 0.3, flip: true, blur: 2, rotate: 15}",
        ],
    )
    for v in _VIEWS:
        out = augment_image(red, cfg.data.augment.image, view_rng(0, "r", v))
        assert np.array_equal(_hue_histogram(out), _hue_histogram(red))
        assert (_pixels(out) == (200, 30, 35)).all()


def test_flip_is_refused_where_orientation_is_protected() -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(None, ["data.augment.protect=[facing]", "data.augment.image.flip=true"])
    assert "data.augment.image.flip=true would mirror the orientation-like attribute(s) facing" in str(
        refused.value
    )
    # a side-less attribute name protects nothing from flips
    assert load_config(None, ["data.augment.protect=[garment]", "data.augment.image.flip=true"])


def test_augmentation_is_for_the_retrieval_task_only() -> None:
    with pytest.raises(ConfigError, match=r"data.augment applies to train.task='retrieval' only"):
        load_config(None, ["train.task=siamese", "loss.name=triplet", "data.augment.text.templates=true"])


def test_a_suite_that_tests_colour_refuses_colour_jitter(tmp_path: Path) -> None:
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        yaml.safe_dump(
            {
                "categories": {
                    "colours": {
                        "queries": [
                            {"text": "red dress", "relevant": {"colour": "red", "garment": "dress"}},
                            {"text": "x", "relevant": ["a.png"], "red": [{"rips": True}, "b.png"]},
                        ]
                    }
                }
            }
        )
    )
    assert suite_attributes(suite) == ["colour", "garment", "rips"]
    augment = AugmentConfig(suite=suite, image=ImageAugmentConfig(colour_jitter=0.1, flip=True))
    with pytest.raises(AugmentError) as refused:
        check_suite_protection(augment)
    assert refused.value.problems == [
        "data.augment.image.colour_jitter=0.1 would change the colour-like attribute(s) colour protected by "
        f"the suite {suite}; set data.augment.image.colour_jitter to 0"
    ]
    assert check_suite_protection(AugmentConfig(suite=suite, image=ImageAugmentConfig(flip=True))) == [
        "colour",
        "garment",
        "rips",
    ]
    with pytest.raises(AugmentError, match="file not found"):
        check_suite_protection(AugmentConfig(suite=tmp_path / "none.yaml"))


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z][a-z-]*", text.lower())


def test_caption_views_keep_every_colour_and_garment_word(fashion: Path) -> None:
    rows = pd.read_csv(fashion / "metadata.csv")
    params = TextAugmentConfig(templates=True, synonyms=True)
    attributes = ["garment", "colour", "pattern", "rips", "style"]
    changed = 0
    for row in rows.to_dict("records"):
        keep = keep_words(row, attributes)
        caption = str(row["text"])
        attribute_words = [w for w in _words(caption) if w in {str(row["colour"]), str(row["garment"])}]
        for v in range(8):
            view = caption_view(caption, params, 0, v, keep)
            for word in attribute_words:  # each colour / garment word of the caption is still there
                assert _words(view).count(word) >= _words(caption).count(word), (caption, view)
            changed += view != caption
    assert changed > len(rows) * 4  # most views differ from the caption


def test_the_same_seed_gives_the_same_views(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    _hand_made().resize((48, 32)).save(path)
    params = ImageAugmentConfig(crop=0.3, flip=True, blur=1, rotate=8, colour_jitter=0.2)
    first = [_pixels(AugmentedLoader(params, seed=3, view=v)(path)) for v in range(4)]
    again = [_pixels(AugmentedLoader(params, seed=3, view=v)(path)) for v in range(4)]
    other = _pixels(AugmentedLoader(params, seed=4, view=0)(path))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], first[1]) and not np.array_equal(first[0], other)
    text = TextAugmentConfig(templates=True, synonyms=True)
    assert [caption_view("grey jumper", text, 1, v) for v in range(5)] == [
        caption_view("grey jumper", text, 1, v) for v in range(5)
    ]
    assert np.array_equal(epoch_views(7, 2, 50, 4), epoch_views(7, 2, 50, 4))
    assert not np.array_equal(epoch_views(7, 2, 50, 4), epoch_views(7, 3, 50, 4))


@pytest.mark.filterwarnings(
    "ignore::cliptune.models.embed.TextsTruncatedWarning"
)  # tiny tokenizer: 16 tokens
def test_views_are_computed_once_and_read_from_the_cache(tmp_path: Path, fashion: Path, clip: Path) -> None:
    backbone = load_backbone(clip)
    rows = pd.read_csv(fashion / "metadata.csv").head(6)
    paths = [fashion / f for f in rows["file_name"]]
    texts = rows["text"].tolist()
    keep = [keep_words(r, ["colour", "garment"]) for r in rows.to_dict("records")]
    augment = AugmentConfig(
        views=3, image=ImageAugmentConfig(crop=0.3, flip=True), text=TextAugmentConfig(templates=True)
    )
    calls = {"image": 0, "text": 0}
    image_forward, text_forward = backbone.image_features, backbone.text_features

    def count_image(*args: object, **kwargs: object) -> torch.Tensor:
        calls["image"] += 1
        return image_forward(*args, **kwargs)

    def count_text(*args: object, **kwargs: object) -> torch.Tensor:
        calls["text"] += 1
        return text_forward(*args, **kwargs)

    backbone.image_features, backbone.text_features = count_image, count_text  # count the tower forwards

    def views_of() -> tuple[torch.Tensor, torch.Tensor]:
        return augmented_tower_features(
            backbone,
            paths,
            texts,
            keep,
            augment,
            cache_dir=tmp_path / "cache",
            precision="fp32",
            progress=False,
        )

    images, texts_v = views_of()
    assert images.shape[:2] == (3, 6) and texts_v.shape[:2] == (3, 6)
    assert calls == {"image": 3, "text": 3}  # one batch per view and modality
    assert not torch.equal(images[0], images[1])  # the views differ
    cache = FeatureCache(tmp_path / "cache", backbone.identity())
    assert len(cache) == 3 * 6 + len(
        {caption_view(t, augment.text, 0, v, k) for v in range(3) for t, k in zip(texts, keep, strict=True)}
    )

    again_images, again_texts = views_of()
    assert calls == {"image": 3, "text": 3}  # nothing computed the second time
    assert torch.equal(again_images, images) and torch.equal(again_texts, texts_v)

    # each epoch shows one cached view per row, the same pick every time it is asked for
    views = EpochViews(images, texts_v, seed=0)
    for epoch in range(3):
        pick = epoch_views(0, epoch, 6, 3)
        items = views.for_epoch(epoch)
        assert all(torch.equal(items[i]["image_features"], images[pick[i], i]) for i in range(6))
        assert [
            torch.equal(a["image_features"], b["image_features"])
            for a, b in zip(items, views.for_epoch(epoch), strict=True)
        ] == [True] * 6


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.filterwarnings("ignore::cliptune.models.embed.TextsTruncatedWarning")
@pytest.mark.parametrize(
    ("trainable_layers", "grad_cache"),
    [(0, None), (1, None), (1, {"chunk_size": 4})],
    ids=["cached-views", "fresh-views", "fresh-views-grad-cache"],
)
def test_an_augmented_run_trains_and_resumes_to_the_uninterrupted_run(
    tmp_path: Path, fashion: Path, clip: Path, trainable_layers: int, grad_cache: dict[str, int] | None
) -> None:
    # frozen towers train on cached views (2 per item); a trained last layer sees a fresh view each epoch,
    # also when gradient caching splits each batch into chunks
    augment = {
        "views": 2,
        "image": {"crop": 0.2, "flip": True, "blur": 1.0},
        "text": {"templates": True, "synonyms": True},
        "protect": ["colour"],
    }
    cfg = {
        "data": {
            "catalogue": str(fashion),
            "split": {"ratios": {"train": 0.7, "val": 0.3}, "min_groups": 2},
            "augment": augment,
        },
        "model": {
            "backbone": str(clip),
            "cache_dir": str(tmp_path / "cache"),
            "trainable_layers": trainable_layers,
        },
        "train": {
            "epochs": 2,
            "batch_size": 8,
            "lr": 5e-3,
            "early_stopping": None,
            "log_every_steps": 1,
            "grad_cache": grad_cache,
        },
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    runs = ["--runs", str(tmp_path / "runs"), "-q"]
    first = runner.invoke(app, ["train", str(path), "--name", "x", *runs])
    assert first.exit_code == 0, first.output
    straight = runner.invoke(
        app, ["train", str(path), "--name", "straight", "--set", "train.epochs=3", *runs]
    )
    assert straight.exit_code == 0, straight.output
    resume = ["train", "--resume", str(tmp_path / "runs" / "x"), "--set", "train.epochs=3", *runs]
    resumed = runner.invoke(app, resume)
    assert resumed.exit_code == 0, resumed.output
    x, full = tmp_path / "runs" / "x", tmp_path / "runs" / "straight"
    assert [r for r in _records(x) if r["kind"] != "resume"] == _records(full)
    model = "model.safetensors"
    assert (x / "model" / model).read_bytes() == (full / "model" / model).read_bytes()
    summary = json.loads((full / "summary.json").read_text())
    views = 2 if trainable_layers == 0 else "fresh each epoch"
    assert summary["info"]["augment"] == {"views": views, "protected": ["colour"]}
    epochs = [r for r in _records(full) if r["kind"] == "epoch"]
    assert all(math.isfinite(e["train/loss"]) for e in epochs[1:])
    assert epochs[-1]["train/loss"] < epochs[1]["train/loss"]  # it learns on the augmented views

    # the views reach the batches: the same run without augmentation trains on other numbers
    plain = ["--set", "train.epochs=3", "--set", "data.augment={}"]
    assert runner.invoke(app, ["train", str(path), "--name", "plain", *plain, *runs]).exit_code == 0
    plain_epochs = [r for r in _records(tmp_path / "runs" / "plain") if r["kind"] == "epoch"]
    assert plain_epochs[0] == epochs[0]  # the same untrained model, validated on plain features
    assert [e["train/loss"] for e in plain_epochs[1:]] != [e["train/loss"] for e in epochs[1:]]


def test_training_refuses_colour_jitter_when_the_suite_tests_colour(
    tmp_path: Path, fashion: Path, clip: Path
) -> None:
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        yaml.safe_dump({"categories": {"c": {"queries": [{"text": "red", "relevant": {"colour": "red"}}]}}})
    )
    cfg = {
        "data": {
            "catalogue": str(fashion),
            "split": {"ratios": {"train": 0.7, "val": 0.3}, "min_groups": 2},
            "augment": {"image": {"colour_jitter": 0.2}, "suite": str(suite)},
        },
        "model": {"backbone": str(clip), "cache_dir": str(tmp_path / "cache")},
        "train": {"epochs": 1, "batch_size": 8},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = runner.invoke(app, ["train", str(path), "--name", "x", "--runs", str(tmp_path / "runs"), "-q"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "would change the colour-like attribute(s) colour protected by the suite" in " ".join(
        result.output.split()
    )
    assert not (tmp_path / "cache").exists() or not any(
        (tmp_path / "cache").rglob("*.safetensors")
    )  # nothing embedded


def test_what_else_an_item_holds_rides_along_with_every_view() -> None:
    # mined negatives (train.hard_negatives) stay with their row whichever view the epoch shows
    images = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)  # (views, rows, features)
    texts = -torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(2, 3, 5)
    extras = [
        {"negative_mask": torch.tensor([True, i > 0]), "image_features": torch.zeros(4)} for i in range(3)
    ]
    views = EpochViews(images, texts, seed=5, extras=extras)
    for epoch in range(4):
        items = views.for_epoch(epoch)
        pick, text_pick = epoch_views(5, epoch, 3, 2), epoch_views(6, epoch, 3, 2)
        for i, item in enumerate(items):
            assert torch.equal(item["negative_mask"], extras[i]["negative_mask"])
            assert torch.equal(item["image_features"], images[pick[i], i])  # the view, not the plain feature
            assert torch.equal(item["text_features"], texts[text_pick[i], i])


def _large_jpeg(path: Path, size: tuple[int, int] = (512, 384)) -> Path:
    """A detailed JPEG whose sides divide by 8: fast decoding draws it at 1/2, 1/4 or 1/8 scale."""
    rng = np.random.default_rng(5)
    coarse = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
    detail = rng.integers(0, 64, (size[1], size[0], 3), dtype=np.uint8)
    big = np.asarray(Image.fromarray(coarse).resize(size, Image.Resampling.BILINEAR), dtype=np.uint8)
    Image.fromarray(np.clip(big.astype(np.int16) + detail - 32, 0, 255).astype(np.uint8)).save(
        path, quality=92
    )
    return path


def test_fast_decode_reaches_the_augmented_views(tmp_path: Path, clip: Path) -> None:
    from cliptune.data.augment import image_view_id
    from cliptune.data.images import load_image

    path = _large_jpeg(tmp_path / "big.jpg")
    params = ImageAugmentConfig(flip=True, colour_jitter=0.2)  # no crop: the view keeps the decoded size
    fast = AugmentedLoader(params, seed=3, view=1, min_side=64)(path)
    full = AugmentedLoader(params, seed=3, view=1)(path)
    # 384 // 4 = 96 >= 64 > 384 // 8 = 48: decoded at 1/4 scale, 512x384 -> 128x96, then the same view
    assert fast.size == (128, 96) and full.size == (512, 384)
    item = hashlib.sha256(path.read_bytes()).hexdigest()
    expected = augment_image(load_image(path, min_side=64), params, view_rng(3, item, 1))
    assert np.array_equal(_pixels(fast), _pixels(expected))
    # another picture, another feature-cache key; full decoding keeps the key views always had
    assert image_view_id(params, 3, 1, 64) == image_view_id(params, 3, 1) + ":jpeg-min-side=64"


@pytest.mark.filterwarnings("ignore::cliptune.models.embed.TextsTruncatedWarning")
def test_a_fast_decode_backbone_augments_fast_decoded_views(tmp_path: Path, clip: Path) -> None:
    from cliptune.models.embed import embed_images

    paths = [_large_jpeg(tmp_path / f"{i}.jpg", (512, 384 + 64 * i)) for i in range(2)]
    backbone = load_backbone(clip)
    augment = AugmentConfig(views=2, image=ImageAugmentConfig(flip=True, colour_jitter=0.2))

    def views(cache: str) -> torch.Tensor:
        images, _ = augmented_tower_features(
            backbone,
            paths,
            ["a", "b"],
            [[], []],
            augment,
            cache_dir=tmp_path / cache,
            precision="fp32",
            progress=False,
        )
        return images

    full = views("full")
    backbone.fast_decode = True
    fast = views("fast")
    # the tiny CLIP's input side is 32: views decode with min_side 2 * 32 = 64, as the plain loader does
    want = embed_images(
        paths,
        cache=None,
        load=AugmentedLoader(augment.image, 0, 1, min_side=64),
        preprocess=backbone.preprocess,
        forward=backbone.image_features,
        precision="fp32",
        progress=False,
    )
    assert torch.allclose(fast[1], want, atol=1e-6) and not torch.allclose(fast[1], full[1], atol=1e-4)
