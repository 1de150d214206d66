"""The behavioural-suite YAML schema: pydantic models, loading, and error messages with exact locations.

A suite file says what a search user expects: for each query (a text or an image), which catalogue
images are the right answers (``relevant``), which are acceptable near misses (``yellow`` flags) and which
must never be shown (``red`` flags), plus the thresholds a category of queries must meet. The structure is
checked here, without a catalogue; :func:`cliptune.suites.resolve.resolve_suite` then checks every
attribute, value and image id against the catalogue. Both report every problem at once, one
``location: reason`` line each (``categories.rips.queries[2].text: ...``). Semantics: ``docs/suites.md``.

Example:
    >>> suite = load_suite(Path("data/fashion/suite.yaml"))  # doctest: +SKIP
    >>> [c for c in suite.categories]  # doctest: +SKIP
    ['rips', 'styles', 'garments', 'colours', 'patterns', 'combinations']
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, model_validator

from cliptune.errors import CliptuneError
from cliptune.suites.selectors import SELECTOR_JSON_SCHEMA, check_selector_shape

__all__ = [
    "Category",
    "Defaults",
    "Query",
    "Suite",
    "SuiteError",
    "ThresholdOverrides",
    "Thresholds",
    "load_suite",
    "parse_suite",
    "suite_json_schema",
]

_SELECTOR_FIELDS = ("relevant", "yellow", "red")

# A selector is checked by check_selector_shape (exact locations, one message per problem), not by a
# pydantic union, whose errors name every union member; its JSON schema is given explicitly.
Selector = Annotated[Any, WithJsonSchema(SELECTOR_JSON_SCHEMA)]


class SuiteError(CliptuneError, ValueError):
    """An invalid suite: ``errors`` holds one ``"location: reason"`` line per problem."""

    def __init__(self, errors: list[str], source: str | None = None) -> None:
        self.errors = errors
        head = f"invalid suite{f' {source}' if source else ''}:"
        super().__init__("\n".join([head, *(f"  {e}" for e in errors)]))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _threshold(default: float | None, description: str) -> Any:
    return Field(default, ge=0.0, le=1.0, description=description)


_MRR = "Gate: MRR (first relevant item, full ranking) must be strictly greater than this."
_PRECISION = "Gate: precision@k (relevant + yellow in the top k, over min(k, |acceptable|)) >= this."
_ACCURACY = "Gate: accuracy@k (share of queries with a relevant item in the top k) >= this."
_RECALL = "Gate: recall@k (relevant in the top k, over min(|relevant|, k)) >= this."
_RED = "Gate: red-flag rate@k (red items in the top k, over k) <= this; null: not gated."
_NDCG = "Gate: nDCG@k with graded gains (relevant 1, yellow yellow_gain) >= this; null: not gated."


class Thresholds(_Model):
    """The suite-wide gates (``defaults.thresholds``); a field set to null is not gated."""

    mrr: float | None = _threshold(0.3, _MRR)
    precision: float | None = _threshold(0.7, _PRECISION)
    accuracy: float | None = _threshold(0.8, _ACCURACY)
    recall: float | None = _threshold(0.6, _RECALL)
    red_flag_rate: float | None = _threshold(None, _RED)
    ndcg: float | None = _threshold(None, _NDCG)


class ThresholdOverrides(_Model):
    """Per-category or per-query overrides: only the fields written replace the inherited ones (null: not gated)."""

    mrr: float | None = _threshold(None, _MRR)
    precision: float | None = _threshold(None, _PRECISION)
    accuracy: float | None = _threshold(None, _ACCURACY)
    recall: float | None = _threshold(None, _RECALL)
    red_flag_rate: float | None = _threshold(None, _RED)
    ndcg: float | None = _threshold(None, _NDCG)

    def apply(self, base: Thresholds) -> Thresholds:
        """``base`` with the fields written in this override replaced."""
        return base.model_copy(update={name: getattr(self, name) for name in self.model_fields_set})


class Defaults(_Model):
    """Settings every category and query inherits unless it overrides them."""

    k: int = Field(5, ge=1, description="Cut-off of the @k metrics (the results a user sees).")
    thresholds: Thresholds = Field(default_factory=Thresholds, description="Gates of every category.")
    yellow_gain: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="nDCG gain of a yellow-flag (acceptable) item; relevant items gain 1.",
    )


class Query(_Model):
    """One search: a text or a query image, and which images are relevant, yellow or red for it."""

    id: str = Field(min_length=1, description="Unique id across the suite, e.g. 'rips-01'.")
    text: str | None = Field(None, min_length=1, description="Text query (give exactly one of text/image).")
    image: str | None = Field(
        None, min_length=1, description="Query image, a path relative to the catalogue folder."
    )
    description: str | None = Field(None, description="Why this query is in the suite (free text).")
    k: int | None = Field(None, ge=1, description="Cut-off for this query only (default: the category's).")
    thresholds: ThresholdOverrides = Field(
        default_factory=ThresholdOverrides, description="Gates of this query's own pass/fail only."
    )
    relevant: Selector = Field(
        description="The right answers: image ids (file names) and/or attribute filters; must match >= 1 image."
    )
    yellow: Selector = Field(
        None, description="Acceptable near misses (relevant items are never yellow); must not overlap red."
    )
    red: Selector = Field(
        None, description="Wrong answers that must not be shown; must not overlap relevant."
    )

    @model_validator(mode="after")
    def _one_query(self) -> Query:
        if (self.text is None) == (self.image is None):
            given = "both" if self.text is not None else "neither"
            raise ValueError(f"give exactly one of 'text' or 'image' (got {given})")
        return self


class Category(_Model):
    """A named group of queries that is gated as a whole (e.g. rips, styles, colours)."""

    description: str | None = Field(None, description="What the category tests (free text).")
    k: int | None = Field(None, ge=1, description="Cut-off for this category (default: defaults.k).")
    thresholds: ThresholdOverrides = Field(
        default_factory=ThresholdOverrides, description="Overrides of defaults.thresholds for this category."
    )
    queries: list[Query] = Field(min_length=1, description="The category's queries (at least one).")


class Suite(_Model):
    """A behavioural suite: named categories of queries with relevant / yellow / red results and gates."""

    suite: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Suite name; results go to RUN/suite/<suite>.json (letters, digits, '.', '_', '-').",
    )
    description: str | None = Field(None, description="What the suite checks (free text).")
    defaults: Defaults = Field(default_factory=Defaults, description="k, thresholds and yellow gain.")
    categories: dict[str, Category] = Field(
        min_length=1, description="Category name -> category; any names (rips, styles, garments, ...)."
    )

    def queries(self) -> list[tuple[str, int, Query]]:
        """Every query with its category name and position: ``(category, index, query)``, in file order."""
        return [(name, i, q) for name, cat in self.categories.items() for i, q in enumerate(cat.queries)]


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def _allowed(loc: tuple[int | str, ...]) -> list[str]:
    """Field names allowed where an unknown key ``loc[-1]`` was found."""
    model: type[BaseModel] = Suite
    parts = list(loc[:-1])
    while parts:
        part = parts.pop(0)
        if model is Suite and part == "categories":
            model, parts = Category, parts[1:]  # skip the category name
        elif part == "queries":
            model, parts = Query, parts[1:]  # skip the index
        elif part == "defaults":
            model = Defaults
        elif part == "thresholds":
            model = Thresholds if model is Defaults else ThresholdOverrides
        else:
            return []
    return sorted(model.model_fields)


def _pydantic_errors(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown key; allowed keys: {', '.join(_allowed(loc))}"
        elif "input" in err and err["type"] != "missing" and not isinstance(err["input"], dict | list):
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"{_location(loc)}: {msg}")
    return lines


def _shape_errors(suite: Suite) -> list[str]:
    errors: list[str] = []
    seen: dict[str, str] = {}
    for cat, i, query in suite.queries():
        where = f"categories.{cat}.queries[{i}]"
        if query.id in seen:
            errors.append(f"{where}.id: duplicate query id '{query.id}' (first at {seen[query.id]})")
        seen.setdefault(query.id, where)
        for field in _SELECTOR_FIELDS:
            value = getattr(query, field)
            if value is not None or field == "relevant":
                errors += check_selector_shape(value, f"{where}.{field}")
    return errors


def parse_suite(raw: Any, source: str | None = None) -> Suite:
    """Validate a suite given as plain data (what ``yaml.safe_load`` returns).

    Args:
        raw: The parsed YAML document.
        source: File name used in the error message.

    Returns:
        The :class:`Suite`.

    Raises:
        SuiteError: Every structural problem, one ``location: reason`` line each.
    """
    if not isinstance(raw, dict):
        raise SuiteError(
            [f"<root>: expected a mapping with 'suite' and 'categories', got {type(raw).__name__}"], source
        )
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as exc:
        raise SuiteError(_pydantic_errors(exc), source) from None
    errors = _shape_errors(suite)
    if errors:
        raise SuiteError(errors, source)
    return suite


def load_suite(path: Path | str) -> Suite:
    """Read and validate a suite YAML file (structure only; see ``resolve_suite`` for the catalogue checks).

    Args:
        path: The suite file.

    Returns:
        The :class:`Suite`.

    Raises:
        SuiteError: The file is missing, is not YAML, or breaks the schema (every problem, with its location).

    Example:
        >>> load_suite("data/fashion/suite.yaml").defaults.k  # doctest: +SKIP
        5
    """
    path = Path(path)
    if not path.is_file():
        raise SuiteError([f"{path}: file not found"])
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"
        raise SuiteError([f"{path}: not valid YAML at {where}: {getattr(exc, 'problem', exc)}"]) from None
    return parse_suite(raw, str(path))


def suite_json_schema() -> str:
    """The JSON schema of a suite file, as published in ``docs/suite.schema.json`` (2-space indent, newline)."""
    schema = Suite.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "cliptune behavioural suite"
    return json.dumps(schema, indent=2, sort_keys=False) + "\n"
