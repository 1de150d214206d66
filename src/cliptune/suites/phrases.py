"""How a generated suite words its queries: value phrases, synonyms and word order, from a small user YAML.

The generator knows nothing of the catalogue's domain, so its default phrase for a value is the value
itself (``blue``, ``t-shirt``; ``_`` read as a space), and for a true/false attribute ``with {attr}`` /
``without {attr}`` (``rips=true`` -> "with rips"). A user who knows the domain writes a phrases file::

    order: [rips, style, colour, pattern, garment]   # word order of a query (default: the attribute order)
    template: "{}"                                   # wraps every query text (e.g. "a photo of {}")
    phrases:
      rips: {true: ripped, false: intact}
      colour: {grey: [grey, gray], purple: [purple, violet]}   # a list: synonyms, one chosen per query

Phrases that start with ``with`` / ``without`` go last whatever the order ("jeans blue with rips"
becomes "blue jeans with rips" once the order puts colour first).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cliptune.errors import CliptuneError
from cliptune.suites.selectors import canonical

__all__ = ["PhraseError", "Phrases", "load_phrases"]

_TRAILING = ("with ", "without ")


class PhraseError(CliptuneError, ValueError):
    """A phrases file that cannot be used: not YAML, an unknown key, attribute or value.

    Attributes:
        path: The phrases file (None: given as data).
        problems: One ``location: reason`` line each.
    """

    def __init__(self, path: Path | None, problems: list[str]) -> None:
        self.path, self.problems = path, problems
        where = f"{path}: " if path is not None else ""
        super().__init__(f"{where}invalid phrases: " + "; ".join(problems))


class Phrases(BaseModel):
    """Value phrases (a list: synonyms), word order and a template for generated query texts."""

    model_config = ConfigDict(extra="forbid")

    order: list[str] | None = Field(None, description="Word order of a query's attributes.")
    template: str = Field("{}", description="Wraps every query text; '{}' is the phrase.")
    phrases: dict[str, dict[str, list[str]]] = Field(
        default_factory=dict, description="attribute -> value -> phrases (the first is the canonical one)."
    )

    def choices(self, attribute: str, value: str, boolean: bool) -> list[str]:
        """The phrases of ``attribute = value`` (the user's, else the default), at least one."""
        given = self.phrases.get(attribute, {}).get(value)
        if given:
            return given
        name = attribute.replace("_", " ")
        if boolean:
            return [f"with {name}" if value == "true" else f"without {name}"]
        return [value.replace("_", " ")]

    def text(self, words: dict[str, str], attributes: list[str]) -> str:
        """A query text: the chosen phrase per attribute in word order, ``with ...`` last, in the template."""
        order = [a for a in (self.order or []) if a in words] + [
            a for a in attributes if a in words and a not in (self.order or [])
        ]
        ordered = sorted((words[a] for a in order), key=lambda w: w.startswith(_TRAILING))  # stable
        return self.template.replace("{}", " ".join(ordered))


def _normalise(raw: Any) -> Any:
    """``phrases`` with canonical value keys (YAML ``true`` -> "true") and single phrases as lists."""
    if not isinstance(raw, dict) or not isinstance(raw.get("phrases"), dict):
        return raw
    out = dict(raw)
    out["phrases"] = {
        attr: (
            {str(canonical(v)): (p if isinstance(p, list) else [p]) for v, p in values.items()}
            if isinstance(values, dict)
            else values
        )
        for attr, values in raw["phrases"].items()
    }
    return out


def load_phrases(path: Path | None, values: dict[str, list[str]] | None = None) -> Phrases:
    """Read a phrases file and check it against the catalogue's attributes and values.

    Args:
        path: The YAML file; None: the defaults (every value is its own phrase).
        values: The catalogue's attributes and their (canonical) values; phrases for an attribute or value
            not in it are errors (a typo would otherwise silently keep the default phrase).

    Returns:
        The :class:`Phrases`.

    Raises:
        PhraseError: The file is not YAML, breaks the format, or names an unknown attribute or value.
    """
    if path is None:
        return Phrases()
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise PhraseError(path, [f"not valid YAML: {' '.join(str(exc).split())}"]) from None
    try:
        phrases = Phrases.model_validate(_normalise(raw))
    except ValidationError as exc:
        raise PhraseError(
            path,
            [f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors()],
        ) from None
    if "{}" not in phrases.template:
        raise PhraseError(path, [f"template: must contain '{{}}' (got {phrases.template!r})"])
    if values is not None:
        problems = [f"order: unknown attribute '{a}'" for a in phrases.order or [] if a not in values]
        for attr, by_value in phrases.phrases.items():
            if attr not in values:
                problems.append(f"phrases.{attr}: unknown attribute; attributes: {', '.join(values)}")
                continue
            problems += [
                f"phrases.{attr}.{v}: unknown value; values: {', '.join(values[attr])}"
                for v in by_value
                if v not in values[attr]
            ]
            problems += [
                f"phrases.{attr}.{v}: give at least one phrase" for v, p in by_value.items() if not p
            ]
        if problems:
            raise PhraseError(path, problems)
    return phrases
