"""What one request may ask of the server: upload size, query length, result count, image pixels.

The defaults are generous for people and tight for abuse: a 10 MiB upload holds any photo a phone takes;
1,000 characters is far more than a CLIP tokenizer reads (77 tokens for CLIP, 64 for SigLIP, about
4 characters a token: the rest is cut anyway) yet a thousand times less than a body can carry; 100 hits
fill several screens of the page; 36 million pixels (6,000 x 6,000) decode into about 100 MB of RGB,
so twenty concurrent uploads stay within a few GB where the loader's own limit (89 million) allows 268 MB each.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from cliptune.serve.errors import ServeError

__all__ = ["Limits"]

MIB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Per-request limits of ``cliptune serve`` (see the module docstring for why these defaults).

    Attributes:
        max_upload_bytes: Largest uploaded query image (a larger one gets 413).
        max_query_chars: Longest text query (a longer one gets 422).
        max_k: Most hits one request may ask for (more gets 422).
        max_image_pixels: Largest ``width * height`` of an uploaded image, checked from its header before
            decoding (a decompression bomb gets 415 and costs nothing).
    """

    max_upload_bytes: int = 10 * MIB
    max_query_chars: int = 1000
    max_k: int = 100
    max_image_pixels: int = 36_000_000

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value < 1:
                raise ServeError(f"Limits.{name} must be >= 1, got {value}")

    def to_dict(self) -> dict[str, int]:
        """The limits as ``/info`` shows them."""
        return asdict(self)
