"""Transformers backbones (CLIP, SigLIP, auto) built from tiny configs and loaded from local folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cliptune.models.backbone import CONFIG_FILE, BackboneError
from cliptune.models.factory import load_backbone
from cliptune.models.freeze import LoraSpec
from tests.tiny_models import IMAGE_SIZE, MAX_TEXT_LEN, make_tiny_clip, make_tiny_siglip

TEXTS = ["a photo of a cat", "ripped blue jeans", "an abstract painting"]
# (spec name, load kwargs): the generic AutoModel path is exercised on the same tiny CLIP folder.
VARIANTS = [("clip", {}), ("siglip", {}), ("clip", {"kind": "auto"}), ("siglip", {"kind": "auto"})]
IDS = ["clip", "siglip", "auto-clip", "auto-siglip"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {"clip": make_tiny_clip(root / "clip"), "siglip": make_tiny_siglip(root / "siglip")}


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    # Odd sizes and a grayscale image: the processor must resize/crop and convert to RGB.
    return [
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (64, 33, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)),
    ]


def _reference(backbone, pixels, tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """The HF model's own get_*_features, the oracle for encode_*."""
    model = backbone.model
    text_inputs = dict(tokens)
    if backbone.kind == "siglip":  # SigLIP was trained without a text attention mask
        text_inputs.pop("attention_mask")
    return (
        model.get_image_features(pixel_values=pixels).pooler_output,
        model.get_text_features(**text_inputs).pooler_output,
    )


@pytest.mark.parametrize(("name", "kwargs"), VARIANTS, ids=IDS)
def test_encode_equals_hf_features(folders, images, name, kwargs) -> None:
    backbone = load_backbone(folders[name], **kwargs)
    pixels = backbone.preprocess(images)
    tokens = backbone.tokenize(TEXTS)
    with torch.no_grad():
        image_emb, text_emb = backbone.encode_image(pixels), backbone.encode_text(**tokens)
        ref_image, ref_text = _reference(backbone, pixels, tokens)
    assert pixels.shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)
    # tiny CLIP projects to 24, tiny SigLIP to its hidden size 32
    expected_dim = 24 if name == "clip" else 32
    assert backbone.embed_dim == expected_dim
    assert image_emb.shape == (3, expected_dim) and text_emb.shape == (3, expected_dim)
    assert torch.equal(image_emb, ref_image)
    assert torch.equal(text_emb, ref_text)


@pytest.mark.parametrize(("name", "feature_dim"), [("clip", 32), ("siglip", 16 * 32)])
def test_feature_shapes_and_split(folders, images, name, feature_dim) -> None:
    backbone = load_backbone(folders[name])
    pixels = backbone.preprocess(images)
    tokens = backbone.tokenize(TEXTS)
    with torch.no_grad():
        feats = backbone.image_features(pixels)
        text_feats = backbone.text_features(**tokens)
        # CLIP: pooled CLS (hidden 32); SigLIP: (32 / 8)^2 = 16 patch tokens x hidden 32 = 512, flattened
        assert feats.shape == (3, feature_dim)
        assert text_feats.shape == (3, 32)
        assert torch.equal(backbone.image_head(feats), backbone.encode_image(pixels))
        assert torch.equal(backbone.text_head(text_feats), backbone.encode_text(**tokens))


def test_siglip_tokenize_pads_to_max_length(folders) -> None:
    backbone = load_backbone(folders["siglip"])
    tokens = backbone.tokenize(["a cat"])
    # SigLIP pools the last position, so texts are padded to the full length: "<bos> a cat <eos>" + 12 pads
    assert tokens["input_ids"].shape == (1, MAX_TEXT_LEN)
    assert tokens["attention_mask"].sum().item() == 4
    assert load_backbone(folders["clip"]).tokenize(["a cat"])["input_ids"].shape == (1, 4)


def test_similarity_params_exposed_not_trained(folders) -> None:
    backbone = load_backbone(folders["siglip"], trainable_layers=-1)
    assert set(backbone.similarity_init) == {"logit_scale", "logit_bias"}
    assert backbone.similarity_init["logit_scale"] == pytest.approx(backbone.model.logit_scale.item())
    assert not backbone.model.logit_scale.requires_grad and not backbone.model.logit_bias.requires_grad


