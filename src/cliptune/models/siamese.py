"""Siamese fusion head: a small transformer that refines and fuses frozen image and text embeddings.

This is the seed-000 model: frozen CLIP features of an item (an artwork, a product) go in, refined image and
text embeddings plus a fused one come out, and the head is trained on triplets (original, AI-generated
derivative, unrelated item) by applying the *same* module to each of the three items.

Design choices:
  - Sequence of three tokens ``[FUSE, image, text]``: image and text are linearly projected to ``width``
    and tagged with a learned modality embedding; ``FUSE`` is a learned token (like BERT's [CLS]) whose
    output is the fused embedding. A learned query lets the head decide how much each modality counts,
    and it still works when a modality is missing (it attends to what is there).
  - ``nn.TransformerEncoder`` with ``batch_first=True, norm_first=True`` (pre-norm trains stably without
    warm-up) and a final LayerNorm, then one output projection shared by the three tokens so the image,
    text and fused embeddings live in one space (cross-modal i2t / t2i comparisons make sense).
  - Outputs are L2-normalised: dot products are cosines, ready for retrieval and indexing. The Siamese
    losses normalise again, which is harmless.
  - Missing modalities: ``has_text`` / ``has_image`` boolean masks (B,) turn the missing token into a padded
    key (nobody attends to it) and its output into a zero vector, so an image-only item still gets a fused
    embedding from its image alone; losses should mask zero rows out.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from cliptune.models.backbone import load_state_strict, read_state
from cliptune.rundir import write_bytes_atomic, write_text_atomic

__all__ = ["SiameseHead", "SiameseOutput"]

_FORMAT = "cliptune-siamese-head-v1"
_CONFIG_FILE = "config.json"
_WEIGHTS_FILE = "model.safetensors"


class SiameseOutput(NamedTuple):
    """What :class:`SiameseHead` returns: three L2-normalised embeddings in one shared space.

    Attributes:
        image: (B, D) refined image embeddings (zero rows where the image is missing).
        text: (B, D) refined text embeddings (zero rows where the text is missing).
        fused: (B, D) fused embeddings (the [FUSE] token's output).
    """

    image: Tensor
    text: Tensor
    fused: Tensor

    def as_dict(self) -> dict[str, Tensor]:
        """The ``{"image", "text", "fused"}`` mapping that the Siamese losses take."""
        return {"image": self.image, "text": self.text, "fused": self.fused}


@dataclass(frozen=True)
class _Config:
    image_dim: int
    text_dim: int
    width: int
    depth: int
    heads: int
    dropout: float
    out_dim: int


class SiameseHead(nn.Module):
    """Transformer head over ``[FUSE, image, text]`` tokens built from frozen CLIP-family embeddings.

    One module is applied to every item of a pair or triplet, which is what makes it Siamese: the weights
    are shared by construction.

    Args:
        image_dim: dimension Fi of the input image embeddings.
        text_dim: dimension Ft of the input text embeddings.
        width: transformer width (token dimension).
        depth: number of transformer encoder layers.
        heads: attention heads; must divide ``width``.
        dropout: dropout inside the encoder layers (active in ``train()`` mode only).
        out_dim: output embedding dimension D; None keeps ``width``.

    Shapes:
        image: (B, Fi), text: (B, Ft), has_image / has_text: (B,) bool -> each output (B, D).

    Example:
        >>> from cliptune.losses.siamese import siamese_objective
        >>> head = SiameseHead(image_dim=512, text_dim=384, width=64, depth=2)
        >>> img, txt = torch.randn(3, 4, 512), torch.randn(3, 4, 384)  # 4 triplets' frozen embeddings
        >>> anchor = head(img[0], txt[0])      # the same weights ...
        >>> positive = head(img[1], txt[1])    # ... applied to each item
        >>> negative = head(img[2], txt[2])
        >>> loss = siamese_objective(anchor.as_dict(), positive.as_dict(), negative.as_dict())["loss"]
        >>> anchor.fused.shape, loss.ndim
        (torch.Size([4, 64]), 0)
    """

    def __init__(
        self,
        image_dim: int,
        text_dim: int,
        width: int = 256,
        depth: int = 2,
        heads: int = 4,
        dropout: float = 0.1,
        out_dim: int | None = None,
    ) -> None:
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"SiameseHead: width ({width}) must be divisible by heads ({heads})")
        for name, value in (
            ("image_dim", image_dim),
            ("text_dim", text_dim),
            ("width", width),
            ("depth", depth),
        ):
            if value < 1:
                raise ValueError(f"SiameseHead: {name} must be >= 1, got {value}")
        self._config = _Config(image_dim, text_dim, width, depth, heads, float(dropout), out_dim or width)
        self.image_proj = nn.Linear(image_dim, width)
        self.text_proj = nn.Linear(text_dim, width)
        self.fuse_token = nn.Parameter(torch.randn(width) * 0.02)
        self.modality = nn.Parameter(torch.randn(2, width) * 0.02)  # row 0 image, row 1 text
        layer = nn.TransformerEncoderLayer(
            d_model=width,
            nhead=heads,
            dim_feedforward=4 * width,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.out_proj = nn.Linear(width, self._config.out_dim)

    @property
    def out_dim(self) -> int:
        """Dimension D of every output embedding."""
        return self._config.out_dim

    def forward(
        self,
        image: Tensor,
        text: Tensor,
        *,
        has_image: Tensor | None = None,
        has_text: Tensor | None = None,
    ) -> SiameseOutput:
        """Refine and fuse one batch of items.

        Args:
            image: (B, Fi) frozen image embeddings (any values where ``has_image`` is False).
            text: (B, Ft) frozen text embeddings (any values where ``has_text`` is False).
            has_image: (B,) bool, False for text-only items; None means every item has an image.
            has_text: (B,) bool, False for image-only items; None means every item has a text.

        Returns:
            A :class:`SiameseOutput` of (B, D) L2-normalised embeddings; the embedding of a missing
            modality is a zero row.

        Raises:
            ValueError: shapes do not match the configured dims, or an item has neither image nor text.
        """
        cfg = self._config
        if image.ndim != 2 or image.shape[1] != cfg.image_dim:
            raise ValueError(f"SiameseHead: image must be (B, {cfg.image_dim}), got {tuple(image.shape)}")
        if text.ndim != 2 or text.shape != (image.shape[0], cfg.text_dim):
            raise ValueError(
                f"SiameseHead: text must be ({image.shape[0]}, {cfg.text_dim}), got {tuple(text.shape)}"
            )
        b = image.shape[0]
        ones = torch.ones(b, dtype=torch.bool, device=image.device)
        img_ok = ones if has_image is None else has_image.to(image.device, torch.bool)  # (B,)
        txt_ok = ones if has_text is None else has_text.to(image.device, torch.bool)  # (B,)
        # torch.export cannot branch on values; the ONNX export (cliptune.export.graphs) builds its own masks
        if not torch.compiler.is_exporting() and not bool((img_ok | txt_ok).all()):
            bad = torch.nonzero(~(img_ok | txt_ok)).flatten().tolist()
            raise ValueError(f"SiameseHead: items {bad} of the batch have neither an image nor a text")

        img_tok = self.image_proj(image) + self.modality[0]  # (B, W)
        txt_tok = self.text_proj(text) + self.modality[1]  # (B, W)
        fuse_tok = self.fuse_token.expand(b, -1)  # (B, W)
        tokens = torch.stack([fuse_tok, img_tok, txt_tok], dim=1)  # (B, 3, W)
        padding = None
        if has_image is not None or has_text is not None:
            padding = torch.stack([ones, img_ok, txt_ok], dim=1).logical_not()  # (B, 3), True = ignore
        hidden = self.norm(self.encoder(tokens, src_key_padding_mask=padding))  # (B, 3, W)
        out = F.normalize(self.out_proj(hidden), dim=-1)  # (B, 3, D)
        return SiameseOutput(
            image=out[:, 1] * img_ok.unsqueeze(1),
            text=out[:, 2] * txt_ok.unsqueeze(1),
            fused=out[:, 0],
        )

    def save(self, directory: Path | str) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created), atomically per file.

        Args:
            directory: target folder, e.g. ``runs/<name>/model/siamese``.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"format": _FORMAT, **asdict(self._config)}
        # The head shares no tensors, so its state dict serialises to the bytes safetensors' save_model writes.
        weights = safetensors_bytes(
            {k: v.detach().contiguous() for k, v in self.state_dict().items()}, metadata={"format": _FORMAT}
        )
        write_bytes_atomic(directory / _WEIGHTS_FILE, weights)
        write_text_atomic(directory / _CONFIG_FILE, json.dumps(config, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path | str, device: torch.device | str = "cpu") -> SiameseHead:
        """Rebuild a head written by :meth:`save`, bit for bit.

        Args:
            directory: folder holding ``config.json`` and ``model.safetensors``.
            device: where to place the weights.

        Returns:
            The head in eval mode.

        Raises:
            FileNotFoundError: a file is missing (named).
            ValueError: the config is not a Siamese head config (names the file and field).
            WeightsMismatchError: the weights miss a key, have an extra one or another shape (a
                ``BackboneError``, itself a ``ValueError``; names the keys and the file).
        """
        directory = Path(directory)
        config_path, weights_path = directory / _CONFIG_FILE, directory / _WEIGHTS_FILE
        for p in (config_path, weights_path):
            if not p.is_file():
                raise FileNotFoundError(f"SiameseHead.load: missing {p}")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if config.pop("format", None) != _FORMAT:
            raise ValueError(f"{config_path}: field 'format' is not {_FORMAT!r}; not a Siamese head")
        try:
            head = cls(**config)
        except TypeError as e:
            raise ValueError(f"{config_path}: bad fields: {e}") from e
        load_state_strict(head, read_state(weights_path), weights_path)
        return head.to(device).eval()
