"""``cliptune export``: ONNX graphs equal PyTorch for every backbone kind, the parity check refuses a wrong
graph, the torch-free client, the Siamese head graph, the plain folder, and the CLI's exits.

Each export of a tiny model costs seconds (torch.export + onnxscript), so every kind is exported once per
module and the tests read those folders; the oracle is always PyTorch computed here (``embed_images_with``,
``embed_texts_with``, ``SiameseHead``), never the numbers the export wrote about itself.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cliptune.cli.app import app
from cliptune.export import onnx as export_onnx_module
from cliptune.export.errors import ExportExistsError, ParityError
from cliptune.export.onnx import export_onnx
from cliptune.models.embed import embed_images_with, embed_texts_with
from cliptune.models.factory import BACKBONE_DIR, HEAD_DIR, LoadedModel, load_model
from cliptune.models.siamese import SiameseHead
from tests.tiny_models import TINY_CORPUS, make_tiny_clip, make_tiny_siglip

runner = CliRunner()
CAPTIONS = TINY_CORPUS[:6]
SIZES = [(40, 30), (33, 50), (64, 64), (45, 37), (32, 32), (50, 41)]  # non-square both ways: resize + crop


def _cos_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def catalogue(root: Path) -> Path:
    """Six random-noise images of different sizes with the tiny corpus as captions."""
    folder = root / "catalogue"
    (folder / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = ["file_name,text"]
    for i, ((w, h), caption) in enumerate(zip(SIZES, CAPTIONS, strict=True)):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / "img" / f"{i}.png")
        lines.append(f"img/{i}.png,{caption}")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    return folder


def _paths(catalogue: Path) -> list[Path]:
    return [catalogue / "img" / f"{i}.png" for i in range(len(SIZES))]


def _open_clip_folder(folder: Path) -> Path:
    from cliptune.models.openclip import import_open_clip
    from tests.test_models_open_clip import _register_tiny_timm_siglip, _save_open_clip

    module = import_open_clip()
    _register_tiny_timm_siglip()
    return _save_open_clip(module, "clip", folder)


def _siamese_folder(root: Path) -> Path:
    """A Siamese model folder as training writes it: the tiny CLIP backbone and a small head."""
    folder = root / "siamese"
    load_model(make_tiny_clip(root / "clip-for-siamese")).backbone.save(folder / BACKBONE_DIR)
    torch.manual_seed(1)
    SiameseHead(image_dim=32, text_dim=32, width=16, depth=1, heads=2, out_dim=12).save(folder / HEAD_DIR)
    return folder


@pytest.fixture(scope="module")
def exported(root: Path, catalogue: Path) -> dict[str, tuple[LoadedModel, Path, dict[str, Any]]]:
    """kind -> (model, export folder, export.json): CLIP through the CLI, the others through the library."""
    out: dict[str, tuple[LoadedModel, Path, dict[str, Any]]] = {}
    clip_dir = make_tiny_clip(root / "clip")
    args = ["export", str(clip_dir), str(root / "x-clip"), "--data", str(catalogue)]
    result = runner.invoke(app, [*args, "-q"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((root / "x-clip" / "export.json").read_text())
    image = manifest["parity"]["graphs"]["image"]
    assert (
        f"image graph: min cosine {image['min_cosine']:.7f}" in result.output
    )  # the console shows the numbers
    out["clip"] = (load_model(clip_dir), root / "x-clip", manifest)
    sources = {
        "siglip": make_tiny_siglip(root / "siglip"),
        "open_clip": f"open_clip:{_open_clip_folder(root / 'open_clip')}",
        "siamese": _siamese_folder(root),
    }
    for kind, source in sources.items():
        model = load_model(source)
        folder = root / f"x-{kind}"
        manifest = export_onnx(model, folder, _paths(catalogue), CAPTIONS)
        out[kind] = (model, folder, manifest)
    return out


@pytest.mark.slow  # the module's exports (one per backbone kind) take about a minute
@pytest.mark.parametrize("kind", ["clip", "siglip", "open_clip", "siamese"])
def test_onnxruntime_equals_pytorch_for_every_backbone_kind(
    exported: dict[str, Any], catalogue: Path, root: Path, kind: str
) -> None:
    model, folder, manifest = exported[kind]
    paths, backbone = _paths(catalogue), model.backbone
    images = [Image.open(p).convert("RGB") for p in paths]
    # independent of the export's own check: sessions opened here, fed PyTorch's own preprocessing and tokens
    image_session = onnxruntime.InferenceSession(str(folder / "image.onnx"))
    got = image_session.run(None, {"pixel_values": backbone.preprocess(images).numpy()})[0]
    want = embed_images_with(model, paths, cache_dir=root / "cache", precision="fp32", progress=False).numpy()
    assert got.shape == want.shape and _cos_rows(got, want).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # the graph L2-normalises
    text_session = onnxruntime.InferenceSession(str(folder / "text.onnx"))
    tokens = backbone.tokenize(CAPTIONS)
    feeds = {i.name: tokens[i.name].numpy() for i in text_session.get_inputs()}
    got = text_session.run(None, feeds)[0]
    want = embed_texts_with(
        model, CAPTIONS, cache_dir=root / "cache", precision="fp32", progress=False
    ).numpy()
    assert _cos_rows(got, want).min() >= 0.9999
    for name, numbers in manifest["parity"]["graphs"].items():
        assert numbers["n"] == len(SIZES) and numbers["min_cosine"] >= 0.9999, name
        assert 0 <= numbers["max_abs_diff"] < 1e-4, name
    assert manifest["exporter"]["image"] == "dynamo" and manifest["exporter"]["text"] == "dynamo"
    # the client's numpy preprocessing reproduces the backbone's (to float rounding), its tokenizer the ids
    assert manifest["parity"]["preprocess_max_abs_diff"] < 1e-5
    assert manifest["parity"]["tokens_equal"] is (None if kind == "open_clip" else True)


@pytest.mark.slow  # the module's exports (one per backbone kind) take about a minute
def test_dynamic_batch_runs_batches_of_one_and_five(exported: dict[str, Any]) -> None:
    model, folder, _ = exported["clip"]
    backbone = model.backbone
    image_session = onnxruntime.InferenceSession(str(folder / "image.onnx"))
    text_session = onnxruntime.InferenceSession(str(folder / "text.onnx"))
    torch.manual_seed(0)
    for batch in (1, 5):
        pixels = torch.randn(batch, 3, 32, 32)
        got = image_session.run(None, {"pixel_values": pixels.numpy()})[0]
        with torch.no_grad():
            want = torch.nn.functional.normalize(backbone.encode_image(pixels), dim=-1).numpy()
        assert got.shape == (batch, 24)
        np.testing.assert_allclose(got, want, atol=1e-5)
        tokens = backbone.tokenize(CAPTIONS[:batch])  # padded to the longest: the sequence length varies too
        got = text_session.run(None, {k: v.numpy() for k, v in tokens.items()})[0]
        with torch.no_grad():
            want = torch.nn.functional.normalize(backbone.encode_text(**tokens), dim=-1).numpy()
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.slow  # the module's exports (one per backbone kind) take about a minute
def test_siamese_head_is_a_third_graph_equal_to_the_head(exported: dict[str, Any]) -> None:
    model, folder, manifest = exported["siamese"]
    assert set(manifest["graphs"]) == {"image", "text", "head"} and manifest["siamese"] is True
    assert [o["name"] for o in manifest["graphs"]["head"]["outputs"]] == [
        "image_embeds",
        "text_embeds",
        "fused_embeds",
    ]
    session = onnxruntime.InferenceSession(str(folder / "head.onnx"))
    torch.manual_seed(3)
    image, text = torch.randn(3, 32), torch.randn(3, 32)
    got = session.run(None, {"image_features": image.numpy(), "text_features": text.numpy()})
    with torch.no_grad():
        want = model.head(image, text)
    for g, w in zip(got, (want.image, want.text, want.fused), strict=True):
        assert g.shape == (3, 12)
        np.testing.assert_allclose(g, w.numpy(), atol=1e-5)
    assert manifest["embed_dim"] == 12  # the head's space, not the backbone's 24


@pytest.mark.slow  # the module's exports (one per backbone kind) take about a minute
def test_export_json_describes_graphs_inputs_and_preprocessing(exported: dict[str, Any]) -> None:
    model, folder, manifest = exported["clip"]
    assert manifest["model"] == model.name and manifest["format"] == "cliptune-onnx-v1"
    assert (
        manifest["backbone_kind"] == "clip" and manifest["embed_dim"] == 24 and manifest["normalized"] is True
    )
    image = manifest["graphs"]["image"]
    assert image["inputs"] == [
        {"name": "pixel_values", "shape": ["batch", 3, 32, 32], "type": "tensor(float)"}
    ]
    assert image["outputs"] == [{"name": "image_embeds", "shape": ["batch", 24], "type": "tensor(float)"}]
    text_inputs = manifest["graphs"]["text"]["inputs"]
    assert [i["name"] for i in text_inputs] == ["input_ids", "attention_mask"]
    assert all(i["shape"] == ["batch", "sequence"] and i["type"] == "tensor(int64)" for i in text_inputs)
    assert isinstance(manifest["opset"], int) and manifest["opset"] >= 17
    assert manifest["tokenizer"] == {
        "file": "tokenizer.json",
        "max_length": 16,  # tiny CLIP: max_position_embeddings 16
        "padding": "longest",
        "pad_id": 0,
        "pad_token": "<pad>",
        "truncation": "longest_first",
    }
    processor = model.backbone.image_processor
    spec = json.loads((folder / "preprocess.json").read_text())
    assert spec["resize"] == {
        "mode": "shortest",
        "size": 32,
        "long_side": "floor",
        "interpolation": "bicubic",
    }
    assert spec["crop"] == {"height": 32, "width": 32, "offset": "floor", "fill": 0}
    assert spec["mean"] == pytest.approx(list(processor.image_mean))
    assert spec["std"] == pytest.approx(list(processor.image_std))
    assert spec["rescale"] == pytest.approx(1 / 255) and spec["channel_order"] == "RGB"
    assert sorted(p.name for p in folder.iterdir()) == [
        "cliptune_onnx.py",
        "export.json",
        "image.onnx",
        "preprocess.json",
        "text.onnx",
        "tokenizer.json",
    ]
    _, _, open_clip_manifest = exported["open_clip"]
    assert open_clip_manifest["tokenizer"] is None  # open_clip's BPE is no tokenizers pipeline
    assert open_clip_manifest["parity"]["tokens_equal"] is None


@pytest.mark.slow  # the module's exports (one per backbone kind) take about a minute
def test_reference_client_runs_without_torch_and_equals_pytorch(
    exported: dict[str, Any], catalogue: Path, root: Path
) -> None:
    model, folder, _ = exported["clip"]
    paths = _paths(catalogue)
    script = (
        "import json, sys\n"
        "import numpy as np\n"
        "import cliptune_onnx\n"
        f"images = cliptune_onnx.embed_images({[str(p) for p in paths]!r})\n"
        f"texts = cliptune_onnx.embed_texts({CAPTIONS!r})\n"
        "np.save('images.npy', images); np.save('texts.npy', texts)\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'cliptune': 'cliptune' in sys.modules}))\n"
    )
    work = root / "client-run"
    shutil.copytree(folder, work)
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"torch": False, "cliptune": False}
    want_images = embed_images_with(model, paths, cache_dir=root / "cache", precision="fp32", progress=False)
    want_texts = embed_texts_with(model, CAPTIONS, cache_dir=root / "cache", precision="fp32", progress=False)
    assert _cos_rows(np.load(work / "images.npy"), want_images.numpy()).min() >= 0.9999
    assert _cos_rows(np.load(work / "texts.npy"), want_texts.numpy()).min() >= 0.9999


@pytest.mark.slow  # the module's exports (one per backbone kind) take about a minute
def test_a_wrong_graph_fails_the_parity_check_and_writes_nothing(
    exported: dict[str, Any], catalogue: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the graphs of the seed-0 CLIP, exported "for" a seed-1 CLIP of the same shapes: a wrong graph
    _, good, _ = exported["clip"]

    def copy_graph(module: Any, args: Any, outputs: Any, path: Path, big: bool) -> str:
        shutil.copy(good / path.name, path)
        return "dynamo"

    monkeypatch.setattr(export_onnx_module, "_export", copy_graph)
    other = load_model(make_tiny_clip(root / "clip-seed1", seed=1))
    out = root / "x-wrong"
    with pytest.raises(ParityError) as caught:
        export_onnx(other, out, _paths(catalogue), CAPTIONS)
    assert caught.value.graph == "image" and caught.value.min_cosine < 0.9999 and caught.value.n == len(SIZES)
    assert "nothing was written" in str(caught.value)
    assert not out.exists() and not list(root.glob(".x-wrong*"))  # no folder, no temporary left behind


@pytest.mark.slow  # the module's exports (one per backbone kind) take about a minute
def test_existing_out_is_refused_without_overwrite(exported: dict[str, Any], catalogue: Path) -> None:
    model, folder, _ = exported["clip"]
    before = (folder / "export.json").read_bytes()
    with pytest.raises(ExportExistsError):
        export_onnx(model, folder, _paths(catalogue), CAPTIONS)
    result = runner.invoke(app, ["export", str(model.source), str(folder), "--data", str(catalogue)])
    assert result.exit_code == 1 and "--overwrite" in result.output and "Traceback" not in result.output
    assert (folder / "export.json").read_bytes() == before


def test_cli_bad_input_exits_without_traceback(root: Path, catalogue: Path) -> None:
    missing = root / "no-such-run"
    result = runner.invoke(app, ["export", str(missing), str(root / "o1"), "--data", str(catalogue)])
    assert result.exit_code == 1 and str(missing) in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["export", str(missing), str(root / "o2")])  # no run, no --data
    assert result.exit_code == 2 and "--data" in result.output
    result = runner.invoke(app, ["export", str(missing), str(root / "o3"), "--format", "tflite"])
    assert result.exit_code == 2 and "--format must be onnx or safetensors" in result.output
    assert not any((root / o).exists() for o in ("o1", "o2", "o3"))


@pytest.mark.slow  # the module's exports (one per backbone kind) take about a minute
def test_safetensors_writes_the_plain_folder_or_refuses(exported: dict[str, Any], root: Path) -> None:
    from transformers import CLIPModel

    model, _, _ = exported["clip"]
    out = root / "plain-clip"
    result = runner.invoke(app, ["export", str(model.source), str(out), "--format", "safetensors"])
    assert result.exit_code == 0, result.output
    assert not (out / "cliptune_backbone.json").exists()  # plain: nothing only cliptune reads
    plain = CLIPModel.from_pretrained(str(out)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = plain.get_image_features(pixel_values=pixels)
        got = got if isinstance(got, torch.Tensor) else got.pooler_output
        torch.testing.assert_close(got, model.backbone.encode_image(pixels))
    siamese, _, _ = exported["siamese"]
    result = runner.invoke(
        app, ["export", str(siamese.source), str(root / "plain-siam"), "--format", "safetensors"]
    )
    assert result.exit_code == 1 and "Siamese head" in result.output and "ONNX" in result.output
    assert "Traceback" not in result.output and not (root / "plain-siam").exists()


def test_plain_folder_merges_lora_and_is_checked(root: Path) -> None:
    from transformers import CLIPModel

    from cliptune.export.plain import check_plain, export_plain
    from cliptune.models.factory import load_backbone
    from cliptune.models.freeze import LoraSpec

    backbone = load_backbone(make_tiny_clip(root / "clip-lora"), lora=LoraSpec(r=2, alpha=4.0))
    torch.manual_seed(5)
    with torch.no_grad():  # peft starts B at zero (a no-op adapter): make the merge matter
        for name, param in backbone.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    model = LoadedModel(backbone, None, root / "clip-lora", backbone.model_identity())
    out = root / "plain-lora"
    written = export_plain(model, out)
    assert "model.safetensors" in written and "cliptune_state.safetensors" not in written
    plain = CLIPModel.from_pretrained(str(out)).eval()  # no peft: the adapters were merged
    assert not any("lora" in k for k in plain.state_dict())
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got = plain.get_image_features(pixel_values=pixels)
        got = got if isinstance(got, torch.Tensor) else got.pooler_output
        want = backbone.encode_image(pixels)
        base = load_backbone(root / "clip-lora").encode_image(pixels)  # the same model without adapters
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert (want - base).abs().max() > 1e-2  # so the equality above needed the merged adapters
    numbers = check_plain(backbone, out)
    assert numbers["image"] >= 0.9999 and numbers["text"] >= 0.9999
    # a folder whose weights are not the model's fails the check
    other = load_backbone(make_tiny_clip(root / "clip-other", seed=2))
    with pytest.raises(ParityError) as caught:
        check_plain(other, out)
    assert caught.value.graph == "plain-image"


@pytest.mark.slow  # the module's exports (one per backbone kind) take about a minute
def test_plain_open_clip_folder_loads_with_open_clip(exported: dict[str, Any], root: Path) -> None:
    from cliptune.export.plain import export_plain
    from cliptune.models.openclip import import_open_clip

    model, _, _ = exported["open_clip"]
    out = root / "plain-open-clip"
    assert "open_clip_config.json" in export_plain(model, out)
    plain = import_open_clip().create_model(f"local-dir:{out}").eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain.encode_image(pixels), model.backbone.encode_image(pixels))


ODD_SIZES = [(40, 30), (33, 50), (161, 97), (97, 161), (20, 20), (300, 7), (7, 300)]


def _odd_images() -> list[Image.Image]:
    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in ODD_SIZES]


def _replayed(spec: dict[str, Any], images: list[Image.Image]) -> np.ndarray:
    from cliptune.export.client import preprocess_image

    return np.stack([preprocess_image(image, spec) for image in images])


@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_open_clip_preprocessing_is_replayed_exactly(mode: str, interpolation: str) -> None:
    from cliptune.export.inputs import _open_clip
    from cliptune.models.openclip import preprocess_image

    cfg = {"size": [32, 32], "mean": [0.48, 0.45, 0.4], "std": [0.26, 0.26, 0.27], "resize_mode": mode}
    cfg |= {"interpolation": interpolation, "fill_color": 7}
    images = _odd_images()  # thin and tiny images: rounding, padding and cropping all show
    want = torch.stack([preprocess_image(image, cfg) for image in images]).numpy()
    np.testing.assert_allclose(_replayed(_open_clip(cfg), images), want, atol=1e-5)


def test_hf_and_composed_preprocessing_is_replayed_exactly(root: Path) -> None:
    from cliptune.export.inputs import describe_preprocess
    from cliptune.models.composed import IMAGENET_STD, _EfficientNetLite0, _minilm_path
    from cliptune.models.factory import load_backbone

    images = _odd_images()
    backbones = [
        load_backbone(make_tiny_clip(root / "pre-clip")),  # shortest_edge + centre crop
        load_backbone(make_tiny_siglip(root / "pre-siglip")),  # exact height x width
        load_backbone("embedded", image_size=48),  # composed EfficientNet: rounded long side
        load_backbone("composed", image_tower=root / "pre-clip", text_tower=_minilm_path(), embed_dim=8),
    ]
    for backbone in backbones:
        want = backbone.preprocess(images).numpy()
        got = _replayed(describe_preprocess(backbone), images)
        if isinstance(getattr(backbone, "image_tower", None), _EfficientNetLite0):
            # cliptune resizes on torch's antialiased bicubic, the torch-free client on Pillow's: the same
            # filter, rounded differently (models/resize.py): at most 2 steps of 0-255, on few values
            steps = np.abs(got - want) * np.array(IMAGENET_STD).reshape(1, 3, 1, 1) * 255
            assert steps.max() <= 2 + 1e-3 and (steps > 0.5).mean() < 0.05, (
                steps.max(),
                (steps > 0.5).mean(),
            )
        else:
            np.testing.assert_allclose(got, want, atol=1e-5)


def test_preprocessing_that_cannot_be_described_is_refused(root: Path) -> None:
    from cliptune.export.errors import ExportError
    from cliptune.export.inputs import _open_clip, describe_preprocess
    from cliptune.models.factory import load_backbone

    with pytest.raises(ExportError, match="resize_mode 'shortest' at 32x48"):
        _open_clip({"size": [32, 48], "mean": [0.5] * 3, "std": [0.5] * 3, "resize_mode": "shortest"})
    backbone = load_backbone(make_tiny_clip(root / "pad-clip"))
    backbone.image_processor.do_pad = True
    with pytest.raises(ExportError, match="do_pad=True"):
        describe_preprocess(backbone)


@pytest.mark.slow  # the module's exports (one per backbone kind) take about a minute
def test_overwrite_replaces_the_whole_folder(
    exported: dict[str, Any], catalogue: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, good, _ = exported["clip"]

    def copy_graph(module: Any, args: Any, outputs: Any, path: Path, big: bool) -> str:
        shutil.copy(good / path.name, path)  # the right graphs, without exporting them again
        return "dynamo"

    monkeypatch.setattr(export_onnx_module, "_export", copy_graph)
    out = root / "x-overwrite"
    shutil.copytree(good, out)
    (out / "stale.txt").write_text("from an older export")
    manifest = export_onnx(model, out, _paths(catalogue)[:2], CAPTIONS[:2], overwrite=True)
    assert not (out / "stale.txt").exists()  # replaced, not merged
    assert json.loads((out / "export.json").read_text()) == manifest
    assert manifest["parity"]["graphs"]["image"]["n"] == 2 and manifest["parity"]["graphs"]["text"]["n"] == 2


def test_a_fast_decode_model_exports_a_client_that_decodes_as_cliptune(root: Path) -> None:
    import importlib.util

    from cliptune.data.images import load_image

    rng = np.random.default_rng(3)
    paths = []
    for i, (w, h) in enumerate([(512, 384), (240, 320)]):  # JPEGs drafted to 1/4 and 1/2 for min 64
        coarse = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR), np.int16)
        detail = rng.integers(-32, 32, (h, w, 3))
        paths.append(root / f"big-{i}.jpg")
        Image.fromarray(np.clip(smooth + detail, 0, 255).astype(np.uint8)).save(paths[-1], quality=92)
    model = load_model(make_tiny_clip(root / "fast-clip"))
    model.backbone.fast_decode = True  # as a model trained with data.fast_decode is loaded
    folder = root / "x-fast"
    manifest = export_onnx(model, folder, paths, CAPTIONS[:2])
    assert manifest["fast_decode"] is True
    assert json.loads((folder / "export.json").read_text())["fast_decode"] is True
    # the tiny CLIP's input side is 32: JPEGs keep a shorter side of at least 2 x 32
    assert json.loads((folder / "preprocess.json").read_text())["jpeg_min_side"] == 64
    spec = importlib.util.spec_from_file_location("fast_client", folder / "cliptune_onnx.py")
    assert spec is not None and spec.loader is not None
    shipped = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shipped)  # the shipped copy, not cliptune's module
    # 384 // 8 = 48 < 64 <= 384 // 4 = 96: 1/4; 240 // 4 = 60 < 64 <= 240 // 2 = 120: 1/2
    for path, size in zip(paths, [(128, 96), (120, 160)], strict=True):
        decoded = shipped.load_rgb(path, 64)
        assert decoded.size == size
        assert np.array_equal(np.asarray(decoded), np.asarray(load_image(path, min_side=64)))
    client_feats = shipped.Embedder(folder).embed_images(paths)
    fast = embed_images_with(model, paths, use_cache=False, precision="fp32", progress=False).numpy()
    model.backbone.fast_decode = False
    full = embed_images_with(model, paths, use_cache=False, precision="fp32", progress=False).numpy()
    assert _cos_rows(client_feats, fast).min() >= 0.9999
    assert np.abs(client_feats - full).max() > 10 * np.abs(client_feats - fast).max()  # not the full decode
