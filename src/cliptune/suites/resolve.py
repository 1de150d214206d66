"""Check a suite against a catalogue and turn every query's selectors into item masks.

This is the second validation pass (the first, structural one is :func:`cliptune.suites.schema.load_suite`):
every attribute, value and image id must exist in the catalogue, a query's relevant set must not be empty,
and a red item can be neither relevant nor yellow. All problems are reported at once, each with its
location. Yellow items that are also relevant count as relevant (a broad yellow filter such as "ripped
jeans of any colour" naturally contains the blue ones a "ripped blue jeans" query calls relevant).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cliptune.data.catalogue import Catalogue
from cliptune.suites.schema import Query, Suite, SuiteError, Thresholds
from cliptune.suites.selectors import CatalogueItems

__all__ = ["ResolvedQuery", "ResolvedSuite", "resolve_suite"]


@dataclass(frozen=True)
class ResolvedQuery:
    """A query with its effective settings and item masks over the catalogue's unique images.

    Attributes:
        category: Category name.
        query: The query as written.
        k: Effective cut-off (query, else category, else suite default).
        thresholds: Effective gates of the query's own pass/fail.
        relevant: (N,) bool, never empty.
        yellow: (N,) bool, disjoint from ``relevant`` and ``red``.
        red: (N,) bool, disjoint from ``relevant``.
        image_path: The query image file (image queries), else None.
        exclude: Item index of the query image when it is itself a catalogue item: it is left out of
            the query's ranking (it would trivially come first), else None.
    """

    category: str
    query: Query
    k: int
    thresholds: Thresholds
    relevant: np.ndarray
    yellow: np.ndarray
    red: np.ndarray
    image_path: Path | None
    exclude: int | None


@dataclass(frozen=True)
class ResolvedSuite:
    """A suite checked against a catalogue: items, per-category settings and resolved queries."""

    suite: Suite
    items: CatalogueItems
    category_k: dict[str, int]
    category_thresholds: dict[str, Thresholds]
    queries: list[ResolvedQuery]


def _query_image(
    items: CatalogueItems, query: Query, where: str, errors: list[str]
) -> tuple[Path | None, int | None]:
    if query.image is None:
        return None, None
    root = items.catalogue.root
    path = root / query.image
    if not path.is_file():
        errors.append(f"{where}.image: file not found: {path}")
        return None, None
    target = path.resolve()
    for image_id in (query.image, Path(query.image).as_posix()):
        i = items.index(image_id)
        if i is not None and items.catalogue.image_path(image_id).resolve() == target:
            return path, i
    return path, None


def _set_errors(
    items: CatalogueItems,
    where: str,
    relevant: np.ndarray,
    yellow: np.ndarray,
    red: np.ndarray,
    excluded: bool,
) -> list[str]:
    errors = []
    if not relevant.any():
        alone = " other than the query image itself" if excluded else ""
        errors.append(
            f"{where}.relevant: matches no image of the catalogue{alone}; a query needs >= 1 relevant image"
        )
    if (both := relevant & red).any():
        errors.append(f"{where}.red: {int(both.sum())} image(s) are also relevant: {items.names(both)}")
    if (both := yellow & red).any():
        errors.append(f"{where}.yellow: {int(both.sum())} image(s) are also red: {items.names(both)}")
    return errors


def _resolve_query(
    items: CatalogueItems, cat: str, i: int, query: Query, k: int, thresholds: Thresholds, errors: list[str]
) -> ResolvedQuery:
    where = f"categories.{cat}.queries[{i}]"
    image_path, exclude = _query_image(items, query, where, errors)
    masks, n_errors = {}, len(errors)
    for name in ("relevant", "yellow", "red"):
        mask, errs = items.select(getattr(query, name), f"{where}.{name}")
        errors += errs
        if exclude is not None:
            mask[exclude] = False
        masks[name] = mask
    relevant, yellow, red = masks["relevant"], masks["yellow"] & ~masks["relevant"], masks["red"]
    if len(errors) == n_errors:  # else the sets are wrong already: these checks would only echo that
        errors += _set_errors(items, where, relevant, yellow, red, exclude is not None)
    return ResolvedQuery(
        category=cat,
        query=query,
        k=query.k or k,
        thresholds=query.thresholds.apply(thresholds),
        relevant=relevant,
        yellow=yellow,
        red=red,
        image_path=image_path,
        exclude=exclude,
    )


def resolve_suite(suite: Suite, catalogue: Catalogue | CatalogueItems) -> ResolvedSuite:
    """Check every query of a suite against a catalogue and build its relevant / yellow / red masks.

    Args:
        suite: From :func:`cliptune.suites.schema.load_suite`.
        catalogue: The catalogue (or its :class:`CatalogueItems`, to reuse the parsed columns).

    Returns:
        The :class:`ResolvedSuite`; items are the catalogue's unique images (``file_name`` values, in order
        of first appearance), however many metadata rows each has.

    Raises:
        SuiteError: Every problem found, e.g. ``categories.rips.queries[2].relevant.garmet: unknown
            attribute 'garmet'; attributes: garment, colour, ...``.
    """
    items = catalogue if isinstance(catalogue, CatalogueItems) else CatalogueItems(catalogue)
    errors: list[str] = []
    category_k: dict[str, int] = {}
    category_thresholds: dict[str, Thresholds] = {}
    queries: list[ResolvedQuery] = []
    for cat, category in suite.categories.items():
        category_k[cat] = category.k or suite.defaults.k
        category_thresholds[cat] = category.thresholds.apply(suite.defaults.thresholds)
        for i, query in enumerate(category.queries):
            queries.append(
                _resolve_query(items, cat, i, query, category_k[cat], category_thresholds[cat], errors)
            )
    if errors:
        raise SuiteError(errors, f"against catalogue {items.catalogue.root}")
    return ResolvedSuite(suite, items, category_k, category_thresholds, queries)
