"""Selectors: which catalogue images a suite query calls relevant, yellow or red.

A selector is either a mapping of attribute filters, or a list whose entries are image ids (``file_name``
values) or filter mappings; a list selects the union of its entries. In a filter every key must hold
(AND), a list value means "any of", and ``{not: v}`` / ``{not: [v, w]}`` means "none of":

    relevant: {garment: jeans, rips: true, colour: [blue, navy]}
    red: [{rips: false, garment: jeans}, images/000123.png]
    yellow: {garment: sweater, style: {not: oversized}}

Values are compared as text: YAML ``true`` / ``false`` match the catalogue's ``true`` / ``false`` (pandas
reads those as booleans, shown as ``true`` / ``false`` here too), numbers match their decimal spelling.
Several metadata rows of one image form one item; the image matches a filter when one of its rows
satisfies every key of it. A row with no value for a key never matches ``key: v`` and always matches
``key: {not: v}``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from cliptune.data.catalogue import Catalogue

__all__ = ["SELECTOR_JSON_SCHEMA", "CatalogueItems", "check_selector_shape"]

_SCALAR_SCHEMA: dict[str, Any] = {"type": ["string", "boolean", "number"]}
_VALUE_SCHEMA: dict[str, Any] = {
    "anyOf": [
        _SCALAR_SCHEMA,
        {"type": "array", "items": _SCALAR_SCHEMA, "minItems": 1, "description": "any of these values"},
        {
            "type": "object",
            "properties": {
                "not": {"anyOf": [_SCALAR_SCHEMA, {"type": "array", "items": _SCALAR_SCHEMA, "minItems": 1}]}
            },
            "required": ["not"],
            "additionalProperties": False,
            "description": "none of these values",
        },
    ]
}
_FILTER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "minProperties": 1,
    "additionalProperties": _VALUE_SCHEMA,
    "description": "attribute -> value | [values] | {not: value(s)}; every key must hold (AND)",
}
SELECTOR_JSON_SCHEMA: dict[str, Any] = {
    "anyOf": [
        _FILTER_SCHEMA,
        {
            "type": "array",
            "items": {"anyOf": [{"type": "string", "description": "image id (file_name)"}, _FILTER_SCHEMA]},
            "description": "union of image ids and filters",
        },
        {"type": "null"},
    ]
}

_SHOWN = 30  # values listed in an "unknown value" message


def _listing(names: Sequence[str], limit: int) -> str:
    """The first ``limit`` names, comma-separated, then ``, ... (N more)`` when there are more."""
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _is_scalar(value: Any) -> bool:
    return isinstance(value, str | bool | int | float) and not (
        isinstance(value, float) and math.isnan(value)
    )


def canonical(value: Any) -> str | None:
    """The text a metadata or filter value is compared as (None: missing)."""
    if value is None or value is pd.NA or (isinstance(value, float | np.floating) and math.isnan(value)):
        return None
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    return str(value)


@dataclass(frozen=True)
class _Condition:
    attribute: str
    values: tuple[str, ...]
    negate: bool
    where: str


@dataclass(frozen=True)
class _Filter:
    conditions: tuple[_Condition, ...]


@dataclass(frozen=True)
class _Spec:
    ids: tuple[tuple[str, str], ...] = ()  # (image id, location)
    filters: tuple[_Filter, ...] = ()


def _parse_values(value: Any, where: str, errors: list[str]) -> tuple[tuple[str, ...], bool]:
    negate = False
    if isinstance(value, Mapping):
        if set(value) != {"not"}:
            errors.append(
                f"{where}: a mapping value must be {{not: value}} or {{not: [values]}}, got keys {sorted(map(str, value))}"
            )
            return (), False
        negate, value, where = True, value["not"], f"{where}.not"
    items = value if isinstance(value, list) else [value]
    if not items:
        errors.append(f"{where}: empty list; give at least one value")
    bad = [v for v in items if not _is_scalar(v)]
    if bad:
        errors.append(f"{where}: values must be text, true/false or numbers, got {bad[0]!r}")
        return (), negate
    return tuple(str(canonical(v)) for v in items), negate


def _parse_filter(raw: Mapping[Any, Any], where: str, errors: list[str]) -> _Filter:
    if not raw:
        errors.append(f"{where}: an empty filter would match every image; name at least one attribute")
    conditions = []
    for key, value in raw.items():
        if not isinstance(key, str):
            errors.append(f"{where}: attribute names must be text, got {key!r}")
            continue
        values, negate = _parse_values(value, f"{where}.{key}", errors)
        conditions.append(_Condition(key, values, negate, f"{where}.{key}"))
    return _Filter(tuple(conditions))


def _parse(value: Any, where: str, errors: list[str]) -> _Spec:
    if value is None:
        return _Spec()
    if isinstance(value, Mapping):
        return _Spec(filters=(_parse_filter(value, where, errors),))
    if not isinstance(value, list):
        errors.append(
            f"{where}: expected a filter mapping or a list of image ids / filters, got {type(value).__name__} {value!r}"
        )
        return _Spec()
    ids, filters = [], []
    for j, entry in enumerate(value):
        if isinstance(entry, str):
            ids.append((entry, f"{where}[{j}]"))
        elif isinstance(entry, Mapping):
            filters.append(_parse_filter(entry, f"{where}[{j}]", errors))
        else:
            errors.append(
                f"{where}[{j}]: expected an image id (file_name) or a filter mapping, got {entry!r}"
            )
    return _Spec(tuple(ids), tuple(filters))


def check_selector_shape(value: Any, where: str) -> list[str]:
    """Structural problems of a selector (no catalogue needed), one ``location: reason`` line each."""
    errors: list[str] = []
    if value is None:
        return [f"{where}: required; give image ids and/or attribute filters"]
    _parse(value, where, errors)
    return errors


@dataclass
class CatalogueItems:
    """The catalogue's unique images (the items a suite ranks) and their attribute values per row.

    Attributes:
        catalogue: The catalogue read from disk.
        ids: Unique ``file_name`` values in order of first appearance: item ``i`` is ``ids[i]``.
    """

    catalogue: Catalogue
    ids: list[str] = field(init=False)
    _row_item: np.ndarray = field(init=False, repr=False)  # (rows,) item index of each metadata row
    _index: dict[str, int] = field(init=False, repr=False)
    _columns: dict[str, np.ndarray] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        codes, uniques = pd.factorize(self.catalogue.rows["file_name"].astype(str), sort=False)
        self._row_item = np.asarray(codes)
        self.ids = [str(u) for u in uniques]
        self._index = {name: i for i, name in enumerate(self.ids)}

    @property
    def attributes(self) -> list[str]:
        """Columns a filter may name: the catalogue's attributes, plus ``group`` when present."""
        return self.catalogue.filters

    def index(self, image_id: str) -> int | None:
        """Item index of a ``file_name``, or None."""
        return self._index.get(image_id)

    def _column(self, name: str) -> np.ndarray:
        if name not in self._columns:
            col = self.catalogue.rows[name].tolist()
            self._columns[name] = np.array([canonical(v) for v in col], dtype=object)  # (rows,)
        return self._columns[name]

    def values(self, name: str) -> list[str]:
        """Distinct (canonical) values of an attribute, sorted."""
        return sorted({v for v in self._column(name) if v is not None})

    def select(self, value: Any, where: str) -> tuple[np.ndarray, list[str]]:
        """Items a selector names, checked against the catalogue.

        Args:
            value: The selector as written in the suite (None selects nothing).
            where: Its location, for error lines (``categories.rips.queries[2].relevant``).

        Returns:
            ``(mask, errors)``: a (N,) bool mask over ``ids`` and every problem found (unknown attribute,
            unknown value, unknown image id), one ``location: reason`` line each.
        """
        errors: list[str] = []
        spec = _parse(value, where, errors)
        mask = np.zeros(len(self.ids), dtype=bool)  # (N,)
        for image_id, loc in spec.ids:
            i = self.index(image_id)
            if i is None:
                errors.append(
                    f"{loc}: unknown image id '{image_id}' (no such file_name in {self.catalogue.metadata_path})"
                )
            else:
                mask[i] = True
        for flt in spec.filters:
            rows = np.ones(len(self._row_item), dtype=bool)  # (rows,) AND over the filter's keys
            for cond in flt.conditions:
                rows &= self._condition(cond, errors)
            mask[np.unique(self._row_item[rows])] = True
        return mask, errors

    def _condition(self, cond: _Condition, errors: list[str]) -> np.ndarray:
        if cond.attribute not in self.attributes:
            errors.append(
                f"{cond.where}: unknown attribute '{cond.attribute}'; attributes: {', '.join(self.attributes)}"
            )
            return np.zeros(len(self._row_item), dtype=bool)
        known = self.values(cond.attribute)
        for v in cond.values:
            if v not in known:
                shown = _listing(known, _SHOWN)
                where = cond.where + (".not" if cond.negate else "")
                errors.append(f"{where}: unknown value '{v}' for '{cond.attribute}'; values: {shown}")
        col = self._column(cond.attribute)
        hit = np.isin(col, np.array(cond.values, dtype=object))  # (rows,) missing (None) never hits
        return ~hit if cond.negate else hit

    def names(self, mask: np.ndarray, limit: int = 5) -> str:
        """Up to ``limit`` ids of a mask, for messages."""
        return _listing([self.ids[i] for i in np.flatnonzero(mask)], limit)
