"""`compare` recommends from held-out rows only, flags losses of different kinds, and fits 80 columns."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cliptune.cli.report import register
from cliptune.ranking.bootstrap import paired_bootstrap_delta
from cliptune.report import compare_runs
from cliptune.report.compare import metric_deltas
from tests.test_report import eval_json, write_json, write_run

runner = CliRunner()
IDS = [str(i) for i in range(40)]


def _run(root: Path, name: str, mrr: dict[str, list[float]], loss: str = "info_nce") -> Path:
    run = write_run(root / name, [{"lr": 1e-3, "val/loss": 0.5}], {"best_epoch": 0}, {"loss": {"name": loss}})
    for split, values in mrr.items():
        write_json(
            run / "eval" / f"{split}.json", eval_json(split, {"t2i": {"ids": IDS, "values": {"mrr": values}}})
        )
    return run


def _ramp(low: float, high: float) -> list[float]:
    return [round(low + (high - low) * i / 39, 4) for i in range(40)]


def test_train_rows_never_flip_the_verdict_or_the_best_run(tmp_path: Path) -> None:
    # The case: the tuned run memorised train (mrr 0.95 vs 0.50, "better" there) but is worse on
    # val and test (0.55 vs 0.74): counting train rows would call it better; held-out rows name the frozen one.
    frozen = _run(
        tmp_path, "frozen", {"train": _ramp(0.3, 0.7), "val": _ramp(0.6, 0.88), "test": _ramp(0.6, 0.88)}
    )
    tuned = _run(
        tmp_path, "tuned", {"train": _ramp(0.9, 1.0), "val": _ramp(0.4, 0.7), "test": _ramp(0.4, 0.7)}
    )
    html, md = compare_runs([frozen, tuned], baseline=frozen, out=tmp_path / "o")
    data = json.loads((tmp_path / "o" / "compare.json").read_text())
    summary = data["summary"]["tuned"]
    assert summary["splits"] == ["val", "test"] and summary["better"] == []
    assert summary["worse"] == ["val t2i/mrr", "test t2i/mrr"]
    assert summary["train"] == {"better": 1, "worse": 0}  # shown, not counted
    best = data["best"]
    assert (best["run"], best["split"], best["metric"]) == ("frozen", "test", "t2i/mrr")
    test_mrr = json.loads((frozen / "eval" / "test.json").read_text())["metrics"]["t2i/mrr"]
    assert best["mean"] == pytest.approx(sum(_ramp(0.6, 0.88)) / 40) and best["interval"] == [
        test_mrr["low"],
        test_mrr["high"],
    ]
    sentence = (
        f"Best run by t2i/mrr on test: the baseline frozen, {test_mrr['mean']:.4f} [{test_mrr['low']:.4f}, "
    )
    text = md.read_text()
    assert sentence in text and sentence in html.read_text()
    assert "better on 0 metric(s), worse on 2" in text
    assert "shown, not counted in the verdict summary" in text  # the train delta table says so

    result = runner.invoke(_app(), ["compare", str(frozen), str(tuned), "--out", str(tmp_path / "o2")])
    assert result.exit_code == 0, result.output
    assert "Best run by t2i/mrr on test: the baseline frozen" in " ".join(result.output.split())


def test_best_candidate_is_named_with_its_interval_and_ties(tmp_path: Path) -> None:
    base = _run(tmp_path, "base", {"test": _ramp(0.2, 0.5)})
    good = _run(tmp_path, "good", {"test": _ramp(0.6, 0.9)})
    also = _run(tmp_path, "also", {"test": [v + 0.001 * (i % 3 - 1) for i, v in enumerate(_ramp(0.6, 0.9))]})
    compare_runs([base, good, also], out=tmp_path / "o")
    best = json.loads((tmp_path / "o" / "compare.json").read_text())["best"]
    means = {n: sum(_values(tmp_path / n, "test")) / 40 for n in ("good", "also")}
    winner = max(means, key=means.__getitem__)
    other = {"good", "also"} - {winner}
    assert best["run"] == winner and best["not_distinguishable_from"] == sorted(other)
    # The delta against the baseline is the paired bootstrap of the same queries (independent recomputation).
    iv = paired_bootstrap_delta(_values(base, "test"), _values(tmp_path / winner, "test"), 200, 0.95, 0)
    assert best["delta_vs_baseline"]["low"] == pytest.approx(iv.low) and iv.low > 0
    assert f"vs the baseline base: better. It is not distinguishable from {other.pop()}" in best["sentence"]


def test_no_run_distinguishable_from_the_baseline(tmp_path: Path) -> None:
    base = _run(tmp_path, "base", {"val": _ramp(0.2, 0.8)})
    same = _run(
        tmp_path, "same", {"val": [v + (0.01 if i % 2 else -0.01) for i, v in enumerate(_ramp(0.2, 0.8))]}
    )
    compare_runs([base, same], out=tmp_path / "o")
    best = json.loads((tmp_path / "o" / "compare.json").read_text())["best"]
    assert best["run"] is None and best["split"] == "val"
    assert best["sentence"].startswith("No run is distinguishable from the baseline base by t2i/mrr on val (")


def test_losses_of_different_kinds_are_flagged_not_compared(tmp_path: Path) -> None:
    a = _run(tmp_path, "clip-infonce", {"test": _ramp(0.2, 0.5)})
    b = _run(tmp_path, "clip-siglip", {"test": _ramp(0.2, 0.5)}, loss="siglip")
    for run, name, temp, loss in ((a, "info_nce", 0.07, 2.0), (b, "info_nce", 0.01, 1.0)):
        ev = json.loads((run / "eval" / "test.json").read_text())
        ev["loss"] = {"name": name, "temperature": temp, "temperature_source": "config"}
        ev["metrics"]["loss"] = {"mean": loss, "low": loss, "high": loss, "n": 40}
        ev["per_query"]["loss"] = {"query_ids": IDS, "values": [loss] * 40}
        write_json(run / "eval" / "test.json", ev)
    _, md = compare_runs([a, b], out=tmp_path / "o")
    text = md.read_text()
    assert (
        "Losses of different kinds are not comparable (clip-infonce: info_nce, clip-siglip: siglip)" in text
    )
    assert "| clip-siglip | test |" in text and "1.0000 (siglip) |" in text
    # The eval loss was computed with two temperatures: a loss 1.0 lower is no verdict, not "50% better".
    evals = [json.loads((r / "eval" / "test.json").read_text()) for r in (a, b)]
    loss = next(d for d in metric_deltas(evals[0], evals[1])[0] if d.metric == "loss")
    assert loss.verdict == "no verdict" and loss.note == "different loss formulas: not comparable"
    assert loss.relative == "50% lower"


def test_console_tables_stay_whole_at_80_columns(tmp_path: Path) -> None:
    a = _run(tmp_path, "a-run-with-a-rather-long-name", {"val": _ramp(0.2, 0.5), "test": _ramp(0.2, 0.5)})
    b = _run(tmp_path, "b-run-with-a-rather-long-name", {"val": _ramp(0.1, 0.9), "test": _ramp(0.3, 0.6)})
    for run in (a, b):  # a siamese-style metric with the longest names
        for split in ("val", "test"):
            ev = json.loads((run / "eval" / f"{split}.json").read_text())
            extra = eval_json(split, {"triplet": {"ids": IDS, "values": {"accuracy/cross": _ramp(0.4, 0.9)}}})
            ev["metrics"] |= extra["metrics"]
            ev["per_query"] |= extra["per_query"]
            write_json(run / "eval" / f"{split}.json", ev)
    result = runner.invoke(
        _app(), ["compare", str(a), str(b), "--out", str(tmp_path / "o")], env={"COLUMNS": "80"}
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    paths = ("compare: ", "markdown: ")  # a file path is printed whole, so it can be copied
    assert [line for line in lines if len(line) > 80 and not line.startswith(paths)] == []
    data = json.loads((tmp_path / "o" / "compare.json").read_text())
    number = r"[+-]\d\.\d{3,4}"
    for split, deltas in data["deltas"][b.name].items():
        for d in deltas:
            iv = d["interval"]
            whole = f"{d['baseline']:.4f}  {d['candidate']:.4f}  {iv['mean']:+.3f} [{iv['low']:+.3f}, {iv['high']:+.3f}]"
            name = d["metric"].split("/", 1)[1]
            assert any(line.strip().startswith(name) and whole in line for line in lines), (
                split,
                d["metric"],
            )
    # No interval is cut: every line that opens one closes it on the same line.
    opened = [line for line in lines if re.search(r" \[[+-]", line)]
    assert opened and all(re.search(rf"{number} \[{number}, {number}\]", line) for line in opened), opened


def _values(run: Path, split: str) -> list[float]:
    values: list[float] = json.loads((run / "eval" / f"{split}.json").read_text())["per_query"]["t2i"][
        "values"
    ]["mrr"]
    return values


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app
