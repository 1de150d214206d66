"""SigLIP pairwise sigmoid loss with learned scale and bias."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cliptune.losses._checks import ExtraImages, check_same_batch, extra_negatives
from cliptune.losses.distributed import gather_with_grad, rank_and_world_size
from cliptune.losses.similarity_init import DEFAULT_SIGLIP_BIAS, DEFAULT_SIGLIP_SCALE

__all__ = ["SigLIPLoss", "siglip"]


def _sigmoid_rows(
    img_q: torch.Tensor,
    txt_k: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    offset: int,
    extra: tuple[torch.Tensor, ExtraImages] | None = None,
) -> torch.Tensor:
    """Sum of -log sigmoid over local image rows vs all texts, divided by the local row count.

    ``extra`` (local texts, (normalised extra images, (b, M) mask)) adds one negative pair per usable
    (caption, extra image), still divided by the b rows: hard negatives add terms, not rows.
    """
    rows = img_q.shape[0]
    logits = logit_scale * img_q @ txt_k.T + logit_bias  # (b, N)
    signs = -torch.ones_like(logits)  # (b, N): -1 for every negative pair ...
    idx = torch.arange(rows, device=logits.device)
    signs[idx, idx + offset] = 1.0  # ... +1 where text offset + i is image i's caption
    total = -F.logsigmoid(signs * logits).sum()
    if extra is not None:
        txt_q, (images, mask) = extra
        extra_logits = logit_scale * txt_q @ images.T + logit_bias  # (b, M), all negatives
        total = total - torch.where(mask, F.logsigmoid(-extra_logits), 0.0).sum()
    return total / rows


def siglip(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    extra_image: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """SigLIP sigmoid loss: every (image, text) pair of the batch is an independent binary decision.

    ``loss = -sum_ij log sigmoid(z_ij * (logit_scale * cos_ij + logit_bias)) / B`` with ``z_ij = +1``
    on the diagonal (matching pairs) and ``-1`` elsewhere, ``cos`` the cosine similarity. Unlike
    InfoNCE there is no softmax over the batch, so the loss does not need the whole batch's negatives
    in one normaliser (cheap to shard) and behaves well at small batch sizes.

    ``logit_scale`` is the *multiplier itself*, already exponentiated, as in open_clip at call time
    (``SigLIPLoss`` holds its log and exponentiates it); SigLIP initialises it to 10 and the bias to
    -10, which starts the model predicting "no match" for the many negatives.

    Args:
        image_emb: image embeddings, row i paired with ``text_emb[i]`` (normalised here).
        text_emb: text embeddings.
        logit_scale: positive multiplier of the cosine similarities (not its log).
        logit_bias: additive bias of the logits.
        extra_image: hard negatives (mined images): each adds a "no match" pair with every caption that
            may use it, summed with the others and still divided by B.
        extra_mask: which caption may use which extra image; None: all.

    Returns:
        The loss, a 0-d tensor.

    Shapes:
        image_emb, text_emb: (B, D), extra_image (M, D), extra_mask (B, M) -> ()

    Example:
        >>> x = torch.eye(2)
        >>> round(siglip(x, x, 1.0, 0.0).item(), 4)  # 2 * (log(1 + e^-1) + log 2) / 2
        1.0064
    """
    check_same_batch("siglip", image_emb=image_emb, text_emb=text_emb)
    img = F.normalize(image_emb, dim=-1)  # (B, D)
    txt = F.normalize(text_emb, dim=-1)  # (B, D)
    extra = extra_negatives(extra_image, extra_mask, img.shape[0], img.shape[1], "siglip")
    return _sigmoid_rows(img, txt, logit_scale, logit_bias, 0, None if extra is None else (txt, extra))


class SigLIPLoss(nn.Module):
    """SigLIP loss as a module holding the learned ``logit_scale`` (a log) and ``logit_bias``.

    The multiplier used is ``exp(logit_scale)``; the defaults are SigLIP's initialisation
    (scale 10, bias -10). With ``gather=True`` and several processes, each process scores its local
    images against the texts of the whole global batch, dividing by its local row count, so the mean of
    the losses over processes is the full-batch loss (see :mod:`cliptune.losses.distributed`).

    Call: ``forward(image_emb, text_emb, extra_image=None, extra_mask=None)`` with (B, D) tensors, row i of
    each a positive pair; ``extra_image`` (M, D) are hard negatives of every local caption (see
    :func:`siglip`), this process's own. Returns ``{"loss", "scale", "bias"}``: ``scale`` and ``bias`` are the values used, detached,
    for logging.

    Args:
        init_logit_scale: initial log of the multiplier (SigLIP: log 10).
        init_logit_bias: initial bias (SigLIP: -10).
        learnable: learn scale and bias; otherwise they are fixed buffers.
        gather: use negatives from every process when torch.distributed runs several.

    Example:
        >>> out = SigLIPLoss()(torch.randn(8, 32), torch.randn(8, 32))
        >>> sorted(out)
        ['bias', 'loss', 'scale']
    """

    def __init__(
        self,
        init_logit_scale: float = math.log(DEFAULT_SIGLIP_SCALE),
        init_logit_bias: float = DEFAULT_SIGLIP_BIAS,
        learnable: bool = True,
        gather: bool = True,
    ) -> None:
        super().__init__()
        self.gather = gather
        scale, bias = torch.tensor(float(init_logit_scale)), torch.tensor(float(init_logit_bias))
        if learnable:
            self.logit_scale = nn.Parameter(scale)
            self.logit_bias = nn.Parameter(bias)
        else:
            self.register_buffer("logit_scale", scale)
            self.register_buffer("logit_bias", bias)

    def forward(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        extra_image: torch.Tensor | None = None,
        extra_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Compute the named terms; see the class docstring.

        Args:
            image_emb: local image embeddings.
            text_emb: local text embeddings, row i paired with ``image_emb[i]``.
            extra_image: extra negative images of every local caption (hard negatives), or None.
            extra_mask: which local caption may use which extra image; None: all.

        Returns:
            ``{"loss", "scale", "bias"}``, 0-d tensors.

        Shapes:
            image_emb, text_emb: (b, D) local rows; extra_image (M, D); extra_mask (b, M).
        """
        check_same_batch("SigLIPLoss", image_emb=image_emb, text_emb=text_emb)
        scale = self.logit_scale.exp()
        img = F.normalize(image_emb, dim=-1)  # (b, D)
        txt = F.normalize(text_emb, dim=-1)  # (b, D)
        found = extra_negatives(extra_image, extra_mask, img.shape[0], img.shape[1], "SigLIPLoss")
        extra = None if found is None else (txt, found)
        rank, world = rank_and_world_size()
        if self.gather and world > 1:
            txt_k = gather_with_grad(txt)
            loss = _sigmoid_rows(img, txt_k, scale, self.logit_bias, rank * img.shape[0], extra)
        else:
            loss = _sigmoid_rows(img, txt, scale, self.logit_bias, 0, extra)
        return {"loss": loss, "scale": scale.detach(), "bias": self.logit_bias.detach()}
