"""Does each training feature help on the demo's fashion catalogue? Measured once, not tuned (issue 16, item 5).

The demo's fine-tuned fashion config (``cliptune demo``: the embedded backbone, head-only on cached
features, InfoNCE at temperature 0.05, batch 64, lr 1e-3, early stopping on ``val/t2i/mrr``) is the
baseline; each variant changes one thing and keeps everything else (catalogue, split seed, train seed,
epoch budget, early-stopping rule):

* ``hard-negatives``: ``train.hard_negatives`` with one negative per caption, mined by ``cliptune mine``
  with the *baseline run's* model on its own train split (default window: every candidate, no margin,
  ``--range-min 0``);
* ``augment``: ``data.augment`` with crop 0.2, flip, blur 1.0 and caption templates + synonyms, ``views``
  cached views per image and caption, colour jitter off and ``colour`` protected (the suite tests colour),
  the suite's attributes protected too;
* ``grad-cache``: ``train.grad_cache`` with chunks of 16 rows of the 64-row batch. It changes memory,
  not the maths: its numbers must equal the baseline's up to fp32 round-off, so the script reports the
  largest difference (weights, every test metric) instead of a "helps" verdict;
* ``forgetting``: ``train.forgetting`` on the demo's art catalogue, then ``cliptune wise`` over alphas
  0, 0.25, 0.5, 0.75, 1 (the head-only demo has no zero-shot start: alpha 0 is the random epoch-0 head).
  The guard only watches, so this run too must equal the baseline (checked like grad-cache).

Every step is an ordinary ``cliptune`` command, printed before it runs, and skipped when its output exists
(so an interrupted run continues). Every run is evaluated on the test split with intervals; each variant is
paired with the baseline query by query (``report.deltas.metric_deltas``, the deltas of ``cliptune compare``)
and the fashion suite's verdicts are listed per category. Settings were fixed before the first run; the
test split judges, it never chooses.

    python benchmarks/bench_training_features.py --out /tmp/bench16            # the demo's catalogue, 15 epochs
    python benchmarks/bench_training_features.py --out /tmp/b16q --n 300 --epochs 2 --views 2   # a smoke run

Writes ``OUT/results.json`` and prints the markdown tables pasted into docs/training.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from safetensors.numpy import load_file

from cliptune.cli.demo_steps import write_demo_configs
from cliptune.models.backbone import STATE_FILE
from cliptune.report.deltas import Delta, metric_deltas
from cliptune.rundir import RunDir

BASELINE = "baseline"
METRICS = ("t2i/mrr", "t2i/recall@5")
ALPHAS = "0,0.25,0.5,0.75,1"
EQUAL_TO_BASELINE = ("grad-cache", "forgetting")
SUITE = "fashion-behaviour"  # the synthetic fashion catalogue's suite.yaml names itself so


def _variants(out: Path, views: int) -> dict[str, dict[str, Any]]:
    """Each variant's changes to the baseline config (deep-merged)."""
    fashion = out / "data" / "fashion"
    return {
        BASELINE: {},
        "hard-negatives": {"train": {"hard_negatives": {"file": str(out / "mined.jsonl"), "per_caption": 1}}},
        "augment": {
            "data": {
                "augment": {
                    "image": {"crop": 0.2, "flip": True, "blur": 1.0, "colour_jitter": 0.0},
                    "text": {"templates": True, "synonyms": True},
                    "views": views,
                    "seed": 0,
                    "protect": ["colour"],
                    "suite": str(fashion / "suite.yaml"),
                }
            }
        },
        "grad-cache": {"train": {"grad_cache": {"chunk_size": 16}}},
        "forgetting": {"train": {"forgetting": {"catalogue": str(out / "data" / "art")}}},
    }


def _merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _cli(args: list[str], ok: tuple[int, ...] = (0,)) -> float:
    """Run one ``cliptune`` command (printed first); return its wall time."""
    print("$ cliptune " + " ".join(args), flush=True)
    tic = time.perf_counter()
    rc = subprocess.run([sys.executable, "-m", "cliptune", *args], check=False).returncode
    if rc not in ok:
        raise SystemExit(f"cliptune {' '.join(args)} exited {rc}")
    return time.perf_counter() - tic


