"""Generate a behavioural suite from a catalogue's attribute columns (``cliptune suite generate``).

A user with their own catalogue should not hand-write every query, relevant set and flag. The generator
writes one category per attribute and one per combination of attributes, one query per value (or per
value combination), and states relevant / yellow / red as attribute **selectors**, not id lists, so the
file stays readable and editable. The rules (those of the hand-written fashion suite, without its domain
knowledge):

- **relevant**: every queried attribute matches;
- **yellow** (similar, acceptable): all queried attributes but one match, and the one that differs is not
  the category's *tested* attribute. A category of one attribute has no yellow set (the only attribute
  that could differ is the tested one). In a combination category the tested attribute is the **first**
  of the combination, in attribute order: in ``garment+colour``, "blue jeans" has jeans of another
  colour as yellow and any other garment as red (a blue skirt is not what was asked for);
- **red** (wrong): the tested attribute has another value of the catalogue (a row with no value for it is
  neither: a missing value contradicts nothing).

Which queries: the value (combination)s present in the catalogue, most frequent on the counted images
first (ties in a seeded order), at most ``max_queries`` per category; any of those with fewer than
``min_relevant`` relevant images among the counted images (the held-out split when one is given) is
dropped and listed, because a gate on one or two images is noise. Thresholds are the schema's defaults
(the seed's); nothing is tuned to a model. Same catalogue, options and seed: same bytes.

Example:
    >>> cat = read_catalogue(Path("data/fashion"))  # doctest: +SKIP
    >>> gen = generate_suite(cat, combinations=2, seed=0)  # doctest: +SKIP
    >>> Path("suite.yaml").write_text(gen.yaml)  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cliptune.data.catalogue import Catalogue
from cliptune.errors import CliptuneError
from cliptune.suites.heldout import ALL, ranked_images
from cliptune.suites.phrases import Phrases
from cliptune.suites.schema import Thresholds
from cliptune.suites.selectors import CatalogueItems, canonical

__all__ = [
    "MAX_VALUES",
    "DroppedQuery",
    "GeneratedSuite",
    "SuiteGenerateError",
    "counted_items",
    "default_attributes",
    "generate_suite",
]

MAX_VALUES = 50  # more distinct values than this: an identifier or free text, not a category to query
_ID_NAMES = ("id", "uuid", "sku")


class SuiteGenerateError(CliptuneError, ValueError):
    """A suite cannot be generated: no usable attribute, an unknown or one-valued attribute, no query left.

    Attributes:
        catalogue: The catalogue folder.
        reason: What is wrong.
    """

    def __init__(self, catalogue: Path, reason: str) -> None:
        self.catalogue, self.reason = catalogue, reason
        super().__init__(f"{catalogue}: {reason}")


@dataclass(frozen=True)
class DroppedQuery:
    """A query left out of the suite, and why (too few relevant images, or an image on both sides)."""

    category: str
    text: str
    reason: str


@dataclass(frozen=True)
class GeneratedSuite:
    """A generated suite: the document, its YAML text, and what was left out.

    Attributes:
        document: The suite as plain data (what ``parse_suite`` accepts).
        yaml: The file's text, header comment included (deterministic for the inputs and seed).
        attributes: The attributes the categories are built from, in order.
        dropped: Queries left out, in category order.
        counted: Which images the relevant counts were taken on, in words.
        n_counted: How many.
    """

    document: dict[str, Any]
    yaml: str
    attributes: list[str]
    dropped: list[DroppedQuery]
    counted: str
    n_counted: int


def _is_id_like(name: str) -> bool:
    low = name.lower()
    return low in _ID_NAMES or any(low.endswith(f"_{n}") for n in _ID_NAMES)


def default_attributes(items: CatalogueItems) -> list[str]:
    """The attributes a suite is generated from when none are named, in catalogue column order.

    Rule: the catalogue's attribute columns (never ``file_name``, the caption, ``text_*``, ``group`` or
    ``split``) with 2 to :data:`MAX_VALUES` distinct values, except identifier-like columns: named ``id``,
    ``uuid``, ``sku`` or ending in ``_id`` / ``_uuid`` / ``_sku``, or with no value shared by two images.
    """
    out = []
    for name in items.catalogue.attributes:
        values = items.values(name)
        if not 2 <= len(values) <= MAX_VALUES or _is_id_like(name):
            continue
        if max(_item_counts(items, [name], None).values(), default=0) < 2:
            continue  # every value names one image: an identifier
        out.append(name)
    return out


def _choose_attributes(items: CatalogueItems, attributes: Sequence[str] | None) -> list[str]:
    root = items.catalogue.root
    if not items.catalogue.attributes:
        raise SuiteGenerateError(
            root, "the catalogue has no attribute columns (only file_name, caption, group or split)"
        )
    if attributes is None:
        chosen = default_attributes(items)
        if not chosen:
            raise SuiteGenerateError(
                root,
                f"no attribute column has 2 to {MAX_VALUES} distinct values shared by several images "
                f"(attributes: {', '.join(items.catalogue.attributes)})",
            )
        return chosen
    unknown = [a for a in attributes if a not in items.catalogue.attributes]
    if unknown:
        raise SuiteGenerateError(
            root,
            f"unknown attribute(s) {', '.join(repr(a) for a in unknown)}; "
            f"attributes: {', '.join(items.catalogue.attributes)}",
        )
    few = [a for a in attributes if len(items.values(a)) < 2]
    if few:
        raise SuiteGenerateError(
            root, f"attribute(s) {', '.join(repr(a) for a in few)} have fewer than 2 distinct values"
        )
    return list(dict.fromkeys(attributes))


def counted_items(
    catalogue: Catalogue, split: str | None, splits_from: Path | None
) -> tuple[str, list[str] | None]:
    """The images relevant sets are counted on, and how to say so.

    Args:
        catalogue: The catalogue.
        split: A split name, ``"all"`` or None. With ``splits_from``, None is the run's held-out split
            (as ``cliptune test`` ranks it); without, None and ``"all"`` are every image and a name is
            taken from the catalogue's ``split`` column.
        splits_from: A run whose ``splits.json`` says which images are in which split.

    Returns:
        ``(words, file_names)``; ``file_names`` is None for every image.

    Raises:
        SuiteGenerateError: A split named without a run and without a ``split`` column, or one with no rows.
        RankedSplitError: From the run's splits.
    """
    if splits_from is not None:
        ranked = ranked_images(splits_from, split, catalogue=catalogue.root, required=True)
        if ranked.items is None:
            return "every image", None
        return f"split {ranked.split} of {splits_from}", ranked.items
    if split is None or split == ALL:
        return "every image", None
    rows = catalogue.rows
    if "split" not in rows.columns:
        raise SuiteGenerateError(
            catalogue.root,
            f"split '{split}' asked for, but the catalogue has no split column and no run splits",
        )
    names = sorted({str(s) for s in rows["split"].dropna()})
    files = rows.loc[rows["split"].astype(str) == split, "file_name"].astype(str).unique().tolist()
    if not files:
        raise SuiteGenerateError(
            catalogue.root, f"no row has split '{split}' (splits in the column: {', '.join(names) or 'none'})"
        )
    return f"split {split} (the catalogue's split column)", files


def _item_counts(
    items: CatalogueItems, attributes: Sequence[str], counted: set[str] | None
) -> Counter[tuple[str, ...]]:
    """Images per value combination of ``attributes`` (an image counts once per combination its rows have)."""
    rows = items.catalogue.rows
    cols = [[canonical(v) for v in rows[a].tolist()] for a in attributes]
    seen: set[tuple[tuple[str, ...], str]] = set()
    for file_name, *values in zip(rows["file_name"].astype(str).tolist(), *cols, strict=True):
        if any(v is None for v in values) or (counted is not None and file_name not in counted):
            continue
        seen.add((tuple(str(v) for v in values), file_name))
    return Counter(combo for combo, _ in seen)


def _yaml_value(value: str) -> str | bool:
    """A canonical value as written in the suite (``true`` / ``false`` as YAML booleans)."""
    return {"true": True, "false": False}.get(value, value)


def _others(items: CatalogueItems, attribute: str, value: str) -> list[str | bool] | str | bool:
    """The attribute's other values: a list, or the one value itself (``rips: false``, not ``[false]``)."""
    others = [_yaml_value(v) for v in items.values(attribute) if v != value]
    return others[0] if len(others) == 1 else others


