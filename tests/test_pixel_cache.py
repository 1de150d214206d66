"""The decoded-uint8 pixel cache and uint8 batches normalised on the device: the same features as the float
preprocess, a changed file or another preprocessing is a miss, a killed write leaves a usable cache, and a
backbone without a uint8 recipe is refused rather than silently cached; a transformers image processor's
recipe gives the processor's own pixels."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from cliptune.data.images import load_image
from cliptune.models.backbone import NoPixelRecipeError, PixelRecipe, normalise_uint8
from cliptune.models.composed import _EfficientNetLite0
from cliptune.models.embed import embed_images, embed_images_with
from cliptune.models.factory import load_model
from cliptune.models.openclip import preprocess_image, uint8_image
from cliptune.models.pixel_cache import MAGIC, PixelCache
from tests.tiny_models import make_tiny_clip, make_tiny_siglip

SIZE = 32


@pytest.fixture(scope="module")
def tower() -> _EfficientNetLite0:
    return _EfficientNetLite0(pretrained=False, size=SIZE)


def _forward(pixels: torch.Tensor) -> torch.Tensor:
    """A tiny fixed 'tower': per-channel means and a few pixels, so any pixel change shows."""
    return torch.cat([pixels.mean(dim=(2, 3)), pixels[:, :, ::7, ::5].flatten(1)], dim=1)


def _photos(folder: Path, n: int = 3) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (48 + 8 * i, 64, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def _embed(
    paths: list[Path],
    tower: _EfficientNetLite0,
    *,
    load: Callable[[Path], Image.Image] = load_image,
    forward: Callable[[torch.Tensor], torch.Tensor] = _forward,
    **kw: object,
) -> torch.Tensor:
    return embed_images(
        paths,
        cache=None,
        load=load,
        preprocess=tower.preprocess,
        forward=forward,
        batch_size=2,
        precision="fp32",
        progress=False,
        **kw,  # type: ignore[arg-type]  # recipe / pixel_cache_dir / preprocess_id, typed at the call
    )


def _shards(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.pixels"))


def test_uint8_normalised_on_the_device_is_bit_identical_to_the_float_preprocess(tower) -> None:
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)), Image.new("L", (33, 90), 7)]
    recipe = tower.pixel_recipe()
    u8 = torch.from_numpy(np.stack([recipe.to_uint8(im) for im in images]))
    assert u8.dtype == torch.uint8 and tuple(u8.shape) == (2, SIZE, SIZE, 3)
    assert torch.equal(normalise_uint8(u8, recipe.mean, recipe.std), tower.preprocess(images))
    # open_clip's preprocess, every resize mode: the same split, the same bits
    for mode in ("shortest", "longest", "squash"):
        cfg = {"size": [24, 24], "mean": [0.48, 0.45, 0.40], "std": [0.26, 0.26, 0.27], "resize_mode": mode}
        cfg |= {"interpolation": "bicubic", "fill_color": 0}
        want = torch.stack([preprocess_image(im, cfg) for im in images])
        got = normalise_uint8(
            torch.from_numpy(np.stack([uint8_image(im, cfg) for im in images])), cfg["mean"], cfg["std"]
        )
        assert torch.equal(got, want), mode


def test_cached_and_uncached_paths_give_the_same_features(tower, tmp_path: Path) -> None:
    paths = _photos(tmp_path / "img")
    want = _embed(paths, tower)  # float preprocess in the loader: the reference
    recipe = tower.pixel_recipe()
    assert torch.equal(_embed(paths, tower, recipe=recipe), want)  # uint8 batches, normalised after
    root = tmp_path / "pixels"
    cold = _embed(paths, tower, recipe=recipe, pixel_cache_dir=root)
    assert len(_shards(root)) == 1
    warm = _embed(paths, tower, recipe=recipe, pixel_cache_dir=root)
    assert len(_shards(root)) == 1  # all hits: nothing written
    assert torch.equal(cold, want) and torch.equal(warm, want)
    cache = PixelCache(_shards(root)[0].parent.parent, recipe.identity + "\0", (SIZE, SIZE, 3))
    assert len(cache) == 3 and cache.get_many([]) == {}
    # the stored rows are exactly the recipe's pixels (150 KB per image at 224 px: H * W * 3 bytes)
    assert _shards(root)[0].stat().st_size >= 3 * SIZE * SIZE * 3


def test_a_changed_file_and_another_preprocessing_are_misses(tower, tmp_path: Path) -> None:
    paths = _photos(tmp_path / "img", n=2)
    recipe, root = tower.pixel_recipe(), tmp_path / "pixels"
    _embed(paths, tower, recipe=recipe, pixel_cache_dir=root)
    Image.new("RGB", (64, 64), (200, 30, 10)).save(paths[0], quality=90)  # same name, new bytes
    got = _embed(paths, tower, recipe=recipe, pixel_cache_dir=root)
    assert torch.equal(got, _embed(paths, tower))  # the new picture, not the cached old one
    assert len(_shards(root)) == 2  # the changed file was decoded and stored (a miss)
    # another input size: another pixel identity, its own folder
    other = _EfficientNetLite0(pretrained=False, size=40)
    embed_images(
        paths,
        cache=None,
        load=load_image,
        preprocess=other.preprocess,
        forward=_forward,
        precision="fp32",
        progress=False,
        recipe=other.pixel_recipe(),
        pixel_cache_dir=root,
    )
    assert len({p.parent for p in _shards(root)}) == 2
    # the fast JPEG decode (another preprocess_id) is another identity too
    _embed(paths, tower, recipe=recipe, pixel_cache_dir=root, preprocess_id="jpeg-min-side=64")
    assert len({p.parent for p in _shards(root)}) == 3


def test_a_killed_write_leaves_a_usable_cache(tower, tmp_path: Path) -> None:
    paths = _photos(tmp_path / "img")
    recipe, root = tower.pixel_recipe(), tmp_path / "pixels"
    want = _embed(paths[:1], tower, recipe=recipe, pixel_cache_dir=root)
    folder = _shards(root)[0].parent
    good = _shards(root)[0].read_bytes()
    (folder / ".abandoned.pixels.tmp").write_bytes(good[:100])  # killed before the rename
    (folder / "cut.pixels").write_bytes(good[: len(good) - 10])  # a damaged shard (copied by hand)
    (folder / "junk.pixels").write_bytes(b"not a shard")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _embed(paths, tower, recipe=recipe, pixel_cache_dir=root)
    assert torch.equal(got, _embed(paths, tower))
    assert torch.equal(got[:1], want)
    messages = [str(w.message) for w in caught]
    assert any("cut.pixels" in m and "truncated" in m for m in messages), messages
    assert any("junk.pixels" in m for m in messages), messages
    assert good.startswith(MAGIC)


def test_put_refuses_the_wrong_shape_naming_the_key(tmp_path: Path) -> None:
    cache = PixelCache(tmp_path, "r", (2, 2, 3))
    with pytest.raises(ValueError, match="image for key k1 is float32 \\(2, 2, 3\\)"):
        cache.put_many({"k1": np.zeros((2, 2, 3), np.float32)})


def test_a_backbone_without_a_uint8_recipe_is_refused_not_silently_cached(tmp_path: Path) -> None:
    model = load_model(make_tiny_clip(tmp_path / "clip", seed=0))  # a transformers image processor
    paths = _photos(tmp_path / "img", n=1)
    model.backbone.image_processor.do_convert_rgb = False  # type: ignore[attr-defined]  # HF backbone's
    plain = embed_images_with(model, paths, cache_dir=tmp_path / "c", precision="fp32", progress=False)
    model.backbone.pixel_cache = True
    with pytest.raises(
        NoPixelRecipeError, match="data.pixel_cache is on, but it cannot be used here"
    ) as info:
        embed_images_with(model, paths, cache_dir=tmp_path / "c2", precision="fp32", progress=False)
    assert "clip backbone: image processor CLIPImageProcessorPil: do_convert_rgb=False" in str(info.value)
    assert not (tmp_path / "c2" / "pixels").exists()
    assert plain.shape[0] == 1


# Sizes (height, width) that exercise both orientations, a square, odd sides and the long-side truncation.
_SHAPES = [(48, 64), (65, 33), (31, 31), (100, 47), (20, 90)]


@pytest.mark.parametrize("make", [make_tiny_clip, make_tiny_siglip], ids=["clip", "siglip"])
def test_a_transformers_processor_recipe_gives_the_processors_own_pixels(make: Any, tmp_path: Path) -> None:
    from transformers import AutoImageProcessor

    from cliptune.models.hf import processor_recipe

    processor = AutoImageProcessor.from_pretrained(str(make(tmp_path / "m")), local_files_only=True)  # type: ignore[no-untyped-call]  # transformers leaves it unannotated
    recipe = processor_recipe(processor)
    rng = np.random.default_rng(1)
    for height, width in _SHAPES:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        want = processor(images=[image], return_tensors="pt")["pixel_values"]  # the processor's own code
        uint8 = recipe.to_uint8(image)
        assert uint8.dtype == np.uint8 and uint8.shape == (SIZE, SIZE, 3)
        got = normalise_uint8(torch.from_numpy(uint8)[None], recipe.mean, recipe.std)
        assert got.shape == want.shape and torch.allclose(got, want, rtol=0, atol=1e-6), (height, width)
    assert recipe.identity.startswith("hf-pil:")


def test_processor_settings_the_recipe_cannot_replay_are_refused_with_the_reason(tmp_path: Path) -> None:
    from transformers import AutoImageProcessor

    from cliptune.models.hf import processor_recipe

    folder = str(make_tiny_clip(tmp_path / "clip"))
    cases = [
        ({"do_convert_rgb": False}, "do_convert_rgb=False"),
        ({"resample": 7}, "resample 7 is not a PIL filter"),
        ({"do_pad": True}, "do_pad=True is a step cliptune does not replay"),
        ({"rescale_factor": 1 / 127.5}, "rescale by 0.00784"),
        ({"do_center_crop": False}, "without a centre crop"),
        ({"crop_size": {"height": 40, "width": 40}}, r"crop \[40, 40\] larger than the resized image"),
        ({"size": {"shortest_edge": 32, "longest_edge": 64}}, "only shortest_edge, or height and width"),
    ]
    for change, reason in cases:
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)  # type: ignore[no-untyped-call]  # unannotated
        for key, value in change.items():
            setattr(processor, key, value)
        with pytest.raises(NoPixelRecipeError, match=reason):
            processor_recipe(processor)


def test_hf_backbones_embed_the_same_with_the_pixel_cache_on_and_off(tmp_path: Path) -> None:
    from cliptune.models.composed import _HFVisionTower

    paths = _photos(tmp_path / "img", n=3)
    model = load_model(make_tiny_clip(tmp_path / "clip", seed=0))
    plain = embed_images_with(model, paths, use_cache=False, precision="fp32", progress=False)
    model.backbone.pixel_cache = True
    cached = embed_images_with(model, paths, cache_dir=tmp_path / "c", precision="fp32", progress=False)
    assert _shards(tmp_path / "c" / "pixels") and torch.equal(cached, plain)
    # and preprocess (training, serve, export) is the recipe's pixels, bit for bit, within 1e-6 of the
    # processor's own float arithmetic
    images = [load_image(p) for p in paths]
    recipe = model.backbone.pixel_recipe()
    via_recipe = normalise_uint8(
        torch.from_numpy(np.stack([recipe.to_uint8(im) for im in images])), recipe.mean, recipe.std
    )
    assert torch.equal(model.backbone.preprocess(images), via_recipe)
    processor = model.backbone.image_processor  # type: ignore[attr-defined]  # the HF backbone's
    assert torch.allclose(
        processor(images=images, return_tensors="pt")["pixel_values"], via_recipe, atol=1e-6
    )
    # a composed backbone's SigLIP vision tower: the same recipe, through its tower
    tower = _HFVisionTower.from_folder(make_tiny_siglip(tmp_path / "siglip"))
    tower_recipe = tower.pixel_recipe()
    assert tower_recipe.mean == (0.5, 0.5, 0.5) and '"mode": "exact"' in tower_recipe.identity
    tower_plain = _embed(paths, tower)  # type: ignore[arg-type]  # any tower with preprocess
    tower_cached = _embed(paths, tower, recipe=tower_recipe, pixel_cache_dir=tmp_path / "p")  # type: ignore[arg-type]
    assert _shards(tmp_path / "p") and torch.equal(tower_cached, tower_plain)


def test_recipe_is_picklable_for_spawned_workers(tower) -> None:
    import pickle

    recipe = pickle.loads(pickle.dumps(tower.pixel_recipe()))
    assert isinstance(recipe, PixelRecipe) and isinstance(recipe.to_uint8, partial)
    assert recipe.to_uint8(Image.new("RGB", (50, 40), (1, 2, 3)))[0, 0].tolist() == [1, 2, 3]


def test_embedded_model_with_the_pixel_cache_embeds_exactly_as_without(tmp_path: Path) -> None:
    from cliptune.models.embed import tower_features
    from cliptune.models.factory import LoadedModel, load_backbone

    backbone = load_backbone("embedded", image_size=SIZE)  # EfficientNet-Lite0: it has a uint8 recipe
    model = LoadedModel(backbone, None, Path("embedded"), backbone.model_identity())
    paths = _photos(tmp_path / "img", n=2)
    plain = embed_images_with(model, paths, use_cache=False, precision="fp32", progress=False)
    backbone.pixel_cache = True
    cached = embed_images_with(model, paths, cache_dir=tmp_path / "c", precision="fp32", progress=False)
    assert _shards(tmp_path / "c" / "pixels")  # the pixels went to FEATURE_CACHE/pixels
    feats, _ = tower_features(backbone, paths, ["a", "b"], cache_dir=tmp_path / "c2", progress=False)
    backbone.pixel_cache = False
    assert torch.allclose(cached, plain, atol=1e-6)
    want, _ = tower_features(backbone, paths, ["a", "b"], cache_dir=tmp_path / "c3", progress=False)
    assert torch.allclose(feats, want, atol=1e-6) and _shards(tmp_path / "c2" / "pixels")


def test_a_cold_pass_decodes_as_the_batches_come_up_not_everything_first(tower, tmp_path: Path) -> None:
    paths = _photos(tmp_path / "img", n=5)
    recipe, root = tower.pixel_recipe(), tmp_path / "pixels"
    _embed(paths[1:4:2], tower, recipe=recipe, pixel_cache_dir=root)  # images 1 and 3 already cached
    events: list[str] = []

    def load(path: Path) -> Image.Image:
        events.append(f"decode {Path(path).stem}")
        return load_image(path)

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        events.append(f"forward {len(pixels)}")
        return _forward(pixels)

    got = _embed(paths, tower, load=load, forward=forward, recipe=recipe, pixel_cache_dir=root)
    # the missing images 0, 2, 4 are decoded in loader batches of 2 as the forward batches (0 1), (2 3), (4)
    # need them: the first forward runs before image 4 is decoded (before: all decodes, then all forwards)
    assert events == ["decode 0", "decode 2", "forward 2", "forward 2", "decode 4", "forward 1"]
    assert torch.equal(got, _embed(paths, tower))  # the same features, cached and fresh rows in order
    again: list[str] = []
    embed_images(
        paths,
        cache=None,
        load=lambda p: again.append(str(p)) or load_image(p),
        preprocess=tower.preprocess,
        forward=_forward,
        precision="fp32",
        progress=False,
        recipe=recipe,
        pixel_cache_dir=root,
    )
    assert again == []  # every decoded image was stored