def _max_weight_diff(a: Path, b: Path) -> float:
    wa = load_file(str(RunDir(a).model / STATE_FILE))
    wb = load_file(str(RunDir(b).model / STATE_FILE))
    assert wa.keys() == wb.keys(), "the two runs saved different weights"
    return max(float(np.max(np.abs(wa[k].astype(np.float64) - wb[k].astype(np.float64)))) for k in wa)


def run(out: Path, n: int, epochs: int, views: int) -> dict[str, Any]:
    """Render, train, mine, evaluate, test and compare; return the measurements."""
    data, runs, cfg_dir = out / "data", out / "runs", out / "configs"
    fashion, art = data / "fashion", data / "art"
    # a continued run keeps the first attempt's timings and starting load (its steps are skipped now)
    before = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    load = {"start": before.get("machine", {}).get("load", {}).get("start", os.getloadavg())}
    if not (fashion / "metadata.csv").exists():
        _cli(["data", "synth", "fashion", str(fashion), "--n", str(n), "--quiet"])
    if not (art / "metadata.csv").exists():
        _cli(["data", "synth", "art", str(art), "--n", "200", "--quiet"])
    demo_cfg = yaml.safe_load(write_demo_configs(out)["finetuned"].read_text())
    demo_cfg["train"]["epochs"] = epochs
    walls: dict[str, float] = dict(before.get("walls", {}))
    for name, change in _variants(out, views).items():
        run_dir = runs / name
        if name == "hard-negatives" and not (out / "mined.jsonl").exists():
            walls["mine"] = _cli(
                ["mine", str(runs / BASELINE), str(out / "mined.jsonl"), "--per-caption", "1"]
            )
        if not (run_dir / "summary.json").exists():
            cfg = _merge(demo_cfg, change) | {"name": name}
            path = cfg_dir / f"{name}.yaml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            walls[name] = _cli(["train", str(path), "--runs", str(runs), "--quiet"])
        if not (run_dir / "eval" / "test.json").exists():
            _cli(["eval", str(run_dir), "--split", "test"])
        if not RunDir(run_dir).suite(SUITE).exists():
            _cli(["test", str(run_dir), "--suite", str(fashion / "suite.yaml")], ok=(0, 1))
    wise = runs / "forgetting" / "wise" / "wise.json"
    if not wise.exists():
        walls["wise"] = _cli(["wise", str(runs / "forgetting"), "--alphas", ALPHAS, "--quiet"])
    names = list(_variants(out, views))
    _cli(
        [
            "compare",
            *[str(runs / name) for name in names],
            "--baseline",
            str(runs / BASELINE),
            "--out",
            str(out / "compare"),
        ]
    )
    load["end"] = os.getloadavg()
    return _collect(out, names, walls, load, n=n, epochs=epochs, views=views)


def _delta(d: Delta) -> dict[str, Any]:
    iv = d.interval
    return {
        "mean": None if iv is None else iv.mean,
        "low": None if iv is None else iv.low,
        "high": None if iv is None else iv.high,
        "verdict": d.verdict,
        "paired": d.paired,
    }


def _suite(run_dir: Path) -> dict[str, dict[str, Any]]:
    result = json.loads(RunDir(run_dir).suite(SUITE).read_text())
    return {
        cat: {"passed": bool(v["passed"]), "failed": v["n_failed_queries"], "queries": v["n_queries"]}
        for cat, v in result["categories"].items()
    }