def _selectors(
    items: CatalogueItems, attrs: Sequence[str], values: Sequence[str]
) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """relevant, yellow, red of a query; ``attrs[0]`` is the tested attribute."""
    relevant = {a: _yaml_value(v) for a, v in zip(attrs, values, strict=True)}
    yellow_filters = []
    for i in range(1, len(attrs)):  # exactly one non-tested attribute differs
        flt: dict[str, Any] = dict(relevant)
        flt[attrs[i]] = _others(items, attrs[i], values[i])
        yellow_filters.append(flt)
    yellow: Any = (
        None if not yellow_filters else yellow_filters[0] if len(yellow_filters) == 1 else yellow_filters
    )
    red = {attrs[0]: _others(items, attrs[0], values[0])}
    return relevant, yellow, red


def _overlap(items: CatalogueItems, relevant: Any, yellow: Any, red: Any) -> bool:
    """An image on both sides (possible only when one image has rows with different attribute values)."""
    rel = items.select(relevant, "relevant")[0]
    red_mask = items.select(red, "red")[0]
    yel = items.select(yellow, "yellow")[0] & ~rel
    return bool((rel & red_mask).any() or (yel & red_mask).any())


def _phrase(phrases: Phrases, items: CatalogueItems, attribute: str, value: str, rng: random.Random) -> str:
    boolean = set(items.values(attribute)) <= {"true", "false"}
    return rng.choice(phrases.choices(attribute, value, boolean))


