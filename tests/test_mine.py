"""Hard-negative mining (`cliptune mine`) and training with the mined negatives as extra batch images."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from cliptune.cli.app import app
from cliptune.config import load_config
from cliptune.data.synthetic import render_fashion
from cliptune.losses import InfoNCELoss, SigLIPLoss, info_nce, siglip
from cliptune.train.mining import (
    MiningError,
    MiningWindow,
    attribute_codes,
    negatives_of_rows,
    read_mined,
    select_hard_negatives,
    write_mined,
)
from tests.tiny_models import make_tiny_clip

runner = CliRunner()


def _unit(*angles_deg: float) -> torch.Tensor:
    """Unit 2-D vectors at the given angles: the cosine of two of them is cos(angle difference)."""
    a = torch.tensor(angles_deg, dtype=torch.float64) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], dim=1)


# A tiny catalogue of 6 images with known embeddings; one caption (at 0 degrees) whose own image is image 0.
# Image:      0        1          2                3               4           5
# angle:      0        10         20               30              40          50   -> cosine with the caption
# group:      g0       g0         g1               g2              g3          g4
# garment:    skirt    skirt      skirt            skirt           dress       (none)
# colour:     red      red        red              blue            red         (none)
# Image 1 shares the caption's group; image 2 matches both attributes of image 0 (a false negative, other
# group); image 3 and 4 differ in one attribute each; image 5 has no attributes (group rule only).
IMAGES = _unit(0, 10, 20, 30, 40, 50)
CAPTION = _unit(0)
GROUPS = ["g0", "g0", "g1", "g2", "g3", "g4"]
ATTRS = pd.DataFrame(
    {
        "garment": ["skirt", "skirt", "skirt", "skirt", "dress", None],
        "colour": ["red", "red", "red", "blue", "red", None],
    }
)


def _mine(window: MiningWindow, caption: torch.Tensor = CAPTION, positive: int = 0) -> tuple[list[int], ...]:
    codes = attribute_codes(ATTRS, ["garment", "colour"])
    mined = select_hard_negatives(caption, IMAGES, [positive], GROUPS, codes, window)
    return mined.negatives[0], mined.ranks[0], mined.positive_ranks


def test_same_group_and_attribute_twins_are_never_negatives() -> None:
    negatives, ranks, positive_ranks = _mine(MiningWindow(per_caption=10))
    # ranks by angle: image i has rank i + 1. Excluded: 0 (itself), 1 (same group), 2 (garment and colour
    # equal to image 0's). Kept: 3 (blue), 4 (dress), 5 (no attributes: only its group decides).
    assert negatives == [3, 4, 5]
    assert ranks == [4, 5, 6]
    assert positive_ranks == [1]


def test_an_item_without_attributes_is_excluded_by_its_group_only() -> None:
    # caption at 50 degrees whose own image is 5 (no attributes): only image 5 itself is left out
    negatives, ranks, _ = _mine(MiningWindow(per_caption=10), _unit(50), positive=5)
    assert negatives == [4, 3, 2, 1, 0]  # by rank: 40, 30, 20, 10, 0 degrees away ... nearest first
    assert ranks == [2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    ("window", "expected"),
    [
        # not excluded, in rank order: images 3, 4, 5 (cosines cos30 = 0.866, cos40 = 0.766, cos50 = 0.643);
        # the excluded 0, 1, 2 take no place in the window (sentence-transformers' positives do not either)
        (MiningWindow(per_caption=2), [3, 4]),  # the two best
        (MiningWindow(per_caption=10, range_min=1), [4, 5]),  # the best candidate skipped
        (MiningWindow(per_caption=10, range_max=2), [3, 4]),  # candidates: the first two not excluded
        (MiningWindow(per_caption=10, range_min=1, range_max=2), [4]),
        # absolute margin 0.2: score <= 1 - 0.2 = 0.8; cos30 = 0.866 out, cos40 = 0.766 and cos50 = 0.643 in
        (MiningWindow(per_caption=10, margin=0.2), [4, 5]),
        # relative margin 0.3: score <= 1 - |1| * 0.3 = 0.7; only cos50 = 0.643 in
        (MiningWindow(per_caption=10, relative_margin=0.3), [5]),
        # range_min counts the candidates that pass the margin: 3 fails it, 4 is skipped, 5 kept
        (MiningWindow(per_caption=1, range_min=1, margin=0.2), [5]),
        # range_max is taken before the margin: candidates 3, 4; 3 fails the margin
        (MiningWindow(per_caption=10, range_max=2, margin=0.2), [4]),
    ],
)
def test_rank_window_and_margins_keep_exactly_the_hand_computed_set(
    window: MiningWindow, expected: list[int]
) -> None:
    assert _mine(window)[0] == expected


def test_the_window_counts_candidates_beyond_a_large_excluded_group() -> None:
    # 40 photos of the caption's own group rank first, then 3 others: range_max counts only the others
    images = torch.cat([_unit(*[0.1 * i for i in range(40)]), _unit(30, 40, 50)])
    groups = ["own"] * 40 + ["a", "b", "c"]
    mined = select_hard_negatives(CAPTION, images, [0], groups, np.full((43, 0), -1), MiningWindow(10, 0, 2))
    assert mined.negatives == [[40, 41]] and mined.ranks == [[41, 42]]


def test_a_negative_positive_score_lowers_the_relative_bar_too() -> None:
    # positive score -0.5, relative margin 0.2: bar = -0.5 - 0.5 * 0.2 = -0.6 (not -0.5 * 0.8 = -0.4)
    caption = _unit(0)
    images = _unit(120, 125, 130)  # cosines -0.5, -0.574, -0.643; image 0 is the positive
    mined = select_hard_negatives(
        caption, images, [0], ["p", "x", "y"], np.full((3, 0), -1), MiningWindow(5, relative_margin=0.2)
    )
    assert mined.negatives == [[2]]


def test_bad_windows_are_named() -> None:
    with pytest.raises(MiningError, match="range_max"):
        MiningWindow(range_min=5, range_max=5)
    with pytest.raises(MiningError, match="not both"):
        MiningWindow(margin=0.1, relative_margin=0.1)
    with pytest.raises(MiningError, match="relative_margin"):
        MiningWindow(relative_margin=1.0)


def test_info_nce_with_extra_images_equals_a_hand_computation() -> None:
    image, text = torch.eye(2), torch.eye(2)
    extra = torch.tensor([[1.0, 1.0]])  # cosine 1/sqrt(2) with both captions
    c = 1 / math.sqrt(2)
    # i2t (per image): logits [1, 0] -> log(1 + e^-1). t2i (per caption): logits [1, 0, c] -> -1 + log(e + 1 + e^c)
    i2t, t2i = math.log(1 + math.exp(-1)), -1 + math.log(math.e + 1 + math.exp(c))
    got = info_nce(image, text, 1.0, extra_image=extra)
    assert got.item() == pytest.approx((i2t + t2i) / 2, abs=1e-6)
    # caption 1 may not use the extra image: its t2i is back to log(1 + e^-1)
    mask = torch.tensor([[True], [False]])
    got = InfoNCELoss(temperature=1.0)(image, text, extra, mask)
    assert got["t2i"].item() == pytest.approx((t2i + i2t) / 2, abs=1e-6)
    assert got["i2t"].item() == pytest.approx(i2t, abs=1e-6)
    # no extra images: the loss of old
    assert info_nce(image, text, 1.0).item() == pytest.approx(i2t, abs=1e-6)


def test_siglip_with_extra_images_equals_a_hand_computation() -> None:
    image, text = torch.eye(2), torch.eye(2)
    extra = torch.tensor([[1.0, 1.0]])
    c = 1 / math.sqrt(2)
    # scale 1, bias 0. Batch: 2 positives -log sig(1), 2 negatives -log sig(-0) = log 2; the extra image is
    # a negative of each caption: -log sig(-c) = log(1 + e^c). Sum / B (2 rows).
    base = 2 * math.log(1 + math.exp(-1)) + 2 * math.log(2)
    expected = (base + 2 * math.log(1 + math.exp(c))) / 2
    assert siglip(image, text, 1.0, 0.0, extra_image=extra).item() == pytest.approx(expected, abs=1e-6)
    loss = SigLIPLoss(init_logit_scale=0.0, init_logit_bias=0.0)
    masked = loss(image, text, extra, torch.tensor([[False], [True]]))["loss"]
    assert masked.item() == pytest.approx((base + math.log(1 + math.exp(c))) / 2, abs=1e-6)


class _IdentityHeads(torch.nn.Module):
    """Stand-in backbone whose heads pass cached features through: the embeddings are the features."""

    def image_head(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def text_head(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_a_batch_s_mined_negatives_are_extra_images_except_for_their_own_group() -> None:
    from cliptune.train.tasks.retrieval import RetrievalModel

    model = RetrievalModel(_IdentityHeads(), InfoNCELoss(temperature=1.0))  # type: ignore[arg-type]
    neg = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[1.0, -1.0], [3.0, 1.0]]])  # (B=2, K=2, F=2)
    batch = {
        "image_features": torch.eye(2),
        "text_features": torch.eye(2),
        "negative_features": neg,
        "negative_mask": torch.tensor([[True, False], [True, True]]),  # item 0's second slot is padding
        "negative_groups": torch.tensor([[5, 0], [7, 0]]),  # item 1's second negative is of group 0 ...
        "group": torch.tensor([0, 1]),  # ... which is caption 0's own group: caption 0 may not use it
    }
    usable = model.hard_negatives(batch)[1]
    assert usable.tolist() == [[True, False, True, False], [True, False, True, True]]
    expected = info_nce(torch.eye(2), torch.eye(2), 1.0, extra_image=neg.flatten(0, 1), extra_mask=usable)
    assert model(batch)["loss"].item() == pytest.approx(expected.item(), abs=1e-6)
    assert model(batch)["loss"].item() > info_nce(torch.eye(2), torch.eye(2), 1.0).item()


def test_mined_files_round_trip_and_are_checked_against_the_training_rows(tmp_path: Path) -> None:
    rows = pd.DataFrame(
        {
            "row": [1, 2, 3, 4],
            "file_name": ["a.png", "b.png", "c.png", "d.png"],
            "text": ["red skirt", "blue skirt", "red dress", "held out"],
            "split": ["train", "train", "train", "val"],
        }
    )
    mined = pd.DataFrame(
        {
            "row": [1, 2],
            "file_name": ["a.png", "b.png"],
            "caption": ["red skirt", "blue skirt"],
            "positive_score": [0.9, 0.8],
            "positive_rank": [1, 2],
            "negatives": [["c.png", "b.png"], ["a.png"]],
            "scores": [[0.7, 0.6], [0.85]],
            "ranks": [[2, 3], [1]],
        }
    )
    for suffix in (".parquet", ".jsonl"):
        path = write_mined(mined, tmp_path / f"mined{suffix}")
        back = read_mined(path)
        assert back["negatives"].map(list).tolist() == [["c.png", "b.png"], ["a.png"]]
        # positions into rows: a -> 0, b -> 1, c -> 2; row 3 (no record) gets none; k = 1 keeps the first
        assert negatives_of_rows(back, rows, [0, 1, 2], "text", path, k=2) == [[2, 1], [0], []]
        assert negatives_of_rows(back, rows, [0, 1, 2], "text", path, k=1) == [[2], [0], []]
    leaking = mined.assign(negatives=[["d.png"], ["a.png"]])
    with pytest.raises(MiningError, match="row 1: negative 'd.png' is not a training image"):
        negatives_of_rows(leaking, rows, [0, 1, 2], "text", tmp_path / "m", k=1)
    other = mined.assign(caption=["a red skirt", "blue skirt"])
    with pytest.raises(MiningError, match="row 1: caption 'a red skirt' in the file"):
        negatives_of_rows(other, rows, [0, 1, 2], "text", tmp_path / "m", k=1)
    held_out = mined.assign(row=[4, 2], caption=["held out", "blue skirt"])
    with pytest.raises(MiningError, match="caption row 4 is split 'val'"):
        negatives_of_rows(held_out, rows, [0, 1, 2], "text", tmp_path / "m", k=1)
    with pytest.raises(MiningError, match="missing column"):
        (tmp_path / "bad.jsonl").write_text('{"row": 1}\n')
        read_mined(tmp_path / "bad.jsonl")


# --- end to end: mine with a run's model, train with the file, resume -----------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mine")
    return {
        "root": root,
        "fashion": render_fashion(root / "fashion", n=60, seed=0, size=128),
        "clip": make_tiny_clip(root / "clip", seed=0),
    }


def _config(s: dict[str, Path], name: str, **train: object) -> Path:
    cfg = {
        "data": {"catalogue": str(s["fashion"]), "split": {"ratios": {"train": 0.7, "val": 0.3}}},
        "model": {"backbone": str(s["clip"]), "cache_dir": str(s["root"] / "cache")},
        "train": {"epochs": 2, "batch_size": 8, "lr": 2e-3, "early_stopping": None, **train},
    }
    path = s["root"] / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _train(s: dict[str, Path], *args: str) -> None:
    result = runner.invoke(app, ["train", *args, "--runs", str(s["root"] / "runs"), "-q"])
    assert result.exit_code == 0, result.output


def test_mine_a_run_then_train_and_resume_with_the_negatives(setup: dict[str, Path]) -> None:
    s, runs = setup, setup["root"] / "runs"
    _train(s, str(_config(s, "base.yaml", epochs=1)), "--name", "base")
    out = s["root"] / "mined.jsonl"
    result = runner.invoke(
        app, ["mine", str(runs / "base"), str(out), "--per-caption", "2", "--range-min", "1", "-q"]
    )
    assert result.exit_code == 0, result.output
    mined = read_mined(out)
    splits = json.loads((runs / "base" / "splits.json").read_text())
    catalogue = pd.read_csv(s["fashion"] / "metadata.csv")
    group_of = dict(zip(catalogue["file_name"], catalogue["group"], strict=True))
    attributes = catalogue.set_index("file_name")[["garment", "colour", "pattern", "rips", "style"]].astype(
        str
    )
    train_groups = set(splits["train"])
    assert len(mined) == sum(g in train_groups for g in catalogue["group"])  # one record per training caption
    assert (mined["negatives"].map(len) == 2).all()
    for rec in mined.itertuples():
        for neg, rank in zip(rec.negatives, rec.ranks, strict=True):
            assert group_of[neg] in train_groups  # only training images: nothing held out leaks in
            assert group_of[neg] != group_of[rec.file_name]  # never the caption's own product
            assert not attributes.loc[neg].equals(attributes.loc[rec.file_name])  # never its attribute twin
            assert rank > 1  # --range-min 1 skips the top-ranked image
        assert list(rec.ranks) == sorted(rec.ranks) and list(rec.scores) == sorted(rec.scores, reverse=True)

    hard = {"hard_negatives": {"file": str(out), "per_caption": 2}}
    _train(s, str(_config(s, "hn.yaml", **hard)), "--name", "hn")
    _train(s, str(_config(s, "hn.yaml", **hard)), "--name", "straight", "--set", "train.epochs=3")
    records = _records(runs / "straight")
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert all("val/t2i/mrr" in e for e in epochs) and len(epochs) == 4  # epoch 0 (untrained) + 3
    losses = [e["train/loss"] for e in epochs[1:]]
    assert losses[-1] < losses[0], losses  # it learns with the hard negatives in the batch
    info = json.loads((runs / "straight" / "summary.json").read_text())["info"]["hard_negatives"]
    assert info == {
        "file": str(out),
        "per_caption": 2,
        "captions_with_negatives": len(mined),
        "negatives": 2 * len(mined),
    }
    # resume replays the very batches, negatives included: the resumed run is the 3-epoch run
    result = runner.invoke(
        app, ["train", "--resume", str(runs / "hn"), "--set", "train.epochs=3", "--runs", str(runs), "-q"]
    )
    assert result.exit_code == 0, result.output
    assert [r for r in _records(runs / "hn") if r["kind"] != "resume"] == records
    assert load_config(runs / "hn" / "config.yaml").train.hard_negatives is not None
    # trainable towers: the mined images' pixels go through the image tower with the batch's own
    tower = {"model": {"backbone": str(s["clip"]), "trainable_layers": 1}}
    path = _config(s, "tower.yaml", epochs=1, lr=1e-4, **hard)
    cfg = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**cfg, "model": {**cfg["model"], **tower["model"]}}))
    _train(s, str(path), "--name", "tower")
    tower_info = json.loads((runs / "tower" / "summary.json").read_text())["info"]
    assert tower_info["hard_negatives"]["negatives"] == 2 * len(mined)
    assert all(
        math.isfinite(e["train/loss"])
        for e in _records(runs / "tower")
        if e["kind"] == "epoch" and e["epoch"]
    )
    # a missing mined file is one sentence naming it, before any training
    missing = {"hard_negatives": {"file": str(s["root"] / "nope.jsonl")}}
    result = runner.invoke(
        app, ["train", str(_config(s, "bad.yaml", **missing)), "--name", "bad", "--runs", str(runs)]
    )
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "nope.jsonl: no such mined-negatives file" in result.output and "Traceback" not in result.output


def test_hard_negatives_config_rules_name_the_fields() -> None:
    from cliptune.config import ConfigError

    base = ["train.hard_negatives={file: m.jsonl, per_caption: 2}"]
    with pytest.raises(ConfigError, match="loss.name info_nce or siglip"):
        load_config(None, overrides=[*base, "loss.name=triplet"])
    with pytest.raises(ConfigError, match="give the mined file"):
        load_config(None, overrides=["train.hard_negatives={per_caption: 2}"])
    with pytest.raises(ConfigError, match="train.task='retrieval'"):
        load_config(None, overrides=[*base, "train.task=siamese", "loss.name=triplet"])
    assert load_config(None, overrides=base).train.hard_negatives.per_caption == 2  # type: ignore[union-attr]


def test_mine_cli_errors_are_sentences(setup: dict[str, Path]) -> None:
    s = setup
    cases = [
        (
            ["mine", str(s["clip"]), str(s["root"] / "m.csv"), "--data", str(s["fashion"])],
            "must end in .parquet",
        ),
        (["mine", str(s["clip"]), str(s["root"] / "m.jsonl")], "--data"),
        (
            [
                "mine",
                str(s["clip"]),
                str(s["root"] / "m.jsonl"),
                "--data",
                str(s["fashion"]),
                "--margin",
                "0.1",
                "--relative-margin",
                "0.1",
            ],
            "not both",
        ),
        (
            [
                "mine",
                str(s["clip"]),
                str(s["root"] / "m.jsonl"),
                "--data",
                str(s["fashion"]),
                "--range-min",
                "3",
                "--range-max",
                "2",
            ],
            "must exceed",
        ),
        # a bare model on a catalogue without a split column: every row is in split 'all'
        (
            ["mine", str(s["clip"]), str(s["root"] / "m.jsonl"), "--data", str(s["fashion"]), "-q"],
            "no split 'train'",
        ),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code in (1, 2), (args, result.output)
        assert isinstance(result.exception, SystemExit), repr(result.exception)
        assert message in result.output, (args, result.output)
    ok = runner.invoke(
        app,
        [
            "mine",
            str(s["clip"]),
            str(s["root"] / "all.parquet"),
            "--data",
            str(s["fashion"]),
            "--split",
            "all",
            "-q",
        ],
    )
    assert ok.exit_code == 0, ok.output
    assert len(read_mined(s["root"] / "all.parquet")) == 60
    assert np.isfinite(np.concatenate(read_mined(s["root"] / "all.parquet")["scores"].to_list())).all()
