"""Symmetric InfoNCE (the CLIP loss) with a fixed or learned, clamped temperature."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cliptune.losses._checks import ExtraImages, Reduction, check_reduction, check_same_batch, extra_negatives
from cliptune.losses.distributed import gather_with_grad, rank_and_world_size
from cliptune.losses.similarity_init import DEFAULT_TEMPERATURE

__all__ = ["InfoNCELoss", "info_nce"]


def _directional_ce(
    img_q: torch.Tensor,
    txt_q: torch.Tensor,
    img_k: torch.Tensor,
    txt_k: torch.Tensor,
    scale: torch.Tensor | float,
    offset: int,
    reduction: Reduction = "mean",
    extra: ExtraImages | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CE of local query rows against all keys (mean, or per row); the positive of row i is key ``offset + i``.

    ``extra`` (normalised images, mask) adds columns to the captions' rows only: negatives, never queries.
    """
    labels = torch.arange(img_q.shape[0], device=img_q.device) + offset  # (b,)
    logits_i2t = scale * img_q @ txt_k.T  # (b, N)
    logits_t2i = scale * txt_q @ img_k.T  # (b, N)
    if extra is not None:
        extra_logits = (scale * txt_q @ extra[0].T).masked_fill(~extra[1], float("-inf"))  # (b, M)
        logits_t2i = torch.cat([logits_t2i, extra_logits], dim=1)  # (b, N + M)
    return F.cross_entropy(logits_i2t, labels, reduction=reduction), F.cross_entropy(
        logits_t2i, labels, reduction=reduction
    )


