"""Tests for the synthetic demo catalogues (cliptune.data.synthetic: registry, fashion, art)."""

from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cliptune.data.synthetic import CATALOGUES, render_art, render_catalogue, render_fashion
from cliptune.data.synthetic import art as synth_art
from cliptune.data.synthetic import fashion as synth_fashion
from cliptune.data.synthetic.art import ART_COLUMNS, ART_TRANSFORMS, TRIPLET_COLUMNS
from cliptune.data.synthetic.fashion import (
    FASHION_ATTRIBUTES,
    FASHION_COLUMNS,
    RIPS_SYNONYMS,
    FashionProduct,
    render_product_photo,
)

FASHION_N = 24
ART_N = 6


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _has_rips_word(text: str) -> bool:
    return any(re.search(rf"\b{re.escape(word)}\b", text) for word in RIPS_SYNONYMS)


@pytest.fixture(scope="module")
def fashion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render_fashion(tmp_path_factory.mktemp("fashion"), n=FASHION_N, seed=0)


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render_art(tmp_path_factory.mktemp("art"), n=ART_N, seed=0, derivatives=3)


# --- fashion ------------------------------------------------------------------------------------


def test_fashion_same_seed_same_bytes_other_seed_other_bytes(fashion: Path, tmp_path: Path) -> None:
    again = render_fashion(tmp_path / "again", n=FASHION_N, seed=0)
    other = render_fashion(tmp_path / "other", n=FASHION_N, seed=1)
    first = _digests(fashion)
    # 24 images + metadata.csv + contact_sheet.png + suite.yaml (the ready behavioural suite)
    assert len(first) == FASHION_N + 3
    assert "suite.yaml" in first
    assert _digests(again) == first
    other_digests = _digests(other)
    assert all(other_digests[k] != v for k, v in first.items() if k.startswith("images/"))


def test_fashion_metadata_columns_values_and_files(fashion: Path) -> None:
    header, rows = _read(fashion / "metadata.csv")
    assert tuple(header) == FASHION_COLUMNS
    assert len(rows) == FASHION_N
    on_disk = {f"images/{p.name}" for p in (fashion / "images").iterdir()}
    assert on_disk == {r["file_name"] for r in rows}
    for row in rows:
        for column, values in FASHION_ATTRIBUTES.items():
            assert row[column] in values, (row["file_name"], column, row[column])
        assert re.fullmatch(r"p\d{4}", row["group"])
        assert re.fullmatch(r"images/\d{6}\.png", row["file_name"])


def test_fashion_products_have_two_to_four_photos_with_constant_attributes(fashion: Path) -> None:
    _, rows = _read(fashion / "metadata.csv")
    by_group: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_group.setdefault(row["group"], []).append(row)
    for group, members in by_group.items():
        assert 2 <= len(members) <= 4, group
        attrs = {tuple(m[c] for c in FASHION_ATTRIBUTES) for m in members}
        assert len(attrs) == 1, group


@pytest.mark.parametrize("n", [2, 3, 5, 7, 9, 13, 40])
def test_product_partition_covers_n_in_groups_of_two_to_four(n: int) -> None:
    sizes = [k for _, k in synth_fashion._products(n, seed=3)]
    assert sum(sizes) == n
    assert all(2 <= k <= 4 for k in sizes)


def test_fashion_rejects_tiny_n_and_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n must be >= 2"):
        render_fashion(tmp_path, n=1)
    with pytest.raises(ValueError, match="size must be >= 128"):
        render_fashion(tmp_path, n=4, size=64)


def test_every_attribute_value_appears_in_a_moderate_catalogue(tmp_path: Path) -> None:
    # 60 photos -> at least 15 products (4 photos each at most) >= 11 colours, the longest value list.
    _, rows = _read(render_fashion(tmp_path, n=60, seed=7, size=128) / "metadata.csv")
    for column, values in FASHION_ATTRIBUTES.items():
        assert {r[column] for r in rows} == set(values), column


def test_rips_rate_is_35_percent_per_block_of_20_products() -> None:
    products = [p for p, _ in synth_fashion._products(200, seed=0)]
    first_40 = products[:40]
    # Rips come in shuffled blocks of 20 products with exactly 7 ripped: 40 products -> 14 ripped.
    assert sum(p.rips for p in first_40) == 14


def test_fashion_captions_mention_rips_only_for_ripped_items(fashion: Path, tmp_path: Path) -> None:
    _, rows = _read(render_fashion(tmp_path, n=120, seed=2, size=128) / "metadata.csv")
    _, small = _read(fashion / "metadata.csv")
    rows += small
    assert any(r["rips"] == "true" for r in rows) and any(r["rips"] == "false" for r in rows)
    for row in rows:
        assert _has_rips_word(row["text"]) == (row["rips"] == "true"), row["text"]
        assert not _has_rips_word(row["text_generic"]), row["text_generic"]


