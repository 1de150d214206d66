"""``models.resize.resize_rgb``: Pillow's filters on torch's antialiased kernels, within the stated rounding.

Pillow's own ``Image.resize`` is the independent reference: the module claims the same filter up to
fixed-point rounding (reducing: at most 1 on the 0-255 scale, on under 1% of the values; enlarging a
small image: at most 2, on under 5%), on real photos.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

import cliptune.models.resize as resize_module
from cliptune.models.composed import _EfficientNetLite0, _imagenet_uint8
from cliptune.models.resize import resize_rgb

BICUBIC, BILINEAR = Image.Resampling.BICUBIC, Image.Resampling.BILINEAR


def _photo(name: str, size: tuple[int, int]) -> Image.Image:
    return (
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize(size, Image.Resampling.LANCZOS)
    )


def _pillow(image: Image.Image, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    return np.asarray(image.resize(size, resample), dtype=np.int16)


@pytest.mark.parametrize("resample", [BICUBIC, BILINEAR])
@pytest.mark.parametrize(
    ("stored", "out", "bound", "share"),
    [
        ((1024, 768), (299, 224), 1, 0.01),  # a fast-decoded photo to the embedded tower's input
        ((2048, 1536), (299, 224), 1, 0.01),  # a full-size phone photo
        ((640, 427), (333, 224), 1, 0.01),  # reduction factors that are not integers
        ((100, 80), (280, 224), 2, 0.05),  # enlarging a thumbnail (measured: max 2, 2.6% of values)
        ((224, 500), (224, 100), 1, 0.01),  # one side kept, the other reduced
    ],
)
def test_pixels_equal_pillows_within_rounding(
    resample: Image.Resampling, stored: tuple[int, int], out: tuple[int, int], bound: int, share: float
) -> None:
    for name in ("astronaut", "chelsea", "rocket"):  # a face, fur, fine foliage
        image = _photo(name, stored)
        ours = resize_rgb(image, out, resample)
        diff = np.abs(ours.astype(np.int16) - _pillow(image, out, resample))
        assert ours.shape == (out[1], out[0], 3) and ours.dtype == np.uint8 and ours.flags.c_contiguous
        assert diff.max() <= bound, (name, int(diff.max()))
        assert (diff > 0).mean() < share, (name, float((diff > 0).mean()))  # rounding, not another filter


def test_a_different_filter_would_fail_the_bound() -> None:
    # the bound has teeth: bilinear and bicubic (both antialiased) of one photo differ far beyond it
    image = _photo("rocket", (1024, 768))
    bicubic = resize_rgb(image, (299, 224), BICUBIC).astype(np.int16)
    assert np.abs(bicubic - _pillow(image, (299, 224), BILINEAR)).max() > 10


def test_same_size_returns_the_pixels_and_other_filters_stay_on_pillow() -> None:
    image = _photo("coffee", (300, 200))
    assert np.array_equal(resize_rgb(image, (300, 200), BICUBIC), np.asarray(image))
    for resample in (Image.Resampling.LANCZOS, Image.Resampling.NEAREST, Image.Resampling.BOX):
        assert np.array_equal(resize_rgb(image, (150, 100), resample), _pillow(image, (150, 100), resample))


def test_without_read_only_dlpack_the_pixels_are_copied_and_equal(monkeypatch: pytest.MonkeyPatch) -> None:
    # NumPy < 2.1 refuses to export read-only arrays through DLPack: the copy it falls back to is the same
    image = _photo("coffee", (640, 427))
    want = resize_rgb(image, (333, 224), BICUBIC)

    def refuse(array: object) -> torch.Tensor:
        raise BufferError("Cannot export readonly array since signalling readonly is unsupported by DLPack.")

    monkeypatch.setattr(resize_module, "from_dlpack", refuse)
    assert np.array_equal(resize_rgb(image, (333, 224), BICUBIC), want)


def test_rejects_images_that_are_not_rgb() -> None:
    with pytest.raises(ValueError, match="mode 'L'"):
        resize_rgb(Image.new("L", (8, 8)), (4, 4), BICUBIC)


def test_threads_give_the_same_pixels_as_one_thread() -> None:
    images = [_photo(name, (512, 384)) for name in ("astronaut", "coffee", "chelsea", "rocket")] * 3
    alone = [resize_rgb(image, (299, 224), BICUBIC) for image in images]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(partial(resize_rgb, size=(299, 224), resample=BICUBIC), images))
    assert all(np.array_equal(a, b) for a, b in zip(alone, threaded, strict=True))


def test_the_embedded_towers_recipe_is_pillows_resize_and_centre_crop_within_rounding() -> None:
    # the recipe's geometry (short side -> 224 rounded, centre crop at the floor offset) is unchanged:
    # written out here with Pillow, the recipe's pixels differ from it only by the resize's rounding
    for stored in [(1024, 768), (768, 1024), (333, 500)]:
        image = _photo("astronaut", stored)
        w, h = image.size
        scale = 224 / min(w, h)
        new_w, new_h = max(224, round(w * scale)), max(224, round(h * scale))
        left, top = (new_w - 224) // 2, (new_h - 224) // 2
        want = image.resize((new_w, new_h), BICUBIC).crop((left, top, left + 224, top + 224))
        got = _imagenet_uint8(image, 224)
        assert got.shape == (224, 224, 3) and got.flags.c_contiguous
        assert np.abs(got.astype(np.int16) - np.asarray(want, dtype=np.int16)).max() <= 1


def test_the_resize_is_part_of_the_pixel_cache_key_and_the_fingerprint() -> None:
    # pixels computed by Pillow's resize (cached before this change) are never served for torch's
    tower = _EfficientNetLite0(pretrained=False)
    assert tower.pixel_recipe().identity == "imagenet-bicubic-short-side-centre-crop:224:torch-antialias"
    assert tower.fingerprint()["resize"] == "torch-antialias"
