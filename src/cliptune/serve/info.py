"""``GET /info``: which model answers, over which index, and what its run measured and gated.

An index records the folder its model was loaded from (``index.json``'s ``model_source``); when that is a
run's ``model/`` folder (or the run itself), the run's test metrics with their intervals and n
(``eval/<split>.json``) and its suite verdicts (``suite/<name>.json``) are shown beside the model, so a
user of the API sees how good the model is before trusting its hits. The files are read once at startup.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cliptune.rundir import RunDir, is_run, read_json
from cliptune.search.index import SearchIndex

__all__ = ["find_run", "run_info"]

_INTERVAL_FIELDS = ("mean", "low", "high", "n")


def find_run(model_source: str) -> Path | None:
    """The run directory a model was loaded from (the source itself or its parent), or None."""
    source = Path(model_source)
    for candidate in (source, source.parent):
        if candidate.is_dir() and is_run(candidate):
            return candidate
    return None


def run_info(index: SearchIndex) -> dict[str, Any] | None:
    """The run behind the index's model: ``{"path", "name", "metrics": {split: {key: interval}}, "suites"}``.

    ``metrics`` holds every evaluated split (``test`` once ``cliptune eval`` ran), each metric as
    ``{"mean", "low", "high", "n"}``; ``suites`` one ``{"name", "passed", "categories": {name: passed}}``
    per suite result. None when the model did not come from a run (a hub model, ``embedded``).

    Raises:
        DamagedFileError: an eval or suite file that is not valid JSON.
    """
    found = find_run(index.model_source)
    if found is None:
        return None
    run = RunDir(found)
    metrics = {}
    for path in sorted(run.eval_dir.glob("*.json")):
        doc = read_json(path)
        if isinstance(doc, dict) and isinstance(doc.get("metrics"), dict):
            metrics[path.stem] = {
                key: {f: value.get(f) for f in _INTERVAL_FIELDS}
                for key, value in doc["metrics"].items()
                if isinstance(value, dict)
            }
    suites = []
    for path in sorted(run.suite_dir.glob("*.json")):
        doc = read_json(path)
        if isinstance(doc, dict) and "categories" in doc:
            suites.append(
                {
                    "name": doc.get("suite", path.stem),
                    "passed": bool(doc.get("passed")),
                    "categories": {c: bool(v.get("passed")) for c, v in doc["categories"].items()},
                }
            )
    return {"path": str(found.resolve()), "name": found.resolve().name, "metrics": metrics, "suites": suites}