def _cpu() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return next(
        (ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor()
    )


def _collect(
    out: Path, names: list[str], walls: dict[str, float], load: dict[str, Any], **settings: Any
) -> dict[str, Any]:
    runs = out / "runs"
    base_eval = json.loads((runs / BASELINE / "eval" / "test.json").read_text())
    results: dict[str, Any] = {
        "settings": settings,
        "machine": {"platform": platform.platform(), "cpu": _cpu(), "cpus": os.cpu_count(), "load": load},
        "walls": walls,
        "runs": {},
    }
    for name in names:
        ev = json.loads((runs / name / "eval" / "test.json").read_text())
        summary = json.loads((runs / name / "summary.json").read_text())
        deltas, flags = metric_deltas(base_eval, ev, n_resamples=2000, seed=0)
        by_metric = {d.metric: d for d in deltas}
        results["runs"][name] = {
            "epochs": summary.get("epochs_trained"),
            "metrics": {m: ev["metrics"][m] for m in METRICS},
            "deltas": {m: _delta(by_metric[m]) for m in METRICS},
            "flags": flags,
            "suite": _suite(runs / name),
            "info": summary.get("info", {}),
        }
    # grad-cache changes memory, forgetting only watches: neither may change the numbers, so both get an
    # equality check against the baseline instead of a "helps" verdict
    results["equality"] = {}
    for name in EQUAL_TO_BASELINE:
        ev = json.loads((runs / name / "eval" / "test.json").read_text())
        results["equality"][name] = {
            "max_weight_diff": _max_weight_diff(runs / BASELINE, runs / name),
            "max_metric_diff": max(
                abs(float(ev["metrics"][m]["mean"]) - float(base_eval["metrics"][m]["mean"]))
                for m in base_eval["metrics"]
            ),
        }
    results["wise"] = json.loads((runs / "forgetting" / "wise" / "wise.json").read_text())
    return results


def _iv(m: dict[str, Any]) -> str:
    return f"{m['mean']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"


def tables(results: dict[str, Any]) -> str:
    """Markdown: the with/without table, then the WiSE-FT sweep."""
    runs = results["runs"]
    cats = list(runs[BASELINE]["suite"])
    lines = [
        "| run | epochs | test t2i/mrr [95% CI] | test t2i/recall@5 [95% CI] | mrr delta vs baseline "
        "[95% CI], verdict | recall@5 delta, verdict | suite (failed/scored queries): "
        + ", ".join(cats)
        + " |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in runs.items():
        cells = []
        for m in METRICS:
            d = r["deltas"][m]
            if name == BASELINE:
                cells.append("-")
            elif name in EQUAL_TO_BASELINE:
                cells.append("equal to the baseline (below), no verdict")
            elif d["mean"] is None:
                cells.append(d["verdict"])
            else:
                cells.append(f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}], {d['verdict']}")
        suite = ", ".join(
            ("pass" if r["suite"][c]["passed"] else "FAIL")
            + f" {r['suite'][c]['failed']}/{r['suite'][c]['queries']}"
            for c in cats
        )
        lines.append(
            f"| {name} | {r['epochs']} | {_iv(r['metrics']['t2i/mrr'])} | {_iv(r['metrics']['t2i/recall@5'])} "
            f"| {cells[0]} | {cells[1]} | {suite} |"
        )
    lines.append("")
    for name, eq in results["equality"].items():
        lines.append(
            f"{name} vs baseline: largest weight difference {eq['max_weight_diff']:.2e}, largest difference "
            f"of a test metric's mean {eq['max_metric_diff']:.2e}."
        )
    lines += [
        "",
        f"| alpha | domain (test) {results['wise']['metric']} | general (art) {results['wise']['metric']} |",
        "| --- | --- | --- |",
    ]
    for p in results["wise"]["points"]:
        lines.append(f"| {p['alpha']:g} | {_iv(p['domain'])} | {_iv(p['general'])} |")
    rec = results["wise"]["recommended"]
    lines += ["", f"Recommended alpha: {rec['alpha']} ({rec.get('reason', '')})"]
    lines += ["", f"Machine: {results['machine']}", f"Walls (s): {results['walls']}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=1500, help="fashion catalogue size (the demo's: 1500)")
    parser.add_argument("--epochs", type=int, default=15, help="epoch budget of every run (the demo's: 15)")
    parser.add_argument("--views", type=int, default=4, help="augmented views per item (data.augment.views)")
    args = parser.parse_args()
    (args.out / "configs").mkdir(parents=True, exist_ok=True)
    results = run(args.out, args.n, args.epochs, args.views)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(tables(results))


if __name__ == "__main__":
    main()