@pytest.mark.parametrize(("name", "kwargs"), VARIANTS[:3], ids=IDS[:3])
def test_save_load_round_trip_is_bitwise(folders, images, tmp_path, name, kwargs) -> None:
    backbone = load_backbone(folders[name], **kwargs)
    with torch.no_grad():  # move the heads away from their initial values so the save must carry them
        for head in backbone.heads():
            for param in head.parameters():
                param.add_(0.01 * torch.randn_like(param))
    backbone.save(tmp_path / "saved")
    restored = load_backbone(tmp_path / "saved")
    pixels, tokens = backbone.preprocess(images), backbone.tokenize(TEXTS)
    with torch.no_grad():
        assert torch.equal(restored.encode_image(pixels), backbone.encode_image(pixels))
        assert torch.equal(restored.encode_text(**tokens), backbone.encode_text(**tokens))
    assert restored.kind == backbone.kind and restored.embed_dim == backbone.embed_dim
    assert restored.identity() == backbone.identity()
    assert (tmp_path / "saved" / CONFIG_FILE).is_file()


def test_lora_save_load_round_trip_is_bitwise(folders, images, tmp_path) -> None:
    backbone = load_backbone(folders["clip"], lora=LoraSpec(r=2, alpha=4))
    with torch.no_grad():  # lora_B starts at zero; make the adapters matter
        for name, param in backbone.named_parameters():
            if "lora_B" in name:
                param.normal_()
    backbone.save(tmp_path / "saved")
    restored = load_backbone(tmp_path / "saved")
    pixels = backbone.preprocess(images)
    with torch.no_grad():
        assert torch.equal(restored.encode_image(pixels), backbone.encode_image(pixels))
    assert restored.lora == LoraSpec(r=2, alpha=4)
    with pytest.raises(BackboneError, match="trainable_layers must be 0"):
        load_backbone(tmp_path / "saved", trainable_layers=1)
    # the transformers folder holds the merged model: close to, not bitwise, the adapted one
    from transformers import CLIPModel

    plain = CLIPModel.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        merged = plain.get_image_features(pixel_values=pixels).pooler_output
        torch.testing.assert_close(merged, backbone.encode_image(pixels), rtol=1e-4, atol=1e-5)


def test_identity_tracks_frozen_weights_not_heads(folders) -> None:
    backbone = load_backbone(folders["clip"])
    before = backbone.identity()
    with torch.no_grad():
        backbone.model.visual_projection.weight.add_(1.0)
    assert backbone.identity() == before  # a head change keeps cached features valid
    with torch.no_grad():
        backbone.model.vision_model.encoder.layers[0].mlp.fc1.bias.add_(1.0)
    assert backbone.identity() != before
    assert load_backbone(folders["siglip"]).identity() != before


def test_offline_hub_id_gives_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match="offline") as info:
        load_backbone("no-such-org/no-such-clip-model")
    assert "save_pretrained" in str(info.value) and "no-such-org/no-such-clip-model" in str(info.value)


def test_bad_options_are_rejected(folders, tmp_path) -> None:
    with pytest.raises(BackboneError, match="embed_dim=64"):
        load_backbone(folders["clip"], embed_dim=64)
    with pytest.raises(BackboneError, match="kind="):
        load_backbone(folders["clip"], kind="siglip")
    with pytest.raises(BackboneError, match="alternatives"):
        load_backbone(folders["clip"], trainable_layers=1, lora=LoraSpec())
    with pytest.raises(BackboneError, match="unknown option"):
        load_backbone(folders["clip"], image_tower="efficientnet-lite0")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneError, match="not a transformers model folder"):
        load_backbone(tmp_path / "empty")


def test_auto_embed_dim_gives_new_heads(folders, images) -> None:
    backbone = load_backbone(folders["clip"], kind="auto", embed_dim=8)
    with torch.no_grad():
        assert backbone.encode_image(backbone.preprocess(images)).shape == (3, 8)
    assert backbone.image_proj.in_features == 24  # the model's own projection output feeds the new head
