"""WiSE-FT and the forgetting guard: the lerp, the recommendation rule, exact ends, general/... logging, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import BertConfig, BertModel
from typer.testing import CliRunner

from cliptune.cli.app import app
from cliptune.cli.wise import parse_alphas
from cliptune.data.synthetic import render_art, render_fashion
from cliptune.evaluation.catalogue import prepare_catalogue
from cliptune.evaluation.run import evaluate_model_on_run, evaluate_run
from cliptune.evaluation.split import evaluate_split
from cliptune.models.factory import load_backbone, load_model
from cliptune.models.freeze import LoraSpec
from cliptune.models.interpolate import InterpolationError, interpolate_state, interpolated_backbone
from cliptune.report.wise import WiseError, recommend_alpha, run_wise
from tests.tiny_models import MAX_TEXT_LEN, make_tiny_clip, make_tiny_tokenizer

runner = CliRunner()
RETRIEVAL = (
    "t2i/",
    "i2t/",
)  # the ranking metrics (the loss's temperature differs between run and bare model)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny CLIP fine-tuned (last layer) on fashion with art as the forgetting guard's catalogue."""
    root = tmp_path_factory.mktemp("wise")
    fashion = render_fashion(root / "fashion", n=60, seed=0)
    art = render_art(root / "art", n=20, seed=1)
    clip = make_tiny_clip(root / "clip")
    cfg = {
        "data": {"catalogue": str(fashion), "split": {"ratios": {"train": 0.6, "val": 0.2, "test": 0.2}}},
        "model": {"backbone": str(clip), "trainable_layers": 1, "cache_dir": str(root / "cache")},
        "train": {
            "epochs": 2,
            "batch_size": 16,
            "lr": 1e-2,  # large, so the tiny model moves and the ends differ
            "early_stopping": None,
            "forgetting": {"catalogue": str(art)},
        },
        "eval": {"bootstrap": 50},
    }
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    result = runner.invoke(
        app, ["train", str(root / "run.yaml"), "--name", "ft", "--runs", str(root / "runs"), "-q"]
    )
    assert result.exit_code == 0, result.output
    return {"root": root, "run": root / "runs" / "ft", "clip": clip, "art": art, "fashion": fashion}


def _retrieval(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith(RETRIEVAL)}


# --- the weights ---------------------------------------------------------------------------------------


def test_interpolated_weights_equal_a_hand_lerp(world: dict[str, Path]) -> None:
    backbone = load_backbone(world["clip"], trainable_layers=1)
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    pre = {k: v.clone() for k, v in backbone.state_dict().items() if k in trainable}
    fine = load_backbone(world["clip"], trainable_layers=1)
    with torch.no_grad():
        for name, param in fine.named_parameters():
            if name in trainable:
                param.add_(torch.randn_like(param))
    mixed = interpolated_backbone(fine, pre, 0.3).state_dict()
    fine_state = fine.state_dict()
    for key, value in mixed.items():
        if key in trainable:  # 0.7 * pre + 0.3 * fine, by hand
            torch.testing.assert_close(value, 0.7 * pre[key] + 0.3 * fine_state[key], rtol=1e-6, atol=1e-6)
        else:  # frozen: training never changed it, the fine-tuned value is the pretrained one
            assert torch.equal(value, fine_state[key]), key
    # the ends are exact, bit for bit
    assert all(torch.equal(interpolated_backbone(fine, pre, 0.0).state_dict()[k], pre[k]) for k in pre)
    assert all(torch.equal(interpolated_backbone(fine, pre, 1.0).state_dict()[k], fine_state[k]) for k in pre)
    assert len(trainable) > 4  # the last block and final norm moved, not only the projections


