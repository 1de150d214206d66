"""A search hit as the API returns it: the :class:`cliptune.search.Hit` fields plus the URL of its image.

Item ids are catalogue file names and may hold ``/``, spaces or ``#``: the URL quotes every character
but ``/`` so the browser asks for exactly the id, and ``GET /images/{id}`` looks the id up, never a path.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any
from urllib.parse import quote

from cliptune.search.query import Hit

__all__ = ["hit_json", "image_url"]


def image_url(item_id: str) -> str:
    """``/images/<id>``, percent-encoded except for ``/``.

    Example:
        >>> image_url("images/a b#1.png")
        '/images/images/a%20b%231.png'
    """
    return "/images/" + quote(item_id, safe="/")


def hit_json(hit: Hit) -> dict[str, Any]:
    """``{"rank", "id", "score", "caption", "attributes", "image_url"}`` of one hit."""
    return {**asdict(hit), "image_url": image_url(hit.id)}
