"""open_clip backbones: parity with open_clip's own encode_image/encode_text, PIL preprocessing, training.

The models are tiny random open_clip models built from config dicts (a CLIP ViT, and a SigLIP whose
image tower is a timm ViT registered here at test size) and written with open_clip's own
``push_to_hf_hub.save_for_hf``, so cliptune reads exactly the folder layout open_clip publishes.

open_clip is an optional extra. Where it is missing these tests skip, except under
``CLIPTUNE_REQUIRE_OPEN_CLIP=1`` (``make test`` sets it, so CI can never skip them silently).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from cliptune.models.backbone import CONFIG_FILE, BackboneError
from cliptune.models.factory import load_backbone
from cliptune.models.freeze import LoraSpec
from cliptune.models.openclip import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, import_open_clip, preprocess_image
from tests.tiny_models import TINY_CORPUS, make_tiny_tokenizer

TEXTS = ["a photo of a cat", "ripped blue jeans!", "an abstract painting in green and yellow"]
IMAGE_SIZE = 32
TIMM_TINY = "cliptune_test_vit_siglip_tiny"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

TINY_CLIP_CFG: dict[str, Any] = {  # ViT-B-32 shrunk: 2 layers of width 32, 8 px patches on 32 px images
    "embed_dim": 24,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}
TINY_SIGLIP_CFG: dict[str, Any] = {  # ViT-B-16-SigLIP shrunk: the same keys, a tiny timm trunk
    "embed_dim": 32,
    "init_logit_bias": -10,
    "custom_text": True,
    "vision_cfg": {
        "image_size": IMAGE_SIZE,
        "timm_model_name": TIMM_TINY,
        "timm_model_pretrained": False,
        "timm_pool": "map",
        "timm_proj": "none",
    },
    "text_cfg": {
        "context_length": 16,
        "vocab_size": 200,
        "hf_tokenizer_name": "tiny-tokenizer-in-this-folder",
        "width": 32,
        "heads": 4,
        "layers": 2,
        "no_causal_mask": True,
        "proj_bias": True,
        "pool_type": "last",
        "norm_kwargs": {"eps": 1e-6},
    },
}
SIGLIP_PREPROCESS = {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "resize_mode": "squash"}


@pytest.fixture(scope="module")
def open_clip() -> Any:
    try:
        module = import_open_clip()
    except BackboneError:
        if os.environ.get("CLIPTUNE_REQUIRE_OPEN_CLIP") == "1":
            raise
        pytest.skip("open_clip extra not installed (make test installs it and never skips)")
    _register_tiny_timm_siglip()
    return module


def _register_tiny_timm_siglip() -> None:
    """A timm SigLIP ViT (no class token, MAP pooling) at test size, as open_clip's timm_model_name."""
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    if TIMM_TINY in timm.list_models():
        return

    def tiny(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        return VisionTransformer(
            img_size=IMAGE_SIZE, patch_size=8, embed_dim=32, depth=2, num_heads=4, class_token=False, **kwargs
        )

    tiny.__name__ = TIMM_TINY
    register_model(tiny)


class _NoTokenizerFiles:
    """CLIP configs use open_clip's bundled BPE: nothing to write beside the weights."""

    def save_pretrained(self, directory: Any) -> None:
        return None


def _save_open_clip(
    open_clip: Any, name: str, folder: Path, seed: int = 0, bin_weights: bool = False
) -> Path:
    """Build a random tiny open_clip model and write it with open_clip's own save_for_hf."""
    from open_clip.model import set_model_preprocess_cfg
    from open_clip.push_to_hf_hub import save_for_hf

    torch.manual_seed(seed)
    if name == "clip":
        cfg, tokenizer = TINY_CLIP_CFG, _NoTokenizerFiles()
        model = open_clip.CLIP(**cfg)
        preprocess = {"size": IMAGE_SIZE, "mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic"}
        preprocess |= {"resize_mode": "shortest", "fill_color": 0, "mode": "RGB"}
    else:
        cfg, tokenizer = TINY_SIGLIP_CFG, make_tiny_tokenizer(max_length=16)
        model = open_clip.CustomTextCLIP(**{k: v for k, v in cfg.items() if k != "custom_text"})
        preprocess = {"size": IMAGE_SIZE, **SIGLIP_PREPROCESS, "fill_color": 0, "mode": "RGB"}
    set_model_preprocess_cfg(model, preprocess)
    save_for_hf(model.eval(), tokenizer, cfg, folder, safe_serialization=not bin_weights)
    return folder


@pytest.mark.parametrize(
    ("tiny", "builtin"), [(TINY_CLIP_CFG, "ViT-B-32"), (TINY_SIGLIP_CFG, "ViT-B-16-SigLIP")]
)
def test_tiny_configs_shrink_the_real_architectures(open_clip, tiny, builtin) -> None:
    real = open_clip.get_model_config(builtin)
    # the same structure (keys: pooling, masks, projections, timm pooling); only sizes and names differ
    assert set(tiny) == set(real)
    for tower in ("vision_cfg", "text_cfg"):
        assert set(tiny[tower]) <= set(real[tower]) | {"head_width"}
    sizes = {
        "image_size",
        "layers",
        "width",
        "heads",
        "patch_size",
        "context_length",
        "vocab_size",
        "head_width",
    }
    for tower in ("vision_cfg", "text_cfg"):
        for key, value in real[tower].items():
            if key not in sizes | {"timm_model_name", "hf_tokenizer_name", "tokenizer_kwargs"}:
                assert tiny[tower][key] == value, (tower, key)


@pytest.fixture(scope="module")
def folders(open_clip: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("open_clip")
    return {name: _save_open_clip(open_clip, name, root / name) for name in ("clip", "siglip")}


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (64, 33, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)),  # grayscale
    ]


