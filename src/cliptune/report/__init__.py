"""Reports and comparisons of run directories: diagnostics by explicit rules, plots, grids, significance.

``build_report(RUN)`` writes ``report.html`` / ``report.md`` into a run directory; ``compare_runs([A, B])``
writes a leaderboard with paired-bootstrap deltas. docs/reports.md lists every rule and its threshold.
"""

from cliptune.report.build import build_report
from cliptune.report.compare import compare_runs
from cliptune.report.diagnostics import Finding, diagnose
from cliptune.report.rundata import ReportError, load_run

__all__ = ["build_report", "compare_runs", "diagnose", "Finding", "load_run", "ReportError"]
