"""Where `embed_images_with` / `embed_texts_with` run: the process's accelerator unless a device is given.

On this CPU machine the resolver picks the CPU, an explicit device wins, a joined launch's device (a fake
``PartialState`` on ``cuda:1``, no CUDA touched) is taken; embeddings on the CPU equal the towers + heads
computed by hand, bit for bit; the model ends on the device and is moved once, not per call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torch import nn

from cliptune.models.embed import (
    _place,
    embed_images_with,
    embed_texts_with,
    embedding_device,
    model_device,
    tower_features,
)
from cliptune.models.factory import LoadedModel, load_model
from cliptune.models.siamese import SiameseHead
from tests.tiny_models import make_tiny_clip

TEXTS = ["a red dress", "blue jeans", "a red dress"]  # a repeat: embedded once, returned twice


class _FakeState:
    """A ``PartialState`` as a 2-GPU launch's process 1 sees it: only ``device`` is read."""

    device = torch.device("cuda", 1)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("device") / "clip", seed=0)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("device-images")
    paths = []
    for i, colour in enumerate(["red", "navy", "olive"]):
        Image.new("RGB", (40 + 3 * i, 30), colour).save(root / f"{i}.png")
        paths.append(root / f"{i}.png")
    return paths


def test_resolver_picks_the_cpu_here_and_an_explicit_device_wins() -> None:
    assert not torch.cuda.is_available()  # this test documents the CPU machine the suite runs on
    assert embedding_device() == torch.device("cpu")
    assert embedding_device("cpu", state=_FakeState()) == torch.device("cpu")  # explicit beats a launch
    assert embedding_device("cuda:2") == torch.device("cuda", 2)  # taken as given, CUDA never asked


def test_resolver_takes_a_joined_launchs_device() -> None:
    # under `accelerate launch` on 2 GPUs, process 1's PartialState says cuda:1: it embeds there
    assert embedding_device(state=_FakeState()) == torch.device("cuda", 1)


def test_image_and_text_embeddings_on_the_cpu_equal_the_towers_and_heads_by_hand(
    clip_dir: Path, images: list[Path], tmp_path: Path
) -> None:
    model = load_model(clip_dir)
    cache = tmp_path / "oracle-cache"  # the oracle's own cache: the embeddings below compute afresh
    backbone = model.backbone
    with torch.inference_mode():  # the oracle: tower features, then the head, then L2 normalisation
        feats, _ = tower_features(backbone, images, ["x"], precision="fp32", cache_dir=cache, progress=False)
        want_images = nn.functional.normalize(backbone.image_head(feats), dim=-1)
        tokens = backbone.tokenize(TEXTS[:2])
        text_feats = backbone.text_features(**tokens)
        want_texts = nn.functional.normalize(backbone.text_head(text_feats), dim=-1)
    want_texts = want_texts[[0, 1, 0]]
    common: dict[str, Any] = {"precision": "fp32", "progress": False, "use_cache": False}
    for device in ("cpu", None):  # None resolves to the CPU here: the same bits
        got_images = embed_images_with(model, images, device=device, **common)
        got_texts = embed_texts_with(model, TEXTS, device=device, **common)
        assert got_images.device.type == "cpu" and got_images.dtype == torch.float32
        assert torch.equal(got_images, want_images)
        assert torch.equal(got_texts, want_texts)


def _spy_on_moves(monkeypatch: pytest.MonkeyPatch, modules: dict[str, nn.Module]) -> list[str]:
    """The names of ``modules`` whose ``.to`` is called, in call order (the move itself still happens)."""
    moves: list[str] = []
    for name, module in modules.items():

        def to(*args: Any, _name: str = name, _to: Any = module.to, **kwargs: Any) -> Any:
            moves.append(_name)
            return _to(*args, **kwargs)

        monkeypatch.setattr(module, "to", to)
    return moves


def test_siamese_head_runs_with_the_backbone_and_is_moved_once(
    clip_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(1)
    base = load_model(clip_dir)
    head = SiameseHead(image_dim=32, text_dim=32, width=16, depth=1, heads=2, out_dim=12).eval()
    model = LoadedModel(backbone=base.backbone, head=head, source=base.source, name=base.name + "+head")
    moves = _spy_on_moves(monkeypatch, {"backbone": model.backbone, "head": head})
    got = embed_texts_with(model, TEXTS[:2], device="cpu", precision="fp32", progress=False, use_cache=False)
    again = embed_texts_with(
        model, TEXTS[:2], device="cpu", precision="fp32", progress=False, use_cache=False
    )
    assert moves == []  # already on the CPU: nothing moved, on either call
    with torch.inference_mode():  # the oracle: the text through the head with the image masked out
        feats = model.backbone.text_features(**model.backbone.tokenize(TEXTS[:2]))
        out = head(
            torch.zeros(2, 32),
            feats,
            has_image=torch.tensor([False, False]),
            has_text=torch.tensor([True, True]),
        )
    assert torch.equal(got, nn.functional.normalize(out.text, dim=-1)) and torch.equal(got, again)
    assert got.shape == (2, 12)
    assert {p.device for m in (model.backbone, head) for p in m.parameters()} == {torch.device("cpu")}
    assert model_device(model) == torch.device("cpu")


def test_place_moves_backbone_and_head_to_the_device_once(
    clip_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the meta device stands in for an accelerator: parameters move there without memory or a GPU
    base = load_model(clip_dir)
    head = SiameseHead(image_dim=32, text_dim=32, width=16, depth=1, heads=2)
    model = LoadedModel(backbone=base.backbone, head=head, source=base.source, name=base.name)
    meta = torch.device("meta")
    _place(model, meta)
    assert {p.device for m in (model.backbone, head) for p in m.parameters()} == {meta}
    assert model_device(model) == meta
    moves = _spy_on_moves(monkeypatch, {"backbone": model.backbone, "head": head})
    _place(model, meta)
    assert moves == []  # already there: not moved again


class _Reached(Exception):
    """Raised by the stand-in tower pipeline once it has recorded what it was given."""


def test_a_launched_process_embeds_on_its_own_gpu_by_default(
    clip_dir: Path, images: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # process 1 of a 2-GPU launch, no CUDA here: the default device reaches the model placement and the
    # tower pipeline (whose num_workers="auto" and pinned copies follow it) as cuda:1
    import cliptune.models.embed as embed

    seen: dict[str, Any] = {}
    monkeypatch.setattr(embed, "_joined_launch", lambda: _FakeState())
    monkeypatch.setattr(embed, "_place", lambda model, device: seen.setdefault("placed", device))

    def tower(what: str) -> Any:
        def record(*args: Any, **kwargs: Any) -> Any:
            seen[what] = kwargs["device"]
            raise _Reached

        return record

    monkeypatch.setattr(embed, "embed_images", tower("images"))
    monkeypatch.setattr(embed, "embed_texts", tower("texts"))
    model = load_model(clip_dir)
    with pytest.raises(_Reached):
        embed_images_with(model, images, progress=False, use_cache=False)
    with pytest.raises(_Reached):
        embed_texts_with(model, TEXTS, progress=False, use_cache=False)
    assert seen == {
        "placed": torch.device("cuda", 1),
        "images": torch.device("cuda", 1),
        "texts": torch.device("cuda", 1),
    }
