"""Loading trained models and embedding with them: the cached path equals the direct encoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from cliptune.models.backbone import BackboneError
from cliptune.models.embed import embed_images_with, embed_texts_with
from cliptune.models.factory import load_backbone, load_model
from cliptune.models.siamese import SiameseHead
from tests.tiny_models import make_tiny_clip


@pytest.fixture()
def images(tmp_path: Path) -> list[Path]:
    paths = []
    for i, colour in enumerate(["red", "blue", "green"]):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (40, 40), colour).save(path)
        paths.append(path)
    return paths


def test_cached_embeddings_equal_the_encoder(tmp_path: Path, images: list[Path]) -> None:
    model = load_model(make_tiny_clip(tmp_path / "clip"))
    assert model.head is None and model.backbone.features_frozen
    got = embed_images_with(model, images, cache_dir=tmp_path / "cache", precision="fp32", progress=False)
    texts = ["a red square", "a blue square"]
    got_t = embed_texts_with(model, texts, cache_dir=tmp_path / "cache", precision="fp32", progress=False)
    b = model.backbone
    with torch.no_grad():
        want = torch.nn.functional.normalize(
            b.encode_image(b.preprocess([Image.open(p).convert("RGB") for p in images])), dim=-1
        )
        want_t = torch.nn.functional.normalize(b.encode_text(**b.tokenize(texts)), dim=-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_t, want_t, atol=1e-5, rtol=1e-5)
    assert torch.allclose(got.norm(dim=-1), torch.ones(3))


def test_fine_tuned_towers_get_their_own_cache_entries(tmp_path: Path, images: list[Path]) -> None:
    # A model whose towers were trained loads frozen for inference; the cache key covers the tower
    # weights, so its features never mix with the pretrained ones.
    base = load_backbone(make_tiny_clip(tmp_path / "clip"), trainable_layers=1)
    with torch.no_grad():
        for p in base.parameters():
            if p.requires_grad:
                p.add_(0.05)
    base.save(tmp_path / "run" / "model")
    tuned = load_model(tmp_path / "run")  # a run directory resolves to run/model
    pretrained = load_model(tmp_path / "clip")
    assert tuned.backbone.identity() != pretrained.backbone.identity()
    a = embed_images_with(tuned, images, cache_dir=tmp_path / "cache", precision="fp32", progress=False)
    b = embed_images_with(pretrained, images, cache_dir=tmp_path / "cache", precision="fp32", progress=False)
    assert not torch.allclose(a, b)
    again = embed_images_with(tuned, images, cache_dir=tmp_path / "cache", precision="fp32", progress=False)
    assert torch.equal(a, again)


def test_siamese_model_folder(tmp_path: Path, images: list[Path]) -> None:
    backbone = load_backbone(make_tiny_clip(tmp_path / "clip"))
    folder = tmp_path / "siam" / "model"
    backbone.save(folder / "backbone")
    feats = backbone.image_features(backbone.preprocess([Image.open(images[0]).convert("RGB")]))
    tfeats = backbone.text_features(**backbone.tokenize(["x"]))
    SiameseHead(feats.shape[1], tfeats.shape[1], width=16, depth=1, heads=2).save(folder / "head")
    model = load_model(tmp_path / "siam")
    assert model.head is not None and "+head:" in model.name
    out = embed_images_with(model, images, cache_dir=tmp_path / "cache", precision="fp32", progress=False)
    assert out.shape == (3, 16)


def test_nothing_loadable_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match="not a run directory"):
        load_model(tmp_path / "nope")


def test_tower_features_with_worker_processes(tmp_path: Path, images: list[Path]) -> None:
    # Decoding in DataLoader workers (a picklable loader, for "spawn" platforms) equals in-process decoding.
    from cliptune.models.embed import tower_features

    backbone = load_backbone(make_tiny_clip(tmp_path / "clip"))
    texts = ["a red square", "a blue square", "a green square"]
    one = tower_features(backbone, images, texts, cache_dir=tmp_path / "c1", precision="fp32", progress=False)
    two = tower_features(
        backbone, images, texts, cache_dir=tmp_path / "c2", precision="fp32", num_workers=1, progress=False
    )
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
