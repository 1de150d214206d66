"""``cliptune data audit``: planted copies across splits are found by the right method, unrelated images never.

The catalogue is the synthetic fashion one (seed 0; the thresholds were set on seed 1, see
``cliptune.data.audit.NEAR_BITS``): products in one studio look, the hard case for false pairs, plus
real photos from ``skimage.data``. Copies of four sources (two renders, two photos) are planted in new
groups on the other side of the split: a byte copy, a half-size resize, a JPEG re-encode, a mirror and a
10% crop. Hashes must find the first four without a model; the crop needs the embedding pass.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageOps
from scipy.fftpack import dct
from skimage import data as skdata
from typer.testing import CliRunner

from cliptune.cli.app import app
from cliptune.config import DataConfig
from cliptune.data.audit import (
    NEAR_BITS,
    Pair,
    audit_table,
    hash_images,
    hash_pairs,
    merge_leaking_groups,
    phash,
)
from cliptune.data.splits import assign_rows, group_ids, make_splits
from cliptune.data.synthetic.fashion import render_fashion
from cliptune.search.duplicates import DEFAULT_COSINE, embedding_pairs

runner = CliRunner()
PHOTOS = {
    "astronaut": skdata.astronaut,
    "coffee": skdata.coffee,
    "chelsea": skdata.chelsea,
    "rocket": skdata.rocket,
}
SOURCES = ["images/000005.png", "images/000030.png", "photos/astronaut.png", "photos/coffee.png"]
HASH_KINDS = {"copy": "exact", "resized": "near", "jpeg": "near", "mirrored": "near"}


def _plant(root: Path, kinds: tuple[str, ...]) -> dict[tuple[str, str], str]:
    """Write the planted copies and their rows (split opposite to the source); returns (src, copy) -> kind."""
    rows = pd.read_csv(root / "metadata.csv", dtype=str)
    planted: dict[tuple[str, str], str] = {}
    new = []
    for s, src in enumerate(SOURCES):
        source_row = rows[rows["file_name"] == src].iloc[0]
        other = "test" if source_row["split"] == "train" else "train"
        img = Image.open(root / src).convert("RGB")
        w, h = img.size
        for kind in kinds:
            name = f"planted/{s}-{kind}." + ("jpg" if kind == "jpeg" else "png")
            (root / "planted").mkdir(exist_ok=True)
            if kind == "copy":
                shutil.copyfile(root / src, root / name)
            elif kind == "resized":
                img.resize((w // 2, h // 2), Image.Resampling.BILINEAR).save(root / name)
            elif kind == "jpeg":
                img.save(root / name, quality=75)
            elif kind == "mirrored":
                ImageOps.mirror(img).save(root / name)
            else:  # crop 5% on each side: 10% of each dimension
                img.crop((w // 20, h // 20, w - w // 20, h - h // 20)).save(root / name)
            new.append(
                {**source_row.to_dict(), "file_name": name, "group": f"planted-{s}-{kind}", "split": other}
            )
            planted[(src, name)] = kind
    pd.concat([rows, pd.DataFrame(new)]).to_csv(root / "metadata.csv", index=False)
    return planted


def _catalogue(root: Path, n: int, kinds: tuple[str, ...]) -> dict[tuple[str, str], str]:
    render_fashion(root, n=n, seed=0, size=128)
    rows = pd.read_csv(root / "metadata.csv", dtype=str)
    (root / "photos").mkdir()
    photos = []
    for name, load in PHOTOS.items():
        Image.fromarray(load()).convert("RGB").save(root / "photos" / f"{name}.png")
        photos.append({**rows.iloc[0].to_dict(), "file_name": f"photos/{name}.png", "group": f"photo-{name}"})
    rows = pd.concat([rows, pd.DataFrame(photos)], ignore_index=True)
    # fix every unplanted row's split to the default grouped split, so the plants can sit opposite
    split = DataConfig().split
    splits = make_splits(rows, split.ratios, split.seed, min_groups=split.min_groups)
    rows["split"] = assign_rows(rows, splits).to_numpy()
    rows.to_csv(root / "metadata.csv", index=False)
    return _plant(root, kinds)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[tuple[str, str], str]]:
    root = tmp_path_factory.mktemp("audit") / "cat"
    return root, _catalogue(root, 200, tuple(HASH_KINDS))


def _pairs(csv: Path) -> dict[tuple[str, str], dict[str, object]]:
    table = pd.read_csv(csv, dtype={"group_a": str, "group_b": str})
    out: dict[tuple[str, str], dict[str, object]] = {}
    for r in table.to_dict("records"):
        a, b = sorted((str(r["file_a"]), str(r["file_b"])))
        out[(a, b)] = {str(k): v for k, v in r.items()}
    return out


def test_phash_matches_imagehash_definition_computed_with_scipy() -> None:
    # imagehash.phash(hash_size=16): grey, 64 x 64 Lanczos, scipy.fftpack DCT on both axes, top-left 16 x 16
    img = Image.fromarray(skdata.astronaut())
    grey = np.asarray(img.convert("L").resize((64, 64), Image.Resampling.LANCZOS), dtype=np.float64)
    low = dct(dct(grey, axis=0), axis=1)[:16, :16]
    assert np.array_equal(np.unpackbits(phash(img)), (low > np.median(low)).ravel().astype(np.uint8))


def test_hash_pairs_match_a_brute_force_hamming_oracle(
    planted: tuple[Path, dict[tuple[str, str], str]],
) -> None:
    root, _ = planted
    rows = pd.read_csv(root / "metadata.csv", dtype=str)
    hashes = hash_images([root / f for f in rows["file_name"]], list(rows["file_name"]))
    bits, mirror = np.unpackbits(hashes.phash, axis=1), np.unpackbits(hashes.phash_mirror, axis=1)
    got = {(p.a, p.b): p for p in hash_pairs(hashes)}
    expected = set()
    for a, b in itertools.combinations(range(len(bits)), 2):
        d = min(
            int((bits[a] != bits[b]).sum()),
            int((bits[a] != mirror[b]).sum()),
            int((mirror[a] != bits[b]).sum()),
        )
        if d <= NEAR_BITS or hashes.digest[a] == hashes.digest[b]:
            expected.add((a, b))
    assert set(got) == expected
    assert all((p.kind == "exact") == (hashes.digest[p.a] == hashes.digest[p.b]) for p in got.values())


def test_audit_finds_every_planted_copy_and_no_false_pair(
    planted: tuple[Path, dict[tuple[str, str], str]], tmp_path: Path
) -> None:
    root, plants = planted
    result = runner.invoke(app, ["data", "audit", str(root), "--out", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 1, result.output  # leaks found: a CI gate fails
    found = _pairs(tmp_path / "out" / "audit.csv")
    for (src, copy), kind in plants.items():
        row = found[tuple(sorted((src, copy)))]
        assert row["kind"] == HASH_KINDS[kind], (copy, row)
        assert row["finding"] == "leak" and {row["split_a"], row["split_b"]} >= {"train"}
        assert bool(row["mirrored"]) == (kind == "mirrored")
    planted_keys = {tuple(sorted(k)) for k in plants}
    # copies of one source pair with each other too (same split, different planted groups)
    siblings = {
        tuple(sorted(p))
        for s in {s for s, _ in plants}
        for p in itertools.combinations([c for (x, c) in plants if x == s], 2)
    }
    false = [k for k, r in found.items() if k not in planted_keys | siblings and r["group_a"] != r["group_b"]]
    assert false == []
    assert all(found[k]["finding"] == "same_split" for k in siblings)
    assert "leak" in result.output and (tmp_path / "out" / "audit.html").read_text().count(
        "data:image/jpeg;base64,"
    ) == 2 * len(found)


def test_fix_merges_leaking_groups_so_a_fresh_split_keeps_copies_together(
    planted: tuple[Path, dict[tuple[str, str], str]], tmp_path: Path
) -> None:
    root, plants = planted
    fixed_csv = tmp_path / "metadata.fixed.csv"
    result = runner.invoke(
        app,
        [
            "data",
            "audit",
            str(root),
            "--out",
            str(tmp_path / "o"),
            "--fix",
            "--fix-out",
            str(fixed_csv),
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    before = pd.read_csv(root / "metadata.csv", dtype=str)
    fixed = pd.read_csv(fixed_csv, dtype=str)
    assert len(fixed) == len(before) and list(fixed["file_name"]) == list(
        before["file_name"]
    )  # no row dropped
    group = dict(zip(fixed["file_name"], group_ids(fixed), strict=True))
    for src, copy in plants:
        assert group[src] == group[copy]
    # a fresh default split of the fixed rows: no audited pair crosses it any more
    split = DataConfig().split
    labels = assign_rows(fixed, make_splits(fixed, split.ratios, split.seed, min_groups=split.min_groups))
    split_of = dict(zip(fixed["file_name"], labels, strict=True))
    found = _pairs(tmp_path / "o" / "audit.csv")
    assert found and all(split_of[a] == split_of[b] for a, b in found)


def test_merge_is_union_find_over_leaking_pairs_and_majority_split() -> None:
    rows = pd.DataFrame(
        {
            "row": [1, 2, 3, 4, 5],
            "file_name": list("abcde"),
            "group": ["g3", "g1", "g2", "g9", None],
            "split": ["test", "train", "train", "val", "val"],
        }
    )
    table = pd.DataFrame(
        {
            "group_a": ["g3", "g1", "g9"],
            "group_b": ["g1", "g2", "e"],
            "finding": ["leak", "leak", "same_split"],
        }
    )
    out, moved = merge_leaking_groups(rows, table)
    # g3-g1 and g1-g2 chain into one set named by its smallest id g1; g9-e is not a leak: untouched
    assert out["group"].tolist() == ["g1", "g1", "g1", "g9", "e"]
    # the set names test once and train twice: its test row moves to train
    assert out["split"].tolist() == ["train", "train", "train", "val", "val"] and moved == 1
    assert "row" not in out.columns


def test_audit_table_says_what_each_pair_means() -> None:
    rows = pd.DataFrame({"file_name": ["a", "a", "b", "c", "d"], "group": ["g1", "g1", "g2", "g2", "g3"]})
    split_of = pd.Series(["train", "train", "train", "train", "test"])
    pairs = [
        Pair(0, 1, "near", 3.0),
        Pair(1, 2, "exact", 0.0),
        Pair(0, 3, "embedding", 0.91),
        Pair(1, 3, "embedding", 0.97),
        Pair(2, 3, "near", 12.0),
    ]
    table = audit_table(pairs, ["a", "b", "c", "d"], rows, split_of)
    # a, b, c are train, d test; b and c share group g2. Leaks: the near pair first, then cosine descending
    assert table[["file_a", "file_b", "finding"]].values.tolist() == [
        ["c", "d", "leak"],
        ["b", "d", "leak"],
        ["a", "d", "leak"],
        ["a", "b", "same_split"],
        ["b", "c", "same_group"],
    ]


def test_embedding_pairs_match_a_brute_force_cosine_oracle() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=gen)
    x[17], x[250] = x[3], x[3] * 2 + 0.01  # an exact copy and a close one
    x = torch.nn.functional.normalize(x, dim=-1)
    got = {(p.a, p.b): p.score for p in embedding_pairs(x, 0.9)}
    sims = (x @ x.T).numpy()
    expected = {(a, b) for a, b in itertools.combinations(range(300), 2) if sims[a, b] >= 0.9}
    assert set(got) == expected and {(3, 17), (3, 250), (17, 250)} <= expected
    assert all(abs(got[k] - min(float(sims[k]), 1.0)) < 1e-5 for k in got)


def test_bad_images_are_named_and_skipped(tmp_path: Path) -> None:
    root = render_fashion(tmp_path / "cat", n=6, seed=0, size=128)
    (root / "images" / "000002.png").write_bytes(b"")
    result = runner.invoke(app, ["data", "audit", str(root), "--out", str(tmp_path / "o"), "-q"])
    assert result.exit_code == 0, result.output
    assert "images/000002.png: empty file (0 bytes)" in result.output.replace("skipped ", "")
    assert "images/000002.png" not in (tmp_path / "o" / "audit.csv").read_text()


def test_cli_defaults_are_the_documented_constants() -> None:
    import inspect

    from cliptune.cli.data import data_audit

    params = inspect.signature(data_audit).parameters
    assert params["threshold"].default == DEFAULT_COSINE and params["max_bits"].default == NEAR_BITS


@pytest.mark.slow
def test_crops_need_the_embedding_pass_and_find_no_false_pair(tmp_path: Path) -> None:
    root = tmp_path / "cat"
    plants = _catalogue(root, 200, ("cropped",))
    out = tmp_path / "o"
    no_model = runner.invoke(app, ["data", "audit", str(root), "--out", str(out), "-q"])
    assert no_model.exit_code == 0, no_model.output  # hashes do not see a 10% crop
    result = runner.invoke(
        app,
        [
            "data",
            "audit",
            str(root),
            "--out",
            str(out),
            "--model",
            "embedded",
            "--cache-dir",
            str(tmp_path / "c"),
            "-q",
        ],
    )
    assert result.exit_code == 1, result.output
    found = _pairs(out / "audit.csv")
    for src, copy in plants:
        row = found[tuple(sorted((src, copy)))]
        assert row["kind"] == "embedding" and row["finding"] == "leak" and row["score"] >= DEFAULT_COSINE
    planted_keys = {tuple(sorted(k)) for k in plants}
    assert [k for k, r in found.items() if k not in planted_keys and r["group_a"] != r["group_b"]] == []
