"""Resizing a decoded image to a tower's input size, on torch's antialiased uint8 kernels.

Why not Pillow's ``Image.resize``: after the JPEG decode, the bicubic resize is the second half of an
image's cost outside the forward. Pillow takes 6-8 ms of one core to bring a 1024 x 768 image to
299 x 224 (and the centre crop) and 20-25 ms from 2048 x 1536; torch's antialiased interpolation on uint8
channels-last input (``F.interpolate(..., antialias=True)``, a port of Pillow-SIMD's kernels) does the
same 3-4x faster (``benchmarks/bench_decode.py --resize``; docs/benchmarks.md). It computes the same filter as Pillow:
bicubic with ``a = -0.5`` (bilinear: the triangle), the support widened by the reduction factor, the same
pixel-centre mapping, fixed-point weights. What differs is rounding inside the fixed-point arithmetic:
when reducing, at most 1 on the 0-255 scale, on 0.1-0.5% of the values; when enlarging a small image, at
most 2, on up to 2.6% (``tests/test_resize.py`` bounds both against Pillow on real photos).

Other filters (nearest, box, Hamming, Lanczos) have no antialiased torch kernel: they stay on Pillow.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.dlpack import from_dlpack

__all__ = ["resize_rgb"]

# Pillow filter -> torch mode of an antialiased uint8 kernel computing the same filter
_TORCH_MODES = {Image.Resampling.BICUBIC: "bicubic", Image.Resampling.BILINEAR: "bilinear"}


def resize_rgb(image: Image.Image, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """Resize an RGB image to ``size`` = (width, height) with Pillow's filter ``resample``, as uint8 pixels.

    Thread-safe (a batch resizes on several threads, ``models/embed.py``), and the result is the same
    for a given image whichever thread computes it.

    Args:
        image: A PIL image in mode ``RGB``.
        size: Output (width, height), as Pillow's ``resize`` takes it.
        resample: Pillow's filter; bicubic and bilinear run on torch, the others on Pillow.

    Returns:
        (height, width, 3) uint8, C-contiguous.

    Raises:
        ValueError: ``image`` is not RGB (the callers convert first: a palette or CMYK image has no meaning
            to resize channel by channel).

    Example:
        >>> image = Image.new("RGB", (64, 48), (10, 200, 30))
        >>> pixels = resize_rgb(image, (32, 24), Image.Resampling.BICUBIC)
        >>> pixels.shape, pixels.dtype, pixels[0, 0].tolist()
        ((24, 32, 3), dtype('uint8'), [10, 200, 30])
    """
    if image.mode != "RGB":
        raise ValueError(f"resize_rgb takes RGB images, got mode {image.mode!r}")
    mode = _TORCH_MODES.get(resample)
    if image.size == tuple(size):  # Pillow copies the pixels unchanged at the same size: so do we
        return np.array(image, dtype=np.uint8)
    if mode is None:
        return np.asarray(image.resize(size, resample), dtype=np.uint8)
    width, height = size
    # (H, W, 3) seen as (1, 3, H, W) is the channels-last layout the uint8 kernels vectorise
    pixels = _tensor(image).permute(2, 0, 1).unsqueeze(0)
    with torch.inference_mode():
        out = torch.nn.functional.interpolate(pixels, size=(height, width), mode=mode, antialias=True)
    return np.ascontiguousarray(out[0].permute(1, 2, 0).numpy())  # (H, W, 3)


def _tensor(image: Image.Image) -> torch.Tensor:
    """The image's pixels as a (H, W, 3) uint8 tensor, copied out of Pillow once.

    ``np.asarray`` copies Pillow's pixels into a read-only array. ``torch.from_numpy`` would warn about
    read-only memory, and a second, writable copy (``np.array``) cost a median 2 ms per 1024 x 768 image
    on the development machine (fresh pages for every image), as much as the resize itself. DLPack hands
    the read-only array to torch as it is; nothing writes to it (the interpolation returns a new tensor).
    """
    pixels = np.asarray(image, dtype=np.uint8)
    try:
        return from_dlpack(pixels)
    except BufferError:  # NumPy < 2.1 cannot export read-only memory through DLPack: copy it
        return torch.from_numpy(pixels.copy())
