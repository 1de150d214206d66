"""WiSE-FT weight interpolation: ``theta(alpha) = (1 - alpha) * theta_pretrained + alpha * theta_finetuned``.

Weight-space ensembling (Wortsman et al., "Robust fine-tuning of zero-shot models", 2022) trades what
fine-tuning gained on the domain against what it made the model forget, with one number. This module owns
only the weights: which tensors move and how; evaluating each alpha is ``cliptune.report.wise``'s job.

Which tensors move: exactly those the pretrained state names (the run's ``model_init.safetensors``: the
trainable parameters and buffers of the untrained model); every other weight was frozen, so the fine-tuned
model already holds its pretrained value. LoRA adapters are not lerped factor by factor (``A`` and ``B``
both moving would make the update quadratic in alpha): ``A`` keeps its fine-tuned value and ``B``, which
peft starts at zero, is scaled by alpha, so the merged update is ``alpha * B A``, exactly the lerp of the
merged weights. Integer buffers (BatchNorm's batch counter) cannot be mixed: they take the nearer end.

``torch.lerp`` gives the ends exactly (alpha 0 returns the pretrained tensor, alpha 1 the fine-tuned one),
so alpha 0 reproduces the pretrained model's metrics and alpha 1 the fine-tuned model's, bit for bit.

Example:
    >>> pre = {"w": torch.zeros(2)}
    >>> interpolate_state(pre, {"w": torch.ones(2), "frozen": torch.ones(1)}, 0.25)
    {'w': tensor([0.2500, 0.2500]), 'frozen': tensor([1.])}
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor

from cliptune.models.backbone import Backbone, BackboneError

__all__ = ["InterpolationError", "interpolate_state", "interpolated_backbone"]

_LORA_A, _LORA_B = "lora_A", "lora_B"


class InterpolationError(BackboneError):
    """The two states cannot be interpolated: a key, shape or dtype differs, or a LoRA ``B`` did not start at 0.

    Attributes:
        key: The state key at fault.
    """

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        super().__init__(f"cannot interpolate weight {key!r}: {reason}")


def interpolate_state(
    pretrained: Mapping[str, Tensor], finetuned: Mapping[str, Tensor], alpha: float
) -> dict[str, Tensor]:
    """The fine-tuned state with every pretrained key moved to ``(1 - alpha) * pre + alpha * fine``.

    Args:
        pretrained: The weights training started from, for the keys training could change (others absent).
        finetuned: The fine-tuned model's whole state dict.
        alpha: 0 (pretrained) to 1 (fine-tuned); values outside extrapolate.

    Returns:
        A new state dict with the keys of ``finetuned``.

    Raises:
        InterpolationError: A pretrained key the fine-tuned state lacks, a shape or dtype mismatch, or a
            LoRA ``B`` that did not start at 0.
    """
    out = dict(finetuned)
    for key, start in pretrained.items():
        if key not in finetuned:
            raise InterpolationError(key, "the fine-tuned model has no such weight")
        end = finetuned[key]
        if start.shape != end.shape or start.dtype != end.dtype:
            raise InterpolationError(
                key,
                f"pretrained {tuple(start.shape)} {start.dtype} vs fine-tuned {tuple(end.shape)} {end.dtype}",
            )
        start = start.to(end.device)
        if not end.is_floating_point():
            out[key] = (start if alpha < 0.5 else end).clone()
        elif _LORA_A in key:
            out[key] = end.clone()  # the update is alpha * B A: A stays, B carries alpha
        elif _LORA_B in key:
            if bool(start.any()):
                raise InterpolationError(
                    key, "a LoRA B that did not start at zero (the update is not alpha * B A)"
                )
            out[key] = torch.lerp(start, end, alpha)  # = alpha * B exactly at both ends
        else:
            out[key] = torch.lerp(start, end, alpha)
    return out


def interpolated_backbone(finetuned: Backbone, pretrained: Mapping[str, Tensor], alpha: float) -> Backbone:
    """A copy of ``finetuned`` whose weights are :func:`interpolate_state` at ``alpha``.

    Args:
        finetuned: The fine-tuned backbone (left untouched).
        pretrained: Its starting weights for the keys training could change (``backbone.`` prefix removed).
        alpha: 0 (pretrained) to 1 (fine-tuned).

    Returns:
        The interpolated backbone in eval mode.

    Raises:
        InterpolationError: See :func:`interpolate_state`.
    """
    state = interpolate_state(pretrained, finetuned.state_dict(), alpha)
    model = copy.deepcopy(finetuned)
    model.load_state_dict(state, strict=True)
    return model.eval()
