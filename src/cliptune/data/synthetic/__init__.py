"""Entry point for the embedded demo catalogues: a name -> renderer registry and `render_catalogue`.

The renderers live in `fashion.py` (product photos with visible attributes, incl. rips) and
`art.py` (abstract originals, their derivatives, triplets). See docs/synthetic.md.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cliptune.data.synthetic.art import render_art
from cliptune.data.synthetic.fashion import render_fashion

__all__ = ["CATALOGUES", "render_art", "render_catalogue", "render_fashion"]

CATALOGUES: dict[str, Callable[..., Path]] = {"fashion": render_fashion, "art": render_art}


def render_catalogue(
    kind: str, out: Path, n: int | None = None, seed: int = 0, progress: bool = False
) -> Path:
    """Render a demo catalogue by name into `out`.

    Args:
        kind: A key of `CATALOGUES` (`"fashion"` or `"art"`).
        out: Folder to write into (created if missing).
        n: Photos for fashion, originals for art; None takes the renderer's default (1500 / 200).
        seed: The same seed and `n` give byte-identical files.
        progress: Show a progress bar on stderr.

    Returns:
        The catalogue folder.

    Raises:
        ValueError: `kind` is not a registered catalogue.

    Example:
        >>> render_catalogue("fashion", Path("data/fashion"), n=4, seed=0)
        PosixPath('data/fashion')
    """
    if kind not in CATALOGUES:
        raise ValueError(f"unknown catalogue '{kind}'; known: {', '.join(sorted(CATALOGUES))}")
    kwargs: dict[str, object] = {"seed": seed, "progress": progress}
    if n is not None:
        kwargs["n"] = n
    return CATALOGUES[kind](Path(out), **kwargs)
