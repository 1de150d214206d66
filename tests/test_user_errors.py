"""The smaller bad inputs of issue 14 (item 8): each is named where it is, or announced, never silent.

A metadata file that is not UTF-8 is located by line and column; a boolean is no number in a config; an
override's bad value is blamed on the override, not the YAML file; rows skipped by ``on_bad_row: skip``
are counted on the console; texts cut to the tokenizer's limit are announced once per command.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cliptune.cli.app import app, truncation_notice
from cliptune.config import ConfigError, DataConfig, load_config
from cliptune.data.catalogue import CatalogueError, read_catalogue
from cliptune.data.images import ImageLoadError, load_image
from cliptune.data.prepare import prepare_data
from cliptune.data.synthetic import render_fashion
from cliptune.models.embed import TextsTruncatedWarning, embed_images, embed_texts_with
from cliptune.models.factory import load_model
from tests.tiny_models import MAX_TEXT_LEN, make_tiny_clip

runner = CliRunner()


def _catalogue_with_latin1(root: Path, suffix: str) -> Path:
    root.mkdir()
    if suffix == ".csv":
        lines = ["file_name,text", "a.png,one", "b.png,two", "c.png,three", "d.png,caf\xe9 cr\xe8me"]
    else:
        lines = [
            f'{{"file_name": "{c}.png", "text": "{t}"}}'
            for c, t in zip("abc", ["one", "two", "six"], strict=True)
        ]
        lines += ['{"file_name": "d.png", "text": "x"}', '{"file_name": "e.png", "text": "caf\xe9"}']
    path = root / f"metadata{suffix}"
    path.write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    return path


@pytest.mark.parametrize(
    ("suffix", "line", "column"),
    [
        # line 5 is "d.png,caf\xe9 cr\xe8me": d . p n g , c a f = 9 characters before the é
        (".csv", 5, 10),
        # line 5 is '{"file_name": "e.png", "text": "caf\xe9"}': 32 characters before "caf", so é is 36th
        (".jsonl", 5, 36),
    ],
)
def test_non_utf8_metadata_names_file_line_and_column(
    tmp_path: Path, suffix: str, line: int, column: int
) -> None:
    path = _catalogue_with_latin1(tmp_path / "cat", suffix)
    with pytest.raises(CatalogueError) as exc:
        read_catalogue(tmp_path / "cat")
    message = str(exc.value)
    assert message.startswith(f"{path} line {line}, column {column}: not UTF-8 text (byte 0xe9)"), message
    assert "position" not in message


@pytest.mark.parametrize(
    "override", ["train.epochs=true", "train.lr=false", "data.split.ratios={train: true}", "eval.k=[1, true]"]
)
def test_booleans_are_not_numbers(override: str) -> None:
    field = override.split("=")[0]
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert f"{field}: a number is needed, not a boolean" in str(exc.value)


def test_booleans_still_fill_boolean_fields_and_numbers_number_fields() -> None:
    cfg = load_config(None, ["train.gradient_checkpointing=true", "train.epochs=3", "train.lr=1e-3"])
    assert cfg.train.gradient_checkpointing is True
    assert cfg.train.epochs == 3 and type(cfg.train.epochs) is int
    assert cfg.train.lr == 1e-3


def test_override_errors_name_the_override_not_the_file(tmp_path: Path) -> None:
    good = tmp_path / "run.yaml"
    good.write_text("train:\n  epochs: 2\n")
    result = runner.invoke(app, ["config", "show", str(good), "--set", "train.epochs=true"])
    assert result.exit_code == 2
    assert str(good) not in result.output  # the file is fine
    assert (
        "train.epochs: a number is needed, not a boolean (got True), set by override 'train.epochs=true'"
        in (result.output)
    )
    assert "--set (train.epochs=true)" in result.output
    # the same value in the file: the file is named, no --set is blamed
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: true\n")
    result = runner.invoke(app, ["config", "show", str(bad), "--set", "train.lr=1e-4"])
    assert result.exit_code == 2
    assert f"invalid config in {bad}:" in result.output
    assert "--set" not in result.output and "set by override" not in result.output
    # a later override of the same field is the one blamed
    with pytest.raises(ConfigError) as exc:
        load_config(good, ["train.epochs=5", "train.epochs=-1"])
    assert exc.value.overrides == ["train.epochs=-1"]


def test_skip_mode_prints_the_count_and_the_rejected_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fashion = render_fashion(tmp_path / "fashion", n=12, seed=0, size=128)
    (fashion / "images" / "000003.png").write_text("not an image")
    (fashion / "images" / "000007.png").unlink()
    run = tmp_path / "run"
    cfg = DataConfig(catalogue=fashion, on_bad_row="skip", split={"ratios": {"train": 1.0}, "min_groups": 0})
    data = prepare_data(cfg, run)
    assert len(data.rows) == 10
    rejected = run / "rejected.csv"
    assert sorted(pd.read_csv(rejected)["file_name"]) == ["images/000003.png", "images/000007.png"]
    err = capsys.readouterr().err
    assert f"skipped 2 bad row(s) of {fashion / 'metadata.csv'}" in err
    assert f"they are listed in {rejected}" in err


def _pixels(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(im.resize((8, 8)), dtype=np.float32)) for im in images])


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_bad_image_is_named_also_from_a_worker_process(tmp_path: Path, num_workers: int) -> None:
    # a worker re-raises an exception whose type takes more than a message as a RuntimeError holding a
    # traceback text; the file and reason must arrive as the typed error
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(good)
    bad.write_text("not a picture")
    with pytest.raises(ImageLoadError) as exc:
        embed_images(
            [good, bad],
            cache=None,
            load=load_image,
            preprocess=_pixels,
            forward=lambda x: x.flatten(1),
            num_workers=num_workers,
            batch_size=1,
            progress=False,
        )
    assert exc.value.path == bad and exc.value.reason == "not an image (unrecognised format)"
    assert str(exc.value).startswith(f"{bad}: ")


def test_long_texts_are_cut_with_one_notice(tmp_path: Path) -> None:
    model = load_model(make_tiny_clip(tmp_path / "clip", seed=0))
    tokenizer = model.backbone.tokenizer  # type: ignore[attr-defined]  # the HF backbone's tokenizer
    long_caption = "a red dress with white dots " * 1500  # ~10,000 characters
    long_query = ("ripped blue jeans " * 300)[:5000]
    for text in (long_caption, long_query):  # an independent count: they really exceed the limit
        assert len(tokenizer(text, truncation=False)["input_ids"]) > MAX_TEXT_LEN
    assert len(tokenizer("a photo of a cat")["input_ids"]) <= MAX_TEXT_LEN
    with pytest.warns(TextsTruncatedWarning) as caught:
        embed_texts_with(
            model,
            [long_caption, "a photo of a cat", long_query, long_caption],
            progress=False,
            cache_dir=tmp_path / "cache",
        )
    assert [(w.message.count, w.message.limit) for w in caught] == [(2, MAX_TEXT_LEN)]  # type: ignore[union-attr]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for texts that fit
        embed_texts_with(model, ["a photo of a cat"], progress=False, cache_dir=tmp_path / "cache")


def test_the_command_prints_one_notice_with_the_total(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.warns(UserWarning, match="something else") as others, truncation_notice():
        for count in (2, 3):  # two embedding calls of one command
            warnings.warn(TextsTruncatedWarning(count, 77), stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)  # passes through
    err = capsys.readouterr().err
    assert err.count("note: ") == 1
    assert "note: 5 text(s) were longer than the tokenizer's limit of 77 tokens and were cut" in err
    assert [str(w.message) for w in others] == ["something else"]  # the two cut-notes were summed, not shown


def test_cliptune_warnings_print_as_one_line_without_source(capsys: pytest.CaptureFixture[str]) -> None:
    from cliptune.data.shards import ShardIndexWarning

    with truncation_notice():
        warnings.warn(ShardIndexWarning("s/0.tar", "s/0.tar.idx.json", "version 2"), stacklevel=1)
    err = capsys.readouterr().err
    assert err == "warning: s/0.tar.idx.json: not used, scanning s/0.tar instead: version 2\n"


def test_search_with_a_long_query_notes_the_cut(tmp_path: Path) -> None:
    fashion = render_fashion(tmp_path / "fashion", n=4, seed=0, size=128)
    clip = make_tiny_clip(tmp_path / "clip", seed=0)
    cache = str(tmp_path / "cache")
    assert (
        runner.invoke(
            app,
            ["index", str(clip), str(tmp_path / "idx"), "--data", str(fashion), "-q", "--cache-dir", cache],
        ).exit_code
        == 0
    )
    result = runner.invoke(app, ["search", str(tmp_path / "idx"), "blue jeans " * 500, "--cache-dir", cache])
    assert result.exit_code == 0, result.output
    assert result.output.count("note: 1 text(s) were longer than the tokenizer's limit of 16 tokens") == 1


def test_open_clip_counts_the_texts_its_tokenizer_cuts() -> None:
    from types import SimpleNamespace

    from cliptune.models.openclip import OpenClipBackbone, import_open_clip

    tokenizer = import_open_clip().tokenizer.SimpleTokenizer()  # CLIP's BPE, context length 77
    texts = [" ".join(["cat"] * n) for n in (75, 76, 200)]  # 75 words + start + end = 77 tokens: fits
    # the oracle: open_clip's own ids; a cut text has no padding left and its words run to the end token
    ids = tokenizer(texts)
    assert [int(row[-1]) for row in ids] == [tokenizer.eot_token_id] * 3
    assert [len(tokenizer.encode(t)) + 2 for t in texts] == [77, 78, 202]
    backbone = SimpleNamespace(tokenizer=tokenizer)  # count_truncated needs only the tokenizer
    assert OpenClipBackbone.count_truncated(backbone, texts) == (2, 77)  # type: ignore[arg-type]  # duck-typed self
