"""Fine-tuning starts from the pretrained similarity: step 0's loss is the model's own loss.

Oracle: transformers' ``CLIPModel(..., return_loss=True).loss`` and ``SiglipModel(..., return_loss=True).loss``
on the same batch, compared with the retrieval task's model (backbone + the loss ``loss_init`` configures)
at step 0. The tiny models get a distinctive similarity first (CLIP's default init, log(1/0.07), would hide
a fallback to the default temperature), and the default-started loss is checked to differ, so the test can
fail.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import CLIPModel, SiglipModel

from cliptune.config import Config, ConfigError, load_config, save_config
from cliptune.losses import initial_siglip, initial_temperature, make_loss
from cliptune.models.backbone import Backbone
from cliptune.models.factory import load_backbone
from cliptune.train.tasks.retrieval import RetrievalModel, loss_init
from tests.tiny_models import TINY_CORPUS, make_tiny_clip, make_tiny_siglip

CLIP_LOGIT_SCALE = math.log(25.0)  # temperature 0.04, not the default 0.07
SIGLIP_LOGIT_SCALE, SIGLIP_LOGIT_BIAS = math.log(3.0), -2.5  # not SigLIP's 10 / -10


def _images(n: int) -> list[Image.Image]:
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (n, 32, 32, 3), generator=gen, dtype=torch.uint8)
    return [Image.fromarray(p.numpy()) for p in pixels]


def _retrieval_loss(backbone: Backbone, cfg: Config, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    kwargs, _ = loss_init(cfg, backbone.similarity_init)
    model = RetrievalModel(backbone, make_loss(cfg.loss.name, **kwargs)).eval()
    with torch.no_grad():
        return model(batch)["loss"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = make_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")
    model = CLIPModel.from_pretrained(path)
    model.logit_scale.data.fill_(CLIP_LOGIT_SCALE)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_siglip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = make_tiny_siglip(tmp_path_factory.mktemp("siglip") / "siglip")
    model = SiglipModel.from_pretrained(path)
    model.logit_scale.data.fill_(SIGLIP_LOGIT_SCALE)
    model.logit_bias.data.fill_(SIGLIP_LOGIT_BIAS)
    model.save_pretrained(path)
    return path


def test_clip_step0_loss_is_the_models_own(tiny_clip: Path) -> None:
    backbone = load_backbone(tiny_clip).eval()
    assert backbone.similarity_init["logit_scale"] == pytest.approx(CLIP_LOGIT_SCALE)
    texts = TINY_CORPUS[:6]
    batch = {"pixel_values": backbone.preprocess(_images(len(texts))), **backbone.tokenize(texts)}
    hf = CLIPModel.from_pretrained(tiny_clip).eval()
    with torch.no_grad():
        expected = hf(**batch, return_loss=True).loss
    ours = _retrieval_loss(backbone, load_config(None), batch)
    print(f"CLIP step-0 loss: cliptune {ours.item():.6f}, CLIPModel {expected.item():.6f}")
    assert ours.item() == pytest.approx(expected.item(), abs=1e-5)
    # the old start (temperature 0.07) is a different loss: the oracle can tell them apart
    default = _retrieval_loss(backbone, load_config(None, ["loss.temperature=0.07"]), batch)
    assert abs(default.item() - expected.item()) > 1e-3


def test_siglip_step0_loss_is_the_models_own(tiny_siglip: Path) -> None:
    backbone = load_backbone(tiny_siglip).eval()
    texts = TINY_CORPUS[:6]
    batch = {"pixel_values": backbone.preprocess(_images(len(texts))), **backbone.tokenize(texts)}
    hf = SiglipModel.from_pretrained(tiny_siglip).eval()
    with torch.no_grad():  # SigLIP is trained (and embedded by cliptune) without an attention mask
        expected = hf(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], return_loss=True).loss
    cfg = load_config(None, ["loss.name=siglip"])
    ours = _retrieval_loss(backbone, cfg, batch)
    print(f"SigLIP step-0 loss: cliptune {ours.item():.6f}, SiglipModel {expected.item():.6f}")
    assert ours.item() == pytest.approx(expected.item(), abs=1e-5)
    default = _retrieval_loss(
        backbone,
        load_config(None, ["loss.name=siglip", "loss.siglip_scale=10", "loss.siglip_bias=-10"]),
        batch,
    )
    assert abs(default.item() - expected.item()) > 1e-3


def test_config_value_wins_and_is_reported(tiny_clip: Path, tiny_siglip: Path) -> None:
    clip = load_backbone(tiny_clip)
    kwargs, start = loss_init(load_config(None), clip.similarity_init)
    assert start == {"temperature": pytest.approx(0.04), "source": "pretrained"}  # 1 / 25
    assert kwargs["temperature"] == pytest.approx(0.04)
    kwargs, start = loss_init(load_config(None, ["loss.temperature=0.07"]), clip.similarity_init)
    assert (kwargs["temperature"], start) == (0.07, {"temperature": 0.07, "source": "config"})
    siglip = load_backbone(tiny_siglip)
    kwargs, start = loss_init(
        load_config(None, ["loss.name=siglip", "loss.siglip_bias=-7"]), siglip.similarity_init
    )
    assert start["scale"] == pytest.approx(3.0) and start["bias"] == -7.0
    assert start["source"] == {"scale": "pretrained", "bias": "config"}
    assert kwargs["init_logit_scale"] == pytest.approx(SIGLIP_LOGIT_SCALE)
    # forms must fit: a SigLIP similarity (with a bias) does not set an InfoNCE temperature, nor CLIP's SigLIP's
    assert loss_init(load_config(None), siglip.similarity_init)[1]["source"] == "default"
    assert loss_init(load_config(None, ["loss.name=siglip"]), clip.similarity_init)[1]["source"] == {
        "scale": "default",
        "bias": "default",
    }


def test_embedded_backbone_keeps_the_defaults() -> None:
    # the demo's backbone has no pretrained similarity: its numbers must not change
    backbone = load_backbone("embedded")
    assert backbone.similarity_init == {}
    assert loss_init(load_config(None), {})[0] == {"temperature": 0.07, "learn_temperature": False}
    kwargs, start = loss_init(load_config(None, ["loss.name=siglip"]), backbone.similarity_init)
    assert kwargs == {"init_logit_scale": math.log(10.0), "init_logit_bias": -10.0}
    assert start["source"] == {"scale": "default", "bias": "default"}


def test_resolution_rules() -> None:
    # 1 / exp(log 100) = 0.01; a learned temperature clamps the pretrained scale to its bound (e^5 > 100)
    assert initial_temperature(None, {"logit_scale": math.log(100.0)}) == (pytest.approx(0.01), "pretrained")
    assert initial_temperature(None, {"logit_scale": 5.0}, max_logit_scale=100.0) == (0.01, "pretrained")
    assert initial_temperature(None, {"logit_scale": 5.0}) == (pytest.approx(math.exp(-5.0)), "pretrained")
    assert initial_temperature(None, {}) == (0.07, "default")
    assert initial_temperature(0.2, {"logit_scale": 5.0}) == (0.2, "config")
    assert initial_siglip(4.0, None, {"logit_scale": 0.0, "logit_bias": 1.0}) == (
        4.0,
        1.0,
        {"scale": "config", "bias": "pretrained"},
    )


def test_learned_temperature_starts_at_the_pretrained_scale(tiny_clip: Path) -> None:
    backbone = load_backbone(tiny_clip)
    kwargs, _ = loss_init(load_config(None, ["loss.learn_temperature=true"]), backbone.similarity_init)
    loss = make_loss("info_nce", **kwargs)
    assert loss.logit_scale.item() == pytest.approx(CLIP_LOGIT_SCALE, abs=1e-6)


def test_unset_values_round_trip_and_old_configs_keep_theirs(tmp_path: Path) -> None:
    # config.yaml is the fully resolved config: "not set" is written as null and reads back as not set
    path = save_config(load_config(None), tmp_path / "config.yaml")
    assert "temperature: null" in path.read_text()
    again = load_config(path)
    assert (again.loss.temperature, again.loss.siglip_scale, again.loss.siglip_bias) == (None, None, None)
    # a config saved before this change wrote temperature: 0.07: it keeps 0.07, whatever the backbone
    old = tmp_path / "old.yaml"
    old.write_text("loss:\n  name: info_nce\n  temperature: 0.07\n  learn_temperature: false\n")
    cfg = load_config(old)
    assert loss_init(cfg, {"logit_scale": CLIP_LOGIT_SCALE})[1] == {"temperature": 0.07, "source": "config"}


def test_siglip_settings_need_the_siglip_loss() -> None:
    with pytest.raises(ConfigError, match=r"loss.siglip_scale apply only to loss.name='siglip'"):
        load_config(None, ["loss.siglip_scale=5"])
    with pytest.raises(ConfigError, match=r"loss.siglip_scale: .*greater than 0"):
        load_config(None, ["loss.name=siglip", "loss.siglip_scale=0"])
