"""`cliptune eval`: metrics equal a dense recomputation, intervals, relevance, per-query files, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import typer
from typer.testing import CliRunner

from cliptune.cli.eval import register
from cliptune.config import load_config
from cliptune.data.catalogue import CatalogueError
from cliptune.data.synthetic import render_art, render_fashion
from cliptune.evaluation.catalogue import prepare_catalogue
from cliptune.evaluation.errors import EvalError, RejectedRowsError
from cliptune.evaluation.loss import LossSettings, info_nce_per_pair, loss_settings
from cliptune.evaluation.retrieval import evaluate_embeddings
from cliptune.evaluation.run import evaluate_run, write_eval
from cliptune.evaluation.triplets import triplet_values
from cliptune.losses import info_nce
from cliptune.losses.siamese import siamese_objective
from cliptune.models.embed import embed_images_with, embed_texts_with
from cliptune.models.factory import load_model
from cliptune.ranking.metrics import retrieval_metrics
from cliptune.train.run import train
from tests.tiny_models import make_tiny_clip

runner = CliRunner()


def _app() -> typer.Typer:
    app = typer.Typer()
    app.callback()(lambda: None)  # keep `eval` a subcommand, as in the real app
    register(app)
    return app


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    fashion = render_fashion(root / "fashion", n=60, seed=0)
    art = render_art(root / "art", n=16, seed=0)
    clip = make_tiny_clip(root / "clip")
    common = [f"model.backbone={clip}", f"model.cache_dir={root / 'cache'}", "train.early_stopping=null"]
    retrieval = load_config(None, [
        "name=r", f"data.catalogue={fashion}", "data.split.ratios={train: 0.6, val: 0.2, test: 0.2}",
        "train.epochs=2", "train.batch_size=8", "train.lr=2e-3", *common,
    ])  # fmt: skip
    siamese = load_config(None, [
        "name=s", f"data.catalogue={art}", "data.split.ratios={train: 0.5, val: 0.25, test: 0.25}",
        "model.head={width: 32, depth: 1, heads: 2}", "loss.name=info_nce", "train.task=siamese",
        "train.epochs=2", "train.batch_size=8", *common,
    ])  # fmt: skip
    runs = root / "runs"
    return {
        "root": root, "fashion": fashion, "clip": clip, "cache": root / "cache",
        "run": train(retrieval, runs_root=runs, quiet=True), "siamese": train(siamese, runs_root=runs, quiet=True),
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------
# hand-made embeddings


def _hand_made(relevant: str, bootstrap: int = 200) -> dict:
    # images a=(1,0), b=(0,1) in group g; c=(0.6,0.8) in group h. Captions: row 1 of a, row 2 of b, row 3 of c.
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    texts = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    return evaluate_embeddings(
        texts, images, row_ids=["1", "2", "3"], texts=["t1", "t2", "t3"], files=["a", "b", "c"],
        groups=["g", "g", "h"], images=["a", "b", "c"], ks=[1, 2], relevant=relevant, bootstrap=bootstrap,
    )  # fmt: skip


def test_hand_made_golden_values_group_vs_item() -> None:
    group, item = _hand_made("group"), _hand_made("item")
    t2i = group["per_query"]["t2i"]
    # row 1 (0,1) scores a 0, b 1, c 0.8 -> b, c, a; row 2 (1,0) -> a, c, b; row 3 (0.6,0.8) -> c (1.0), b, a
    assert t2i["top"] == [["b", "c", "a"], ["a", "c", "b"], ["c", "b", "a"]]
    assert t2i["relevant"] == [["a", "b"], ["a", "b"], ["c"]]
    assert item["per_query"]["t2i"]["relevant"] == [["a"], ["b"], ["c"]]
    # group: rows 1 and 2 find a group-g image at rank 1 (MRR 1, recall@1 = 1/2), row 3 finds c at 1
    assert t2i["values"]["mrr"] == [1.0, 1.0, 1.0]
    assert t2i["values"]["recall@1"] == [0.5, 0.5, 1.0]
    assert t2i["values"]["recall@2"] == [0.5, 0.5, 1.0]  # row 1: top 2 = b, c -> 1 of {a, b}
    # item: rows 1, 2 find their own image last (rank 3): MRR (1/3 + 1/3 + 1) / 3 = 5/9
    assert item["metrics"]["t2i/mrr"]["mean"] == pytest.approx(5 / 9)
    # i2t: a (1,0) scores rows 0, 1, 0.6 -> 2, 3, 1; group relevant {1, 2} -> MRR 1; item {1} -> rank 3
    assert group["per_query"]["i2t"]["top"][0] == ["2", "3", "1"]
    assert group["per_query"]["i2t"]["relevant"] == [["1", "2"], ["1", "2"], ["3"]]
    assert item["per_query"]["i2t"]["values"]["mrr"] == pytest.approx([1 / 3, 1 / 3, 1.0])
    assert group["metrics"]["i2t/precision@2"]["mean"] == pytest.approx((0.5 + 0.5 + 0.5) / 3)
    for result in (group, item):
        for key, m in result["metrics"].items():
            assert m["n"] == 3, key
            assert m["low"] <= m["mean"] <= m["high"], key
    assert _hand_made("item", bootstrap=0)["metrics"]["t2i/mrr"] == {
        "mean": pytest.approx(5 / 9), "low": None, "high": None, "n": 3, "confidence": 0.95
    }  # fmt: skip


def _dense_oracle(text: torch.Tensor, image: torch.Tensor, files, groups, images, ks, relevant):
    """Per-query metrics from the full score matrices and relevance built with plain loops."""
    key_row = list(groups) if relevant == "group" else list(files)
    key_img = [key_row[list(files).index(f)] for f in images]
    rel = torch.tensor([[key_row[i] == key_img[j] for j in range(len(images))] for i in range(len(files))])
    t2i = retrieval_metrics(text @ image.T, rel, ks=ks, prefix="")
    i2t = retrieval_metrics(image @ text.T, rel.T.contiguous(), ks=ks, prefix="")
    return t2i, i2t


def test_duplicate_captions_rank_like_the_dense_oracle() -> None:
    # Identical captions make identical embeddings: their ranks must differ (tie rule: lower index first).
    torch.manual_seed(0)
    image = F.normalize(torch.randn(12, 16), dim=-1)
    text = F.normalize(torch.randn(30, 16), dim=-1)
    text[10:20] = text[0]  # ten duplicates of caption 0
    files = [f"i{i % 12}" for i in range(30)]
    groups = [f"g{i % 12 // 3}" for i in range(30)]
    images = [f"i{j}" for j in range(12)]
    for relevant in ("group", "item"):
        out = evaluate_embeddings(
            text, image, row_ids=[str(i) for i in range(30)], texts=["x"] * 30, files=files, groups=groups,
            images=images, ks=[1, 5], relevant=relevant, bootstrap=0,
        )  # fmt: skip
        t2i, i2t = _dense_oracle(text, image, files, groups, images, [1, 5], relevant)
        for name, oracle in (("t2i", t2i), ("i2t", i2t)):
            for key, values in oracle.items():
                assert out["per_query"][name]["values"][key] == values.tolist(), (relevant, name, key)


def test_info_nce_per_pair_and_triplet_values_match_the_losses() -> None:
    torch.manual_seed(1)
    image, text = torch.randn(10, 8), torch.randn(10, 8)
    per_pair = info_nce_per_pair(image, text, temperature=0.1, batch_size=4)  # batches 4, 4, 2
    for start in (0, 4, 8):
        batch = info_nce(image[start : start + 4], text[start : start + 4], 0.1)
        assert per_pair[start : start + 4].mean().item() == pytest.approx(batch.item(), rel=1e-6)
    a, p, n = ({k: torch.randn(6, 8) for k in ("image", "text", "fused")} for _ in range(3))

    values = triplet_values(a, p, n, LossSettings(margin=0.3, weights={"image": 2.0, "cross": 0.5}))
    objective = siamese_objective(a, p, n, {"image": 2.0, "cross": 0.5}, margin=0.3)
    assert values["loss"].mean().item() == pytest.approx(objective["loss"].item(), rel=1e-6)
    for t in range(6):  # plain loop: cos(a_image, p_text) > cos(a_image, n_text)
        pos = F.cosine_similarity(a["image"][t], p["text"][t], dim=0)
        neg = F.cosine_similarity(a["image"][t], n["text"][t], dim=0)
        assert values["accuracy/i2t"][t].item() == float(pos > neg)


def test_eval_loss_values_are_the_training_losses_per_item() -> None:
    # eval calls the losses with reduction="none": the very terms training averages, bit for bit
    gen = torch.Generator().manual_seed(7)
    image, text = torch.randn(10, 8, generator=gen), torch.randn(10, 8, generator=gen)
    per_pair = info_nce_per_pair(image, text, temperature=0.07, batch_size=4)
    for start in (0, 4, 8):
        batch = info_nce(image[start : start + 4], text[start : start + 4], 0.07, reduction="none")
        assert torch.equal(per_pair[start : start + 4], batch)
    a, p, n = ({k: torch.randn(5, 8, generator=gen) for k in ("image", "text", "fused")} for _ in range(3))
    values = triplet_values(a, p, n, LossSettings(margin=0.3, distance="euclidean", weights={"text": 0.5}))
    objective = siamese_objective(a, p, n, {"text": 0.5}, 0.3, "euclidean", reduction="none")
    assert torch.equal(values["loss"], objective["loss"])


# ----------------------------------------------------------------------------------------------
# a tiny trained run


def test_run_eval_equals_dense_recomputation(world: dict[str, Path]) -> None:
    run = world["run"]
    result = evaluate_run(run, ["test"], progress=False)["test"]
    cfg = load_config(run / "config.yaml")
    from cliptune.data.prepare import prepare_data
    from cliptune.data.splits import group_ids

    rows = prepare_data(cfg.data, run).split_rows("test")
    files, texts = rows["file_name"].tolist(), rows["text"].tolist()
    images = list(dict.fromkeys(files))
    model = load_model(run)
    kw = {"cache_dir": world["cache"], "progress": False}
    image = embed_images_with(model, [world["fashion"] / f for f in images], **kw)
    text = embed_texts_with(model, texts, **kw)
    groups = group_ids(rows).tolist()
    t2i, i2t = _dense_oracle(text, image, files, groups, images, [1, 5, 10], "group")
    assert result["n_rows"] == len(rows) and result["n_images"] == len(images)
    assert result["per_query"]["t2i"]["query_ids"] == [str(r) for r in rows["row"]]
    assert result["per_query"]["i2t"]["query_ids"] == images
    for name, oracle, n in (("t2i", t2i, len(rows)), ("i2t", i2t, len(images))):
        for key, values in oracle.items():
            assert result["per_query"][name]["values"][key] == values.tolist(), (name, key)
            m = result["metrics"][f"{name}/{key}"]
            assert m["mean"] == pytest.approx(values.double().mean().item(), abs=1e-12)
            assert m["n"] == n and m["low"] <= m["mean"] <= m["high"]
        n_items = len(images) if name == "t2i" else len(rows)
        assert [len(top) for top in result["per_query"][name]["top"]] == [min(10, n_items)] * n
    # loss: InfoNCE at the temperature training started from (no loss.temperature in the config, so the
    # tiny CLIP's pretrained logit_scale: t = exp(-logit_scale)) over batches of 8 pairs in row order
    t = math.exp(-model.backbone.similarity_init["logit_scale"])
    paired = image[[images.index(f) for f in files]]
    batches = [(info_nce(paired[s : s + 8], text[s : s + 8], t).item(), len(text[s : s + 8]))
               for s in range(0, len(text), 8)]  # fmt: skip
    expected = sum(v * b for v, b in batches) / len(text)
    assert result["metrics"]["loss"]["mean"] == pytest.approx(expected, rel=1e-5)
    assert result["loss"] == {
        "name": "info_nce",
        "temperature": t,
        "temperature_source": "pretrained",
        "batch_size": 8,
    }
    # the same model on the same split again: same ids, same values (query ids are stable)
    again = evaluate_run(run, ["test"], progress=False)["test"]
    assert again["per_query"] == result["per_query"] and again["metrics"] == result["metrics"]
    path = write_eval(result, run)
    assert path == run / "eval" / "test.json"
    assert json.loads(path.read_text())["metrics"] == result["metrics"]


def test_val_eval_agrees_with_training_log(world: dict[str, Path]) -> None:
    run = world["run"]
    result = evaluate_run(run, ["val"], progress=False, bootstrap=10)["val"]
    best = json.loads((run / "summary.json").read_text())["best"]
    for key in ("t2i/recall@5", "t2i/mrr", "i2t/precision@5", "i2t/mrr"):
        assert result["metrics"][key]["mean"] == pytest.approx(best[f"val/{key}"], abs=1e-6), key
    item = evaluate_run(run, ["val"], progress=False, bootstrap=10, relevant="item")["val"]
    for g, i in zip(
        result["per_query"]["t2i"]["relevant"], item["per_query"]["t2i"]["relevant"], strict=True
    ):
        assert set(i) <= set(g) and len(i) == 1  # an image per caption row; its group may hold more


def test_siamese_run_triplet_metrics(world: dict[str, Path]) -> None:
    run = world["siamese"]
    result = evaluate_run(run, ["val"], progress=False)["val"]
    summary = json.loads((run / "summary.json").read_text())
    n_triplets = summary["info"]["triplets"]["val"]
    triplet = result["per_query"]["triplet"]
    assert len(triplet["query_ids"]) == n_triplets and all(q.count("|") == 2 for q in triplet["query_ids"])
    for key in (
        "accuracy",
        "accuracy/image",
        "accuracy/text",
        "accuracy/cross",
        "accuracy/i2t",
        "accuracy/t2i",
    ):
        m = result["metrics"][f"triplet/{key}"]
        assert m["n"] == n_triplets and m["low"] <= m["mean"] <= m["high"]
        assert m["mean"] == pytest.approx(summary["best"][f"val/triplet/{key}"], abs=1e-6), key
    assert result["loss"]["name"] == "siamese"
    assert result["loss"]["siamese_loss"] == "info_nce" and result["loss"]["temperature"] == 0.07
    assert result["metrics"]["loss"]["mean"] == pytest.approx(summary["best"]["val/loss"], rel=1e-5)
    assert "t2i/recall@5" in result["metrics"] and "i2t/mrr" in result["metrics"]


# ----------------------------------------------------------------------------------------------
# CLI


def test_cli_run_table_file_and_json(world: dict[str, Path]) -> None:
    run = world["run"]
    result = runner.invoke(_app(), ["eval", str(run), "--split", "val", "--bootstrap", "50", "-q"])
    assert result.exit_code == 0, result.output
    for text in ("t2i", "i2t", "recall@5", "mrr", "precision@5", "loss", "val"):
        assert text in result.output
    assert "[" in result.output and "]" in result.output  # "0.42 [0.25, 0.58]" cells
    assert json.loads((run / "eval" / "val.json").read_text())["split"] == "val"
    result = runner.invoke(
        _app(), ["eval", str(run), "--all-splits", "--json", "--k", "1,5", "--bootstrap", "20", "-q"]
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert list(printed) == ["train", "val", "test"]
    assert "t2i/recall@5" in printed["test"] and "t2i/recall@10" not in printed["test"]
    assert (run / "eval" / "train.json").is_file()


def test_cli_bare_model(world: dict[str, Path], tmp_path: Path) -> None:
    app = _app()
    no_data = runner.invoke(app, ["eval", str(world["clip"])])
    assert no_data.exit_code == 2 and "--data" in no_data.output
    args = ["eval", str(world["clip"]), "--data", str(world["fashion"]), "--cache-dir", str(world["cache"])]
    ok = runner.invoke(app, [*args, "--out", str(tmp_path / "out"), "--bootstrap", "20", "-q"])
    assert ok.exit_code == 0, ok.output
    saved = json.loads((tmp_path / "out" / "all.json").read_text())  # no split column: the split "all"
    assert saved["n_rows"] == 60 and saved["loss"]["name"] is None and "loss" not in saved["metrics"]
    assert "no loss" in ok.output
    missing = runner.invoke(app, [*args, "--split", "test", "--out", str(tmp_path / "out"), "-q"])
    assert missing.exit_code == 1 and "no split 'test'" in missing.output
    bad_k = runner.invoke(app, [*args, "--k", "0,5"])
    assert bad_k.exit_code == 2


def test_cli_eval_of_a_model_with_nan_weights_names_split_model_and_cause(
    world: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    from cliptune.cli.app import app

    broken = tmp_path / "nan-clip"
    shutil.copytree(world["clip"], broken)
    weights = load_file(broken / "model.safetensors")
    weights["visual_projection.weight"][0, 0] = float("nan")  # one NaN weight: every image embedding NaN
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    args = ["eval", str(broken), "--data", str(world["fashion"]), "--cache-dir", str(tmp_path / "cache")]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "out"), "--bootstrap", "0", "-q"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "query row" not in result.output
    error, *notes = result.output.strip().splitlines()  # the error, then the usual truncation note
    first = sorted(p.name for p in (world["fashion"] / "images").iterdir())[0]
    assert error.startswith(
        f"cannot evaluate split 'all' with model {load_model(broken).name} ({broken}): 60 of its 60 image "
        f"embeddings contain NaN or infinite values (the first for 'images/{first}'), most likely because the "
        "model's weights do (a training run that diverged, or a damaged weights file) or the tower overflows "
        "at precision 'auto'"
    )
    # then the CLI's hint (cli/errors.HINTS): where to look and what to change, fp32 advice below fp32
    assert "metrics.jsonl" in error and "train.lr" in error and "model.embed_precision" in error
    assert all(n.startswith("note: ") for n in notes) and len(notes) <= 1
    assert not list((tmp_path / "out").glob("*.json"))  # nothing written for a failed evaluation


def test_prepare_catalogue_split_column(world: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    cat = tmp_path / "cat"
    shutil.copytree(world["fashion"], cat)
    meta = pd.read_csv(cat / "metadata.csv", dtype=str, keep_default_na=False)
    meta["split"] = ["test" if g.endswith(("0", "1")) else "train" for g in meta["group"]]
    meta.to_csv(cat / "metadata.csv", index=False)
    data = prepare_catalogue(cat)
    assert sorted(data.splits) == ["test", "train"]
    assert len(data.split_rows("test")) == int((meta["split"] == "test").sum())
    meta.loc[3, "split"] = ""
    meta.to_csv(cat / "metadata.csv", index=False)
    with pytest.raises(ValueError, match=r"column 'split' is empty in 1 row\(s\) \(rows 4\)"):
        prepare_catalogue(cat)


def test_prepare_catalogue_rejected_rows_are_a_typed_error(world: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    cat = tmp_path / "cat"
    shutil.copytree(world["fashion"], cat)
    meta = pd.read_csv(cat / "metadata.csv", dtype=str, keep_default_na=False)
    (cat / meta.loc[2, "file_name"]).unlink()  # a row whose image is gone
    with pytest.raises(RejectedRowsError) as caught:
        prepare_catalogue(cat)
    err = caught.value
    assert isinstance(err, CatalogueError) and isinstance(err, EvalError)  # old handlers still catch it
    assert [row for row, _, _ in err.rejected] == [3] and err.rejected[0][1] == meta.loc[2, "file_name"]
    assert err.path == cat / "metadata.csv" and "1 bad row(s)" in str(err) and "--" not in str(err)


def test_loss_settings_use_the_learned_temperature(tmp_path: Path) -> None:

    cfg = load_config(None, ["loss.learn_temperature=true", "loss.temperature=0.07", "train.batch_size=16"])
    torch.save({"logit_scale": torch.tensor(3.0)}, tmp_path / "loss_state.pt")
    learned = loss_settings(cfg, tmp_path)
    assert learned.temperature == pytest.approx(torch.exp(torch.tensor(-3.0)).item())  # 1 / e^3
    assert (learned.source, learned.batch_size) == ("learned", 16)
    torch.save({"logit_scale": torch.tensor(5.0)}, tmp_path / "loss_state.pt")  # e^5 > 100: clamped
    assert loss_settings(cfg, tmp_path).temperature == pytest.approx(0.01)
    fixed = loss_settings(load_config(None, ["loss.temperature=0.05"]), tmp_path)
    assert (fixed.temperature, fixed.source) == (0.05, "config")


def test_a_headless_baseline_on_a_siamese_run_has_no_loss(world: dict[str, Path]) -> None:
    from cliptune.evaluation.run import evaluate_model_on_run

    run = world["siamese"]
    own = evaluate_run(run, ["test"], bootstrap=0, progress=False)["test"]
    base = evaluate_model_on_run(world["clip"], run, ["test"], bootstrap=0, progress=False)["test"]
    assert base["per_query"]["t2i"]["query_ids"] == own["per_query"]["t2i"]["query_ids"]
    # the run's loss is per triplet through its head: a headless model's InfoNCE would not compare
    assert "loss" not in base["metrics"] and "needs a head" in base["loss"]["reason"]
