"""The search package's base error, in its own module so that every search module can raise it."""

from __future__ import annotations

from cliptune.errors import CliptuneError

__all__ = ["SearchIndexError"]


class SearchIndexError(CliptuneError, ValueError):
    """A problem building, loading or querying an index; the message names the folder and the reason."""
