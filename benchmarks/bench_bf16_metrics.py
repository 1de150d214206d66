"""Retrieval metrics of one trained run embedded in fp32 vs bf16: how much does bf16 change the numbers?

Usage:
    python benchmarks/bench_bf16_metrics.py runs/demo/runs/fashion-finetuned --split test
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cliptune.config import load_config
from cliptune.data.prepare import prepare_data
from cliptune.evaluation.split import evaluate_split
from cliptune.models.factory import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    cfg = load_config(args.run / "config.yaml")
    data = prepare_data(cfg.data, args.run)
    model = load_model(args.run)
    results = {
        precision: evaluate_split(
            model, data, args.split, ks=cfg.eval.k, relevant=cfg.eval.relevant, bootstrap=0,
            confidence=cfg.eval.confidence, seed=0, text_column=cfg.data.text_column,
            group_column=cfg.data.group_column, cache_dir=cfg.model.cache_dir, precision=precision,
            progress=False,
        )["metrics"]
        for precision in ("fp32", "bf16")
    }  # fmt: skip
    diffs = {k: abs(results["fp32"][k]["mean"] - results["bf16"][k]["mean"]) for k in results["fp32"]}
    worst = max(diffs, key=diffs.get)
    print(
        f"{args.run} split={args.split}: {len(diffs)} metrics; max |fp32 - bf16| = {diffs[worst]:.4f} ({worst})"
    )
    for key in ("t2i/recall@1", "t2i/recall@5", "t2i/mrr", "i2t/recall@5", "i2t/mrr"):
        print(f"  {key:14} fp32 {results['fp32'][key]['mean']:.4f}  bf16 {results['bf16'][key]['mean']:.4f}")


if __name__ == "__main__":
    main()
