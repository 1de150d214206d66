"""What trains: ``trainable_layers`` (same meaning for every backbone), LoRA adapters, counting.

``trainable_layers`` semantics, identical for every backbone (the per-backbone module lists are in
``docs/models.md``):

* ``-1``: every parameter that ``encode_*`` uses trains (the source model's similarity
  parameters and unused classifier layers stay frozen: nothing would give them a gradient).
* ``0``: only the heads train; the features are frozen and can be cached.
* ``N > 0``: the last ``N`` blocks of each tower, the tower's final norms and the heads train.
  ``N`` larger than a tower's depth trains all its blocks, but never its embeddings or stem
  (that is what ``-1`` is for).

LoRA (``apply_lora``) is the alternative to unfreezing blocks: the tower weights stay frozen,
adapters are injected into the towers with peft, and the heads keep training.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from torch import nn

from cliptune.models.backbone import Backbone, BackboneError

__all__ = ["LoraSpec", "apply_lora", "apply_trainable_layers", "count_parameters", "merged_copy"]

_M = TypeVar("_M", bound=nn.Module)  # merged_copy returns a copy of the same class


@dataclass(frozen=True)
class LoraSpec:
    """LoRA adapter settings.

    Attributes:
        r: Rank of the update ``B @ A``.
        alpha: Scale numerator; the update is scaled by ``alpha / r``.
        dropout: Dropout on the adapter input during training.
        target_modules: Names (last component) of the Linear/Conv2d modules to adapt inside the
            towers; None uses each backbone's default (``q_proj``/``v_proj`` for CLIP/SigLIP,
            ``query``/``value`` for BERT, the 1x1 convs of EfficientNet blocks).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.r < 1:
            raise BackboneError(f"lora.r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise BackboneError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise BackboneError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None:
            # JSON round trips give lists; a frozen dataclass must hold a hashable tuple.
            object.__setattr__(self, "target_modules", tuple(self.target_modules))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (``LoraSpec(**d)`` rebuilds it)."""
        data = asdict(self)
        data["target_modules"] = None if self.target_modules is None else list(self.target_modules)
        return data


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """Count parameters, each shared tensor once.

    Args:
        module: Any module.

    Returns:
        ``(trainable, total)`` element counts.

    Example:
        >>> count_parameters(nn.Linear(3, 2).requires_grad_(False)), count_parameters(nn.Linear(3, 2))
        ((0, 8), (8, 8))
    """
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def apply_trainable_layers(backbone: Backbone, n: int) -> Backbone:
    """Set ``requires_grad`` so that exactly the parts named by ``trainable_layers = n`` train.

    Args:
        backbone: Any backbone; modified in place.
        n: -1 (everything), 0 (heads only) or N > 0 (last N blocks per tower + final norms +
            heads). With LoRA applied only 0 is allowed (adapters and heads keep training).

    Returns:
        The same backbone, with frozen sub-modules kept in eval mode.

    Raises:
        BackboneError: ``n < -1``, or ``n != 0`` on a backbone with LoRA.
    """
    if not isinstance(n, int) or n < -1:
        raise BackboneError(f"trainable_layers must be -1, 0 or a positive int, got {n!r}")
    if backbone.lora is not None and n != 0:
        raise BackboneError(f"trainable_layers={n} cannot be combined with LoRA; LoRA needs 0")
    backbone.requires_grad_(n == -1)
    if n > 0:
        for tower in backbone.towers():
            for module in [*tower.blocks[-n:], *tower.final]:
                module.requires_grad_(True)
    for head in backbone.heads():
        head.requires_grad_(True)
    if backbone.lora is not None:
        for name, param in backbone.named_parameters():
            param.requires_grad_("lora_" in name)
        for head in backbone.heads():
            head.requires_grad_(True)
    for param in backbone._unused_parameters():
        param.requires_grad_(False)
    backbone.trainable_layers = n
    backbone.train(backbone.training)
    return backbone


def apply_lora(backbone: Backbone, spec: LoraSpec) -> Backbone:
    """Inject LoRA adapters into both towers; freeze the tower weights, keep the heads trainable.

    Args:
        backbone: Any backbone without LoRA; modified in place.
        spec: Rank, alpha, dropout and target module names.

    Returns:
        The same backbone; ``features_frozen`` is now False.

    Raises:
        BackboneError: LoRA already applied, or no target module found in any tower (targets
            are matched per tower; a tower with none of them keeps its weights frozen).

    Example:
        >>> backbone = apply_lora(backbone, LoraSpec(r=4, alpha=8))
        >>> backbone.lora is not None
        True
    """
    from peft import LoraConfig, inject_adapter_in_model

    if backbone.lora is not None:
        raise BackboneError("LoRA is already applied to this backbone")
    apply_trainable_layers(backbone, 0)
    adapted = 0
    for tower in backbone.towers():
        targets = spec.target_modules or tower.lora_targets
        if tower.body is None or not targets:
            continue
        names = [
            name
            for name, module in tower.body.named_modules()
            if name.rsplit(".", 1)[-1] in targets and isinstance(module, (nn.Linear, nn.Conv2d))
        ]
        if names:  # a tower without any of the targets keeps its weights frozen
            config = LoraConfig(
                r=spec.r,
                # peft annotates lora_alpha as int, but only divides by it (scaling = alpha / r); the float
                # LoraSpec.alpha is passed unchanged, as before
                lora_alpha=spec.alpha,  # type: ignore[arg-type]
                lora_dropout=spec.dropout,
                target_modules=names,
            )
            inject_adapter_in_model(config, tower.body)
            adapted += 1
    if adapted == 0:
        raise BackboneError(
            f"LoRA: no Linear/Conv2d module named {list(spec.target_modules or ())} in any tower "
            f"of this {backbone.kind} backbone"
        )
    backbone.lora = spec
    return apply_trainable_layers(backbone, 0)


def merged_copy(module: _M) -> _M:
    """A deep copy of ``module`` with every LoRA adapter merged into its base layer and removed.

    Used to save plain transformers checkpoints of LoRA-tuned models (merging changes the float
    rounding, so cliptune itself restores the unmerged weights).

    Args:
        module: A module that may contain peft LoRA layers.

    Returns:
        A copy without peft layers; the original is untouched.
    """
    from peft.tuners.lora import LoraLayer

    merged = copy.deepcopy(module)
    for name, child in list(merged.named_modules()):
        if isinstance(child, LoraLayer):
            child.merge()
            parent_name, _, attr = name.rpartition(".")
            parent = merged.get_submodule(parent_name) if parent_name else merged
            setattr(parent, attr, child.get_base_layer())
    return merged