def _reference(open_clip: Any, folder: Path) -> tuple[Any, Any]:
    """open_clip's own model and tokenizer for the folder (the oracle)."""
    name = f"local-dir:{folder}"
    return open_clip.create_model(name).eval(), open_clip.get_tokenizer(name)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


@pytest.mark.parametrize(("name", "dim"), [("clip", 24), ("siglip", 32)])
def test_embeddings_equal_open_clip_encode(open_clip, folders, images, name, dim) -> None:
    backbone = load_backbone(f"open_clip:{folders[name]}")
    reference, ref_tokenizer = _reference(open_clip, folders[name])
    pixels = backbone.preprocess(images)
    tokens = backbone.tokenize(TEXTS)
    assert torch.equal(tokens["input_ids"], ref_tokenizer(TEXTS))  # the same token ids as open_clip
    with torch.no_grad():
        image_emb, text_emb = backbone.encode_image(pixels), backbone.encode_text(**tokens)
        ref_image, ref_text = reference.encode_image(pixels), reference.encode_text(tokens["input_ids"])
    assert backbone.embed_dim == dim and image_emb.shape == (3, dim) and text_emb.shape == (3, dim)
    assert _cosine(image_emb, ref_image).min() >= 0.99999
    assert _cosine(text_emb, ref_text).min() >= 0.99999
    # torch picks attention kernels by requires_grad (nn.MultiheadAttention's fused path needs every
    # weight frozen; 1.5e-6 apart otherwise): with both frozen the same ops run, bitwise equal.
    reference.requires_grad_(False)
    backbone.requires_grad_(False)
    with torch.no_grad():
        ref_image, ref_text = reference.encode_image(pixels), reference.encode_text(tokens["input_ids"])
    assert torch.equal(image_emb, ref_image) and torch.equal(text_emb, ref_text)


def test_similarity_init_and_tokenize_mask(folders) -> None:
    clip = load_backbone(f"open_clip:{folders['clip']}")
    siglip = load_backbone(f"open_clip:{folders['siglip']}", trainable_layers=-1)
    assert clip.similarity_init == pytest.approx({"logit_scale": float(np.log(1 / 0.07))})
    assert siglip.similarity_init == pytest.approx(
        {"logit_scale": float(np.log(1 / 0.07)), "logit_bias": -10.0}
    )
    assert not siglip.model.logit_bias.requires_grad  # never trains, even with trainable_layers=-1
    tokens = clip.tokenize(["a cat"])
    # CLIP BPE: <start> a cat <end> + 12 pads of context 16; "!" (id 0, like padding) stays a real token
    assert tokens["input_ids"].shape == (1, 16) and tokens["attention_mask"].sum() == 4
    assert clip.tokenize(["!"])["attention_mask"].sum() == 3
    assert siglip.tokenize(["a cat"])["attention_mask"].sum() == 4  # <bos> a cat <eos>, pads are id 0


