"""One error base for the whole library.

Library code raises a subclass of :class:`CliptuneError` that carries the facts (file, row, field, value,
step) in its message; only the CLI (``cliptune.cli``) turns it into a sentence about flags and an exit
code. A user catching ``CliptuneError`` catches every user-facing failure of cliptune and nothing else.
Each layer defines its own subclass next to its code (``CatalogueError`` in ``data/catalogue.py``,
``TrainingError`` in ``train/``), so a layer never imports a higher one to raise.
"""

from __future__ import annotations

__all__ = ["CliptuneError"]


class CliptuneError(Exception):
    """Base of every error cliptune raises for a user's input, files or state."""