def _category(
    items: CatalogueItems,
    attrs: tuple[str, ...],
    order: list[str],
    phrases: Phrases,
    counted: set[str] | None,
    max_queries: int,
    min_relevant: int,
    seed: int,
) -> tuple[str, dict[str, Any] | None, list[DroppedQuery]]:
    name = "+".join(attrs)
    counts = _item_counts(items, attrs, counted)
    present = sorted(_item_counts(items, attrs, None))  # combinations that exist in the catalogue
    rng = random.Random(f"{seed}:order:{name}")
    rng.shuffle(present)  # seeded tie order, then a stable sort by frequency
    ranked = sorted(present, key=lambda combo: -counts[combo])[:max_queries]
    queries: list[dict[str, Any]] = []
    dropped: list[DroppedQuery] = []
    for values in ranked:
        qrng = random.Random(f"{seed}:text:{name}:{'|'.join(values)}")
        words = {a: _phrase(phrases, items, a, v, qrng) for a, v in zip(attrs, values, strict=True)}
        text = phrases.text(words, order)
        relevant, yellow, red = _selectors(items, attrs, values)
        if counts[values] < min_relevant:
            dropped.append(DroppedQuery(name, text, f"{counts[values]} relevant image(s)"))
        elif _overlap(items, relevant, yellow, red):
            dropped.append(DroppedQuery(name, text, "an image has rows on both sides of a flag"))
        else:
            qid = f"{name.replace('+', '-')}-{len(queries) + 1:02d}"
            queries.append({"id": qid, "text": text, "relevant": relevant, "yellow": yellow, "red": red})
    if not queries:
        return name, None, dropped
    others = ", ".join(attrs[1:])
    description = (
        f"{attrs[0]}: relevant = the value asked for; red = another value; no yellow (one attribute)."
        if len(attrs) == 1
        else f"{name}, tested attribute {attrs[0]}: relevant = all match; yellow = {attrs[0]} matches and "
        f"exactly one of {others} differs; red = another value of {attrs[0]}."
    )
    return name, {"description": description, "queries": queries}, dropped