def _bands(size: tuple[int, int]) -> Image.Image:
    """Three vertical bands, red | green | blue, each a third of the width."""
    w, h = size
    array = np.zeros((h, w, 3), dtype=np.uint8)
    for band in range(3):
        array[:, band * w // 3 : (band + 1) * w // 3, band] = 255
    return Image.fromarray(array)


def _normalised(rgb: tuple[int, int, int], mean: Any, std: Any) -> torch.Tensor:
    return (torch.tensor(rgb, dtype=torch.float32) / 255 - torch.tensor(mean)) / torch.tensor(std)


def test_preprocess_follows_preprocess_cfg() -> None:
    cfg = {
        "size": 32,
        "mean": OPENAI_MEAN,
        "std": OPENAI_STD,
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    # shortest: 96 x 32 needs no resize (short side already 32), the centre crop keeps the green band
    out = preprocess_image(_bands((96, 32)), cfg)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    green = _normalised((0, 255, 0), OPENAI_MEAN, OPENAI_STD).view(3, 1, 1)  # (0 - .481) / .269 = -1.792 ...
    assert torch.allclose(out, green.expand(3, 32, 32))
    # a solid colour at any size is the normalised colour everywhere: (200 / 255 - .481) / .269 = 1.127
    solid = preprocess_image(Image.new("RGB", (50, 70), (200, 100, 50)), cfg)
    assert torch.allclose(
        solid, _normalised((200, 100, 50), OPENAI_MEAN, OPENAI_STD).view(3, 1, 1).expand(3, 32, 32)
    )
    assert solid[0, 0, 0].item() == pytest.approx((200 / 255 - 0.48145466) / 0.26862954, abs=1e-5)
    # longest: 96 x 32 -> 32 x 11 (32 / 3 = 10.67 rounds to 11), padded with fill 0 to 32 x 32: rows
    # 0..10 and 22..31 are (0 - mean) / std, the middle 11 rows hold the bands
    longest = preprocess_image(_bands((96, 32)), {**cfg, "resize_mode": "longest", "fill_color": 0})
    black = _normalised((0, 0, 0), OPENAI_MEAN, OPENAI_STD).view(3, 1)
    assert torch.allclose(longest[:, :10, :].reshape(3, -1), black.expand(3, 320))
    assert torch.allclose(longest[:, 22:, :].reshape(3, -1), black.expand(3, 320))
    assert torch.allclose(longest[:, 16, 16], _normalised((0, 255, 0), OPENAI_MEAN, OPENAI_STD), atol=0.05)
    # squash: 96 x 32 -> 32 x 32, all three bands kept (column 2 red, 16 green, 29 blue); mean/std 0.5:
    # (255 / 255 - .5) / .5 = 1 and (0 - .5) / .5 = -1
    squash = preprocess_image(_bands((96, 32)), {**cfg, **SIGLIP_PREPROCESS})
    for column, channel in ((2, 0), (16, 1), (29, 2)):
        expected = -torch.ones(3)
        expected[channel] = 1.0
        assert torch.allclose(squash[:, 10, column], expected, atol=1e-6)
    # shortest on a portrait image: 40 x 80 -> 32 x 64 (long side int(32 * 80 / 40)), centre rows 16..47
    tall = np.zeros((80, 40, 3), dtype=np.uint8)
    tall[20:60] = 255  # white middle half
    cropped = preprocess_image(Image.fromarray(tall), {**cfg, "interpolation": "nearest"})
    white = _normalised((255, 255, 255), OPENAI_MEAN, OPENAI_STD).view(3, 1, 1)
    assert torch.allclose(cropped, white.expand(3, 32, 32))


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_trainable_layers_zero_and_two(folders, images, name) -> None:
    heads_only = load_backbone(f"open_clip:{folders[name]}")
    assert heads_only.features_frozen
    trainable = {n for n, p in heads_only.named_parameters() if p.requires_grad}
    if name == "clip":  # the two projections moved out of the open_clip model
        assert trainable == {"image_proj.weight", "text_proj.weight"}
    else:  # timm MAP head + text Linear
        assert {"text_proj.linear.weight", "text_proj.linear.bias"} < trainable
        assert all(
            n.startswith(("text_proj.", "model.visual.trunk.attn_pool.", "model.visual.trunk.fc_norm."))
            for n in trainable
        )
    two = load_backbone(f"open_clip:{folders[name]}", trainable_layers=2)
    assert not two.features_frozen and two.identity() == heads_only.identity()
    names = {n for n, p in two.named_parameters() if p.requires_grad}
    block = "model.visual.transformer.resblocks.1." if name == "clip" else "model.visual.trunk.blocks.1."
    assert any(n.startswith(block) for n in names)
    assert not any("token_embedding" in n or "conv1" in n or "patch_embed" in n for n in names)
    pixels, tokens = two.preprocess(images), two.tokenize(TEXTS)
    loss = two.encode_image(pixels).sum() + two.encode_text(**tokens).sum()
    loss.backward()
    assert all(p.grad is not None for n, p in two.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_save_reload_is_bitwise_and_loads_in_open_clip(open_clip, folders, images, tmp_path, name) -> None:
    backbone = load_backbone(f"open_clip:{folders[name]}", trainable_layers=1)
    with torch.no_grad():  # move trained parts away from the checkpoint so the save must carry them
        for param in backbone.parameters():
            if param.requires_grad:
                param.add_(0.01 * torch.randn_like(param))
    backbone.save(tmp_path / "saved")
    # the same trainable parameters as `backbone`: torch picks attention kernels by requires_grad
    restored = load_backbone(tmp_path / "saved", trainable_layers=1)
    pixels, tokens = backbone.preprocess(images), backbone.tokenize(TEXTS)
    with torch.no_grad():
        assert torch.equal(restored.encode_image(pixels), backbone.encode_image(pixels))
        assert torch.equal(restored.encode_text(**tokens), backbone.encode_text(**tokens))
        plain, _ = _reference(open_clip, tmp_path / "saved")  # the folder is a plain open_clip folder too
        plain.requires_grad_(False)
        backbone.requires_grad_(False)
        assert torch.equal(plain.encode_image(pixels), backbone.encode_image(pixels))
    assert restored.kind == "open_clip" and restored.identity() == backbone.identity()
    assert json.loads((tmp_path / "saved" / CONFIG_FILE).read_text())["trainable_layers"] == 1
    assert (tmp_path / "saved" / OPEN_CLIP_CONFIG).is_file()


@pytest.mark.parametrize(
    ("name", "towers"),
    [
        ("clip", (".visual.transformer.", "model.transformer.")),
        ("siglip", (".trunk.blocks.", ".text.transformer.")),
    ],
)
def test_lora_trains_saves_and_reloads_bitwise(open_clip, folders, images, tmp_path, name, towers) -> None:
    backbone = load_backbone(f"open_clip:{folders[name]}", lora=LoraSpec(r=2, alpha=4))
    lora = [n for n, p in backbone.named_parameters() if "lora_" in n]
    assert lora and all(backbone.get_parameter(n).requires_grad for n in lora)
    assert all(any(tower in n for n in lora) for tower in towers)  # adapters in both towers
    assert not any(n.startswith(("image_proj.", "text_proj.")) or ".attn_pool." in n for n in lora)  # no head
    with torch.no_grad():  # lora_B starts at zero; make the adapters matter
        for n in lora:
            if "lora_B" in n:
                backbone.get_parameter(n).normal_()
    backbone.save(tmp_path / "saved")
    restored = load_backbone(tmp_path / "saved")
    pixels, tokens = backbone.preprocess(images), backbone.tokenize(TEXTS)
    with torch.no_grad():
        assert torch.equal(restored.encode_image(pixels), backbone.encode_image(pixels))
        assert torch.equal(restored.encode_text(**tokens), backbone.encode_text(**tokens))
        merged, _ = _reference(open_clip, tmp_path / "saved")  # merged adapters: close, not bitwise
        torch.testing.assert_close(
            merged.encode_image(pixels), backbone.encode_image(pixels), rtol=1e-4, atol=1e-5
        )
    assert restored.lora == LoraSpec(r=2, alpha=4)


def test_bin_weights_folder_loads(open_clip, images, tmp_path) -> None:
    folder = _save_open_clip(open_clip, "clip", tmp_path / "bin", seed=1, bin_weights=True)
    assert (folder / "open_clip_pytorch_model.bin").is_file()
    backbone = load_backbone(f"open_clip:{folder}")
    reference, _ = _reference(open_clip, folder)
    pixels = backbone.preprocess(images)
    with torch.no_grad():
        assert torch.equal(backbone.encode_image(pixels), reference.encode_image(pixels))


def test_bad_specs_are_backbone_errors(open_clip, folders, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match="not an open_clip folder"):
        load_backbone(f"open_clip:{tmp_path}")
    with pytest.raises(BackboneError, match="could not load it"):
        load_backbone("open_clip:hf-hub:Marqo/marqo-fashionSigLIP")
    with pytest.raises(BackboneError, match="could not load it"):  # a pretrained tag needs a download
        load_backbone("open_clip:ViT-B-32/laion2b_s34b_b79k")
    with pytest.raises(BackboneError, match="expected a local open_clip folder"):
        load_backbone("open_clip:ViT-B-32")
    with pytest.raises(BackboneError, match="embed_dim=8 differs"):
        load_backbone(f"open_clip:{folders['clip']}", embed_dim=8)
    with pytest.raises(BackboneError, match="unknown option"):
        load_backbone(f"open_clip:{folders['clip']}", seed=1)


def test_missing_extra_names_it(monkeypatch) -> None:
    """Runs with or without open_clip installed: an absent package is a BackboneError naming the extra."""
    monkeypatch.setitem(sys.modules, "open_clip", None)  # `import open_clip` now raises ImportError
    with pytest.raises(BackboneError, match=r"cliptune\[open_clip\]"):
        load_backbone("open_clip:hf-hub:Marqo/marqo-fashionSigLIP")


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cliptune.data.synthetic import render_fashion

    return render_fashion(tmp_path_factory.mktemp("cat") / "fashion", n=60, seed=0)


@pytest.mark.parametrize("layers", [0, 2])
def test_open_clip_folder_trains_saves_reloads_and_evaluates(folders, catalogue, tmp_path, layers) -> None:
    from cliptune.cli.app import app

    runner = CliRunner()
    cfg = {
        "data": {"catalogue": str(catalogue), "split": {"ratios": {"train": 0.7, "val": 0.3}}},
        "model": {
            "backbone": f"open_clip:{folders['clip']}",
            "trainable_layers": layers,
            "cache_dir": str(tmp_path / "c"),
        },
        "train": {"epochs": 2, "batch_size": 16, "lr": 2e-3, "early_stopping": None},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    args = ["train", str(tmp_path / "run.yaml"), "--name", "oc", "--runs", str(tmp_path / "runs"), "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "oc"
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs if e["kind"] == "epoch"] == [0, 1, 2]
    reloaded = load_backbone(run / "model")
    assert reloaded.kind == "open_clip" and reloaded.trainable_layers == 0
    assert json.loads((run / "model" / CONFIG_FILE).read_text())["trainable_layers"] == layers
    reloaded.save(tmp_path / "resaved")
    again = load_backbone(tmp_path / "resaved")  # the run's model round-trips bitwise
    pixels = reloaded.preprocess([Image.new("RGB", (40, 30), (10, 200, 30))])
    tokens = reloaded.tokenize(TINY_CORPUS[:2])
    with torch.no_grad():
        assert torch.equal(again.encode_image(pixels), reloaded.encode_image(pixels))
        assert torch.equal(again.encode_text(**tokens), reloaded.encode_text(**tokens))
    evaluated = runner.invoke(app, ["eval", str(run), "--split", "val", "--bootstrap", "20", "-q"])
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads((run / "eval" / "val.json").read_text())["metrics"]
    best = json.loads((run / "summary.json").read_text())["best"]
    assert metrics["t2i/recall@1"]["n"] == 17  # 30% of 60 rows (grouped split)
    if layers == 0:  # frozen towers, the same cached features: eval ranks as the best epoch's validation did
        assert metrics["t2i/recall@1"]["mean"] == pytest.approx(best["val/t2i/recall@1"])
        assert metrics["i2t/recall@5"]["mean"] == pytest.approx(best["val/i2t/recall@5"])


def test_open_clip_weights_that_do_not_fit_fail_naming_the_key(folders, tmp_path) -> None:
    # A saved open_clip folder whose weights file lost a key (renamed) must not load as a partly random model.
    from safetensors.torch import load_file, save_file

    backbone = load_backbone(f"open_clip:{folders['clip']}")
    backbone.save(tmp_path / "saved")
    weights = tmp_path / "saved" / OPEN_CLIP_WEIGHTS
    state = load_file(str(weights))
    key = next(k for k in state if k.startswith("visual.transformer."))
    state[key + "_renamed"] = state.pop(key)
    save_file(state, str(weights))
    with pytest.raises(BackboneError) as info:
        load_backbone(tmp_path / "saved")
    assert key in str(info.value) and str(tmp_path / "saved") in str(info.value)
