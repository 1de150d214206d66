"""Config loading, overrides and every validation error the foundation issue lists."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
import yaml

from cliptune.config import (
    TASK_LOSSES,
    Config,
    ConfigError,
    LossConfig,
    ModelConfig,
    apply_overrides,
    config_markdown,
    load_config,
    save_config,
)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _errors(tmp_path: Path, text: str, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text), overrides or [])
    return info.value.errors


def test_defaults_are_the_measured_schedule() -> None:
    # docs/training.md "Why these defaults": chosen on val over three catalogues; seed 002's recall@1/5/10.
    cfg = load_config(None)
    t = cfg.train
    assert (t.epochs, t.batch_size, t.lr, t.scheduler) == (30, 64, pytest.approx(1e-3), "plateau")
    assert t.early_stopping is not None
    assert (t.early_stopping.metric, t.early_stopping.mode, t.early_stopping.patience) == (
        "val/t2i/mrr",
        "max",
        5,
    )
    assert (t.plateau.metric, t.plateau.mode, t.plateau.patience) == ("val/t2i/mrr", "max", 2)
    assert cfg.eval.k == [1, 5, 10]
    assert cfg.model.backbone == "embedded"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # the siamese task has no t2i/mrr: its primary metric is watched
        (
            ["train.task=siamese", "loss.name=triplet"],
            ("val/triplet/accuracy", "max", "val/triplet/accuracy", 1e-3),
        ),
        # tower weights train: a hundred times smaller default lr; LoRA counts as tower training
        (["model.trainable_layers=2"], ("val/t2i/mrr", "max", "val/t2i/mrr", 1e-5)),
        (["model.lora.r=4"], ("val/t2i/mrr", "max", "val/t2i/mrr", 1e-5)),
        # a user's value is never replaced; an unset mode follows the user's metric (a loss goes down)
        (["model.trainable_layers=2", "train.lr=3e-4"], ("val/t2i/mrr", "max", "val/t2i/mrr", 3e-4)),
        (["train.early_stopping.metric=val/loss"], ("val/loss", "min", "val/t2i/mrr", 1e-3)),
        (
            ["train.task=siamese", "loss.name=triplet", "train.early_stopping.metric=val/loss/image"],
            ("val/loss/image", "min", "val/triplet/accuracy", 1e-3),
        ),
        (
            ["train.plateau.metric=val/loss", "train.plateau.mode=max"],
            ("val/t2i/mrr", "max", "val/loss", 1e-3),
        ),
    ],
)
def test_defaults_that_depend_on_other_fields(
    tmp_path: Path, overrides: list[str], expected: tuple[str, str, str, float]
) -> None:
    cfg = load_config(None, overrides)
    es, plateau = cfg.train.early_stopping, cfg.train.plateau
    assert es is not None
    assert (es.metric, es.mode, plateau.metric, cfg.train.lr) == pytest.approx(expected)
    if "train.plateau.mode=max" in overrides:
        assert plateau.mode == "max"  # set by the user, kept although a loss goes down
    # config.yaml records the resolved values: loading it gives the same config
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_yaml_and_overrides(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "train:\n  lr: 1e-3\n  epochs: 5\ndata:\n  split:\n    ratios: {train: 0.8, val: 0.2}\n"
    )
    cfg = load_config(path, ["train.lr=1e-4", "loss.name=siglip", "track=[wandb, tensorboard]"])
    assert cfg.train.lr == pytest.approx(1e-4)  # the override wins over the file
    assert cfg.train.epochs == 5
    assert cfg.loss.name == "siglip"
    assert cfg.data.split.ratios == {"train": 0.8, "val": 0.2}
    assert cfg.track.trackers == ["wandb", "tensorboard"]  # list shorthand for track


def test_override_is_repeatable_and_last_wins() -> None:
    raw = apply_overrides({}, ["train.lr=1", "train.lr=2", "model.lora.r=4"])
    assert raw == {"train": {"lr": 2}, "model": {"lora": {"r": 4}}}


def test_saved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["name=r1", "data.split.ratios={train: 0.6, val: 0.4}", "eval.k=[10, 1]"])
    path = save_config(cfg, tmp_path / "runs" / "r1" / "config.yaml")
    again = load_config(path)
    assert again == cfg
    # Fully resolved: every section and default is written out.
    raw = yaml.safe_load(path.read_text())
    assert set(raw) == set(Config.model_fields)
    assert raw["train"]["plateau"]["factor"] == 0.5
    assert raw["eval"]["k"] == [1, 10]


def test_unknown_key_names_path_and_allowed_keys(tmp_path: Path) -> None:
    (err,) = _errors(tmp_path, "train:\n  learning_rate: 0.1\n")
    assert err.startswith("train.learning_rate: unknown key")
    assert "lr" in err and "epochs" in err


def test_unknown_top_level_section(tmp_path: Path) -> None:
    (err,) = _errors(tmp_path, "trainer: {}\n")
    assert err.startswith("trainer: unknown key")
    assert "train" in err and "model" in err


def test_wrong_type(tmp_path: Path) -> None:
    (err,) = _errors(tmp_path, "train:\n  epochs: many\n")
    assert err.startswith("train.epochs:")
    assert "integer" in err and "'many'" in err


def test_negative_lr(tmp_path: Path) -> None:
    (err,) = _errors(tmp_path, "train:\n  lr: -0.001\n")
    assert err.startswith("train.lr:")
    assert "greater than 0" in err and "-0.001" in err


@pytest.mark.parametrize(
    ("override", "error"),
    [
        # The absurd settings of issue 14: a traceback (lr 1e38) and a "successful" loss of 9.5e28 before.
        ("train.lr=1e38", "train.lr: Input should be less than or equal to 1 (got '1e38'); allowed: (0, 1]"),
        (
            "loss.temperature=1e-30",
            "loss.temperature: Input should be greater than or equal to 0.01 (got '1e-30'); allowed: [0.01, 1]",
        ),
        (
            "loss.temperature=2",
            "loss.temperature: Input should be less than or equal to 1 (got 2); allowed: [0.01, 1]",
        ),
        (
            "train.weight_decay=5",
            "train.weight_decay: Input should be less than or equal to 1 (got 5); allowed: [0, 1]",
        ),
        (
            "loss.siglip_scale=1e5",
            "loss.siglip_scale: Input should be less than or equal to 1000 (got '1e5'); allowed: (0, 1000]",
        ),
        (
            "loss.siglip_bias=-1e4",
            "loss.siglip_bias: Input should be greater than or equal to -1000 (got '-1e4'); allowed: [-1000, 1000]",
        ),
    ],
)
def test_absurd_optimisation_and_loss_settings_fail_naming_field_and_range(override: str, error: str) -> None:
    # YAML reads 1e38 (no dot) as a string; pydantic converts it and the message quotes what was given
    siglip = ["loss.name=siglip"] if "siglip" in override else []
    with pytest.raises(ConfigError) as info:
        load_config(None, [*siglip, override])
    assert info.value.errors == [f"{error}, set by override {override!r}"]  # blamed on the override
    assert info.value.overrides == [override]


def test_bounds_admit_the_documented_edges_and_defaults() -> None:
    cfg = load_config(None, ["train.lr=1", "train.weight_decay=1", "loss.temperature=0.01"])
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.loss.temperature) == (1.0, 1.0, 0.01)
    assert load_config(None, ["loss.temperature=1"]).loss.temperature == 1.0
    siglip = load_config(None, ["loss.name=siglip", "loss.siglip_scale=1000", "loss.siglip_bias=-1000"])
    assert (siglip.loss.siglip_scale, siglip.loss.siglip_bias) == (1000.0, -1000.0)


def test_a_cosine_margin_above_two_can_never_be_met() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["loss.name=triplet", "loss.margin=2.5"])
    assert info.value.errors == [
        "loss.margin=2.5 can never be met with loss.distance='cosine' (cosine distances lie in [0, 2]): set "
        "loss.margin to at most 2"
    ]
    assert load_config(None, ["loss.name=triplet", "loss.margin=2"]).loss.margin == 2.0
    # euclidean distances of raw embeddings have no upper end
    raw = load_config(None, ["loss.name=triplet", "loss.distance=euclidean", "loss.margin=2.5"])
    assert raw.loss.margin == 2.5


def test_ratios_not_summing_to_one(tmp_path: Path) -> None:
    (err,) = _errors(tmp_path, "data:\n  split:\n    ratios: {train: 0.8, test: 0.3}\n")
    assert err.startswith("data.split.ratios:")
    assert "sum to 1" in err and "1.1" in err


def test_ratios_need_train(tmp_path: Path) -> None:
    (err,) = _errors(tmp_path, "data:\n  split:\n    ratios: {val: 0.5, test: 0.5}\n")
    assert "data.split.ratios" in err and "'train'" in err


@pytest.mark.parametrize("ks", ["[0, 5]", "[-1]", "[]"])
def test_k_must_be_positive(tmp_path: Path, ks: str) -> None:
    (err,) = _errors(tmp_path, f"eval:\n  k: {ks}\n")
    assert err.startswith("eval.k:")


def test_literal_lists_allowed_values(tmp_path: Path) -> None:
    (err,) = _errors(tmp_path, "train:\n  scheduler: step\n")
    assert err.startswith("train.scheduler:")
    assert "'plateau'" in err and "'cosine'" in err


def test_unknown_tracker(tmp_path: Path) -> None:
    (err,) = _errors(tmp_path, "track: [neptune]\n")
    assert err.startswith("track.trackers.0:")
    assert "'wandb'" in err


def test_every_error_reported_at_once(tmp_path: Path) -> None:
    errs = _errors(tmp_path, "train:\n  lr: 0\n  batch_size: 0\nmodel:\n  trainable_layers: -2\n")
    assert [e.split(":")[0] for e in errs] == ["model.trainable_layers", "train.batch_size", "train.lr"]


def test_head_width_divisible_by_heads(tmp_path: Path) -> None:
    (err,) = _errors(tmp_path, "model:\n  head: {width: 30, heads: 4}\n")
    assert err.startswith("model.head:") and "divide" in err


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["train.lr"])


def test_override_unknown_key_is_reported() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.lrr=0.1"])
    assert info.value.errors[0].startswith("train.lrr: unknown key")


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(_write(tmp_path, "- 1\n- 2\n"))


def test_docs_config_md_is_generated_from_the_code() -> None:
    # docs/config.md must say what the code does: regenerate with `make docs` when fields change.
    committed = (Path(__file__).parents[1] / "docs" / "config.md").read_text(encoding="utf-8")
    assert committed == config_markdown()
    assert "| `train.lr` | `0.001` |" in committed


# --- cross-field rules: bad combinations fail at validation, before any work, naming every field ---------


@pytest.mark.parametrize(
    ("overrides", "fields"),
    [
        (["model.lora={r: 4}", "model.trainable_layers=2"], ["model.lora", "model.trainable_layers=2"]),
        (["model.lora={r: 4}", "model.trainable_layers=-1"], ["model.lora", "model.trainable_layers=-1"]),
        (["train.task=siamese", "loss.name=siglip"],
         ["loss.name='siglip'", "train.task='siamese'", "loss.name triplet, contrastive, info_nce"]),
        (["train.task=siamese", "loss.learn_temperature=true"],
         ["loss.learn_temperature=true", "train.task='siamese'"]),
        (["train.task=siamese", "loss.name=triplet", "loss.temperature=0.1"],
         ["loss.temperature=0.1", "train.task='siamese'", "loss.name='triplet'"]),
        (["train.task=siamese", "loss.name=triplet", "model.trainable_layers=1"],
         ["train.task='siamese'", "model.trainable_layers=1", "model.lora=null"]),
        (["train.task=siamese", "loss.name=contrastive", "model.lora={r: 2}"],
         ["train.task='siamese'", "model.trainable_layers=0", "model.lora=set"]),
        (["model.backbone=openai/clip-vit-base-patch32", "model.image_size=160"],
         ["model.image_size", "model.backbone='openai/clip-vit-base-patch32'"]),
    ],
)  # fmt: skip
def test_cross_field_rules_fail_at_validation(overrides: list[str], fields: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = "\n".join(info.value.errors)
    for field in fields:
        assert field in message
    assert "<root>" not in message


def test_cross_field_problems_are_all_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.task=siamese", "model.lora={r: 2}", "model.trainable_layers=1"])
    errors = info.value.errors
    assert len(errors) == 2
    assert errors[0].startswith("model.lora and model.trainable_layers=1")
    assert errors[1].startswith("train.task='siamese'")


def test_cross_field_rules_also_guard_assignment() -> None:
    cfg = load_config(None, ["model.lora={r: 4}"])
    with pytest.raises(ValueError, match="model.trainable_layers=3"):
        cfg.model = ModelConfig(lora=cfg.model.lora, trainable_layers=3)


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.lora={r: 4}", "model.trainable_layers=0"],
        ["train.task=siamese"],  # info_nce over the triplets
        ["train.task=siamese", "loss.name=triplet"],
        ["train.task=siamese", "loss.name=contrastive"],
        ["train.task=siamese", "loss.name=info_nce", "loss.temperature=0.1"],
        ["train.task=retrieval", "loss.name=siglip"],
        ["model.backbone=embedded", "model.image_size=160"],
        ["model.backbone=composed", "model.image_size=160"],
        ["loss.name=triplet", "model.trainable_layers=-1"],
    ],
)
def test_consistent_combinations_load(overrides: list[str]) -> None:
    load_config(None, overrides)


@pytest.mark.parametrize("task", ["retrieval", "siamese"])
def test_the_old_siamese_loss_name_fails_naming_its_replacement(task: str) -> None:
    # 'siamese' used to mean "whatever loss.name says, the siamese task trains triplet margins".
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"train.task={task}", "loss.name=siamese"])
    (line,) = info.value.errors
    assert line.startswith("loss.name: ")
    assert "loss.name='triplet' with train.task='siamese'" in line


def test_task_losses_cover_every_loss_name() -> None:
    names = set(get_args(LossConfig.model_fields["name"].annotation))
    assert set().union(*TASK_LOSSES.values()) == names
    for task, losses in TASK_LOSSES.items():
        for name in names:
            overrides = [f"train.task={task}", f"loss.name={name}"]
            if name in losses:
                assert load_config(None, overrides).loss.name == name
            else:
                with pytest.raises(ConfigError, match=f"loss.name='{name}' does not fit train.task='{task}'"):
                    load_config(None, overrides)


def test_num_workers_is_auto_by_default_and_takes_a_count_or_auto(tmp_path: Path) -> None:
    assert load_config(None).data.num_workers == "auto"
    assert load_config(None, ["data.num_workers=4"]).data.num_workers == 4
    assert load_config(None, ["data.num_workers=0"]).data.num_workers == 0
    assert load_config(None, ["data.num_workers=auto"]).data.num_workers == "auto"
    old = tmp_path / "old.yaml"  # a config written when the field was an int keeps its meaning
    old.write_text("data:\n  num_workers: 2\n")
    assert load_config(old).data.num_workers == 2
    saved = save_config(load_config(None), tmp_path / "saved.yaml")  # "auto" round-trips
    assert load_config(saved).data.num_workers == "auto"


@pytest.mark.parametrize("value", ["many", "-1", "true", "1.5"])
def test_a_bad_num_workers_fails_naming_the_field(value: str) -> None:
    override = f"data.num_workers={value}"
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    (err,) = info.value.errors  # one line, not one per branch of int | 'auto'
    assert err.startswith("data.num_workers: must be a whole number >= 0 or 'auto'")
    assert err.endswith(f"set by override {override!r}")