def test_lora_keeps_a_and_scales_b_so_the_merged_update_is_alpha_times_ba() -> None:
    a0, a1, b1 = torch.randn(2, 3), torch.randn(2, 3), torch.randn(4, 2)
    pre = {"q.lora_A.default.weight": a0, "q.lora_B.default.weight": torch.zeros(4, 2)}
    fine = {
        "q.lora_A.default.weight": a1,
        "q.lora_B.default.weight": b1,
        "q.base_layer.weight": torch.ones(4, 3),
    }
    out = interpolate_state(pre, fine, 0.25)
    assert torch.equal(out["q.lora_A.default.weight"], a1)
    merged = out["q.lora_B.default.weight"] @ out["q.lora_A.default.weight"]
    torch.testing.assert_close(merged, 0.25 * (b1 @ a1))  # (1 - a) * 0 + a * B1 A1
    assert torch.equal(out["q.base_layer.weight"], torch.ones(4, 3))
    with pytest.raises(InterpolationError, match="did not start at zero"):
        interpolate_state({**pre, "q.lora_B.default.weight": torch.ones(4, 2)}, fine, 0.5)
    with pytest.raises(InterpolationError, match="no such weight"):
        interpolate_state({"missing": torch.zeros(1)}, fine, 0.5)


# --- the recommendation rule ------------------------------------------------------------------------------


def _points(rows: list[tuple[float, float, float]]) -> list[dict]:
    return [{"alpha": a, "domain": {"mean": d}, "general": {"mean": g}} for a, d, g in rows]


def test_recommendation_on_hand_made_numbers() -> None:
    # alpha 0's general score 0.50, tolerance 0.02: alphas with general >= 0.48 qualify (0, 0.3, 0.5);
    # of those, 0.5 has the best domain score (0.41); alpha 1's 0.60 is out (general 0.30)
    rows = [(0.0, 0.20, 0.50), (0.3, 0.35, 0.495), (0.5, 0.41, 0.48), (0.7, 0.50, 0.47), (1.0, 0.60, 0.30)]
    assert recommend_alpha(_points(rows), 0.02)["alpha"] == 0.5
    # tolerance 0.2: everything down to 0.30 qualifies, alpha 1 wins
    assert recommend_alpha(_points(rows), 0.2)["alpha"] == 1.0
    # ties in domain score go to the smaller alpha (closer to the pretrained model)
    assert recommend_alpha(_points([(0.0, 0.1, 0.5), (0.4, 0.3, 0.5), (0.6, 0.3, 0.5)]), 0.0)["alpha"] == 0.4
    # no alpha above 0 keeps the general score: "none", said as such
    none = recommend_alpha(_points([(0.0, 0.2, 0.5), (0.5, 0.4, 0.47), (1.0, 0.6, 0.2)]), 0.02)
    assert none["alpha"] is None and none["reason"].startswith("none")
    # fine-tuning that does not help the domain: alpha 0 itself is the answer, not "none"
    assert recommend_alpha(_points([(0.0, 0.5, 0.5), (1.0, 0.4, 0.5)]), 0.02)["alpha"] == 0.0
    with pytest.raises(WiseError, match="alpha 0"):
        recommend_alpha(_points([(0.5, 0.4, 0.5)]), 0.02)


def test_parse_alphas() -> None:
    assert parse_alphas("0,0.1,...,1") == [round(i / 10, 10) for i in range(11)]
    assert parse_alphas("0, 0.5,1") == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError):
        parse_alphas("0,...,1")


# --- the forgetting guard and the sweep on a trained run ----------------------------------------------------


