"""Robust image loading: every odd image mode becomes the right RGB pixels, every bad file one clear error."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cliptune.data.images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image, probe_image


def _pixels(img: Image.Image) -> list:
    return np.asarray(img).tolist()


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A valid PNG signature + IHDR claiming width x height, with no pixel data (a would-be bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk + end)
    return path


def _red_left_blue_right(width: int = 4, height: int = 2) -> Image.Image:
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : width // 2] = (255, 0, 0)
    arr[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(arr)


def test_default_limit_is_pillows() -> None:
    assert DEFAULT_MAX_PIXELS == 89_478_485 == int(1024 * 1024 * 1024 // 4 // 3)


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_exif_orientation_is_applied(tmp_path: Path, suffix: str) -> None:
    # Stored 4 wide x 2 high, red left / blue right; EXIF orientation 6 = "rotate 90 degrees clockwise to
    # view": shown 2 wide x 4 high, and the left (red) half becomes the top half.
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"rot.{suffix}"
    _red_left_blue_right().save(path, exif=exif, **({"quality": 100} if suffix == "jpg" else {}))
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (2, 4)
    arr = np.asarray(img).astype(int)
    assert np.abs(arr[:2] - [255, 0, 0]).max() <= 3  # JPEG may be off by a few levels
    assert np.abs(arr[2:] - [0, 0, 255]).max() <= 3
    assert probe_image(path) == (4, 2)  # probe reports the stored size


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    arr = np.array([[[0, 0, 0, 0], [255, 0, 0, 255], [0, 0, 0, 128]]], np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    got = _pixels(load_image(tmp_path / "a.png"))
    assert got[0][0] == [255, 255, 255]  # fully transparent -> white, not convert()'s black
    assert got[0][1] == [255, 0, 0]  # opaque stays
    # half-transparent black over white: 0 * 128/255 + 255 * 127/255 = 127
    assert all(abs(v - 127) <= 1 for v in got[0][2])


def test_la_is_composited_on_white(tmp_path: Path) -> None:
    arr = np.array([[[0, 0], [100, 255]]], np.uint8)
    Image.fromarray(arr).save(tmp_path / "la.png")
    assert _pixels(load_image(tmp_path / "la.png")) == [[[255, 255, 255], [100, 100, 100]]]


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)  # index 0 black, index 1 green
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    img.save(tmp_path / "p.png")
    assert _pixels(load_image(tmp_path / "p.png")) == [[[0, 0, 0], [0, 200, 0]]]
    img.save(tmp_path / "pt.png", transparency=0)  # index 0 transparent -> white
    assert _pixels(load_image(tmp_path / "pt.png")) == [[[255, 255, 255], [0, 200, 0]]]
    img.save(tmp_path / "pt.gif", transparency=0)
    assert _pixels(load_image(tmp_path / "pt.gif")) == [[[255, 255, 255], [0, 200, 0]]]


def test_greyscale_and_cmyk_become_rgb(tmp_path: Path) -> None:
    Image.fromarray(np.array([[77, 200]], np.uint8)).save(tmp_path / "l.png")
    assert _pixels(load_image(tmp_path / "l.png")) == [[[77, 77, 77], [200, 200, 200]]]
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putpixel((0, 0), (0, 0, 0, 0))  # no ink -> white
    cmyk.putpixel((1, 0), (255, 0, 0, 0))  # full cyan -> R = 255 - 255 = 0
    cmyk.save(tmp_path / "c.tif")
    assert _pixels(load_image(tmp_path / "c.tif")) == [[[255, 255, 255], [0, 255, 255]]]


def test_sixteen_bit_png_is_scaled_not_white(tmp_path: Path) -> None:
    # 16 -> 8 bits is value / 257: 0 -> 0, 2570 -> 10, 32768 -> 127.5 -> 128 (round half even), 65535 -> 255
    Image.fromarray(np.array([[0, 2570, 32768, 65535]], np.uint16)).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"  # the mode convert("RGB") turns white
    got = _pixels(load_image(tmp_path / "g16.png"))
    assert got == [[[0, 0, 0], [10, 10, 10], [128, 128, 128], [255, 255, 255]]]
    mid = np.asarray(load_image(tmp_path / "g16.png")).astype(float)
    assert mid[0, 2].mean() == 128  # mid-grey stays mid-grey


def test_32bit_integer_image_uses_the_16bit_range(tmp_path: Path) -> None:
    # mode "I": 514 / 257 = 2; 70000 is clipped at 255
    Image.fromarray(np.array([[514, 70000]], np.int32)).save(tmp_path / "i.tif")
    assert _pixels(load_image(tmp_path / "i.tif")) == [[[2, 2, 2], [255, 255, 255]]]


@pytest.mark.parametrize("loader", [load_image, probe_image])
def test_bad_files_raise_one_clear_error(tmp_path: Path, loader) -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (64, 64, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "ok.jpg")
    Image.fromarray(rgb).save(tmp_path / "ok.png")
    for name in ("ok.jpg", "ok.png"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut_{name}").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "page.jpg").write_text("<html><body>404</body></html>")
    (tmp_path / "folder.jpg").mkdir()
    cases = {
        "missing.jpg": "file not found",
        "empty.jpg": "empty file (0 bytes)",
        "page.jpg": "not an image (unrecognised format)",
        "folder.jpg": "not a regular file",
        "cut_ok.jpg": "truncated image",
        "cut_ok.png": "truncated image",
    }
    for name, reason in cases.items():
        with pytest.raises(ImageLoadError) as info:
            loader(tmp_path / name)
        assert info.value.reason.startswith(reason), (name, info.value.reason)
        assert info.value.path == tmp_path / name
        assert str(tmp_path / name) in str(info.value)
    assert loader(tmp_path / "ok.png") is not None


@pytest.mark.parametrize("loader", [load_image, probe_image])
def test_too_large_is_rejected_from_the_header(tmp_path: Path, loader) -> None:
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    with pytest.raises(ImageLoadError) as info:
        loader(tmp_path / "big.png", max_pixels=9_999)
    assert info.value.reason == "image too large: 100 x 100 = 10,000 pixels > limit 9,999"
    assert loader(tmp_path / "big.png", max_pixels=10_000) is not None  # the limit itself is allowed


def test_bomb_header_is_rejected_without_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", DEFAULT_MAX_PIXELS)
    # 20000 * 20000 = 400,000,000 > 2 * 89,478,485: Pillow's own error fires first; we still name both numbers
    bomb = _png_header_only(tmp_path / "bomb.png", 20_000, 20_000)
    with pytest.raises(ImageLoadError) as info:
        probe_image(bomb)
    assert info.value.reason == "image too large: 400,000,000 pixels > limit 89,478,485"
    # 9500 * 9500 = 90,250,000: between 1x and 2x Pillow's limit, where Pillow only warns
    near = _png_header_only(tmp_path / "near.png", 9_500, 9_500)
    with pytest.raises(ImageLoadError) as info:
        probe_image(near)
    assert info.value.reason == "image too large: 9500 x 9500 = 90,250,000 pixels > limit 89,478,485"
    # A limit above Pillow's is honoured: the header passes, and the missing pixel data is what fails.
    with pytest.raises(ImageLoadError) as info:
        probe_image(bomb, max_pixels=500_000_000)
    assert "too large" not in info.value.reason


def test_loaded_image_is_independent_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    Image.new("RGB", (3, 2), (10, 20, 30)).save(path)
    img = load_image(path)
    path.unlink()
    assert img.size == (3, 2) and img.getpixel((2, 1)) == (10, 20, 30)


# --- the fast JPEG path (min_side: DCT-domain downscaling through Pillow's draft) ---------------------


def _photo_jpeg(path: Path, size: tuple[int, int]) -> Path:
    """A real photo (skimage's astronaut) resized to ``size`` and saved as a quality-92 JPEG."""
    from skimage.data import astronaut

    Image.fromarray(astronaut()).resize(size, Image.Resampling.LANCZOS).save(path, quality=92)
    return path


def _model_view(img: Image.Image, side: int = 224) -> np.ndarray:
    """What a 224 px model sees: short side -> 224 (bicubic, antialiased), centre crop; float 0-255."""
    w, h = img.size
    scale = side / min(w, h)
    new = (max(side, round(w * scale)), max(side, round(h * scale)))
    small = img.resize(new, Image.Resampling.BICUBIC)
    left, top = (new[0] - side) // 2, (new[1] - side) // 2
    return np.asarray(small.crop((left, top, left + side, top + side)), dtype=np.float64)


def test_min_side_decodes_large_jpeg_reduced_with_the_same_pixels(tmp_path: Path) -> None:
    path = _photo_jpeg(tmp_path / "photo.jpg", (2048, 1536))
    full, fast = load_image(path), load_image(path, min_side=448)
    # 1536 // 4 = 384 < 448, so the largest exact reduction is 1/2
    assert full.size == (2048, 1536) and fast.size == (1024, 768) and fast.mode == "RGB"
    diff = np.abs(_model_view(full) - _model_view(fast))
    assert diff.mean() < 0.5 and diff.max() <= 8, (diff.mean(), diff.max())  # measured 0.18 / 3
    # a smaller bound allows 1/8: 1536 // 8 = 192 >= 150
    assert load_image(path, min_side=150).size == (256, 192)


def test_min_side_keeps_full_size_when_no_exact_reduction_fits(tmp_path: Path) -> None:
    odd = _photo_jpeg(tmp_path / "odd.jpg", (2047, 1533))  # no 1/2, 1/4, 1/8 divides both sides
    assert load_image(odd, min_side=224).size == (2047, 1533)
    small = _photo_jpeg(tmp_path / "small.jpg", (512, 400))  # 400 // 2 = 200 < 224: already small enough
    assert load_image(small, min_side=224).size == (512, 400)
    _red_left_blue_right(64, 32).save(tmp_path / "x.png")  # not a JPEG: never reduced
    assert load_image(tmp_path / "x.png", min_side=4).size == (64, 32)


def test_min_side_applies_exif_orientation(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view: the left (red) half becomes the top half
    path = tmp_path / "rot.jpg"
    _red_left_blue_right(64, 32).save(path, exif=exif, quality=100)
    img = load_image(path, min_side=8)
    assert img.size == (8, 16)  # stored 64 x 32 decoded at 1/4 = 16 x 8, then rotated
    arr = np.asarray(img).astype(int)
    assert np.abs(arr[:7] - [255, 0, 0]).max() <= 3 and np.abs(arr[9:] - [0, 0, 255]).max() <= 3


def test_min_side_keeps_every_guard(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (64, 64, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "page.jpg").write_text("<html><body>404</body></html>")
    cases = {
        "missing.jpg": "file not found",
        "empty.jpg": "empty file (0 bytes)",
        "page.jpg": "not an image (unrecognised format)",
        "cut.jpg": "truncated image",  # still read to the end at 1/8 scale
    }
    for name, reason in cases.items():
        with pytest.raises(ImageLoadError) as info:
            load_image(tmp_path / name, min_side=8)
        assert info.value.reason.startswith(reason), (name, info.value.reason)
    # the pixel limit is checked on the stored size, not the reduced one
    with pytest.raises(ImageLoadError) as info:
        load_image(tmp_path / "ok.jpg", max_pixels=4_095, min_side=8)
    assert info.value.reason == "image too large: 64 x 64 = 4,096 pixels > limit 4,095"
    assert load_image(tmp_path / "ok.jpg", max_pixels=4_096, min_side=8).size == (8, 8)


@pytest.mark.parametrize("name", ["photo.jpg", "photo.ppm"])  # JPEG: pixels not copied; PPM may be mapped
def test_loaded_pixels_stay_when_the_file_is_overwritten(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    Image.new("RGB", (64, 48), (200, 30, 60)).save(path)
    want = np.asarray(Image.open(path).convert("RGB")).copy()  # an independent decode
    img = load_image(path)
    Image.new("RGB", (64, 48), (0, 0, 0)).save(path)  # same size, other pixels, same file
    assert img.mode == "RGB" and np.array_equal(np.asarray(img), want)
