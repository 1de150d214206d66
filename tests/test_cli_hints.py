"""Hints the CLI adds to library errors that need more than the message's facts to act on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cliptune.cli.app import app
from cliptune.cli.errors import HINTS, hint_for, with_hint
from cliptune.config import AugmentConfig, augment_protect_problems
from cliptune.data.augment import AugmentError, suite_attributes
from cliptune.data.catalogue import Catalogue, read_catalogue
from cliptune.evaluation.errors import NonFiniteEmbeddingsError
from cliptune.report.wise import NoGeneralCatalogueError, WiseError, recommend_alpha, run_wise
from cliptune.search.ann import IndexParameterError, check_params, resolve_params
from cliptune.suites.generate import SuiteGenerateError, counted_items, generate_suite
from cliptune.suites.phrases import PhraseError, load_phrases
from cliptune.train.mining import MiningError, MiningWindow, read_mined


def _nan(precision: str) -> NonFiniteEmbeddingsError:
    return NonFiniteEmbeddingsError("test", "abc123", "runs/x/model", "image", 3, 10, "a.jpg", precision)


def test_non_finite_embeddings_hint_says_how_to_find_and_avoid_the_divergence() -> None:
    message = with_hint(_nan("fp32"))
    facts, _, hint = message.partition("at precision 'fp32': ")
    assert facts.startswith(
        "cannot evaluate split 'test' with model abc123 (runs/x/model): 3 of its 10 image"
    )
    assert hint == (
        "if the model is a training run, find the step where its loss became NaN or grew in its "
        "metrics.jsonl and train it again with a lower train.lr, train.grad_clip on (e.g. "
        "--set train.grad_clip=1.0) or more train.warmup_steps; if its weights file may be damaged, restore "
        "or retrain it"
    )


def test_non_finite_embeddings_hint_suggests_fp32_only_below_it() -> None:
    for precision in ("bf16", "auto"):
        assert with_hint(_nan(precision)).endswith(
            "restore or retrain it; to rule out overflow, embed at fp32 (model.embed_precision)"
        )
    assert "embed at fp32" not in with_hint(_nan("fp32"))


def test_augment_hint_turns_each_refused_field_into_a_set_override(tmp_path: Path) -> None:
    augment = AugmentConfig.model_validate({"image": {"colour_jitter": 0.4, "flip": True}})
    problems = augment_protect_problems(augment, ["colour", "orientation"], "data.augment.protect")
    assert len(problems) == 2  # the library's own facts: one line per refused augmentation
    message = with_hint(AugmentError(problems))
    assert message.splitlines() == [
        *problems,
        "change the data.augment section of the config, or override it for one run with "
        "--set data.augment.image.colour_jitter=0 --set data.augment.image.flip=false",
    ]
    with pytest.raises(AugmentError) as missing:
        suite_attributes(tmp_path / "nope.yaml")
    assert with_hint(missing.value) == (
        f"data.augment.suite: {tmp_path / 'nope.yaml'}: file not found: point data.augment.suite at an "
        "existing suite YAML file, or set it to null"
    )


def _catalogue(root: Path, rows: str) -> Catalogue:
    root.mkdir()
    (root / "metadata.csv").write_text("file_name,text,group,colour,garment,size\n" + rows)
    return read_catalogue(root)


def test_suite_generate_hints_name_the_flag_of_each_cause(tmp_path: Path) -> None:
    cat = _catalogue(
        tmp_path / "c",
        "a.png,x,g1,red,jeans,m\nb.png,x,g2,blue,jeans,m\nc.png,x,g3,red,dress,m\nd.png,x,g4,blue,dress,m\n",
    )

    def hint_of(**kw: Any) -> str:
        with pytest.raises(SuiteGenerateError) as err:
            generate_suite(cat, **kw)
        return with_hint(err.value).rpartition(": ")[2]

    assert hint_of(attributes=["colour", "colr"]) == "choose --attributes among them"
    assert hint_of(attributes=["colour", "size"]) == "leave them out of --attributes"
    assert hint_of(attributes=["colour"], min_relevant=3) == (
        "lower --min-relevant, or count more images (--split all, or another --split)"
    )
    with pytest.raises(SuiteGenerateError) as err:
        counted_items(cat, "test", None)
    assert with_hint(err.value).endswith(
        "no split column and no run splits: give the run whose splits to use with --splits-from RUN, or "
        "leave out --split"
    )


def test_phrases_hint_points_at_the_phrases_file(tmp_path: Path) -> None:
    path = tmp_path / "phrases.yaml"
    path.write_text("phrases:\n  colr: {red: crimson}\n")
    with pytest.raises(PhraseError) as err:
        load_phrases(path, {"colour": ["red", "blue"]})
    facts, _, hint = with_hint(err.value).rpartition(": ")
    assert facts.startswith(f"{path}: invalid phrases: ") and "colr" in facts
    assert hint == (
        "edit the file given with --phrases (keys order, template, phrases; attributes and values as the "
        "catalogue spells them; docs/suites.md)"
    )


def _index_hint(call: Any) -> str:
    with pytest.raises(IndexParameterError) as err:
        call()
    return with_hint(err.value)


def test_index_parameter_hints_name_the_cliptune_index_options() -> None:
    assert _index_hint(lambda: check_params("lsh", {})) == (
        "index kind must be one of flat, hnsw, ivfpq, got 'lsh': choose --kind flat, hnsw or ivfpq"
    )
    assert _index_hint(lambda: check_params("hnsw", {"nlist": 4, "pq_m": 8, "ef_search": 9})) == (
        "parameter(s) nlist, pq_m do not apply to index kind hnsw: leave out --nlist, --pq-m, or choose the "
        "--kind they belong to (hnsw: --hnsw-m, --ef-construction, --ef-search; ivfpq: --nlist, --pq-m, "
        "--nprobe)"
    )
    assert _index_hint(lambda: resolve_params("ivfpq", 100, 64, {})).endswith(
        "this catalogue has 100: use kind hnsw or flat: build it with --kind hnsw (or --kind flat, exact)"
    )
    assert _index_hint(lambda: resolve_params("ivfpq", 1000, 64, {"pq_m": 5})) == (
        "pq_m 5 must divide the embedding dimension 64: change --pq-m on `cliptune index`, or leave it out "
        "for its default"
    )
    assert _index_hint(lambda: resolve_params("ivfpq", 1000, 64, {"nlist": 2000})).endswith(
        "change --nlist on `cliptune index`, or leave it out for its default"
    )


def test_mining_hints_name_the_mine_flags_or_the_mined_file(tmp_path: Path) -> None:
    with pytest.raises(MiningError) as err:
        MiningWindow(range_min=5, range_max=3)
    assert with_hint(err.value) == (
        "mining window: range_max (3) must exceed range_min (5): change --per-caption, --range-min, "
        "--range-max, --margin or --relative-margin"
    )
    with pytest.raises(MiningError) as err:
        read_mined(tmp_path / "mined.parquet")
    assert with_hint(err.value) == (
        f"{tmp_path / 'mined.parquet'}: no such mined-negatives file: mine it again with `cliptune mine` on "
        "this run's catalogue and caption column (--split train) and set train.hard_negatives.file to the "
        "new file"
    )
    assert with_hint(MiningError("select_hard_negatives: 3 captions with 2 positives")) == (
        "select_hard_negatives: 3 captions with 2 positives"  # a bug: no flag fixes it
    )


def test_wise_hints_name_the_wise_flags(tmp_path: Path) -> None:
    points = [{"alpha": 0.5, "domain": {"mean": 0.4}, "general": {"mean": 0.5}}]
    with pytest.raises(WiseError) as err:
        recommend_alpha(points, 0.02)
    assert with_hint(err.value).endswith("include it: add 0 to --alphas (e.g. --alphas 0,0.25,0.5,0.75,1)")
    with pytest.raises(WiseError) as err:
        run_wise(tmp_path, [0.0, 1.0])
    assert with_hint(err.value) == (
        f"{tmp_path}: not a run directory (no config.yaml): give a training run's folder (runs/<name>)"
    )
    # the subclass keeps its own hint
    assert hint_for(NoGeneralCatalogueError("no general catalogue")) == "give one with --general CATALOGUE"


def test_the_caption_column_hint_names_only_commands_that_take_text_column() -> None:
    import typer.main

    hint = HINTS["cliptune.data.catalogue.MissingCaptionError"]
    assert isinstance(hint, str)
    named = hint.partition("--text-column on ")[2].replace(" and ", ", ").split(", ")
    assert named == ["data check", "data audit", "suite generate", "eval", "test", "index", "embed", "mine"]
    root = typer.main.get_command(app)
    for words in named:
        command = root
        for word in words.split():
            command = command.commands[word]  # type: ignore[attr-defined]  # click groups hold .commands
        options = {o for p in command.params for o in getattr(p, "opts", [])}
        assert "--text-column" in options, words