def test_forgetting_guard_logs_general_metrics_at_epoch_0_and_every_validation(
    world: dict[str, Path],
) -> None:
    lines = (world["run"] / "metrics.jsonl").read_text().splitlines()
    epochs = [r for r in map(json.loads, lines) if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    for record in epochs:
        assert {"general/t2i/mrr", "general/i2t/mrr", "general/t2i/recall@5"} <= set(record)
    # epoch 0 is the pretrained model: its general values are those of `cliptune eval` of the tiny CLIP on
    # every art row, captions' own images relevant (forgetting.relevant's default), in fp32 as validation runs
    art = prepare_catalogue(world["art"])
    model = load_model(world["clip"])
    zero_shot = evaluate_split(
        model, art, "all", relevant="item", bootstrap=0, precision="fp32", progress=False
    )
    for key in ("t2i/mrr", "i2t/mrr", "t2i/recall@5"):
        assert epochs[0][f"general/{key}"] == pytest.approx(zero_shot["metrics"][key]["mean"], abs=1e-6)
    assert epochs[2]["general/t2i/mrr"] != epochs[0]["general/t2i/mrr"]  # training moved it
    assert (world["run"] / "model_init.safetensors").is_file()


def test_wise_ends_reproduce_the_pretrained_and_fine_tuned_metrics_exactly(world: dict[str, Path]) -> None:
    run = world["run"]
    result = run_wise(run, [0.0, 0.5, 1.0], tolerance=0.02)
    points = {p["alpha"]: p for p in result["points"]}
    fine = _retrieval(evaluate_run(run, ["test"], progress=False)["test"]["metrics"])
    pretrained = _retrieval(
        evaluate_model_on_run(world["clip"], run, ["test"], progress=False)["test"]["metrics"]
    )
    metric = result["metric"]
    assert points[1.0]["domain"] == {k: fine[metric][k] for k in ("mean", "low", "high", "n")}
    assert points[0.0]["domain"] == {k: pretrained[metric][k] for k in ("mean", "low", "high", "n")}
    assert pretrained != fine  # the ends differ, so the equalities above say something
    art = prepare_catalogue(world["art"])
    zero = evaluate_split(
        load_model(world["clip"]), art, "all", relevant="item", bootstrap=50, progress=False
    )
    assert points[0.0]["general"]["mean"] == zero["metrics"][metric]["mean"]
    assert (
        points[0.0]["general"]["n"] == len(art.rows) == 80
    )  # every art row (20 images x 4 captions) is a query
    assert result["recommended"] == recommend_alpha(result["points"], 0.02)


def _tiny_composed(path: Path, clip: Path) -> Path:
    """Tiny CLIP vision tower + tiny BERT text tower with new random projections (seed 0), saved."""
    tokenizer = make_tiny_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=MAX_TEXT_LEN,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path / "bert")
    tokenizer.save_pretrained(path / "bert")
    load_backbone("composed", image_tower=clip, text_tower=path / "bert", embed_dim=16).save(
        path / "composed"
    )
    return path / "composed"