def generate_suite(
    catalogue: Catalogue,
    *,
    attributes: Sequence[str] | None = None,
    combinations: int = 2,
    max_queries: int = 8,
    min_relevant: int = 2,
    seed: int = 0,
    phrases: Phrases | None = None,
    counted: tuple[str, list[str] | None] = ("every image", None),
    name: str | None = None,
) -> GeneratedSuite:
    """Build a behavioural suite from a catalogue's attributes (rules in the module docstring).

    Args:
        catalogue: The catalogue.
        attributes: Attributes to build categories from, in order (the order decides each combination's
            tested attribute: its first); None: :func:`default_attributes`.
        combinations: Largest combination size: 1 single attributes only, 2 also pairs, 3 also triples.
        max_queries: Queries per category at most (before dropping).
        min_relevant: Fewest relevant images (among ``counted``) a query keeps.
        seed: Orders ties between equally frequent values and picks synonyms.
        phrases: Value phrases and word order (:func:`cliptune.suites.phrases.load_phrases`).
        counted: ``(words, file_names)`` from :func:`counted_items`: the images relevant sets are counted on.
        name: The suite's name; default ``<catalogue folder>-generated``.

    Returns:
        The :class:`GeneratedSuite`.

    Raises:
        SuiteGenerateError: No attribute columns, an unknown or one-valued attribute, or no query left.
    """
    items = CatalogueItems(catalogue)
    attrs = _choose_attributes(items, attributes)
    phrases = phrases or Phrases()
    words, files = counted
    counted_set = None if files is None else set(files)
    n_counted = len(items.ids) if files is None else len(counted_set or ())
    categories: dict[str, Any] = {}
    dropped: list[DroppedQuery] = []
    for size in range(1, max(1, combinations) + 1):
        for combo in itertools.combinations(attrs, size):
            cat_name, category, lost = _category(
                items, combo, attrs, phrases, counted_set, max_queries, min_relevant, seed
            )
            dropped += lost
            if category is not None:
                categories[cat_name] = category
    if not categories:
        raise SuiteGenerateError(
            catalogue.root,
            f"no query has {min_relevant} or more relevant images among {words} ({n_counted} images)",
        )
    suite_name = name or f"{_slug(catalogue.root.name)}-generated"
    document = {
        "suite": suite_name,
        "description": f"Generated from the attributes {', '.join(attrs)} of {catalogue.root.name}: "
        "relevant = every queried attribute matches; yellow = all but one match, the one not the tested "
        "attribute; red = the tested attribute differs.",
        "defaults": {"k": 5, "yellow_gain": 0.5, "thresholds": Thresholds().model_dump()},
        "categories": categories,
    }
    header = [
        f"Behavioural suite generated by `cliptune suite generate` from {catalogue.root.name}/"
        f"{catalogue.metadata_path.name} (seed {seed}).",
        f"Attributes: {', '.join(attrs)}; combinations up to {max(1, combinations)}; at most {max_queries} "
        f"queries per category; relevant images counted on {words} ({n_counted} images), at least {min_relevant}.",
        "Tested attribute of a combination category: its first. Format and metrics: docs/suites.md.",
        f"Queries dropped ({len(dropped)}): "
        + ("; ".join(f"{d.category}: '{d.text}' ({d.reason})" for d in dropped) or "none"),
    ]
    return GeneratedSuite(document, _dump(document, header), attrs, dropped, words, n_counted)


def _slug(name: str) -> str:
    out = "".join(c if c.isalnum() or c in "._-" else "-" for c in name).strip("-.")
    return out or "catalogue"


def _flow(value: Any) -> str:
    text = yaml.safe_dump(
        value, default_flow_style=True, width=1_000_000, sort_keys=False, allow_unicode=True
    )
    return text.strip().removesuffix("...").strip()


def _dump(doc: dict[str, Any], header: list[str]) -> str:
    lines = [f"# {h}" for h in header]
    lines += [f"suite: {_flow(doc['suite'])}", f"description: {_flow(doc['description'])}", "defaults:"]
    lines += [f"  {key}: {_flow(value)}" for key, value in doc["defaults"].items()]
    lines.append("categories:")
    for name, cat in doc["categories"].items():
        lines += [f"  {_flow(name)}:", f"    description: {_flow(cat['description'])}", "    queries:"]
        for q in cat["queries"]:
            lines += [f"      - id: {_flow(q['id'])}", f"        text: {_flow(q['text'])}"]
            lines += [
                f"        {key}: {_flow(q[key])}"
                for key in ("relevant", "yellow", "red")
                if q[key] is not None
            ]
    return "\n".join(lines) + "\n"
