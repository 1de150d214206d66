"""The ready behavioural suite of the synthetic fashion catalogue (``suite.yaml`` beside its metadata).

It asks what a fashion search user would ask, in the catalogue's caption vocabulary but not its
captions, over six categories: rips, styles (fit), garments, colours, patterns and combinations. Flags
follow what a shopper would accept: for "ripped blue jeans", ripped jeans of another colour are a yellow
flag (similar, acceptable) and intact jeans a red flag (does not match); for "oversized sweater" a
regular-fit sweater is yellow and other garments red. Near misses are the neighbouring garment (jeans /
shorts, t-shirt / sweater, jacket / coat, dress / skirt), neighbouring colours (red / orange / pink ...)
and neighbouring patterns (striped / checked, dotted / floral).

The queries of the first five categories are fixed; the combination queries are taken from the
products that exist in the catalogue (most photographed first), so the suite fits any render. A fixed
query whose relevant set would be empty in a (small) catalogue is left out and listed in the file's
header. Thresholds are the seed's (MRR > 0.3, precision >= 0.7, accuracy >= 0.8, recall >= 0.6) for every
category: nothing here is tuned to a model. The same metadata gives the same bytes.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from cliptune.data.synthetic.common import with_article
from cliptune.rundir import write_text_atomic

__all__ = ["SUITE_NAME", "fashion_suite", "write_fashion_suite"]

SUITE_NAME = "fashion-behaviour"
_Sel = dict[str, Any] | list[Any] | None
_Product = tuple[str, str, str, bool, str]  # garment, colour, pattern, rips, style
_UNCONSTRAINED = object()  # a pruned {not: [...]} whose values are all absent: the key constrains nothing

_SIBLING = {
    "jeans": "shorts",
    "shorts": "jeans",
    "t-shirt": "sweater",
    "sweater": "t-shirt",
    "jacket": "coat",
    "coat": "jacket",
    "dress": "skirt",
    "skirt": "dress",
}
_NEAR_COLOURS = {
    "red": ["orange", "pink"],
    "orange": ["red", "yellow", "brown"],
    "yellow": ["orange"],
    "green": [],
    "blue": ["purple"],
    "purple": ["blue", "pink"],
    "pink": ["red", "purple"],
    "brown": ["orange"],
    "black": ["grey"],
    "white": ["grey"],
    "grey": ["black", "white"],
}
_NEAR_PATTERNS = {"striped": ["checked"], "checked": ["striped"], "dotted": ["floral"], "floral": ["dotted"]}
_COLOUR_WORD = {"grey": "gray", "purple": "violet"}  # the caption synonyms, used on alternate queries
_PATTERN_WORD = {"striped": "striped", "checked": "plaid", "dotted": "polka-dot", "floral": "floral"}
_STYLE_WORD = {"slim": "slim-fit", "oversized": "oversized"}
_BOTTOM_STYLE_WORD = {"slim": "skinny", "oversized": "baggy"}
_PLURAL = {"jeans", "shorts"}

_RIPS = [  # (garment, ripped?, text)
    ("jeans", True, "ripped jeans"),
    ("jeans", True, "distressed denim jeans"),
    ("shorts", True, "torn denim shorts"),
    ("t-shirt", True, "ripped tee"),
    ("sweater", True, "jumper with tears"),
    ("jacket", True, "distressed zip jacket"),
    ("coat", True, "torn overcoat"),
    ("dress", True, "ripped summer dress"),
    ("skirt", True, "distressed skirt"),
    ("jeans", False, "undamaged jeans"),
    ("jacket", False, "pristine jacket"),
]
_STYLES = [  # (garment, style, text)
    ("sweater", "oversized", "oversized sweater"),
    ("jeans", "slim", "skinny jeans"),
    ("jeans", "oversized", "baggy jeans"),
    ("t-shirt", "oversized", "loose-fit t-shirt"),
    ("dress", "slim", "fitted dress"),
    ("coat", "oversized", "relaxed oversized coat"),
    ("jacket", "slim", "slim-fit jacket"),
    ("shorts", "oversized", "wide-leg shorts"),
    ("skirt", "slim", "slim skirt"),
]
_GARMENTS = [
    ("jeans", "a pair of jeans"),
    ("t-shirt", "a tee"),
    ("dress", "a dress"),
    ("jacket", "a zip jacket"),
    ("skirt", "an a-line skirt"),
    ("shorts", "shorts"),
    ("sweater", "a pullover"),
    ("coat", "a long coat"),
]
_COLOUR_TEMPLATES = ["{} clothes", "{} clothing", "a {} garment", "something {}"]
_PATTERNS = [
    ("striped", "striped clothes"),
    ("checked", "plaid clothing"),
    ("dotted", "polka-dot clothes"),
    ("floral", "flower-print clothing"),
    ("plain", "plain solid-colour clothes"),
]
_COLOURS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "grey"]
_DESCRIPTIONS = {
    "rips": "Rips and tears: the intact version of the garment is a red flag; the ripped neighbouring garment is yellow.",
    "styles": "Fit: the regular fit of the garment is yellow; the opposite fit and other garments are red.",
    "garments": "Garment type: the neighbouring garment is yellow; every other garment is red.",
    "colours": "Colour: neighbouring colours are yellow; every other colour is red.",
    "patterns": "Pattern: the neighbouring pattern is yellow; every other pattern is red.",
    "combinations": "Several attributes at once, for products that exist in the catalogue.",
}


def _read_products(catalogue_dir: Path) -> tuple[Counter[_Product], int, dict[str, set[str]]]:
    path = catalogue_dir / "metadata.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metadata.csv; render the catalogue first (render_fashion)")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    need = ("garment", "colour", "pattern", "rips", "style")
    if rows and not {"file_name", *need} <= set(rows[0]):
        raise ValueError(
            f"{path}: not a fashion catalogue; missing column(s) {sorted(set(need) - set(rows[0]))}"
        )
    photos = Counter(
        (r["garment"], r["colour"], r["pattern"], r["rips"] == "true", r["style"]) for r in rows
    )  # product attributes -> number of photos
    present = {key: {r[key] for r in rows} for key in need}
    return photos, len(rows), present


def _prune_value(value: Any, present: set[str]) -> Any:
    """A filter value restricted to values in the catalogue; None when it can match nothing."""
    if isinstance(value, dict):  # {not: [...]}: absent values exclude nothing
        kept = [v for v in value["not"] if v in present]
        return {"not": kept} if kept else _UNCONSTRAINED
    if isinstance(value, list):
        kept = [v for v in value if v in present]
        return kept or None
    return value if (str(value).lower() if isinstance(value, bool) else value) in present else None


def _prune(sel: _Sel, present: dict[str, set[str]]) -> _Sel:
    """A yellow/red selector without values absent from the catalogue (small renders lack some values)."""
    if sel is None:
        return None
    if isinstance(sel, list):
        kept = [f for f in (_prune(s, present) for s in sel) if f is not None]
        return kept or None
    out = {}
    for key, value in sel.items():
        pruned = _prune_value(value, present[key])
        if pruned is None:
            return None
        if pruned is not _UNCONSTRAINED:
            out[key] = pruned
    return out or None


def _present(photos: Counter[_Product], **want: Any) -> bool:
    keys = ("garment", "colour", "pattern", "rips", "style")
    return any(all(dict(zip(keys, p, strict=True))[k] == v for k, v in want.items()) for p in photos)


def _not(values: Iterable[str]) -> dict[str, list[str]]:
    return {"not": sorted(values)}


def _near(colour: str, colours: set[str]) -> list[str]:
    return [c for c in _NEAR_COLOURS.get(colour, []) if c in colours]


def _query(qid: str, text: str, relevant: _Sel, yellow: _Sel, red: _Sel) -> dict[str, Any]:
    return {"id": qid, "text": text, "relevant": relevant, "yellow": yellow, "red": red}


def _fixed(
    photos: Counter[_Product], present: dict[str, set[str]]
) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    cats: dict[str, list[dict[str, Any]]] = {
        c: [] for c in ("rips", "styles", "garments", "colours", "patterns")
    }
    skipped: list[str] = []

    def add(cat: str, text: str, exists: bool, relevant: _Sel, yellow: _Sel, red: _Sel) -> None:
        if not exists:
            skipped.append(f"{cat}: '{text}'")
            return
        qid = f"{cat}-{len(cats[cat]) + 1:02d}"
        cats[cat].append(_query(qid, text, relevant, _prune(yellow, present), _prune(red, present)))

    for g, ripped, text in _RIPS:
        sib = {"garment": _SIBLING[g], "rips": True} if ripped else None
        add(
            "rips",
            text,
            _present(photos, garment=g, rips=ripped),
            {"garment": g, "rips": ripped},
            sib,
            {"garment": g, "rips": not ripped},
        )
    for g, style, text in _STYLES:
        opposite = "slim" if style == "oversized" else "oversized"
        add(
            "styles",
            text,
            _present(photos, garment=g, style=style),
            {"garment": g, "style": style},
            {"garment": g, "style": "regular"},
            [{"garment": _not([g])}, {"garment": g, "style": opposite}],
        )
    for g, text in _GARMENTS:
        add(
            "garments",
            text,
            _present(photos, garment=g),
            {"garment": g},
            {"garment": _SIBLING[g]},
            {"garment": _not([g, _SIBLING[g]])},
        )
    for i, c in enumerate(_COLOURS):
        word = _COLOUR_WORD.get(c, c) if i % 2 else c
        near = _near(c, present["colour"])
        add(
            "colours",
            _COLOUR_TEMPLATES[i % len(_COLOUR_TEMPLATES)].format(word),
            c in present["colour"],
            {"colour": c},
            {"colour": near} if near else None,
            {"colour": _not([c, *near])},
        )
    for p, text in _PATTERNS:
        near_p = _NEAR_PATTERNS.get(p, [])
        add(
            "patterns",
            text,
            _present(photos, pattern=p),
            {"pattern": p},
            {"pattern": near_p} if near_p else None,
            {"pattern": _not([p, *near_p])},
        )
    return cats, skipped


def _phrase(garment: str, words: list[str]) -> str:
    text = " ".join([*words, garment])
    return text if garment in _PLURAL else with_article(text)


def _combinations(photos: Counter[_Product], present: dict[str, set[str]]) -> list[dict[str, Any]]:
    # most photographed products first, then a fixed attribute order: deterministic for given metadata
    ranked = sorted(photos, key=lambda p: (-photos[p], p[0], p[1], p[2], p[3], p[4]))
    # "ripped blue jeans" (the demo's flagship query) first when it exists, then other jeans
    ripped = list(dict.fromkeys((g, c) for g, c, _, r, _ in ranked if r))
    ripped.sort(key=lambda gc: (gc != ("jeans", "blue"), gc[0] != "jeans"))  # stable: keeps the ranking
    out: list[dict[str, Any]] = []

    def pick(candidates: Iterable[tuple[str, ...]], n: int) -> list[tuple[str, ...]]:
        chosen, garments = [], set()
        for cand in candidates:
            if cand[0] not in garments:
                chosen.append(cand)
                garments.add(cand[0])
            if len(chosen) == n:
                break
        return chosen

    for g, c in pick(ripped, 4):
        out.append(
            _query(
                "",
                _phrase(g, ["ripped", c]),
                {"garment": g, "colour": c, "rips": True},
                {"garment": g, "colour": _not([c]), "rips": True},
                {"garment": g, "rips": False},
            )
        )
    styled = [(g, c, s) for g, c, _, _, s in ranked if s != "regular"]
    for g, c, s in pick(styled, 3):
        word = (_BOTTOM_STYLE_WORD if g in _PLURAL else _STYLE_WORD)[s]
        out.append(
            _query(
                "",
                _phrase(g, [word, c]),
                {"garment": g, "colour": c, "style": s},
                {"garment": g, "colour": c, "style": _not([s])},
                {"garment": g, "colour": _not([c, *_near(c, present["colour"])])},
            )
        )
    patterned = [(g, c, p) for g, c, p, _, _ in ranked if p != "plain"]
    for g, c, p in pick(patterned, 3):
        out.append(
            _query(
                "",
                _phrase(g, [c, _PATTERN_WORD[p]]),
                {"garment": g, "colour": c, "pattern": p},
                {"garment": g, "colour": c, "pattern": _not([p])},
                {"garment": g, "colour": _not([c, *_near(c, present["colour"])])},
            )
        )
    for i, q in enumerate(out, 1):
        q["id"] = f"combinations-{i:02d}"
    return out


def fashion_suite(catalogue_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """The fashion suite for a rendered catalogue, as plain data, and the fixed queries left out.

    Args:
        catalogue_dir: A folder written by ``render_fashion`` (its ``metadata.csv`` is read).

    Returns:
        ``(suite, skipped)``: the suite document (see ``docs/suites.md``) and ``"category: 'text'"`` for
        each fixed query that has no relevant image in this catalogue.
    """
    photos, _, present = _read_products(Path(catalogue_dir))
    cats, skipped = _fixed(photos, present)
    cats["combinations"] = _combinations(photos, present)
    suite = {
        "suite": SUITE_NAME,
        "description": "What a fashion search user expects: rips, fit, garment types, colours, patterns and "
        "combinations; relevant, yellow-flag (similar, acceptable) and red-flag (wrong) results.",
        "defaults": {
            "k": 5,
            "yellow_gain": 0.5,
            "thresholds": {
                "mrr": 0.3,
                "precision": 0.7,
                "accuracy": 0.8,
                "recall": 0.6,
                "red_flag_rate": None,
            },
        },
        "categories": {
            name: {"description": _DESCRIPTIONS[name], "queries": queries}
            for name, queries in cats.items()
            if queries
        },
    }
    return suite, skipped


def _flow(value: Any) -> str:
    return (
        yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False)
        .strip()
        .removesuffix("...")
        .strip()
    )


def _dump(suite: dict[str, Any], header: list[str]) -> str:
    lines = [f"# {h}" if h else "#" for h in header]
    lines += [f"suite: {_flow(suite['suite'])}", f"description: {_flow(suite['description'])}", "defaults:"]
    lines += [f"  {key}: {_flow(value)}" for key, value in suite["defaults"].items()]
    lines.append("categories:")
    for name, cat in suite["categories"].items():
        lines += [f"  {name}:", f"    description: {_flow(cat['description'])}", "    queries:"]
        for q in cat["queries"]:
            lines.append(f"      - id: {_flow(q['id'])}")
            lines.append(f"        text: {_flow(q['text'])}")
            lines += [
                f"        {key}: {_flow(q[key])}"
                for key in ("relevant", "yellow", "red")
                if q[key] is not None
            ]
    return "\n".join(lines) + "\n"


def write_fashion_suite(catalogue_dir: Path) -> Path:
    """Write ``suite.yaml`` into a rendered fashion catalogue (deterministic: same metadata, same bytes).

    Args:
        catalogue_dir: The catalogue folder (``render_fashion``'s ``out``).

    Returns:
        The suite file, ``catalogue_dir / "suite.yaml"``.

    Raises:
        FileNotFoundError: No ``metadata.csv`` there.
        ValueError: The metadata lacks a fashion attribute column.

    Example:
        >>> from cliptune.data.synthetic.fashion import render_fashion
        >>> write_fashion_suite(render_fashion(Path("data/fashion"), n=4))
        PosixPath('data/fashion/suite.yaml')
    """
    catalogue_dir = Path(catalogue_dir)
    photos, n_rows, _ = _read_products(catalogue_dir)
    suite, skipped = fashion_suite(catalogue_dir)
    n_queries = sum(len(c["queries"]) for c in suite["categories"].values())
    header = [
        "Behavioural suite of the synthetic fashion catalogue, written by cliptune.data.synthetic.suite from",
        f"metadata.csv ({n_rows} photos, {len(photos)} attribute combinations, {n_queries} queries).",
        "Run it: cliptune test RUN --suite suite.yaml. Format and metric definitions: docs/suites.md.",
        "Fixed queries left out (no relevant image in this catalogue): " + ("; ".join(skipped) or "none"),
    ]
    path = catalogue_dir / "suite.yaml"
    write_text_atomic(path, _dump(suite, header))
    return path
