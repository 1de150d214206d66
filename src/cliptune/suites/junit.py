"""JUnit XML of a suite result, so CI systems show every query and category gate as a test case.

Layout: ``<testsuites>`` holds one ``<testsuite name=CATEGORY>`` per category, with one ``<testcase>`` per
query (``classname`` = ``SUITE.CATEGORY``, ``name`` = the query id) and one more named ``gate`` for the
category verdict. A failed case carries ``<failure message=... type=...>`` whose text lists the missed
thresholds and the red items in the top k with their rank. The ``gate`` case is what ``cliptune test``'s
exit code follows; a CI that fails on any JUnit failure also fails on single queries.
"""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from cliptune.ranking.bootstrap import format_interval
from cliptune.rundir import write_bytes_atomic

__all__ = ["junit_xml", "write_junit"]


def _fmt(metrics: dict[str, Any]) -> str:
    parts = []
    for key, m in metrics.items():
        if isinstance(m, dict):
            parts.append(f"{key} {format_interval(m)}")
        else:
            parts.append(f"{key} {m:.3f}")
    return ", ".join(parts)


def _case(
    parent: ET.Element,
    classname: str,
    name: str,
    failures: list[str],
    kind: str,
    out: str,
    skipped: str | None = None,
) -> None:
    case = ET.SubElement(parent, "testcase", classname=classname, name=name, time="0")
    if skipped is not None:
        ET.SubElement(case, "skipped", message=skipped)
    if failures:
        failure = ET.SubElement(case, "failure", message="; ".join(failures), type=kind)
        failure.text = "\n".join(failures)
    ET.SubElement(case, "system-out").text = out


def junit_xml(result: dict[str, Any]) -> ET.ElementTree:
    """The JUnit tree of a :func:`cliptune.suites.run.run_suite` result (see the module docstring)."""
    suite = result["suite"]
    root = ET.Element("testsuites", name=f"cliptune suite {suite}")
    total = failed = n_skipped = 0
    for name in [*result["categories"], *result.get("unmeasured", {})]:
        cat = result["categories"].get(name)
        queries = [q for q in result["queries"] if q["category"] == name]
        lost = [q for q in result.get("skipped", []) if q["category"] == name]
        n_fail = sum(not q["passed"] for q in queries) + (cat is not None and not cat["passed"])
        node = ET.SubElement(
            root,
            "testsuite",
            name=name,
            tests=str(len(queries) + len(lost) + 1),
            failures=str(n_fail),
            errors="0",
            skipped=str(len(lost) + (cat is None)),
        )
        props = ET.SubElement(node, "properties")
        ranked = (("split", result.get("split", "all")), ("n_items", result["n_items"]))
        k = cat["k"] if cat is not None else result["k"]
        for key, value in (("model", result["model"]), ("catalogue", result["catalogue"]), *ranked, ("k", k)):
            ET.SubElement(props, "property", name=key, value=str(value))
        for q in queries:
            what = q["text"] if q["text"] is not None else f"image {q['image']}"
            _case(
                node,
                f"{suite}.{name}",
                q["id"],
                [] if q["passed"] else q["failures"],
                "QueryFailed",
                f"{what}\n{_fmt(q['metrics'])}",
            )
        for q in lost:
            what = q["text"] if q["text"] is not None else f"image {q['image']}"
            _case(node, f"{suite}.{name}", q["id"], [], "", what, skipped=q["status"])
        if cat is None:
            status = result["unmeasured"][name]
            _case(node, f"{suite}.{name}", "gate", [], "GateFailed", status, skipped=status)
        else:
            _case(node, f"{suite}.{name}", "gate", cat["failures"], "GateFailed", _fmt(cat["metrics"]))
        total, failed = total + len(queries) + len(lost) + 1, failed + n_fail
        n_skipped += len(lost) + (cat is None)
    root.set("tests", str(total))
    root.set("failures", str(failed))
    root.set("errors", "0")
    root.set("skipped", str(n_skipped))
    tree = ET.ElementTree(root)
    ET.indent(tree)
    return tree


def write_junit(result: dict[str, Any], path: Path | str) -> Path:
    """Write the JUnit XML of a suite result (see the module docstring for the layout).

    Args:
        result: From :func:`cliptune.suites.run.run_suite`.
        path: Output file; parent folders are created.

    Returns:
        ``path``.

    Example:
        >>> write_junit(run_suite(suite, model, catalogue), "reports/suite.xml")  # doctest: +SKIP
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    junit_xml(result).write(buf, encoding="utf-8", xml_declaration=True)
    return write_bytes_atomic(path, buf.getvalue())