def test_head_only_run_interpolates_from_its_random_epoch_0_head(
    tmp_path: Path, world: dict[str, Path]
) -> None:
    # a composed backbone's projections are new (random): alpha 0 must be that epoch-0 head, not any
    # pretrained one; the saved folder the run started from is that head, so it is the independent reference
    start = _tiny_composed(tmp_path / "m", world["clip"])
    cfg = {
        "data": {
            "catalogue": str(world["fashion"]),
            "split": {"ratios": {"train": 0.6, "val": 0.2, "test": 0.2}},
        },
        "model": {"backbone": str(start), "cache_dir": str(tmp_path / "cache")},
        "train": {"epochs": 2, "batch_size": 16, "lr": 1e-2, "early_stopping": None},
        "eval": {"bootstrap": 20},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    trained = runner.invoke(
        app, ["train", str(tmp_path / "run.yaml"), "--name", "h", "--runs", str(tmp_path), "-q"]
    )
    assert trained.exit_code == 0, trained.output
    run = tmp_path / "h"
    assert load_backbone(run / "model").features_frozen  # head-only
    result = run_wise(run, [0.0, 1.0], general=world["art"])
    points = {p["alpha"]: p for p in result["points"]}
    pretrained = evaluate_model_on_run(start, run, ["test"], progress=False)["test"]["metrics"]
    fine = evaluate_run(run, ["test"], progress=False)["test"]["metrics"]
    for alpha, expected in ((0.0, pretrained), (1.0, fine)):
        assert points[alpha]["domain"] == {k: expected["t2i/mrr"][k] for k in ("mean", "low", "high", "n")}
    assert pretrained["t2i/mrr"]["mean"] != fine["t2i/mrr"]["mean"]


def test_lora_run_alpha_0_is_the_pretrained_model_and_alpha_1_the_tuned_one(
    tmp_path: Path, world: dict[str, Path]
) -> None:
    # LoRA: B starts at 0, so epoch 0 is the pretrained CLIP with inert adapters; alpha scales B (alpha * B A)
    model = {"backbone": str(world["clip"]), "lora": {"r": 2, "alpha": 4.0}}
    cfg = {
        "data": {
            "catalogue": str(world["fashion"]),
            "split": {"ratios": {"train": 0.6, "val": 0.2, "test": 0.2}},
        },
        "model": {**model, "cache_dir": str(tmp_path / "c")},
        "train": {"epochs": 1, "batch_size": 16, "lr": 1e-2, "early_stopping": None},
        "eval": {"bootstrap": 20},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    trained = runner.invoke(
        app, ["train", str(tmp_path / "run.yaml"), "--name", "l", "--runs", str(tmp_path), "-q"]
    )
    assert trained.exit_code == 0, trained.output
    run = tmp_path / "l"
    # alpha 0's weights: the pretrained CLIP's (base layers, heads) and every B zero
    init = {k.removeprefix("backbone."): v for k, v in load_file(run / "model_init.safetensors").items()}
    start = interpolated_backbone(load_model(run).backbone, init, 0.0).state_dict()
    bare = load_backbone(world["clip"]).state_dict()
    for key, value in start.items():
        if "lora_B" in key:
            assert not value.any(), key
        elif "lora_A" not in key:
            assert torch.equal(value, bare[key.replace(".base_layer", "")]), key
    # and its metrics: the epoch-0 model as training built it (CLIP + inert adapters, the same forward path;
    # the bare CLIP embeds through cached features, which round differently on this near-tied tiny model)
    load_backbone(world["clip"], lora=LoraSpec(r=2, alpha=4.0)).save(tmp_path / "epoch0")
    result = run_wise(run, [0.0, 1.0], general=world["art"])
    points = {p["alpha"]: p for p in result["points"]}
    pretrained = evaluate_model_on_run(tmp_path / "epoch0", run, ["test"], progress=False)["test"]["metrics"]
    fine = evaluate_run(run, ["test"], progress=False)["test"]["metrics"]
    for alpha, expected in ((0.0, pretrained), (1.0, fine)):
        assert points[alpha]["domain"] == {k: expected["t2i/mrr"][k] for k in ("mean", "low", "high", "n")}
    assert _retrieval(pretrained) != _retrieval(fine)


# --- the command ------------------------------------------------------------------------------------------


def test_cli_writes_json_and_png_and_prints_the_recommendation(
    world: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "w"
    result = runner.invoke(
        app, ["wise", str(world["run"]), "--alphas", "0,0.5,...,1", "--out", str(out), "-q"]
    )
    assert result.exit_code == 0, result.output
    written = json.loads((out / "wise.json").read_text())
    assert [p["alpha"] for p in written["points"]] == [0.0, 0.5, 1.0]
    assert (out / "wise.png").read_bytes().startswith(b"\x89PNG")
    chosen = written["recommended"]["alpha"]
    assert f"recommended alpha: {'none' if chosen is None else f'{chosen:g}'}" in result.output


def test_cli_errors_without_traceback(world: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "cfg").mkdir()
    cfg = yaml.safe_load((world["run"] / "config.yaml").read_text())
    cfg["train"]["forgetting"] = None
    (tmp_path / "cfg" / "config.yaml").write_text(yaml.safe_dump(cfg))
    no_general = runner.invoke(app, ["wise", str(tmp_path / "cfg")])
    assert no_general.exit_code == 1
    assert "no general catalogue" in no_general.output and "--general" in no_general.output
    assert "Traceback" not in no_general.output
    not_run = runner.invoke(app, ["wise", str(tmp_path)])
    assert not_run.exit_code == 1 and "not a run directory" in not_run.output
    bad = runner.invoke(app, ["wise", str(world["run"]), "--alphas", "0,x"])
    assert bad.exit_code == 2 and "--alphas" in bad.output and "Traceback" not in bad.output
    no_init = runner.invoke(app, ["wise", str(tmp_path / "cfg"), "--general", str(world["art"])])
    assert no_init.exit_code == 1 and "model_init.safetensors" in no_init.output