def test_generic_caption_is_colour_and_garment_only(fashion: Path) -> None:
    _, rows = _read(fashion / "metadata.csv")
    colour_words = {c: synth_fashion._COLOUR_WORDS.get(c, [c]) for c in FASHION_ATTRIBUTES["colour"]}
    for row in rows:
        expected = set()
        for noun, plural in synth_fashion._GARMENT_WORDS[row["garment"]]:
            for colour in colour_words[row["colour"]]:
                phrase = f"{colour} {noun}"
                article = "an" if phrase[0] in "aeiou" else "a"
                expected.add(f"a pair of {phrase}" if plural else f"{article} {phrase}")
        assert row["text_generic"] in expected, row
        # The rich caption uses the same garment and colour words, plus attributes.
        phrase = re.sub(r"^(a pair of|an|a) ", "", row["text_generic"])
        colour, noun = phrase.split(" ", 1)
        assert re.search(rf"\b{colour}\b", row["text"]) and noun in row["text"], row


def test_fashion_images_are_rgb_of_requested_size(fashion: Path) -> None:
    for path in sorted((fashion / "images").iterdir()):
        with Image.open(path) as im:
            assert im.mode == "RGB" and im.size == (160, 160), path.name


def test_contact_sheet_tiles_the_first_images(fashion: Path) -> None:
    with Image.open(fashion / "contact_sheet.png") as sheet:
        # 24 images in 8 columns of 120 px -> 960 wide, 3 rows of (120 + 26) px -> 438 high.
        assert sheet.size == (960, 438)
        assert sheet.mode == "RGB"


def test_rerender_replaces_stale_images(tmp_path: Path) -> None:
    render_fashion(tmp_path, n=10, seed=0, size=128)
    render_fashion(tmp_path, n=4, seed=0, size=128)
    _, rows = _read(tmp_path / "metadata.csv")
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == sorted(
        Path(r["file_name"]).name for r in rows
    )


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    for axis in (0, 1):
        for shift in (1, -1):
            out |= np.roll(mask, shift, axis=axis)
    return out


@pytest.mark.parametrize(
    ("garment", "colour", "pattern"),
    [
        ("jeans", "blue", "plain"),
        ("t-shirt", "black", "striped"),
        ("coat", "white", "checked"),
        ("skirt", "yellow", "floral"),
    ],
)
def test_rips_change_pixels_only_inside_the_garment(garment: str, colour: str, pattern: str) -> None:
    ripped = FashionProduct("p0000", garment, colour, pattern, True, "regular", design_seed=11)
    intact = replace(ripped, rips=False)
    a, mask_a = render_product_photo(ripped, photo=1)
    b, mask_b = render_product_photo(intact, photo=1)
    assert np.array_equal(mask_a, mask_b)  # same pose, same silhouette
    diff = np.abs(np.asarray(a, np.int32) - np.asarray(b, np.int32)).sum(axis=-1)  # (160, 160)
    # Background, shadow and lighting untouched; only the garment's anti-aliased rim (alpha <= 50%,
    # so outside the mask) may pick up a rip's colour.
    assert not diff[~_dilate(mask_a)].any()
    assert mask_a.mean() > 0.15  # the garment fills a good part of the frame
    # Holes (skin/dark) and white threads differ strongly from the fabric: >= 4% of the garment area.
    assert (diff[mask_a] > 60).mean() >= 0.04


def test_style_changes_the_silhouette_width() -> None:
    widths = {}
    for style in FASHION_ATTRIBUTES["style"]:
        product = FashionProduct("p0000", "jeans", "blue", "plain", False, style, design_seed=5)
        _, mask = render_product_photo(product, photo=0)
        widths[style] = int(mask.any(axis=0).sum())  # columns the garment covers
    # x-scale 0.76 / 1.0 / 1.3 of the same pose: strictly increasing width.
    assert widths["slim"] < widths["regular"] < widths["oversized"]
    assert widths["oversized"] / widths["slim"] > 1.4


def test_each_garment_has_its_own_silhouette() -> None:
    masks = {}
    for garment in FASHION_ATTRIBUTES["garment"]:
        product = FashionProduct("p0000", garment, "red", "plain", False, "regular", design_seed=5)
        masks[garment] = render_product_photo(product, photo=0)[1]
    names = list(masks)
    for i, g1 in enumerate(names):
        for g2 in names[i + 1 :]:
            union = (masks[g1] | masks[g2]).sum()
            iou = (masks[g1] & masks[g2]).sum() / union
            assert iou < 0.85, (g1, g2, float(iou))


# --- art ----------------------------------------------------------------------------------------


def test_art_same_seed_same_bytes_other_seed_other_bytes(art: Path, tmp_path: Path) -> None:
    first = _digests(art)
    # 6 originals x (1 + 3) images + metadata.csv + triplets.csv + contact_sheet.png
    assert len(first) == ART_N * 4 + 3
    assert _digests(render_art(tmp_path / "again", n=ART_N, seed=0)) == first
    other = _digests(render_art(tmp_path / "other", n=ART_N, seed=1))
    assert all(other[k] != v for k, v in first.items() if k.startswith("images/"))


