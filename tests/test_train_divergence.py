"""A diverged model stops the run and never becomes the best model; its error names epoch, step and cause.

The tiny retrieval task here is the real one's shape on random "cached features": two linear heads, the
InfoNCE loss and the retrieval validation of ``cliptune train`` (an epoch takes milliseconds).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from torch import Tensor, nn

from cliptune.config import TrainConfig
from cliptune.evaluation.validation import MIN_SPREAD, embedding_problems, retrieval_validation
from cliptune.losses import InfoNCELoss
from cliptune.train.errors import DivergenceError
from cliptune.train.failures import MAX_WEIGHT, weight_problems
from cliptune.train.loop import fit
from cliptune.train.tasks.bundle import TaskBundle
from tests.toy_task import make_bundle as make_toy_bundle

N_TRAIN, N_VAL, D_IN, D_OUT = 96, 48, 16, 8  # batch 32: 3 steps per epoch


class TinyPairs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.image_head, self.text_head = nn.Linear(D_IN, D_OUT), nn.Linear(D_IN, D_OUT)
        self.loss = InfoNCELoss(temperature=0.07)

    def embed(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return self.image_head(batch["image_features"]), self.text_head(batch["text_features"])

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = self.loss(*self.embed(batch))
        return terms


def _pairs(n: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, D_IN, generator=g)
    return image, image + 0.3 * torch.randn(n, D_IN, generator=g)  # captions near their images


def make_bundle(before_validation: Callable[[TinyPairs, int], None] | None = None) -> TaskBundle:
    """The tiny retrieval task; ``before_validation(model, call)`` may break the model before validation ``call``."""
    torch.manual_seed(0)
    model = TinyPairs()
    train_img, train_txt = _pairs(N_TRAIN, 1)
    val_img, val_txt = _pairs(N_VAL, 2)
    calls = [0]

    def evaluate(m: nn.Module) -> dict[str, float]:
        calls[0] += 1
        assert isinstance(m, TinyPairs)
        if before_validation is not None:
            before_validation(m, calls[0])
        image, text = m.embed({"image_features": val_img, "text_features": val_txt})
        names = [f"img{i}" for i in range(N_VAL)]
        return retrieval_validation(
            image, text, groups=names, files=names, ks=[1, 5], relevant="item", loss_fn=m.loss, batch_size=32
        )

    def save_model(m: nn.Module, directory: Path) -> None:
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, directory / "pairs.safetensors")

    items = [{"image_features": train_img[i], "text_features": train_txt[i]} for i in range(N_TRAIN)]
    return TaskBundle(model=model, train_data=items, evaluate=evaluate, save_model=save_model)


def _run_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _cfg(epochs: int = 3, grad_clip: float | None = 1.0) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=32, lr=1e-2, early_stopping=None, grad_clip=grad_clip)


def _epochs(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["epoch"] for r in map(json.loads, lines) if r["kind"] == "epoch"]


def _model_bytes(run_dir: Path) -> bytes:
    return (run_dir / "model" / "pairs.safetensors").read_bytes()


def test_a_healthy_tiny_run_is_not_stopped(tmp_path: Path) -> None:
    fit(make_bundle(), _cfg(), tmp_path, Accelerator(cpu=True), quiet=True)
    assert _epochs(tmp_path) == [0, 1, 2, 3]


def test_lr_1e9_stops_with_a_divergence_error_and_keeps_the_untrained_model(tmp_path: Path) -> None:
    # The config refuses lr > 1 (test_config.py); a library caller's config built without validation, as
    # here, is the remaining way in. AdamW's decoupled decay multiplies every weight by 1 - 1e9 * 0.01 =
    # -1e7 per step: after epoch 1 (3 steps) the heads are ~1e20, every embedding's norm overflows float32,
    # all normalise to zero vectors, and the validation loss is ln(32), below the untrained model's.
    cfg = _cfg().model_copy(update={"lr": 1e9})
    with pytest.raises(DivergenceError) as info:
        fit(make_bundle(), cfg, _run_dir(tmp_path / "run"), Accelerator(cpu=True), quiet=True)
    err = info.value
    assert (err.epoch, err.step, err.best_epoch) == (1, 3, 0)
    message = str(err)
    assert message.startswith("training diverged at epoch 1 (step 3): ")
    assert "validation image embeddings do not normalise to unit vectors in 48 of 48 rows" in message
    assert "validation text embeddings do not normalise to unit vectors in 48 of 48 rows" in message
    assert f"(bound {MAX_WEIGHT:g}, the largest float16)" in message
    assert "model/ keeps epoch 0, the last healthy best" in message
    assert "Likely cause: learning rate too high (train.lr=1e+09); gradients are already clipped" in message
    # The collapsed epoch is neither logged nor saved: model/ is the untrained model, byte for byte.
    assert _epochs(tmp_path / "run") == [0]
    untrained = tmp_path / "untrained"
    (untrained / "model").mkdir(parents=True)
    bundle = make_bundle()
    bundle.save_model(bundle.model, untrained / "model")
    assert _model_bytes(tmp_path / "run") == _model_bytes(untrained)


def test_a_collapse_after_healthy_epochs_keeps_the_last_healthy_best_bitwise(tmp_path: Path) -> None:
    def collapse_at_epoch_2(model: TinyPairs, call: int) -> None:
        if call == 3:  # validations: 1 = epoch 0, 2 = epoch 1, 3 = epoch 2
            model.image_head.weight.data.zero_()  # every image embeds to the bias: one vector

    with pytest.raises(DivergenceError, match=r"^training diverged at epoch 2 \(step 6\): ") as info:
        fit(
            make_bundle(collapse_at_epoch_2),
            _cfg(),
            _run_dir(tmp_path / "run"),
            Accelerator(cpu=True),
            quiet=True,
        )
    assert info.value.problems == [
        "validation image embeddings are identical: all 48 rows within 0 of the first (collapse threshold 0.0001)"
    ]
    assert info.value.best_epoch == 1
    assert _epochs(tmp_path / "run") == [0, 1]
    # model/ equals a run that stopped after epoch 1 (CPU training is deterministic).
    fit(make_bundle(), _cfg(epochs=1), _run_dir(tmp_path / "one"), Accelerator(cpu=True), quiet=True)
    assert _model_bytes(tmp_path / "run") == _model_bytes(tmp_path / "one")


def _nan_text_weight(model: TinyPairs, call: int) -> None:
    if call == 2:  # the validation of epoch 1
        model.text_head.weight.data[0, 0] = math.nan


@pytest.mark.parametrize("grad_clip", [1.0, None])
def test_nan_in_validation_names_epoch_step_and_a_hint_that_fits_the_config(
    tmp_path: Path, grad_clip: float | None
) -> None:
    with pytest.raises(DivergenceError) as info:
        fit(
            make_bundle(_nan_text_weight),
            _cfg(grad_clip=grad_clip),
            tmp_path,
            Accelerator(cpu=True),
            quiet=True,
        )
    message = str(info.value)
    assert message.startswith(
        "training diverged at epoch 1 (step 3): validation text embeddings are not finite in 48 of 48 rows "
        "(first: row 0); trainable weight text_head.weight reaches nan"
    )
    if grad_clip is None:  # clipping is off: it is worth turning on
        assert (
            "with unclipped gradients (train.grad_clip: null): lower train.lr or enable train.grad_clip"
            in message
        )
    else:  # clipping is on: advising it would be no advice
        assert "enable train.grad_clip" not in message
        assert "already clipped (train.grad_clip=1), so lower train.lr, or check the data" in message
    assert "scores contain NaN" not in message


def test_a_non_finite_validation_value_of_any_task_stops_the_run(tmp_path: Path) -> None:
    # The toy regression task has no embeddings: its validation loss itself is checked.
    bundle = make_toy_bundle(0, val_values=[1.0, 0.5, math.nan])
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.01, early_stopping=None)
    with pytest.raises(DivergenceError, match=r"at epoch 2 \(step 24\): validation val/loss is nan\. "):
        fit(bundle, cfg, tmp_path, Accelerator(cpu=True), quiet=True)
    assert _epochs(tmp_path) == [0, 1]


def test_a_broken_untrained_model_is_not_blamed_on_the_settings(tmp_path: Path) -> None:
    def nan_from_the_start(model: TinyPairs, call: int) -> None:
        model.image_head.bias.data[0] = math.inf

    with pytest.raises(DivergenceError) as info:
        fit(make_bundle(nan_from_the_start), _cfg(), tmp_path, Accelerator(cpu=True), quiet=True)
    message = str(info.value)
    assert message.startswith("training diverged at the untrained model (epoch 0): ")
    assert "no model was saved. No training step ran" in message
    assert "train.lr" not in message
    assert not (tmp_path / "model").exists()


def test_embedding_check_thresholds_separate_collapse_from_healthy_spread() -> None:
    g = torch.Generator().manual_seed(0)
    healthy = torch.randn(48, D_OUT, generator=g)
    assert embedding_problems(healthy, "image") == []
    assert embedding_problems(healthy * 1e15, "image") == []  # large but representable: norms ~3e15
    assert embedding_problems(healthy * 1e-9, "image") == []  # small but above normalize's eps 1e-12
    # Entries of 1e20 square to 1e40 > float32 max 3.4e38: the norm is inf, the unit vector zero.
    assert "do not normalise" in embedding_problems(healthy * 1e20, "image")[0]
    assert "do not normalise" in embedding_problems(torch.zeros(48, D_OUT), "image")[0]
    one = torch.randn(1, D_OUT, generator=g).repeat(48, 1)  # (48, D) one direction
    # A perturbation of 1e-6 per entry moves unit vectors ~1e-6 * sqrt(8) / |v| apart: below 1e-4.
    assert "identical" in embedding_problems(one + 1e-6 * torch.randn(48, D_OUT, generator=g), "text")[0]
    assert embedding_problems(one + 1e-2 * torch.randn(48, D_OUT, generator=g), "text") == []
    assert embedding_problems(one[:1], "text") == []  # one row: nothing to compare
    assert MIN_SPREAD == 1e-4


def test_weight_check_flags_non_finite_and_out_of_range_trainable_weights_only() -> None:
    layer = nn.Linear(4, 2)
    assert weight_problems(layer) == []
    layer.weight.data[1, 1] = 1e5  # beyond 65504
    assert weight_problems(layer) == [
        "trainable weight weight reaches 1e+05 (bound 65504, the largest float16)"
    ]
    layer.bias.data[0] = math.nan
    assert weight_problems(layer) == ["trainable weight bias reaches nan (bound 65504, the largest float16)"]
    layer.requires_grad_(False)  # frozen weights do not move: not checked
    assert weight_problems(layer) == []