def info_nce(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    temperature: float | torch.Tensor,
    reduction: Reduction = "mean",
    extra_image: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE: each image must pick its own caption among the batch, and vice versa.

    Also known as the CLIP loss, NT-Xent, or MultipleNegativesRankingLoss (symmetric). Embeddings are
    L2-normalised, ``logits = image @ text.T / temperature``, and the loss is the mean of
    ``cross_entropy(logits, arange(B))`` and ``cross_entropy(logits.T, arange(B))``: every other item
    of the batch is a negative, so larger batches give harder, more informative negatives.

    Args:
        image_emb: image embeddings, row i paired with ``text_emb[i]``; any scale (normalised here).
        text_emb: text embeddings.
        temperature: softmax temperature (> 0), a float or a 0-d tensor (e.g. a learned one); lower
            values sharpen the distribution and weight hard negatives more.
        reduction: ``"mean"`` (the loss) or ``"none"``: per pair i, the mean of its image's and its
            caption's cross-entropy against the batch, so evaluation can resample and pair the pairs;
            its mean is the loss.
        extra_image: hard negatives (mined images) added as extra candidates of every caption: the
            text-to-image softmax runs over ``B + M`` images, each caption's positive still its own image;
            they are no queries, so image-to-text is unchanged.
        extra_mask: which caption may use which extra image (False: left out of that caption's softmax,
            e.g. an extra image of the caption's own group); None: all.

    Returns:
        The loss, a 0-d tensor (``log(B)`` for uninformative embeddings), or the (B,) per-pair terms.

    Shapes:
        image_emb, text_emb: (B, D), extra_image (M, D), extra_mask (B, M) -> () or (B,)

    Example:
        >>> x = torch.eye(2)
        >>> round(info_nce(x, x, 1.0).item(), 4)  # log(1 + e^-1)
        0.3133
    """
    check_same_batch("info_nce", image_emb=image_emb, text_emb=text_emb)
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"info_nce: temperature must be > 0, got {temperature}")
    check_reduction("info_nce", reduction)
    img = F.normalize(image_emb, dim=-1)  # (B, D)
    txt = F.normalize(text_emb, dim=-1)  # (B, D)
    extra = extra_negatives(extra_image, extra_mask, img.shape[0], img.shape[1], "info_nce")
    i2t, t2i = _directional_ce(img, txt, img, txt, 1.0 / temperature, 0, reduction, extra)
    return (i2t + t2i) / 2


class InfoNCELoss(nn.Module):
    """Symmetric InfoNCE as a module, with optional learned temperature and cross-process negatives.

    A learned temperature is log-parametrised like CLIP: the parameter is
    ``logit_scale = log(1 / temperature)`` and the scale used is ``exp(logit_scale)``. Before every
    forward the parameter is clamped in place to ``log(max_logit_scale)`` (CLIP clamps it to log 100
    after each optimiser step), so the scale never exceeds ``max_logit_scale`` while the gradient can
    still pull it back down. A fixed temperature is used as given.

    With ``gather=True`` and several processes, each process scores its local rows against the
    embeddings of the whole global batch (see :mod:`cliptune.losses.distributed`): the mean of the losses over
    processes equals the single-process full-batch loss, and so do the DDP-averaged gradients.

    Call: ``forward(image_emb, text_emb, extra_image=None, extra_mask=None)`` with (B, D) tensors, row i of
    each a positive pair; ``extra_image`` (M, D) are hard negatives of every caption (see :func:`info_nce`),
    this process's own (not gathered). Returns ``{"loss", "i2t", "t2i", "temperature"}``: ``loss = (i2t + t2i) / 2``, ``i2t`` the
    image-to-text cross-entropy over local rows, ``t2i`` the reverse, and ``temperature`` (detached)
    the value used, for logging.

    Args:
        temperature: the fixed temperature, or the initial one when learned (CLIP: 0.07).
        learn_temperature: learn ``logit_scale`` as a parameter.
        max_logit_scale: upper bound on ``1 / temperature`` when learned (CLIP: 100).
        gather: use negatives from every process when torch.distributed runs several.

    Example:
        >>> loss_fn = InfoNCELoss(temperature=0.07, learn_temperature=True)
        >>> out = loss_fn(torch.randn(8, 32), torch.randn(8, 32))
        >>> sorted(out)
        ['i2t', 'loss', 't2i', 'temperature']
    """

    DEFAULT_MAX_LOGIT_SCALE = 100.0
    """CLIP's bound on the learned scale ``1 / temperature``."""

    def __init__(
        self,
        temperature: float = DEFAULT_TEMPERATURE,
        learn_temperature: bool = False,
        max_logit_scale: float = DEFAULT_MAX_LOGIT_SCALE,
        gather: bool = True,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"InfoNCELoss: temperature must be > 0, got {temperature}")
        if learn_temperature and 1.0 / temperature > max_logit_scale:
            raise ValueError(
                f"InfoNCELoss: initial scale 1/temperature = {1.0 / temperature:g} exceeds "
                f"max_logit_scale = {max_logit_scale:g}"
            )
        self.learn_temperature = learn_temperature
        self.max_logit_scale = max_logit_scale
        self.gather = gather
        self.temperature = temperature
        if learn_temperature:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    def _scale(self) -> torch.Tensor | float:
        if not self.learn_temperature:
            return 1.0 / self.temperature
        # .data: keep the parameter in range without touching autograd's version counter.
        self.logit_scale.data.clamp_(max=math.log(self.max_logit_scale))
        return self.logit_scale.exp()

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
            ``{"loss", "i2t", "t2i", "temperature"}``, 0-d tensors.

        Shapes:
            image_emb, text_emb: (b, D) local rows; extra_image (M, D); extra_mask (b, M).
        """
        check_same_batch("InfoNCELoss", image_emb=image_emb, text_emb=text_emb)
        scale = self._scale()
        img = F.normalize(image_emb, dim=-1)  # (b, D)
        txt = F.normalize(text_emb, dim=-1)  # (b, D)
        extra = extra_negatives(extra_image, extra_mask, img.shape[0], img.shape[1], "InfoNCELoss")
        rank, world = rank_and_world_size()
        if self.gather and world > 1:
            i2t, t2i = _directional_ce(
                img,
                txt,
                gather_with_grad(img),
                gather_with_grad(txt),
                scale,
                rank * img.shape[0],
                extra=extra,
            )
        else:
            i2t, t2i = _directional_ce(img, txt, img, txt, scale, 0, extra=extra)
        temperature = torch.as_tensor(1.0 / scale, device=img.device).detach()
        return {"loss": (i2t + t2i) / 2, "i2t": i2t, "t2i": t2i, "temperature": temperature}
