"""The torch-free reference client of an ONNX export, copied into the export folder as ``cliptune_onnx.py``.

It needs only numpy, Pillow, onnxruntime and (for texts) tokenizers, so a user runs an exported model
without cliptune or torch. It is also cliptune's own description of the preprocessing: the export's
parity check runs *this* code's :func:`preprocess_image` and :class:`Embedder` against PyTorch, so what
the folder promises is what was checked. Keep it standalone: no cliptune import, no torch import.

That is why it carries its own copy of one cliptune rule, on purpose: the JPEG draft decode of
``data.fast_decode`` (:func:`load_rgb`'s ``min_side``, cliptune's ``data.images._draft``). A model trained
with fast decoding records its bound as ``jpeg_min_side`` in ``preprocess.json`` (``fast_decode`` in
``export.json``), and this client decodes exactly as cliptune then does; the export test checks both
decode the same pixels from a large JPEG.

Example (inside an export folder)::

    from cliptune_onnx import Embedder
    model = Embedder()                      # the folder this file is in
    images = model.embed_images(["a.jpg"])  # (1, D) float32, L2-normalised
    texts = model.embed_texts(["a red dress"])
    scores = texts @ images.T               # cosine similarities
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

__all__ = ["Embedder", "embed_images", "embed_texts", "load_rgb", "preprocess_image"]

EXPORT_FILE = "export.json"
PREPROCESS_FILE = "preprocess.json"
TOKENIZER_FILE = "tokenizer.json"
_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def load_rgb(path: str | Path, min_side: int | None = None) -> Image.Image:
    """Decode an image as cliptune does: EXIF orientation applied, transparency composited on white, RGB.

    With ``min_side`` (``preprocess.json``'s ``jpeg_min_side``: the model was trained with
    ``data.fast_decode``), a JPEG decodes at the largest exact DCT reduction (1/8, 1/4, 1/2) that divides
    both sides and keeps the shorter one at least ``min_side``, as cliptune does; None decodes at full size.
    """
    with Image.open(path) as opened:
        if min_side is not None and opened.format == "JPEG":
            _draft(opened, int(min_side))
        image = ImageOps.exif_transpose(opened)
        image.load()
    if image.mode in ("RGBA", "LA", "PA") or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info
    ):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _draft(image: Image.Image, min_side: int) -> None:
    """A copy of cliptune's ``data.images._draft`` (this client must not import cliptune)."""
    width, height = image.size
    for s in (8, 4, 2):
        if width % s == 0 and height % s == 0 and min(width, height) // s >= min_side:
            image.draft(None, (width // s, height // s))  # Pillow then picks exactly this 1/s scale
            return


def preprocess_image(image: Image.Image, spec: dict[str, Any]) -> np.ndarray:
    """One RGB image -> the (3, H, W) float32 pixels the image graph takes, as ``preprocess.json`` says.

    Steps: resize (``shortest``: short side to ``size``, the long side scaled and rounded by
    ``long_side``, ``floor`` or ``round``; ``longest``: long side fits, both rounded; ``exact``), centre
    crop (offsets ``floor`` = ``(new - size) // 2`` or ``round``; padded with ``fill`` when smaller), then
    ``pixels * rescale`` and ``(x - mean) / std`` per channel in RGB order.
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    resize = spec["resize"]
    rgb = _resize(rgb, resize, _FILTERS[resize["interpolation"]])
    crop = spec.get("crop")
    if crop:
        rgb = _center_crop(rgb, int(crop["height"]), int(crop["width"]), crop["offset"], int(crop["fill"]))
    pixels = np.asarray(rgb, dtype=np.float32) * np.float32(spec["rescale"])  # (H, W, 3)
    mean = np.asarray(spec["mean"], dtype=np.float32)
    std = np.asarray(spec["std"], dtype=np.float32)
    return np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1), dtype=np.float32)


def _resize(image: Image.Image, resize: dict[str, Any], interpolation: Image.Resampling) -> Image.Image:
    w, h = image.size
    mode = resize["mode"]
    if mode == "exact":
        return image.resize((int(resize["width"]), int(resize["height"])), interpolation)
    if mode == "shortest":
        size, short = int(resize["size"]), min(w, h)
        scaled = [
            size if side == short else _long_side(side, size, short, resize["long_side"]) for side in (w, h)
        ]
        return image.resize((max(size, scaled[0]), max(size, scaled[1])), interpolation)
    if mode == "longest":
        ratio = max(h / int(resize["height"]), w / int(resize["width"]))
        return image.resize((round(w / ratio), round(h / ratio)), interpolation)
    raise ValueError(f"{PREPROCESS_FILE}: unknown resize mode {mode!r}")


def _long_side(side: int, size: int, short: int, rule: str) -> int:
    """The long side after resizing, in the arithmetic of the library it copies (float order matters)."""
    return int(size * side / short) if rule == "floor" else round(side * (size / short))


def _center_crop(image: Image.Image, height: int, width: int, offset: str, fill: int) -> Image.Image:
    w, h = image.size
    if w < width or h < height:
        canvas = Image.new("RGB", (max(w, width), max(h, height)), (fill, fill, fill))
        canvas.paste(image, (max(width - w, 0) // 2, max(height - h, 0) // 2))
        image, (w, h) = canvas, canvas.size
    if offset == "floor":
        top, left = (h - height) // 2, (w - width) // 2
    else:
        top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    return image.crop((left, top, left + width, top + height))


class Embedder:
    """The exported graphs in onnxruntime, with the folder's preprocessing and tokenizer.

    Args:
        folder: The export folder (default: the folder this file is in).
        providers: onnxruntime execution providers (default CPU).
    """

    def __init__(
        self, folder: str | Path | None = None, providers: Sequence[str] = ("CPUExecutionProvider",)
    ) -> None:
        import onnxruntime  # type: ignore[import-untyped]  # onnxruntime ships no type information

        self.folder = Path(folder) if folder is not None else Path(__file__).resolve().parent
        self.manifest: dict[str, Any] = json.loads((self.folder / EXPORT_FILE).read_text(encoding="utf-8"))
        self.preprocess_spec: dict[str, Any] = json.loads(
            (self.folder / PREPROCESS_FILE).read_text(encoding="utf-8")
        )
        graphs = self.manifest["graphs"]
        self.sessions = {
            name: onnxruntime.InferenceSession(str(self.folder / graph["file"]), providers=list(providers))
            for name, graph in graphs.items()
        }
        self._tokenizer: Any = None

    def preprocess(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB images -> (B, 3, H, W) float32 pixels."""
        return np.stack([preprocess_image(image, self.preprocess_spec) for image in images])

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Texts -> ``input_ids`` / ``attention_mask`` (B, T) int64, with the export's padding and truncation."""
        settings = self.manifest["tokenizer"]
        if settings is None:
            raise ValueError(f"{self.folder}: this export has no tokenizer file; tokenize texts yourself")
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(self.folder / TOKENIZER_FILE))
            tokenizer.enable_truncation(int(settings["max_length"]))
            pad_length = int(settings["max_length"]) if settings["padding"] == "max_length" else None
            tokenizer.enable_padding(
                pad_id=int(settings["pad_id"]), pad_token=str(settings["pad_token"]), length=pad_length
            )
            self._tokenizer = tokenizer
        encoded = self._tokenizer.encode_batch(list(texts))
        ids = np.asarray([e.ids for e in encoded], dtype=np.int64)
        mask = np.asarray([e.attention_mask for e in encoded], dtype=np.int64)
        return {"input_ids": ids, "attention_mask": mask}

    def run_images(self, pixels: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) pixels -> (B, D) L2-normalised image embeddings."""
        out: np.ndarray = self.sessions["image"].run(None, {"pixel_values": pixels.astype(np.float32)})[0]
        return out

    def run_texts(self, tokens: dict[str, np.ndarray]) -> np.ndarray:
        """Token tensors -> (B, D) L2-normalised text embeddings (feeds only the inputs the graph has)."""
        session = self.sessions["text"]
        feeds = {i.name: tokens[i.name].astype(np.int64) for i in session.get_inputs()}
        out: np.ndarray = session.run(None, feeds)[0]
        return out

    def embed_images(self, paths: Sequence[str | Path], batch_size: int = 32) -> np.ndarray:
        """Image files -> (N, D) float32 L2-normalised embeddings (decoded as the model was trained)."""
        min_side = self.preprocess_spec.get("jpeg_min_side")  # None: full decode (and older exports)
        parts = [
            self.run_images(self.preprocess([load_rgb(p, min_side) for p in paths[i : i + batch_size]]))
            for i in range(0, len(paths), batch_size)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, int(self.manifest["embed_dim"])), np.float32)

    def embed_texts(self, texts: Sequence[str], batch_size: int = 128) -> np.ndarray:
        """Texts -> (N, D) float32 L2-normalised embeddings."""
        parts = [
            self.run_texts(self.tokenize(texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, int(self.manifest["embed_dim"])), np.float32)


def embed_images(paths: Sequence[str | Path], folder: str | Path | None = None) -> np.ndarray:
    """:meth:`Embedder.embed_images` with a new :class:`Embedder` on ``folder``."""
    return Embedder(folder).embed_images(paths)


def embed_texts(texts: Sequence[str], folder: str | Path | None = None) -> np.ndarray:
    """:meth:`Embedder.embed_texts` with a new :class:`Embedder` on ``folder``."""
    return Embedder(folder).embed_texts(texts)


if __name__ == "__main__":  # python cliptune_onnx.py IMAGE... or --text TEXT...
    import sys

    args = sys.argv[1:]
    if args[:1] == ["--text"]:
        print(json.dumps(embed_texts(args[1:]).tolist()))
    else:
        print(json.dumps(embed_images(args).tolist()))
