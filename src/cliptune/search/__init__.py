"""Search a catalogue by text or image: build a FAISS index with metadata, query it with attribute filters.

``build_index`` embeds the images with a trained model and saves them atomically; ``load_index`` reads an
index folder back; ``search`` embeds a query with the same model and returns ranked :class:`Hit` objects.
See ``docs/search.md``.
"""

from cliptune.search.index import SearchIndex, SearchIndexError, build_index, load_index
from cliptune.search.query import Hit, search, search_embeddings

__all__ = [
    "Hit",
    "SearchIndex",
    "SearchIndexError",
    "build_index",
    "load_index",
    "search",
    "search_embeddings",
]
