"""`cliptune compare`: paired deltas and verdicts, different query sets flagged, the seed-001 wording."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from cliptune.cli.report import register
from cliptune.report import ReportError, compare_runs
from cliptune.report.compare import metric_deltas, relative_change
from tests.test_report import eval_json, suite_json, write_json, write_run

runner = CliRunner()
IDS = [str(i) for i in range(40)]


def _eval(values: list[float], ids: list[str] = IDS, **extra) -> dict:
    return eval_json("test", {"t2i": {"ids": ids, "values": {"mrr": values, **extra}}})


def test_identical_per_query_values_are_not_distinguishable() -> None:
    values = [0.1 * (i % 10) for i in range(40)]
    deltas, flags = metric_deltas(_eval(values), _eval(values))
    (d,) = deltas
    assert flags == [] and d.paired
    assert (d.interval.mean, d.interval.low, d.interval.high) == (0.0, 0.0, 0.0)
    assert d.verdict == "not distinguishable"


def test_pairing_is_by_query_id_not_position() -> None:
    values = [0.1 * (i % 10) for i in range(40)]
    order = list(reversed(range(40)))
    shuffled = _eval([values[i] for i in order], [IDS[i] for i in order])
    (d,), flags = metric_deltas(_eval(values), shuffled)
    assert flags == [] and d.paired and d.interval.low == d.interval.high == 0.0


def test_clearly_better_and_clearly_worse() -> None:
    base = [0.2] * 20 + [0.5] * 20  # mean 0.35
    cand = [0.9] * 20 + [1.0] * 20  # mean 0.95: every query gains 0.5..0.7
    (d,), _ = metric_deltas(_eval(base), _eval(cand))
    assert d.verdict == "better" and d.interval.mean == pytest.approx(0.6) and d.interval.low >= 0.5
    (w,), _ = metric_deltas(_eval(cand), _eval(base))
    assert w.verdict == "worse"
    # Lower is better for red-flag rates: a higher rate is worse.
    (r,), _ = metric_deltas(eval_json("test", {"t2i": {"ids": IDS, "values": {"red_flag_rate@5": base}}}),
                            eval_json("test", {"t2i": {"ids": IDS, "values": {"red_flag_rate@5": cand}}}))  # fmt: skip
    assert not r.higher_is_better and r.verdict == "worse"


def test_small_noisy_difference_is_not_distinguishable() -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, 40).round(3).tolist()
    cand = [min(1.0, v + 0.01 * s) for v, s in zip(base, rng.choice([-1, 1], 40), strict=True)]
    (d,), _ = metric_deltas(_eval(base), _eval(cand))
    assert d.verdict == "not distinguishable" and d.interval.low < 0 < d.interval.high


def test_different_query_sets_are_flagged_and_unpaired() -> None:
    other = [f"x{i}" for i in range(30)] + IDS[:10]
    (d,), flags = metric_deltas(_eval([0.5] * 40), _eval([0.5] * 40, other))
    assert not d.paired and "unpaired" in d.note
    assert flags == [
        "test t2i: the runs were evaluated on different queries (40 vs 40, 10 shared): deltas are unpaired "
        "and mix model and data differences"
    ]


def test_missing_per_query_values_give_no_verdict() -> None:
    base, cand = _eval([0.5] * 40), _eval([0.6] * 40)
    del cand["per_query"]
    (d,), _ = metric_deltas(base, cand)
    assert d.verdict == "no verdict" and d.interval is None


def test_relative_change_only_says_better_next_to_a_verdict() -> None:
    # Seed 001's "32% better" needs the verdict: 0.03664 / 0.1148 = 31.9% -> "32%".
    assert relative_change(0.1148, 0.07816, "better") == "32% better"
    assert relative_change(0.98934, 0.99338, "better") == "0.41% better"  # 0.00404 / 0.98934 = 0.408%
    assert relative_change(0.96685, 0.98401, "worse") == "1.8% worse"  # 0.01716 / 0.96685 = 1.77%
    # Noise is shown as noise, never as an improvement, whatever the size of the change.
    assert relative_change(0.17994, 0.12908, "not distinguishable") == "not distinguishable"
    # Without a verdict (training-log means) the change is neutral: direction of the number only.
    assert relative_change(0.1148, 0.07816, "no verdict") == "32% lower"
    assert relative_change(0.01, 0.03, "no verdict") == "200% higher"  # 0.02 / 0.01
    assert (
        relative_change(0.0, 0.1, "no verdict") == "n/a" and relative_change(0.3, 0.3, "no verdict") == "same"
    )


def test_delta_table_relative_column_follows_the_verdict(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", [{"lr": 1e-3, "val/loss": 0.5}], {"best_epoch": 0})
    b = write_run(tmp_path / "b", [{"lr": 1e-3, "val/loss": 0.4}], {"best_epoch": 0})
    rng = np.random.default_rng(1)
    noise = rng.uniform(0, 1, 40).round(3).tolist()
    # recall@5: +0.33 relative, but per-query noise -> not distinguishable; mrr: +0.5 on every query -> better
    write_json(a / "eval" / "test.json", _eval([0.2] * 40, **{"recall@5": noise}))
    cand_recall = [min(1.0, v + (0.3 if i % 2 else -0.25)) for i, v in enumerate(noise)]
    write_json(b / "eval" / "test.json", _eval([0.7] * 40, **{"recall@5": cand_recall}))
    _, md = compare_runs([a, b], out=tmp_path / "o")
    data = json.loads((tmp_path / "o" / "compare.json").read_text())
    by_metric = {d["metric"]: d for d in data["deltas"]["b"]["test"]}
    assert by_metric["t2i/recall@5"]["verdict"] == "not distinguishable"
    assert by_metric["t2i/recall@5"]["relative"] == "not distinguishable"
    assert by_metric["t2i/mrr"]["relative"] == "250% better"  # (0.7 - 0.2) / 0.2
    rows = [line for line in md.read_text().splitlines() if line.startswith("| t2i/recall@5 |")]
    assert rows and all("better" not in r and "worse" not in r for r in rows)


def _seed_run(
    root: Path, name: str, val_loss: float, train_loss: float, lr_final: float, val_groups: list[str]
):
    # Seed 000 (60/40) and seed 001 (80/20): final values of the two siamese runs.
    epochs = [{"lr": 3e-4, "val/loss": 0.5}, {"lr": 3e-4, "val/loss": val_loss, "train/loss": train_loss}]
    return write_run(root / name, epochs, {"task": "siamese", "best_epoch": 1, "lr_final": lr_final},
                     {"train": {"task": "siamese", "lr": 3e-4}}, {"train": ["g0"], "val": val_groups})  # fmt: skip


def test_compare_runs_end_to_end(tmp_path: Path) -> None:
    a = _seed_run(tmp_path, "split-60-40", 0.1148, 0.01003, 7e-5, ["g1", "g2"])
    b = _seed_run(tmp_path, "split-80-20", 0.07816, 0.03043, 1.5e-4, ["g1"])
    base_mrr = [0.2] * 20 + [0.5] * 20
    write_json(a / "eval" / "test.json", _eval(base_mrr, **{"recall@5": [1.0] * 40}))
    write_json(b / "eval" / "test.json", _eval([0.9] * 40, **{"recall@5": [1.0] * 40}))
    queries = [{"id": f"rips-{i}", "category": "rips", "text": "ripped jeans", "passed": m >= 0.3, "mrr": m}
               for i, m in enumerate([0.1, 0.2, 0.25])]  # fmt: skip
    write_json(a / "suite" / "fashion.json", suite_json("fashion", queries))
    write_json(
        b / "suite" / "fashion.json",
        suite_json("fashion", [q | {"mrr": 1.0, "passed": True} for q in queries]),
    )

    html_path, md_path = compare_runs([a, b], baseline=a, out=tmp_path / "cmp")
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    verdicts = {d["metric"]: d["verdict"] for d in data["deltas"]["split-80-20"]["test"]}
    assert verdicts == {"t2i/mrr": "better", "t2i/recall@5": "not distinguishable"}
    md = md_path.read_text()
    assert (
        "| val/loss | 0.1148 | 0.07816 | 32% lower | no verdict |" in md
    )  # seed 001: no interval, no "better"
    assert "validated on different groups" in md
    assert "split-80-20 ended with a higher LR than split-60-40 (0.00015 vs 7e-05)" in md
    assert "| rips | **FAIL** | pass |" in md
    assert "| train/loss | 0.01003 | 0.03043 | 203% higher | no verdict |" in md  # 0.0204 / 0.01003
    html = html_path.read_text()
    assert "http://" not in html and "https://" not in html
    assert 'id="overlay-val-loss"' in html and 'id="overlay-lr"' in html
    assert re.search(r'<td class="better">better</td>', html)


def test_compare_command(tmp_path: Path) -> None:
    app = typer.Typer()
    register(app)
    a = _seed_run(tmp_path, "a", 0.2, 0.1, 3e-4, ["g1"])
    b = _seed_run(tmp_path, "b", 0.1, 0.1, 3e-4, ["g1"])
    write_json(a / "eval" / "test.json", _eval([0.5] * 40))
    write_json(b / "eval" / "test.json", _eval([0.5] * 30, [f"x{i}" for i in range(30)]))
    result = runner.invoke(app, ["compare", str(a), str(b), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "compare.html" in result.output and "different queries" in result.output
    assert "(unpaired" in result.output
    assert "--heldout" in result.output  # the warning about different queries names the fair comparison
    assert runner.invoke(app, ["compare", str(a)]).exit_code == 2
    assert runner.invoke(app, ["compare", str(a), str(b), "--baseline", str(tmp_path)]).exit_code == 2
    missing = runner.invoke(app, ["compare", str(a), str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "run directory not found" in missing.output
    with pytest.raises(ReportError, match="listed twice"):
        compare_runs([a, a])


def test_loss_is_paired_by_query_id_and_lower_is_better() -> None:
    # eval writes per_query.loss = {"query_ids": [...], "values": [...]} (no sub-metric): a bare "loss"
    # metric must pair like the others, and a lower loss is "better".
    def ev(values: list[float]) -> dict:
        return {"split": "test", "metrics": {"loss": {"mean": float(np.mean(values))}},
                "per_query": {"loss": {"query_ids": IDS, "values": values}}}  # fmt: skip

    (d,), flags = metric_deltas(ev([2.0] * 40), ev([1.0] * 20 + [1.2] * 20))
    assert flags == [] and d.paired and d.metric == "loss"
    assert d.interval.mean == pytest.approx(-0.9)
    assert d.verdict == "better"
