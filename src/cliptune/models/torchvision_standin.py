"""A stand-in ``torchvision`` for importing open_clip and timm where the real one cannot load.

open_clip and timm import torchvision at module level (transforms, ``ops.misc.FrozenBatchNorm2d``,
datasets), but their *model* code never calls it. PyPI's torchvision does not load beside the CPU
torch build, so on such machines :func:`standin_torchvision` puts small placeholder modules in
``sys.modules`` for the duration of an import and removes them afterwards: later code (transformers'
``is_torchvision_available`` among it) still sees torchvision as absent. cliptune preprocesses
images with PIL itself, so none of the placeholders is ever called.

Example:
    >>> with standin_torchvision():
    ...     import open_clip
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

__all__ = ["standin_torchvision"]

# The names open_clip 3.x and timm 1.x import from; each child is also set as an attribute of its parent.
_MODULES = (
    "torchvision",
    "torchvision.transforms",
    "torchvision.transforms.functional",
    "torchvision.transforms.v2",
    "torchvision.ops",
    "torchvision.ops.misc",
    "torchvision.datasets",
    "torchvision.io",
    "torchvision.utils",
)


class InterpolationMode(enum.Enum):
    """torchvision's interpolation names (timm builds lookup tables from them at import time)."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


class _Placeholder:
    """Any other imported name: a class that refuses to be used (model code never uses one)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            "cliptune imported open_clip/timm with a stand-in torchvision; this torchvision feature "
            "is not available"
        )


def _module(name: str) -> ModuleType:
    module = ModuleType(name)
    module.__path__ = []  # a package, so `import torchvision.x.y` resolves children from sys.modules
    module.InterpolationMode = InterpolationMode  # type: ignore[attr-defined]

    def __getattr__(attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        placeholder = type(attr, (_Placeholder,), {"__module__": name})
        setattr(module, attr, placeholder)
        return placeholder

    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    return module


def _torchvision_loads() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # ImportError, or PyPI's build failing beside the CPU torch (RuntimeError)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        return False
    return True


@contextmanager
def standin_torchvision() -> Iterator[bool]:
    """Make ``import torchvision`` succeed inside the block; a no-op when the real one loads.

    Yields:
        True when the stand-in is in place, False when the real torchvision is used.
    """
    if _torchvision_loads():
        yield False
        return
    modules = {name: _module(name) for name in _MODULES}
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(modules[parent], child, module)
    sys.modules.update(modules)
    try:
        yield True
    finally:
        for name in _MODULES:
            if sys.modules.get(name) is modules[name]:
                del sys.modules[name]
