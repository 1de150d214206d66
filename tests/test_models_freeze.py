"""trainable_layers, LoRA and parameter counting on tiny CLIP / SigLIP backbones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cliptune.models.backbone import BackboneError
from cliptune.models.factory import load_backbone
from cliptune.models.freeze import LoraSpec, apply_lora, apply_trainable_layers, count_parameters, merged_copy
from tests.tiny_models import make_tiny_clip, make_tiny_siglip

# One tiny encoder layer (hidden 32, intermediate 64):
#   q, k, v, o projections 4 * (32*32 + 32) = 4224; two LayerNorms 2 * 64 = 128;
#   fc1 32*64 + 64 = 2112; fc2 64*32 + 32 = 2080          -> 8544
LAYER = 8544
NORM = 64  # final LayerNorm: 32 weights + 32 biases


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {"clip": make_tiny_clip(root / "clip"), "siglip": make_tiny_siglip(root / "siglip")}


def _numel(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def test_count_parameters_golden() -> None:
    layer = nn.Linear(3, 2)  # 3*2 weights + 2 biases = 8
    assert count_parameters(layer) == (8, 8)
    layer.bias.requires_grad_(False)
    assert count_parameters(layer) == (6, 8)
    shared = nn.Sequential(layer, layer)  # a shared module counts once
    assert count_parameters(shared) == (6, 8)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, 2 * 32 * 24),  # visual + text projection, 32 -> 24, no bias: 1536
        (1, 2 * 32 * 24 + 2 * (LAYER + NORM)),  # + last layer and final norm per tower: 18752
        (5, 2 * 32 * 24 + 2 * (2 * LAYER + NORM)),  # N beyond depth: every block, never embeddings: 35840
    ],
)
def test_clip_trainable_counts_golden(folders, n, expected) -> None:
    backbone = load_backbone(folders["clip"], trainable_layers=n)
    assert count_parameters(backbone)[0] == expected
    assert backbone.features_frozen == (n == 0)


def test_clip_trainable_counts_from_named_modules(folders) -> None:
    backbone = load_backbone(folders["clip"], trainable_layers=1)
    m = backbone.model
    expected = _numel(
        m.vision_model.encoder.layers[-1],
        m.vision_model.post_layernorm,
        m.visual_projection,
        m.text_model.encoder.layers[-1],
        m.text_model.final_layer_norm,
        m.text_projection,
    )
    assert count_parameters(backbone)[0] == expected
    trainable, total = count_parameters(apply_trainable_layers(backbone, -1))
    assert trainable == total - 1  # everything but logit_scale (the loss owns the temperature)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        # MAP head: probe 32 + attention (3*32*32 + 96 + 32*32 + 32 = 4224) + LayerNorm 64
        # + MLP 4192 = 8512; text head 32*32 + 32 = 1056                      -> 9568
        (0, 8512 + 1056),
        (1, 8512 + 1056 + 2 * (LAYER + NORM)),  # 26784
    ],
)
def test_siglip_trainable_counts_golden(folders, n, expected) -> None:
    backbone = load_backbone(folders["siglip"], trainable_layers=n)
    m = backbone.model
    named = _numel(m.vision_model.head, m.text_model.head)
    if n == 1:
        named += _numel(
            m.vision_model.encoder.layers[-1],
            m.vision_model.post_layernorm,
            m.text_model.encoder.layers[-1],
            m.text_model.final_layer_norm,
        )
    assert count_parameters(backbone)[0] == expected == named
    trainable, total = count_parameters(apply_trainable_layers(backbone, -1))
    assert trainable == total - 2  # logit_scale and logit_bias stay frozen


def test_frozen_modules_stay_in_eval_mode(folders) -> None:
    backbone = load_backbone(folders["clip"], trainable_layers=1).train()
    layers = backbone.model.vision_model.encoder.layers
    assert not layers[0].training and layers[-1].training
    assert not backbone.model.vision_model.embeddings.training
    assert backbone.model.visual_projection.training
    apply_trainable_layers(backbone, 0)
    assert not backbone.model.vision_model.training and backbone.model.text_projection.training


def test_invalid_trainable_layers(folders) -> None:
    backbone = load_backbone(folders["clip"])
    with pytest.raises(BackboneError, match="trainable_layers"):
        apply_trainable_layers(backbone, -2)
    apply_lora(backbone, LoraSpec(r=2))
    with pytest.raises(BackboneError, match="LoRA"):
        apply_trainable_layers(backbone, 1)
    with pytest.raises(BackboneError, match="already"):
        apply_lora(backbone, LoraSpec(r=2))


def test_lora_spec_validation() -> None:
    with pytest.raises(BackboneError, match="lora.r"):
        LoraSpec(r=0)
    with pytest.raises(BackboneError, match="lora.dropout"):
        LoraSpec(dropout=1.0)
    spec = LoraSpec(target_modules=["q_proj"])
    assert spec.target_modules == ("q_proj",) and LoraSpec(**spec.to_dict()) == spec


def test_lora_counts_golden(folders) -> None:
    backbone = load_backbone(folders["clip"], lora=LoraSpec(r=2, alpha=4))
    # q_proj and v_proj of 2 layers x 2 towers = 8 adapted Linear(32, 32):
    # A: 2*32 + B: 32*2 = 128 each -> 1024, + projections 1536 = 2560
    assert count_parameters(backbone)[0] == 1024 + 1536
    assert not backbone.features_frozen
    with pytest.raises(BackboneError, match="no Linear/Conv2d module named"):
        load_backbone(folders["clip"], lora=LoraSpec(target_modules=("nonexistent",)))


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_lora_training_changes_only_adapters_and_heads(folders, name) -> None:
    torch.manual_seed(0)
    backbone = load_backbone(folders[name], lora=LoraSpec(r=4, alpha=8)).train()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]
    pixels = backbone.preprocess(images)
    tokens = backbone.tokenize(["a cat", "a dog", "a cup of coffee", "a rocket"])
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    optimizer = torch.optim.Adam([p for p in backbone.parameters() if p.requires_grad], lr=1e-2)

    def info_nce() -> torch.Tensor:  # written here on purpose: the losses module is separate
        image = F.normalize(backbone.encode_image(pixels), dim=-1)  # (4, D)
        text = F.normalize(backbone.encode_text(**tokens), dim=-1)  # (4, D)
        logits = image @ text.T / 0.1  # (4, 4)
        target = torch.arange(4)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    losses = []
    for _ in range(8):
        loss = info_nce()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    head_prefixes = backbone._prefixes(backbone.heads())
    changed = {k for k, v in backbone.state_dict().items() if not torch.equal(v, before[k])}
    assert changed, "nothing trained"
    assert all("lora_" in k or k.startswith(head_prefixes) for k in changed), sorted(changed)
    assert any("lora_B" in k for k in changed) and any(k.startswith(head_prefixes) for k in changed)


def test_merged_copy_removes_adapters(folders) -> None:
    from peft.tuners.lora import LoraLayer

    backbone = load_backbone(folders["clip"], lora=LoraSpec(r=2))
    with torch.no_grad():
        for key, param in backbone.named_parameters():
            if "lora_B" in key:
                param.normal_()
    merged = merged_copy(backbone.model)
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert any(isinstance(m, LoraLayer) for m in backbone.model.modules())  # the original is untouched
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = backbone.encode_image(pixels)
        got = merged.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_siglip_lora_leaves_map_head_plain(folders) -> None:
    from peft.tuners.lora import LoraLayer

    # the MAP head's attention has an `out_proj`; targeting it must only touch the encoders
    backbone = load_backbone(folders["siglip"], lora=LoraSpec(r=2, target_modules=("out_proj", "q_proj")))
    assert not any(isinstance(m, LoraLayer) for m in backbone.model.vision_model.head.modules())
    assert isinstance(backbone.model.vision_model.encoder.layers[0].self_attn.out_proj, LoraLayer)
