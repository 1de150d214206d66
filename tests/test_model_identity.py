"""Model identity vs features identity: three runs that differ only in their trained heads get three model
identities (and one features identity), so `search --model` with another run and `index` over another
run's index are refused naming both; the identity covers head and tower tensors, buffers included, and
survives a save and reload bit for bit."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from cliptune.cli import index as index_cli
from cliptune.cli import search as search_cli
from cliptune.config import Config
from cliptune.data.catalogue import read_catalogue
from cliptune.data.synthetic import render_fashion
from cliptune.models.backbone import CONFIG_FILE, Backbone, BackboneError
from cliptune.models.factory import BACKBONE_DIR, HEAD_DIR, load_backbone, load_model
from cliptune.models.freeze import LoraSpec
from cliptune.models.siamese import SiameseHead
from cliptune.search import SearchIndexError, build_index, load_index, search
from cliptune.search.index import ModelMismatchError
from cliptune.train.run import train
from tests.tiny_models import make_tiny_clip

# three runs on one tiny CLIP, heads only (trainable_layers 0): (train.seed, train.lr)
RUNS = {"r0": (0, 1e-3), "r1": (1, 1e-3), "r2": (0, 5e-3)}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("identity")


@pytest.fixture(scope="module")
def fashion(root: Path) -> Path:
    return render_fashion(root / "fashion", n=24, seed=0)


@pytest.fixture(scope="module")
def clip(root: Path) -> Path:
    return make_tiny_clip(root / "clip", seed=0)


@pytest.fixture(scope="module")
def runs(root: Path, fashion: Path, clip: Path) -> dict[str, Path]:
    """One epoch each; they differ only in the seed or learning rate of their trained projections."""
    out = {}
    for name, (seed, lr) in RUNS.items():
        cfg = Config.model_validate(
            {
                "name": name,
                "data": {"catalogue": str(fashion), "split": {"ratios": {"train": 0.75, "val": 0.25}}},
                "model": {"backbone": str(clip), "trainable_layers": 0, "cache_dir": str(root / "cache")},
                "train": {"epochs": 1, "batch_size": 8, "lr": lr, "seed": seed, "early_stopping": None},
            }
        )
        out[name] = train(cfg, runs_root=root / "runs", quiet=True)
    return out


def _app() -> typer.Typer:
    app = typer.Typer()
    index_cli.register(app)
    search_cli.register(app)
    return app


def _heads(backbone: Backbone) -> dict[str, torch.Tensor]:
    prefixes = backbone._prefixes(backbone.heads())
    return {k: v for k, v in backbone.state_dict().items() if k.startswith(prefixes)}


def test_runs_differing_only_in_heads_get_different_model_identities(runs: dict[str, Path]) -> None:
    models = {name: load_model(run) for name, run in runs.items()}
    # independent check of the premise: every tensor outside the heads is equal, the heads are not
    ref = models["r0"].backbone
    for name, m in models.items():
        own = m.backbone.state_dict()
        assert all(torch.equal(v, own[k]) for k, v in ref.state_dict().items() if k not in _heads(ref))
        if name != "r0":
            assert any(not torch.equal(v, own[k]) for k, v in _heads(ref).items())
    names = {m.name for m in models.values()}
    features = {m.backbone.features_identity() for m in models.values()}
    assert len(names) == 3  # three embedding spaces, three identities
    assert len(features) == 1  # one frozen tower: the feature cache is shared
    assert names.isdisjoint(features)  # two concepts, never confused


def test_reloaded_model_keeps_its_identity_bitwise(runs: dict[str, Path], tmp_path: Path) -> None:
    first, again = load_model(runs["r1"]), load_model(runs["r1"])
    saved = json.loads((runs["r1"] / "model" / CONFIG_FILE).read_text())  # hashed at save time
    assert first.name == again.name == saved["model_identity"]
    assert first.backbone.features_identity() == saved["features_identity"]
    first.backbone.save(tmp_path / "copy")  # a second save/load round trip keeps it too
    assert load_model(tmp_path / "copy").name == first.name


def test_search_with_another_runs_model_is_refused_naming_both(
    root: Path, fashion: Path, runs: dict[str, Path]
) -> None:
    r0, r1 = load_model(runs["r0"]), load_model(runs["r1"])
    out = build_index(
        r0, read_catalogue(fashion), root / "idx-search", cache_dir=root / "cache", progress=False
    )
    with pytest.raises(
        ModelMismatchError, match=rf"built with model {r0.name} .*the query model is {r1.name}"
    ) as exc:
        search(load_index(out), r1, text="ripped blue jeans", cache_dir=root / "cache")
    assert isinstance(exc.value, SearchIndexError)
    assert (exc.value.index_model, exc.value.query_model) == (r0.name, r1.name)
    assert exc.value.query_source == str(runs["r1"] / "model")
    args = ["search", str(out), "ripped blue jeans", "--cache-dir", str(root / "cache")]
    result = CliRunner().invoke(_app(), [*args, "--model", str(runs["r1"])])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and result.exception is not None and isinstance(result.exception, SystemExit)
    assert f"built with model {r0.name}" in text and f"the query model is {r1.name}" in text
    assert "Traceback" not in result.output and "score" not in text  # no scores printed
    # the index's own model still answers
    assert CliRunner().invoke(_app(), [*args, "--model", str(runs["r0"])]).exit_code == 0


def test_index_over_another_models_index_is_refused_unless_overwrite(
    root: Path, fashion: Path, runs: dict[str, Path]
) -> None:
    out, cache = root / "idx-build", str(root / "cache")
    tail = ["--data", str(fashion), "--cache-dir", cache, "-q"]
    runner, app = CliRunner(), _app()
    assert runner.invoke(app, ["index", str(runs["r0"]), str(out), *tail]).exit_code == 0
    before = (out / "index.faiss").read_bytes()
    refused = runner.invoke(app, ["index", str(runs["r2"]), str(out), *tail])
    text = " ".join(refused.output.split())
    r0, r2 = load_model(runs["r0"]).name, load_model(runs["r2"]).name
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert f"built with model {r0}" in text and f"this is {r2}" in text and "--overwrite" in text
    assert (out / "index.faiss").read_bytes() == before and load_index(out).model == r0
    # the same model rebuilds without asking; another one only with --overwrite
    assert runner.invoke(app, ["index", str(runs["r0"]), str(out), *tail]).exit_code == 0
    assert runner.invoke(app, ["index", str(runs["r2"]), str(out), *tail, "--overwrite"]).exit_code == 0
    assert load_index(out).model == r2 and (out / "index.faiss").read_bytes() != before


def test_every_head_and_tower_tensor_counts_buffers_included(clip: Path) -> None:
    backbone = load_backbone(clip)
    model0, features0 = backbone.model_identity(), backbone.features_identity()
    head = backbone.heads()[0]
    with torch.no_grad():  # one ulp in one head weight: another space, same features
        weight = head.weight  # type: ignore[union-attr]  # CLIP's projections are Linear layers
        weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(float("inf")))
    model1 = backbone.model_identity()
    assert model1 != model0 and backbone.features_identity() == features0
    head.register_buffer("scale", torch.ones(3))  # a head buffer (e.g. a norm's running statistics)
    model2 = backbone.model_identity()
    head.scale.add_(1.0)  # type: ignore[operator]  # the buffer registered just above
    assert backbone.model_identity() not in (model0, model1, model2)
    assert backbone.features_identity() == features0
    buffers = dict(backbone.named_buffers())  # a tower buffer: both identities change
    buffers["model.text_model.embeddings.position_ids"][0, -1] = 0
    assert backbone.features_identity() != features0 and backbone.model_identity() != model2


def test_lora_adapters_change_both_identities(clip: Path) -> None:
    backbone = load_backbone(clip, lora=LoraSpec(r=2))
    model0, features0 = backbone.model_identity(), backbone.features_identity()
    adapter = next(p for n, p in backbone.named_parameters() if "lora" in n.lower())
    with torch.no_grad():
        adapter.add_(0.5)
    assert backbone.features_identity() != features0 and backbone.model_identity() != model0


def test_siamese_heads_on_one_backbone_get_different_identities(clip: Path, tmp_path: Path) -> None:
    backbone = load_backbone(clip)
    names = []
    for seed in (0, 1):
        folder = tmp_path / f"siamese{seed}"
        backbone.save(folder / BACKBONE_DIR)
        torch.manual_seed(seed)
        SiameseHead(image_dim=24, text_dim=24, width=16, depth=1, heads=2).save(folder / HEAD_DIR)
        names.append(load_model(folder).name)
    assert names[0] != names[1]
    assert all(n.startswith(f"{backbone.model_identity()}+head:") for n in names)


def test_batchnorm_statistics_of_an_unfrozen_block_change_both_identities(tmp_path: Path) -> None:
    """The embedded image tower with its last block unfrozen: one train-mode forward moves only buffers."""
    backbone = load_backbone("embedded", trainable_layers=1)
    model0, features0 = backbone.model_identity(), backbone.features_identity()
    params = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    backbone.train()
    with torch.no_grad():
        backbone.image_features(torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    backbone.eval()
    assert all(torch.equal(p, params[n]) for n, p in backbone.named_parameters())  # only buffers moved
    assert backbone.features_identity() != features0 and backbone.model_identity() != model0
    backbone.save(tmp_path / "saved")  # and the moved statistics survive a save and reload, bit for bit
    saved = json.loads((tmp_path / "saved" / CONFIG_FILE).read_text())
    assert load_model(tmp_path / "saved").name == saved["model_identity"] == backbone.model_identity()


def test_preprocessing_counts_in_the_identity(clip: Path) -> None:
    # same weights, other image normalisation: other features, so another cache key and another space
    backbone = load_backbone(clip)
    model0, features0 = backbone.model_identity(), backbone.features_identity()
    backbone.image_processor.image_mean = [0.1, 0.2, 0.3]  # type: ignore[attr-defined]  # the HF backbone's
    assert backbone.features_identity() != features0 and backbone.model_identity() != model0


def test_a_lora_backbone_saved_and_reloaded_keeps_its_adapters_and_identity(
    clip: Path, tmp_path: Path
) -> None:
    backbone = load_backbone(clip, lora=LoraSpec(r=2))
    with torch.no_grad():
        next(p for n, p in backbone.named_parameters() if "lora" in n.lower()).add_(0.5)
    backbone.save(tmp_path / "lora")
    text = (tmp_path / "lora" / CONFIG_FILE).read_text()
    saved = json.loads(text)
    assert backbone.lora is not None and saved["lora"] == backbone.lora.to_dict()
    assert saved["trainable_layers"] == backbone.trainable_layers == 0
    assert text == json.dumps(saved, indent=2, sort_keys=True) + "\n"  # sorted and indented: diffable
    loaded = load_model(tmp_path / "lora")
    assert loaded.backbone.lora == backbone.lora
    assert loaded.name == saved["model_identity"] == backbone.model_identity()


def test_loaded_siamese_model_keeps_its_head_and_names_both_hashes(clip: Path, tmp_path: Path) -> None:
    backbone = load_backbone(clip)
    backbone.save(tmp_path / "s" / BACKBONE_DIR)
    torch.manual_seed(0)
    SiameseHead(image_dim=24, text_dim=24, width=16, depth=1, heads=2).save(tmp_path / "s" / HEAD_DIR)
    loaded = load_model(tmp_path / "s")
    assert isinstance(loaded.head, SiameseHead) and not loaded.head.training
    assert re.fullmatch(r"[0-9a-f]{16}\+head:[0-9a-f]{16}", loaded.name)


def test_nothing_loadable_is_named_with_what_was_tried(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(BackboneError) as info:
        load_model(missing)
    assert str(info.value).startswith(
        f"{missing}: not a run directory, model folder or backbone spec (backbone '{missing}': "
    )


def test_identities_are_16_hex_digits_of_what_changes_embeddings_only(
    clip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backbone = load_backbone(clip)
    model0, features0 = backbone.model_identity(), backbone.features_identity()
    assert re.fullmatch(r"[0-9a-f]{16}", features0) and re.fullmatch(r"[0-9a-f]{16}", model0)
    with torch.no_grad():  # CLIP's logit scale: no encode_* uses it, so neither identity sees it
        backbone.model.logit_scale.add_(1.0)  # type: ignore[attr-defined]  # the HF backbone's model
    assert (backbone.model_identity(), backbone.features_identity()) == (model0, features0)
    # the settings hash does not depend on key order (a library upgrade may reorder a config dict), and
    # values JSON cannot hold (paths, dtypes) are hashed by their text
    fingerprint = backbone._fingerprint()
    monkeypatch.setattr(backbone, "_fingerprint", lambda: dict(reversed(fingerprint.items())))
    assert backbone.features_identity() == features0
    monkeypatch.setattr(backbone, "_fingerprint", lambda: {**fingerprint, "dtype": torch.float32})
    assert backbone.features_identity() != features0


def test_a_spec_that_is_no_folder_loads_by_name() -> None:
    loaded = load_model("embedded")
    assert loaded.source == Path("embedded") and loaded.name == load_backbone("embedded").model_identity()
