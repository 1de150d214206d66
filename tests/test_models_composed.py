"""Composed backbones: the embedded EfficientNet-Lite0 + MiniLM default, and HF towers, offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data

from cliptune.models.backbone import BackboneError
from cliptune.models.composed import _minilm_path
from cliptune.models.factory import load_backbone
from cliptune.models.freeze import LoraSpec, apply_lora, apply_trainable_layers, count_parameters
from tests.tiny_models import make_tiny_clip

PHOTOS = [
    ("chelsea", "a cat"),
    ("coffee", "a cup of coffee"),
    ("astronaut", "an astronaut"),
    ("rocket", "a rocket"),
    ("hubble_deep_field", "galaxies in deep space"),
    ("immunohistochemistry", "cells under a microscope"),
]


@pytest.fixture(scope="module")
def embedded():
    return load_backbone("embedded")


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [Image.fromarray(getattr(data, name)()) for name, _ in PHOTOS]


def _numel(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def test_embedded_encodes_offline(embedded, photos) -> None:
    pixels = embedded.preprocess(photos[:2])
    tokens = embedded.tokenize(["a cat", "a cup of coffee on a saucer"])
    with torch.no_grad():
        assert embedded.image_features(pixels).shape == (2, 1280)
        assert embedded.text_features(**tokens).shape == (2, 384)
        assert embedded.encode_image(pixels).shape == (2, 256)
        assert embedded.encode_text(**tokens).shape == (2, 256)
    assert pixels.shape == (2, 3, 224, 224)
    assert embedded.kind == "composed" and embedded.embed_dim == 256 and embedded.features_frozen


def test_embedded_is_deterministic_from_seed(embedded) -> None:
    again = load_backbone("embedded")
    assert torch.equal(again.image_proj.weight, embedded.image_proj.weight)
    assert again.identity() == embedded.identity()


def test_imagenet_preprocess_golden(embedded) -> None:
    image = Image.new("RGB", (300, 200), (255, 0, 51))
    pixels = embedded.preprocess([image])[0]  # a constant image stays constant through resize and crop
    # (255/255 - 0.485) / 0.229 = 2.24891; (0 - 0.456) / 0.224 = -2.03571; (51/255 - 0.406) / 0.225 = -0.91556
    expected = torch.tensor([2.24891, -2.03571, -0.91556]).view(3, 1, 1).expand(3, 224, 224)
    torch.testing.assert_close(pixels, expected, rtol=0, atol=1e-4)
    gray = embedded.preprocess([Image.new("L", (224, 500), 0)])
    assert gray.shape == (1, 3, 224, 224)


def test_mean_pooling_matches_naive_loop(embedded) -> None:
    tokens = embedded.tokenize(["a cat", "a much longer caption about a cup of coffee"])
    with torch.no_grad():
        pooled = embedded.text_features(**tokens)
        hidden = embedded.text_tower.model(**tokens).last_hidden_state
    for row in range(2):
        kept = [hidden[row, t] for t in range(hidden.shape[1]) if tokens["attention_mask"][row, t] == 1]
        torch.testing.assert_close(pooled[row], torch.stack(kept).mean(0))
    assert tokens["attention_mask"][0].sum() < tokens["attention_mask"][1].sum()  # padding was masked


def test_embedded_trainable_counts(embedded) -> None:
    image_net, text_model = embedded.image_tower.net, embedded.text_tower.model
    # projections: 1280*256 + 256 + 384*256 + 256 = 426496
    assert count_parameters(embedded)[0] == 426496
    apply_trainable_layers(embedded, 1)
    expected = _numel(
        image_net._blocks[-1],
        image_net._conv_head,
        image_net._bn1,
        text_model.encoder.layer[-1],
        embedded.image_proj,
        embedded.text_proj,
    )
    assert count_parameters(embedded)[0] == expected
    embedded.train()
    assert embedded.image_tower.net._blocks[-1].training and not embedded.image_tower.net._blocks[0].training
    assert not embedded.image_tower.net._bn0.training  # frozen BatchNorm keeps its statistics
    trainable, total = count_parameters(apply_trainable_layers(embedded, -1))
    assert trainable == total
    apply_trainable_layers(embedded, 0)
    embedded.eval()
    assert embedded.features_frozen


def test_embedded_save_load_bitwise(embedded, photos, tmp_path) -> None:
    embedded.save(tmp_path / "model")
    restored = load_backbone(tmp_path / "model")
    pixels = embedded.preprocess(photos[:2])
    tokens = embedded.tokenize(["a cat", "an astronaut"])
    with torch.no_grad():
        assert torch.equal(restored.encode_image(pixels), embedded.encode_image(pixels))
        assert torch.equal(restored.encode_text(**tokens), embedded.encode_text(**tokens))
    assert restored.identity() == embedded.identity()
    assert torch.equal(restored.tokenize(["a cat"])["input_ids"], embedded.tokenize(["a cat"])["input_ids"])


def test_composed_with_hf_image_tower(tmp_path, photos) -> None:
    clip = make_tiny_clip(tmp_path / "clip")
    backbone = load_backbone(
        "composed", image_tower=clip, text_tower=_minilm_path(), embed_dim=16, trainable_layers=1
    )
    vision, bert = backbone.image_tower.vision, backbone.text_tower.model
    expected = _numel(
        vision.encoder.layers[-1],
        vision.post_layernorm,
        bert.encoder.layer[-1],
        backbone.image_proj,
        backbone.text_proj,
    )
    assert count_parameters(backbone)[0] == expected
    pixels = backbone.preprocess(photos[:3])
    with torch.no_grad():
        emb = backbone.encode_image(pixels)
        assert emb.shape == (3, 16) and pixels.shape == (3, 3, 32, 32)
        assert torch.equal(backbone.image_features(pixels), vision(pixel_values=pixels).pooler_output)
    backbone.save(tmp_path / "saved")
    restored = load_backbone(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(restored.encode_image(pixels), emb)


def test_embedded_lora_wraps_pointwise_convs_and_attention(photos) -> None:
    from peft.tuners.lora import LoraLayer

    backbone = load_backbone("embedded")
    pixels = backbone.preprocess(photos[:1])
    tokens = backbone.tokenize(["a cat"])
    with torch.no_grad():
        before = backbone.encode_image(pixels), backbone.encode_text(**tokens)
    apply_lora(backbone, LoraSpec(r=2))
    wrapped = {name.rsplit(".", 1)[-1] for name, m in backbone.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == {"_expand_conv", "_project_conv", "query", "value"}
    assert not backbone.features_frozen
    with torch.no_grad():  # lora_B starts at zero: injection adds exact zeros
        assert torch.equal(backbone.encode_image(pixels), before[0])
        assert torch.equal(backbone.encode_text(**tokens), before[1])
    trainable = {name for name, p in backbone.named_parameters() if p.requires_grad}
    assert all("lora_" in name or name.startswith(("image_proj.", "text_proj.")) for name in trainable)
    # explicit targets present only in the text tower: the image tower stays fully frozen
    text_only = apply_lora(load_backbone("embedded"), LoraSpec(r=2, target_modules=("query", "value")))
    assert not any(p.requires_grad for p in text_only.image_tower.parameters())
    assert any(isinstance(m, LoraLayer) for m in text_only.text_tower.modules())


def test_composed_errors(tmp_path) -> None:
    with pytest.raises(BackboneError, match="not one of"):
        load_backbone("composed", image_tower="resnet-9000")
    with pytest.raises(BackboneError, match="fixed towers"):
        load_backbone("embedded", image_tower="efficientnet-lite0")


def _crops(image: Image.Image, count: int, rng: np.random.Generator) -> list[Image.Image]:
    """Random 60-90 % crops, half of them mirrored: cheap augmentations of one photo."""
    width, height = image.size
    out = []
    for _ in range(count):
        scale = rng.uniform(0.6, 0.9)
        w, h = int(width * scale), int(height * scale)
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        crop = image.crop((x, y, x + w, y + h))
        out.append(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop)
    return out


@pytest.mark.slow
def test_embedded_learns_to_rank_real_photos(embedded, photos) -> None:
    """Train only the projections on cached tower features; held-out crops must rank right."""
    rng = np.random.default_rng(0)
    n = len(PHOTOS)
    train = [c for image in photos for c in _crops(image, 3, rng)]
    held_out = [c for image in photos for c in _crops(image, 2, rng)]
    with torch.no_grad():  # tower features once: the towers are frozen
        train_feats = embedded.image_features(embedded.preprocess(train)).view(n, 3, -1)  # (6, 3, 1280)
        held_feats = embedded.image_features(embedded.preprocess(held_out))  # (12, 1280)
        text_feats = embedded.text_features(**embedded.tokenize([c for _, c in PHOTOS]))  # (6, 384)
    held_labels = torch.arange(n).repeat_interleave(2)  # (12,)

    def t2i_hits() -> int:
        with torch.no_grad():
            text = F.normalize(embedded.text_head(text_feats), dim=-1)
            image = F.normalize(embedded.image_head(held_feats), dim=-1)
            return int((held_labels[(text @ image.T).argmax(1)] == torch.arange(n)).sum())

    assert t2i_hits() <= 2  # random projections: chance is 1 of 6
    heads = [*embedded.image_proj.parameters(), *embedded.text_proj.parameters()]
    initial = [p.detach().clone() for p in heads]
    optimizer = torch.optim.Adam(heads, lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        pick = torch.randint(0, 3, (n,), generator=generator)  # one crop per photo per step
        image = F.normalize(embedded.image_head(train_feats[torch.arange(n), pick]), dim=-1)  # (6, 256)
        text = F.normalize(embedded.text_head(text_feats), dim=-1)  # (6, 256)
        logits = image @ text.T / 0.07  # InfoNCE, symmetric (the losses module is tested elsewhere)
        target = torch.arange(n)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    try:
        assert loss.item() < 0.1
        assert t2i_hits() >= 5
    finally:  # the fixture is shared: restore the initial projections
        with torch.no_grad():
            for param, value in zip(heads, initial, strict=True):
                param.copy_(value)
