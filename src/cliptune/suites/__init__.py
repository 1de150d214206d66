"""Behavioural suites: YAML schema, flag semantics, thresholds, gate verdicts and JUnit XML.

A suite gates a model on what search users expect (relevant / yellow-flag / red-flag results per query,
thresholds per category). Flow: :func:`load_suite` (structure) -> :func:`resolve_suite` (against a
catalogue) -> :func:`ranked_images` (a run's held-out split by default, so a gate measures images
training never saw) -> :func:`run_suite` (embed, rank, score, gate) -> ``suite/<name>.json`` and
:func:`write_junit`. Definitions and file format: ``docs/suites.md``.

Example:
    >>> suite = load_suite("data/fashion/suite.yaml")  # doctest: +SKIP
    >>> result = run_suite(suite, load_model("runs/demo"), read_catalogue(Path("data/fashion")))  # doctest: +SKIP
    >>> write_junit(result, "suite.xml")  # doctest: +SKIP
"""

from cliptune.suites.heldout import RankedImages, ranked_images
from cliptune.suites.junit import write_junit
from cliptune.suites.resolve import ResolvedSuite, resolve_suite
from cliptune.suites.run import run_suite
from cliptune.suites.schema import Suite, SuiteError, load_suite, parse_suite, suite_json_schema
from cliptune.suites.scoring import query_metrics

__all__ = [
    "RankedImages",
    "ResolvedSuite",
    "Suite",
    "SuiteError",
    "load_suite",
    "parse_suite",
    "query_metrics",
    "ranked_images",
    "resolve_suite",
    "run_suite",
    "suite_json_schema",
    "write_junit",
]