def test_art_metadata_rows_kinds_and_transforms(art: Path) -> None:
    header, rows = _read(art / "metadata.csv")
    assert tuple(header) == ART_COLUMNS
    assert len(rows) == ART_N * 4
    assert {f"images/{p.name}" for p in (art / "images").iterdir()} == {r["file_name"] for r in rows}
    for group in {r["group"] for r in rows}:
        members = [r for r in rows if r["group"] == group]
        assert [m["kind"] for m in members] == ["original", "derivative", "derivative", "derivative"]
        assert members[0]["transform"] == "none"
        transforms = [m["transform"] for m in members[1:]]
        assert len(set(transforms)) == 3 and set(transforms) <= set(ART_TRANSFORMS)
        assert members[0]["text"].startswith("abstract composition of ")
        for m in members[1:]:
            assert m["text"].startswith(
                synth_art._TRANSFORM_PHRASE[m["transform"]] + ": abstract composition of "
            )


def test_art_triplets_anchor_original_positive_same_group_negative_other(art: Path) -> None:
    header, triplets = _read(art / "triplets.csv")
    _, rows = _read(art / "metadata.csv")
    meta = {r["file_name"]: r for r in rows}
    assert tuple(header) == TRIPLET_COLUMNS
    assert len(triplets) == ART_N * 3  # one per derivative
    assert {t["positive"] for t in triplets} == {r["file_name"] for r in rows if r["kind"] == "derivative"}
    for t in triplets:
        anchor, positive, negative = meta[t["anchor"]], meta[t["positive"]], meta[t["negative"]]
        assert anchor["kind"] == "original"
        assert positive["group"] == anchor["group"]
        assert negative["group"] != anchor["group"]


def test_art_derivatives_are_related_but_not_identical(art: Path) -> None:
    _, rows = _read(art / "metadata.csv")

    def pixels(name: str) -> np.ndarray:
        with Image.open(art / name) as im:
            assert im.mode == "RGB" and im.size == (160, 160)
            return np.asarray(im, np.int32)

    originals = {r["group"]: pixels(r["file_name"]) for r in rows if r["kind"] == "original"}
    for r in rows:
        if r["kind"] != "derivative":
            continue
        derived, original = pixels(r["file_name"]), originals[r["group"]]
        assert not np.array_equal(derived, original), r["file_name"]
        if r["transform"] == "mirror":
            assert np.array_equal(derived, original[:, ::-1]), r["file_name"]
        if r["transform"] == "texture":  # same picture under an overlay: small mean change
            assert np.abs(derived - original).mean() < 50, r["file_name"]


def test_art_more_derivatives_than_transforms_reuses_them(tmp_path: Path) -> None:
    _, rows = _read(render_art(tmp_path, n=2, derivatives=7, size=64) / "metadata.csv")
    transforms = [r["transform"] for r in rows if r["group"] == "a0000"][1:]
    # 7 derivatives: each of the 5 transforms once, then the seeded order again from the start.
    assert sorted(transforms[:5]) == sorted(ART_TRANSFORMS)
    assert transforms[5:] == transforms[:2]


def test_art_description_golden() -> None:
    def shape(kind: str, colour: str, size: float) -> synth_art._Shape:
        return synth_art._Shape(kind, colour, 0.5, 0.5, size, 0.0, 0.5, (0.0,) * 6)

    comp = synth_art._Composition(
        "cream",
        (
            shape("circle", "red", 0.25),
            shape("line", "blue", 0.1),
            shape("blob", "teal", 0.15),
            shape("line", "blue", 0.1),
        ),
        "hatch",
    )
    # Groups ranked by summed size: red circle 0.25 > blue lines 0.1 + 0.1 = 0.2 > teal blob 0.15;
    # a single shape larger than 0.22 is "large".
    assert synth_art._describe(comp) == (
        "abstract composition of a large red circle, two blue lines and a teal blob on a cream background"
        " with hatched lines"
    )


def test_art_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="originals"):
        render_art(tmp_path, n=1)
    with pytest.raises(ValueError, match="derivatives"):
        render_art(tmp_path, n=2, derivatives=0)


# --- registry -----------------------------------------------------------------------------------


def test_registry_and_render_catalogue(tmp_path: Path) -> None:
    assert CATALOGUES == {"fashion": render_fashion, "art": render_art}
    out = render_catalogue("art", tmp_path / "a", n=2, seed=0)
    assert out == tmp_path / "a"
    _, rows = _read(out / "metadata.csv")
    assert len(rows) == 2 * 4  # n=2 originals, default 3 derivatives each
    with pytest.raises(ValueError, match="unknown catalogue 'paintings'; known: art, fashion"):
        render_catalogue("paintings", tmp_path / "b", n=2, seed=0)
