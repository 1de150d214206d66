"""Where a loss's similarity starts: the config's value, the backbone's pretrained one, or the default.

A pretrained dual encoder learned its similarity together with its towers (CLIP: ``logit_scale``, the log of
1 / temperature; SigLIP: ``logit_scale`` and ``logit_bias``). Fine-tuning from the towers but restarting the
similarity at a textbook default changes the loss at step 0 for no reason; starting from the pretrained value
makes step 0's loss the model's own. A value set in the config always wins, and a backbone without a
pretrained similarity (the offline ``embedded`` towers) gets the documented default, so its numbers do not
change. A similarity is taken over only when its form fits the loss: a softmax one (``logit_scale`` and no
``logit_bias``) for InfoNCE, a sigmoid one (both) for SigLIP.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = [
    "DEFAULT_SIGLIP_BIAS",
    "DEFAULT_SIGLIP_SCALE",
    "DEFAULT_TEMPERATURE",
    "SOURCES",
    "initial_siglip",
    "initial_temperature",
]

DEFAULT_TEMPERATURE = 0.07
"""InfoNCE temperature without a config value or a pretrained softmax similarity (CLIP's initialisation)."""
DEFAULT_SIGLIP_SCALE = 10.0
"""SigLIP multiplier (not its log) without a config value or a pretrained sigmoid similarity."""
DEFAULT_SIGLIP_BIAS = -10.0
"""SigLIP bias without a config value or a pretrained sigmoid similarity."""

SOURCES = ("config", "pretrained", "default")
"""Where a starting value can come from: set in the config, the backbone's pretrained similarity, the default."""


def initial_temperature(
    configured: float | None,
    similarity_init: Mapping[str, float],
    max_logit_scale: float | None = None,
) -> tuple[float, str]:
    """The InfoNCE temperature to start from, and where it came from.

    Args:
        configured: ``loss.temperature``; None means "not set".
        similarity_init: ``Backbone.similarity_init`` (``logit_scale`` and maybe ``logit_bias``, as floats).
        max_logit_scale: when the temperature is learned, its scale bound: a pretrained scale above it is
            clamped to it, as the learned parameter would be at its first forward (CLIP's own 100).

    Returns:
        ``(temperature, source)``: the configured value (``"config"``); else ``1 / exp(logit_scale)`` of a
        softmax similarity, one without ``logit_bias`` (``"pretrained"``); else 0.07 (``"default"``).

    Example:
        >>> temperature, source = initial_temperature(None, {"logit_scale": math.log(100.0)})
        >>> round(temperature, 12), source
        (0.01, 'pretrained')
        >>> initial_temperature(0.05, {"logit_scale": math.log(100.0)})
        (0.05, 'config')
    """
    if configured is not None:
        return configured, "config"
    if "logit_scale" in similarity_init and "logit_bias" not in similarity_init:
        scale = math.exp(similarity_init["logit_scale"])
        if max_logit_scale is not None:
            scale = min(scale, max_logit_scale)
        return 1.0 / scale, "pretrained"
    return DEFAULT_TEMPERATURE, "default"


def initial_siglip(
    scale: float | None, bias: float | None, similarity_init: Mapping[str, float]
) -> tuple[float, float, dict[str, str]]:
    """The SigLIP multiplier and bias to start from, and where each came from.

    Each value is resolved on its own: the configured one, else the backbone's sigmoid similarity (one with
    both ``logit_scale`` and ``logit_bias``), else SigLIP's initialisation (scale 10, bias -10).

    Args:
        scale: ``loss.siglip_scale``, the multiplier itself (not its log); None means "not set".
        bias: ``loss.siglip_bias``; None means "not set".
        similarity_init: ``Backbone.similarity_init``.

    Returns:
        ``(scale, bias, {"scale": source, "bias": source})`` with ``scale = exp(logit_scale)`` when pretrained.

    Example:
        >>> initial_siglip(None, None, {})
        (10.0, -10.0, {'scale': 'default', 'bias': 'default'})
        >>> initial_siglip(None, -5.0, {"logit_scale": 0.0, "logit_bias": -2.0})
        (1.0, -5.0, {'scale': 'pretrained', 'bias': 'config'})
    """
    sigmoid = "logit_scale" in similarity_init and "logit_bias" in similarity_init
    sources: dict[str, str] = {}
    if scale is not None:
        sources["scale"] = "config"
    elif sigmoid:
        scale, sources["scale"] = math.exp(similarity_init["logit_scale"]), "pretrained"
    else:
        scale, sources["scale"] = DEFAULT_SIGLIP_SCALE, "default"
    if bias is not None:
        sources["bias"] = "config"
    elif sigmoid:
        bias, sources["bias"] = similarity_init["logit_bias"], "pretrained"
    else:
        bias, sources["bias"] = DEFAULT_SIGLIP_BIAS, "default"
    return scale, bias, sources
