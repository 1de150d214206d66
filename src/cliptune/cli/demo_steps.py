"""The offline demo: the brief's story told with ordinary ``cliptune`` commands.

1. render the fashion and art catalogues and check them;
2. fashion: train a *base* model on generic captions (garment + colour) and a *fine-tuned* one on
   attribute-rich captions (rips, pattern, style), both on cached features of the embedded backbone;
   evaluate both on the same held-out test queries (the rich captions), run the shipped behavioural suite
   on both; generate a suite from the catalogue's attribute columns (wording from a small phrases file the
   demo writes, as a user would) and run it on the fine-tuned model, to see whether the story holds without
   the hand-written suite; audit the catalogue for near-duplicate images that cross the run's splits;
   compare the two runs;
3. art: train the Siamese head on originals and their derivatives and report the seed-000 figures;
4. index the fine-tuned model and run two searches.

Each step is a list of CLI arguments, printed before it runs, so a user can re-run any step by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cliptune.rundir import write_text_atomic

__all__ = [
    "GENERATED_ATTRIBUTES",
    "PHRASES",
    "DemoStep",
    "demo_steps",
    "write_demo_configs",
]

# The generated suite's attributes, in the order of the shipped suite's categories (rips, styles, garments,
# colours, patterns): a combination's first attribute is the one it tests (docs/suites.md).
GENERATED_ATTRIBUTES = ("rips", "style", "garment", "colour", "pattern")

# The user's wording of the catalogue's values, written once from the fashion vocabulary (what a shopper
# types: "ripped", "slim-fit", "plaid"), never from a result: the generator's default for a true/false
# column ("with rips") is not how anyone asks for ripped jeans.
PHRASES: dict[str, Any] = {
    "order": ["rips", "style", "colour", "pattern", "garment"],
    "template": "{}",
    "phrases": {
        "rips": {True: "ripped", False: "intact"},
        "style": {"slim": "slim-fit", "oversized": "oversized", "regular": "regular-fit"},
        "pattern": {"checked": "plaid", "dotted": "polka-dot", "plain": "plain"},
        "colour": {"grey": ["grey", "gray"]},
    },
}


@dataclass(frozen=True)
class DemoStep:
    """One command of the demo and what it shows.

    Attributes:
        title: What the step is for (printed above the command).
        args: Arguments after ``cliptune``.
        may_fail: Exit code 1 is an expected outcome (a behavioural gate that fails is news, not an error).
    """

    title: str
    args: list[str]
    may_fail: bool = False

    @property
    def command(self) -> str:
        return "cliptune " + " ".join(_quote(a) for a in self.args)


def _quote(arg: str) -> str:
    return f'"{arg}"' if any(c in arg for c in " {}:,") else arg


def _fashion_config(out: Path, name: str, text_column: str, epochs: int) -> dict[str, Any]:
    return {
        "name": name,
        "data": {
            "catalogue": str(out / "data" / "fashion"),
            "text_column": text_column,
            "split": {"ratios": {"train": 0.7, "val": 0.15, "test": 0.15}, "seed": 0},
        },
        # the catalogue is rendered at 160 px: run the CNN at that size instead of upsampling to 224
        "model": {"backbone": "embedded", "image_size": 160, "trainable_layers": 0},
        "loss": {"name": "info_nce", "temperature": 0.05},
        "train": {
            "epochs": epochs,
            "batch_size": 64,
            "lr": 1e-3,
            "early_stopping": {"metric": "val/t2i/mrr", "mode": "max", "patience": 4},
            "plateau": {"metric": "val/loss", "patience": 1},
        },
    }


def _art_config(out: Path, epochs: int) -> dict[str, Any]:
    return {
        "name": "art-siamese",
        "data": {"catalogue": str(out / "data" / "art"), "split": {"ratios": {"train": 0.8, "val": 0.2}}},
        "model": {
            "backbone": "embedded",
            "image_size": 160,
            "trainable_layers": 0,
            "head": {"width": 128, "depth": 2, "heads": 4},
        },
        "loss": {"name": "triplet", "margin": 0.2},
        "train": {"task": "siamese", "epochs": epochs, "batch_size": 32, "lr": 3e-4, "early_stopping": None},
    }


def write_demo_configs(out: Path, fast: bool = False) -> dict[str, Path]:
    """Write the demo's run configs and the generated suite's phrases file into ``out/configs``.

    Every training step can then be re-run by hand, and ``suite generate`` reads the phrases as a user's
    own file (key ``phrases``).
    """
    folder = out / "configs"
    folder.mkdir(parents=True, exist_ok=True)
    epochs = 6 if fast else 15
    configs = {
        "base": _fashion_config(out, "fashion-base", "text_generic", epochs),
        "finetuned": _fashion_config(out, "fashion-finetuned", "text", epochs),
        "art": _art_config(out, 8 if fast else 20),
    }
    paths = {}
    for key, cfg in configs.items():
        path = folder / f"{cfg['name']}.yaml"
        write_text_atomic(path, yaml.safe_dump(cfg, sort_keys=False))
        paths[key] = path
    phrases = folder / "fashion-phrases.yaml"
    write_text_atomic(phrases, yaml.safe_dump(PHRASES, sort_keys=False))
    paths["phrases"] = phrases
    return paths


def demo_steps(out: Path, fast: bool = False) -> list[DemoStep]:
    """The demo as a list of CLI steps (configs must exist: see :func:`write_demo_configs`)."""
    data, runs, cfg = out / "data", out / "runs", out / "configs"
    fashion, art = str(data / "fashion"), str(data / "art")
    base, tuned, siam = str(runs / "fashion-base"), str(runs / "fashion-finetuned"), str(runs / "art-siamese")
    suite = str(data / "fashion" / "suite.yaml")
    generated = str(data / "fashion" / "generated-suite.yaml")
    index = str(out / "index")
    n_fashion, n_art = ("600", "80") if fast else ("1500", "200")
    q = ["--quiet"]
    return [
        DemoStep(
            "Render the synthetic fashion catalogue",
            ["data", "synth", "fashion", fashion, "--n", n_fashion, *q],
        ),
        DemoStep("Check it (every bad row would be listed)", ["data", "check", fashion, *q]),
        DemoStep("Render the synthetic art catalogue", ["data", "synth", "art", art, "--n", n_art, *q]),
        DemoStep("Check it", ["data", "check", art, *q]),
        DemoStep(
            "Train the base model on generic captions (garment + colour)",
            ["train", str(cfg / "fashion-base.yaml"), "--runs", str(runs), *q],
        ),
        DemoStep(
            "Fine-tune on attribute-rich captions (rips, pattern, style)",
            ["train", str(cfg / "fashion-finetuned.yaml"), "--runs", str(runs), *q],
        ),
        DemoStep(
            "Evaluate the base model on the held-out test queries (rich captions)",
            ["eval", base, "--split", "test", "--text-column", "text"],
        ),
        DemoStep("Evaluate the fine-tuned model on the same queries", ["eval", tuned, "--split", "test"]),
        DemoStep(
            "Behavioural suite on the base model (its held-out test images)",
            ["test", base, "--suite", suite],
            may_fail=True,
        ),
        DemoStep(
            "Behavioural suite on the fine-tuned model (the same test images)",
            ["test", tuned, "--suite", suite],
            may_fail=True,
        ),
        DemoStep(
            "Generate a suite from the catalogue's attributes instead (the run's held-out images)",
            [
                "suite",
                "generate",
                fashion,
                "--out",
                generated,
                "--splits-from",
                tuned,
                "--attributes",
                ",".join(GENERATED_ATTRIBUTES),
                "--phrases",
                str(cfg / "fashion-phrases.yaml"),
            ],
        ),
        DemoStep(
            "The generated suite on the fine-tuned model (does the story hold?)",
            ["test", tuned, "--suite", generated],
            may_fail=True,
        ),
        DemoStep(
            "Audit the catalogue for copies that cross the fine-tuned run's splits (leaks)",
            ["data", "audit", fashion, "--splits-from", tuned, "--out", str(out / "audit"), *q],
            may_fail=True,
        ),
        DemoStep(
            "Compare the two runs (paired bootstrap on the same queries)",
            ["compare", base, tuned, "--baseline", base, "--out", str(out / "compare")],
        ),
        DemoStep("Report on the fine-tuned run", ["report", tuned]),
        DemoStep(
            "Train the Siamese head on art originals and derivatives",
            ["train", str(cfg / "art-siamese.yaml"), "--runs", str(runs), *q],
        ),
        DemoStep("Evaluate it (seed-000 figures)", ["eval", siam, "--split", "val"]),
        DemoStep("Report on the Siamese run", ["report", siam]),
        DemoStep(
            "Index the fashion catalogue with the fine-tuned model",
            ["index", tuned, "--data", fashion, index],
        ),
        DemoStep("Search it", ["search", index, "ripped blue jeans", "-k", "5"]),
        DemoStep(
            "Search with an attribute filter",
            ["search", index, "oversized sweater", "-k", "5", "--where", "colour=red"],
        ),
    ]
