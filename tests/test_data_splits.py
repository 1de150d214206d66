"""Grouped splits: seeded, leak-free, ratio-matched on rows, independent of row order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cliptune.data.splits import (
    _strata,  # the stratum rule, stated directly (docs/catalogues.md step 3)
    assign_rows,
    carved_groups,
    group_ids,
    load_splits,
    make_splits,
    save_splits,
)


def _catalogue(sizes: list[int], explicit: dict[int, str] | None = None) -> pd.DataFrame:
    """Group g{i} has sizes[i] rows; groups in ``explicit`` carry that split name on their first row only."""
    records = []
    for g, size in enumerate(sizes):
        for k in range(size):
            split = (explicit or {}).get(g) if k == 0 else None
            records.append(
                {"file_name": f"img{g}_{k}.png", "text": "t", "group": f"g{g:02d}", "split": split}
            )
    frame = pd.DataFrame(records)
    frame.insert(0, "row", range(1, len(frame) + 1))
    return frame


def _reference(rows: pd.DataFrame, ratios: dict[str, float], seed: int) -> dict[str, list[str]]:
    """Plain-Python oracle of the documented algorithm (one stratum, no explicit splits)."""
    sizes: dict[str, int] = {}
    for gid in rows["group"]:
        sizes[gid] = sizes.get(gid, 0) + 1
    gids = sorted(sizes)
    order = np.random.default_rng(seed).permutation(len(gids))
    names = sorted(ratios)
    total = sum(sizes.values())
    filled = dict.fromkeys(names, 0)
    out: dict[str, list[str]] = {n: [] for n in names}
    for i in order:
        gid = gids[i]
        room = {n: ratios[n] * total - filled[n] for n in names}
        fits = [n for n in names if room[n] >= sizes[gid] - 1e-6]
        best = min(fits, key=lambda n: room[n]) if fits else max(names, key=lambda n: room[n])
        out[best].append(gid)
        filled[best] += sizes[gid]
    for name in names:  # at least one group per split with ratio > 0
        if ratios[name] > 0 and not out[name]:
            donors = [n for n in names if len(out[n]) > 1]
            if donors:
                donor = max(donors, key=lambda n: len(out[n]))
                gid = min(out[donor], key=lambda g: (sizes[g], g))
                out[donor].remove(gid)
                out[name].append(gid)
    return {n: sorted(v) for n, v in out.items()}


def _rows_per_split(rows: pd.DataFrame, splits: dict[str, list[str]]) -> dict[str, int]:
    return assign_rows(rows, splits).value_counts().reindex(list(splits), fill_value=0).to_dict()


def test_singleton_groups_match_ratios_exactly() -> None:
    rows = _catalogue([1] * 10)
    assert _rows_per_split(rows, make_splits(rows, {"train": 0.8, "test": 0.2}, seed=3)) == {
        "test": 2,
        "train": 8,
    }
    rows = _catalogue([1] * 20)  # 0.7 * 20 = 14, 0.15 * 20 = 3
    splits = make_splits(rows, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=0)
    assert _rows_per_split(rows, splits) == {"test": 3, "train": 14, "val": 3}
    # golden output: a change here means existing run directories would no longer reproduce their split
    assert splits["test"] == ["g04", "g06", "g19"] and splits["val"] == ["g02", "g13", "g16"]


@pytest.mark.parametrize("seed", range(6))
def test_uneven_groups_find_the_exact_split(seed: int) -> None:
    # groups of 5, 3, 1, 1 rows; 0.8/0.2 of 10 rows = 8/2: the only exact split is {g00, g01} / {g02, g03},
    # and best fit finds it from any order (a group goes where it fits most tightly).
    rows = _catalogue([5, 3, 1, 1])
    assert make_splits(rows, {"train": 0.8, "test": 0.2}, seed=seed) == {
        "test": ["g02", "g03"],
        "train": ["g00", "g01"],
    }


def test_every_positive_split_gets_a_group() -> None:
    rows = _catalogue([100, 1, 1])  # the big group swamps every target
    for seed in range(5):
        splits = make_splits(rows, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=seed)
        assert sorted(map(len, splits.values())) == [1, 1, 1]
        assert splits["train"] == ["g00"]
    assert make_splits(rows, {"train": 1.0, "test": 0.0}, seed=0)["test"] == []  # ratio 0 may stay empty


def test_ratios_are_validated() -> None:
    rows = _catalogue([1, 1])
    for ratios in ({"train": 0.8, "test": 0.3}, {"train": 1.2, "test": -0.2}, {"train": float("nan")}, {}):
        with pytest.raises(ValueError, match="split ratios must be >= 0 and sum to 1") as info:
            make_splits(rows, ratios, seed=0)
        assert all(name in str(info.value) for name in ratios)
    make_splits(rows, {"train": 0.7, "val": 0.15, "test": 0.15 + 5e-7}, seed=0)  # within 1e-6


def test_stratified_by_group_majority() -> None:
    # 10 groups of 3 rows whose majority is red (red, red, blue) and 10 whose majority is blue; 0.8/0.2
    # within each stratum of 30 rows is 24/6 rows = 8/2 groups.
    rows = _catalogue([3] * 20)
    colours = []
    for g in range(20):
        colours += ["red", "red", "blue"] if g < 10 else ["blue", "blue", "red"]
    rows["colour"] = colours
    for seed in range(3):
        splits = make_splits(rows, {"train": 0.8, "test": 0.2}, seed=seed, stratify="colour")
        test_ids = [int(g[1:]) for g in splits["test"]]
        assert sum(g < 10 for g in test_ids) == 2 and sum(g >= 10 for g in test_ids) == 2
    with pytest.raises(ValueError, match="stratify column 'size' not found"):
        make_splits(rows, {"train": 1.0}, seed=0, stratify="size")


def test_stratum_tie_goes_to_the_smallest_value() -> None:
    # g00 is red, red; g01 is red, blue: a tie, so g01's stratum is "blue" (the smallest value). Each group
    # is then alone in its stratum; neither split's target (1 row) takes its 2 rows, so it goes to the
    # split furthest below target, a tie broken by name: "test". Train, left empty, then takes test's
    # smallest group (ties: smallest id), g00. Were g01 in "red" beside g00, the seeded shuffle of that
    # stratum would decide, and some seeds would put g00 in test.
    rows = _catalogue([2, 2])
    rows["colour"] = ["red", "red", "red", "blue"]
    for seed in range(8):
        splits = make_splits(rows, {"train": 0.5, "test": 0.5}, seed=seed, stratify="colour")
        assert splits == {"test": ["g01"], "train": ["g00"]}, seed
    rows["colour"] = ["red", "red", "blue", "red"]  # the order of a group's rows does not matter
    assert make_splits(rows, {"train": 0.5, "test": 0.5}, seed=0, stratify="colour")["test"] == ["g01"]


def test_empty_rows_give_empty_splits() -> None:
    empty = pd.DataFrame({"file_name": [], "text": [], "group": []})
    assert make_splits(empty, {"train": 0.8, "test": 0.2}, seed=0) == {"test": [], "train": []}


def test_explicit_split_is_honoured() -> None:
    rows = _catalogue([2] * 6, explicit={0: "test", 1: "holdout"})
    splits = make_splits(rows, {"train": 0.5, "test": 0.5}, seed=1)
    assert "g00" in splits["test"] and splits["holdout"] == ["g01"]  # a name outside ratios is kept
    # the 4 free groups (8 rows) are split 0.5/0.5 among themselves: 2 groups each, plus g00 in test
    assert len(splits["train"]) == 2 and len(splits["test"]) == 3
    rows.loc[1, "split"] = "train"  # g00's second row contradicts its first
    with pytest.raises(ValueError, match="group 'g00' has conflicting explicit splits: test, train"):
        make_splits(rows, {"train": 0.5, "test": 0.5}, seed=1)


def test_group_ids_fall_back_to_file_name() -> None:
    rows = pd.DataFrame({"file_name": ["a.png", "a.png", "b.png"], "group": ["p1", None, "  "]})
    assert group_ids(rows).tolist() == ["p1", "a.png", "b.png"]
    assert group_ids(rows.drop(columns="group")).tolist() == ["a.png", "a.png", "b.png"]
    assert group_ids(pd.DataFrame({"file_name": ["x"], "group": [7]})).tolist() == ["7"]


def test_assign_rows_and_json_round_trip(tmp_path: Path) -> None:
    rows = _catalogue([2, 1, 3])
    splits = make_splits(rows, {"train": 0.5, "test": 0.5}, seed=0)
    path = save_splits(splits, tmp_path / "splits.json")
    assert load_splits(path) == splits
    labels = assign_rows(rows, load_splits(path))
    assert labels.notna().all() and labels.groupby(rows["group"]).nunique().max() == 1
    with pytest.raises(ValueError, match="row 1: group 'g00' is in no split"):
        assign_rows(rows, {"train": ["g01", "g02"]})
    path.write_text(json.dumps({"train": ["g00", "g01"], "test": ["g01"]}))
    with pytest.raises(ValueError, match="group 'g01' is in two splits \\(train, test\\)"):
        load_splits(path)
    path.write_text(json.dumps({"train": "g00"}))
    with pytest.raises(ValueError, match="expected {split name"):
        load_splits(path)


sizes_strategy = st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=30)
ratios_strategy = st.lists(st.integers(min_value=1, max_value=20), min_size=2, max_size=3).map(
    lambda w: {name: x / sum(w) for name, x in zip(("train", "val", "test"), w, strict=False)}
)


@settings(max_examples=50, deadline=None)
@given(
    sizes=sizes_strategy,
    ratios=ratios_strategy,
    seed=st.integers(0, 2**32 - 1),
    shuffle_seed=st.integers(0, 99),
)
def test_split_properties(sizes: list[int], ratios: dict[str, float], seed: int, shuffle_seed: int) -> None:
    rows = _catalogue(sizes)
    splits = make_splits(rows, ratios, seed=seed)
    all_groups = sorted(set(rows["group"]))
    listed = [g for gids in splits.values() for g in gids]
    assert sorted(listed) == all_groups  # every group in exactly one split: none crosses, none lost
    assert set(splits) == set(ratios)
    assert assign_rows(rows, splits).notna().all()  # every row assigned
    assert make_splits(rows, ratios, seed=seed) == splits  # same seed, same split
    shuffled = rows.sample(frac=1.0, random_state=shuffle_seed).reset_index(drop=True)
    assert make_splits(shuffled, ratios, seed=seed) == splits  # row order does not matter
    assert splits == _reference(rows, ratios, seed)  # the documented algorithm, in plain Python
    counts = _rows_per_split(rows, splits)
    for name, share in ratios.items():  # no split exceeds its target by a whole group
        assert counts[name] < share * len(rows) + max(sizes)
    if len(sizes) >= len(ratios):
        assert all(splits[name] for name in ratios)


@settings(max_examples=50, deadline=None)
@given(
    sizes=sizes_strategy,
    ratios=ratios_strategy,
    seed=st.integers(0, 1000),
    fixed=st.dictionaries(st.integers(0, 29), st.sampled_from(["train", "test", "extra"]), max_size=8),
)
def test_explicit_split_property(
    sizes: list[int], ratios: dict[str, float], seed: int, fixed: dict[int, str]
) -> None:
    fixed = {g: s for g, s in fixed.items() if g < len(sizes)}
    rows = _catalogue(sizes, explicit=fixed)
    splits = make_splits(rows, ratios, seed=seed)
    carved = carved_groups(rows, splits)
    carved_ids = {g for gids in carved.values() for g in gids}
    for g, name in fixed.items():  # fixed groups stay, except train groups carved into an empty split
        gid = f"g{g:02d}"
        assert gid in splits[name] or (name == "train" and gid in carved_ids)
    named = set(fixed.values())
    assert all(name != "train" and name not in named for name in carved)  # only into splits no row names
    listed = [g for gids in splits.values() for g in gids]
    assert sorted(listed) == sorted(set(rows["group"]))
    shuffled = rows.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    assert make_splits(shuffled, ratios, seed=seed) == splits


# --- predefined splits: val carved from train --------------------------------------------------------


def _fixed_catalogue(train: list[int], test: list[int]) -> pd.DataFrame:
    """Every row fixed: groups t00.. (sizes ``train``) say train, groups x00.. (sizes ``test``) say test."""
    records = []
    for prefix, name, sizes in (("t", "train", train), ("x", "test", test)):
        for g, size in enumerate(sizes):
            for k in range(size):
                records.append(
                    {"file_name": f"{prefix}{g}_{k}.png", "group": f"{prefix}{g:02d}", "split": name}
                )
    frame = pd.DataFrame(records)
    frame.insert(0, "row", range(1, len(frame) + 1))
    return frame


@pytest.mark.parametrize("seed", range(4))
def test_train_test_rows_get_val_carved_from_train(seed: int) -> None:
    rows = _fixed_catalogue(train=[2] * 10, test=[2] * 3)
    splits = make_splits(rows, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=seed)
    # val's share of train + val is 0.1 / 0.9: 20 * 0.111 = 2.2 rows, so exactly one 2-row group fits
    assert len(splits["val"]) == 1 and len(splits["train"]) == 9
    assert splits["test"] == ["x00", "x01", "x02"]  # the fixed test split is untouched
    assert sorted(splits["train"] + splits["val"]) == [f"t{g:02d}" for g in range(10)]
    assert carved_groups(rows, splits) == {"val": splits["val"]}
    assert (
        make_splits(
            rows.sample(frac=1.0, random_state=seed), {"train": 0.8, "val": 0.1, "test": 0.1}, seed=seed
        )
        == splits
    )
    # the carve is seeded: the 10 candidate groups are not always the same one
    picks = {make_splits(rows, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=s)["val"][0] for s in range(12)}
    assert len(picks) > 1


def test_train_only_rows_split_like_rows_without_a_split_column() -> None:
    rows = _fixed_catalogue(train=[1, 2, 3, 1, 2, 3, 1, 2, 3, 4, 1, 1], test=[])
    ratios = {"train": 0.7, "val": 0.15, "test": 0.15}
    for seed in range(5):
        carved = make_splits(rows, ratios, seed=seed)
        free = make_splits(rows.drop(columns="split"), ratios, seed=seed)
        assert carved == free  # same shares, same generator, same sorted groups
        assert set(carved_groups(rows, carved)) == {"val", "test"}


def test_carving_needs_two_train_groups_and_test_only_rows_carve_nothing() -> None:
    one = _fixed_catalogue(train=[5], test=[2, 2])
    splits = make_splits(one, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=0)
    assert splits == {"test": ["x00", "x01"], "train": ["t00"], "val": []}
    test_only = _fixed_catalogue(train=[], test=[2, 2, 2])
    assert make_splits(test_only, {"train": 0.8, "val": 0.2}, seed=0) == {
        "test": ["x00", "x01", "x02"],
        "train": [],
        "val": [],
    }


# --- minimum groups per held-out split ---------------------------------------------------------------


def test_eighty_images_of_ten_products_get_more_than_one_group_per_held_out_split() -> None:
    rows = _catalogue([8] * 10)  # the catalogue: 80 photos of 10 products, split 0.8/0.1/0.1
    ratios = {"train": 0.8, "val": 0.1, "test": 0.1}
    plain = make_splits(rows, ratios, seed=0)
    assert [len(plain[n]) for n in ("train", "val", "test")] == [8, 1, 1]  # degenerate: 1 product each
    raised = make_splits(rows, ratios, seed=0, min_groups=5)
    # m = min(5, 10 // (2 * 2)) = 2: val and test get 2 groups each, train keeps 6 (at least half)
    assert [len(raised[n]) for n in ("train", "val", "test")] == [6, 2, 2]
    assert set(plain["val"]) <= set(raised["val"]) and set(plain["test"]) <= set(raised["test"])


def test_min_groups_golden_and_never_shrinks() -> None:
    rows = _catalogue([1] * 20)  # 20 singletons at 0.7/0.15/0.15: 3 + 3 groups held out by ratio alone
    ratios = {"train": 0.7, "val": 0.15, "test": 0.15}
    raised = make_splits(rows, ratios, seed=0, min_groups=5)
    # m = min(5, 20 // 4) = 5; each takes train's smallest ids (all size 1) in sorted order
    assert [len(raised[n]) for n in ("train", "val", "test")] == [10, 5, 5]
    plain = make_splits(rows, ratios, seed=0)
    assert set(plain["test"]) <= set(raised["test"]) and set(plain["val"]) <= set(raised["val"])
    rows = _catalogue([1] * 40)  # 6 + 6 held out already: nothing moves
    assert make_splits(rows, ratios, seed=0, min_groups=5) == make_splits(rows, ratios, seed=0)


@settings(max_examples=50, deadline=None)
@given(sizes=sizes_strategy, ratios=ratios_strategy, seed=st.integers(0, 1000), m=st.integers(1, 6))
def test_min_groups_property(sizes: list[int], ratios: dict[str, float], seed: int, m: int) -> None:
    rows = _catalogue(sizes)
    splits = make_splits(rows, ratios, seed=seed, min_groups=m)
    held_out = [n for n in ratios if n != "train"]
    want = min(m, len(sizes) // (2 * len(held_out)))
    assert all(len(splits[n]) >= want for n in held_out)
    assert sorted(g for gids in splits.values() for g in gids) == sorted(set(rows["group"]))
    plain = make_splits(rows, ratios, seed=seed)
    if len(plain["train"]) >= len(sizes) / 2:  # moving groups never takes train below half of them
        assert len(splits["train"]) >= len(sizes) / 2


# --- edges that `make mutation MUTATE=splits` found unstated (docs/reliability.md) -------------------------


def test_a_non_default_group_column_is_used_everywhere() -> None:
    # groups named by "product"; the "group" column, present too, must be ignored by every function
    rows = pd.DataFrame(
        {
            "file_name": [f"{i}.png" for i in range(8)],
            "product": list("aabbccdd"),
            "group": list("wxyzwxyz"),
            "split": ["train", "train", "train", "train", "test", "test", "train", "train"],
        }
    )
    splits = make_splits(rows, {"train": 0.5, "val": 0.25, "test": 0.25}, seed=0, group_column="product")
    assert sorted(g for gids in splits.values() for g in gids) == ["a", "b", "c", "d"]
    labels = assign_rows(rows, splits, group_column="product")
    assert labels.name == "split"
    assert labels.tolist() == [name for p in rows["product"] for name, gids in splits.items() if p in gids]
    # every row is fixed to train or test: val is carved from train's groups a, b, d
    assert splits["test"] == ["c"] and len(splits["val"]) == 1 and splits["val"][0] in "abd"
    assert carved_groups(rows, splits, group_column="product") == {"val": splits["val"]}
    assert group_ids(rows, "product").name == group_ids(rows.drop(columns="group")).name == "group_id"


def test_missing_stratify_column_names_the_columns() -> None:
    rows = _catalogue([1, 1, 2])
    with pytest.raises(ValueError) as info:
        make_splits(rows, {"train": 0.5, "test": 0.5}, seed=0, stratify="colour")
    columns = ", ".join(rows.columns)
    assert str(info.value) == f"stratify column 'colour' not found (columns: {columns})"


def test_min_groups_needs_a_train_split_and_leaves_zero_ratio_splits_empty() -> None:
    rows = _catalogue([1] * 20)
    # no train split: nothing can be moved, the ratio split stands
    no_train = {"val": 0.9, "test": 0.1}
    assert make_splits(rows, no_train, seed=0, min_groups=3) == make_splits(rows, no_train, seed=0)
    # a held-out split with ratio 0 is not held out: it stays empty, the others reach the minimum
    ratios = {"train": 0.9, "val": 0.1, "test": 0.0}
    splits = make_splits(rows, ratios, seed=0, min_groups=4)
    assert splits["test"] == [] and len(splits["val"]) == 4 and len(splits["train"]) == 16
    assert len(make_splits(rows, ratios, seed=0)["val"]) == 2  # the default min_groups=0: ratios alone


def test_two_train_groups_are_enough_to_carve() -> None:
    two = _fixed_catalogue(train=[5, 3], test=[2])
    splits = make_splits(two, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=0)
    assert splits["test"] == ["x00"] and len(splits["train"]) == 1 and len(splits["val"]) == 1
    assert sorted(splits["train"] + splits["val"]) == ["t00", "t01"]
    assert carved_groups(two, splits) == {"val": splits["val"]}


def test_min_groups_moves_the_smallest_group_before_the_smallest_id() -> None:
    # g00 has 3 rows, every other group 1: raising val/test takes the one-row groups, never g00
    rows = _catalogue([3] + [1] * 19)
    raised = make_splits(rows, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=0, min_groups=5)
    assert [len(raised[n]) for n in ("train", "val", "test")] == [10, 5, 5]
    assert make_splits(rows, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=0)["train"][0] == "g00"
    assert raised["train"][0] == "g00"  # in train by ratio, and it stays there


def test_a_groups_stratum_is_its_most_frequent_value() -> None:
    # group a: red twice, blue once -> red; group b: blue twice, red once -> blue; c: a tie -> the smaller y
    table = pd.DataFrame(
        {"gid": list("aaabbbcc"), "stratum": ["red", "red", "blue", "blue", "blue", "red", "z", "y"]}
    )
    assert _strata(table) == {"blue": ["b"], "red": ["a"], "y": ["c"]}


def test_saved_splits_are_one_id_per_line_sorted(tmp_path: Path) -> None:
    path = save_splits({"val": ["b", "a"], "train": ["c"]}, tmp_path / "s.json")
    assert path.read_text() == '{\n "train": [\n  "c"\n ],\n "val": [\n  "a",\n  "b"\n ]\n}\n'


def test_min_groups_after_carving_counts_trains_groups_before_the_carve() -> None:
    # every row fixed to train (20 groups) or test: val is carved from train with 0.1 / 0.9 of its rows
    # (2 groups), then step 7 raises it to min(4, 20 // 2) = 4 groups, all from train's former groups
    rows = _fixed_catalogue(train=[1] * 20, test=[1] * 3)
    ratios = {"train": 0.8, "val": 0.1, "test": 0.1}
    assert len(make_splits(rows, ratios, seed=0)["val"]) == 2
    raised = make_splits(rows, ratios, seed=0, min_groups=4)
    assert len(raised["val"]) == 4 and len(raised["train"]) == 16 and len(raised["test"]) == 3
    assert all(g.startswith("t") for g in raised["val"])
    assert carved_groups(rows, raised) == {"val": raised["val"]}


def test_a_fixed_group_may_carry_several_stratify_values() -> None:
    # Fixing a group to a split is about the split column alone: g00's rows are red and blue (and g01's
    # first row names test, its others nothing), which is no conflict of explicit splits.
    rows = _catalogue([2, 2, 2, 2], explicit={0: "test", 1: "test"})
    rows.loc[rows["group"] == "g00", "split"] = "test"  # every row of g00 names it
    rows["colour"] = ["red", "blue", "red", None, "red", "red", "blue", "blue"]
    splits = make_splits(rows, {"train": 0.5, "test": 0.5}, seed=0, stratify="colour")
    assert splits["test"][:2] == ["g00", "g01"] and sorted(sum(splits.values(), [])) == [
        "g00",
        "g01",
        "g02",
        "g03",
    ]


def test_rows_without_a_stratify_value_form_the_first_stratum() -> None:
    # Rows without a value are a stratum of their own, named "" and so drawn before every value: the
    # splits are those of the same rows with the missing values written as "!" (which sorts before "A").
    # Which stratum is drawn first matters: the seeded generator shuffles the strata one after another.
    rows = _catalogue([1] * 24)
    values = ["A", None, "Z"] * 8
    rows["colour"] = values
    named = rows.assign(colour=["!" if v is None else v for v in values])
    ratios = {"train": 0.5, "val": 0.25, "test": 0.25}
    differ = 0
    for seed in range(6):
        got = make_splits(rows, ratios, seed=seed, stratify="colour")
        assert got == make_splits(named, ratios, seed=seed, stratify="colour"), seed
        # drawn after "A" (as a stratum named "XXXX" would be), the same seed splits otherwise
        late = rows.assign(colour=["X" if v is None else v for v in values])
        differ += got != make_splits(late, ratios, seed=seed, stratify="colour")
        # each stratum of 8 groups still gets 4/2/2: the missing values were split, not dropped
        missing = {f"g{i:02d}" for i, v in enumerate(values) if v is None}
        assert [len(missing & set(got[n])) for n in ("train", "val", "test")] == [4, 2, 2], seed
    assert differ > 0
    # a tie between no value and a value goes to no value (it sorts first): g00 is (None, "A")
    rows = _catalogue([2, 2])
    rows["colour"] = [None, "A", "A", "A"]
    assert _strata(pd.DataFrame({"gid": rows["group"], "stratum": rows["colour"].fillna("")})) == {
        "": ["g00"],
        "A": ["g01"],
    }


def test_assign_rows_names_the_index_when_rows_have_no_row_column() -> None:
    rows = _catalogue([2, 1, 3]).drop(columns="row")
    rows.index = [10, 11, 12, 13, 14, 15]
    with pytest.raises(ValueError, match=r"^index 12: group 'g01' is in no split; were the splits made"):
        assign_rows(rows, {"train": ["g00", "g02"]})


def test_min_groups_takes_from_a_surplus_held_out_split_before_train_drops_below_half() -> None:
    # Found by test_min_groups_property: 8 single-row groups at 0.5/0.125/0.375 give train 4, val 1, test 3;
    # val's second group must come from test's surplus, since a train group would leave train 3 of 8.
    rows = _catalogue([1] * 8)
    ratios = {"train": 0.5, "val": 0.125, "test": 0.375}
    plain = make_splits(rows, ratios, seed=0)
    assert [len(plain[n]) for n in ("train", "val", "test")] == [4, 1, 3]
    splits = make_splits(rows, ratios, seed=0, min_groups=2)
    assert [len(splits[n]) for n in ("train", "val", "test")] == [4, 2, 2]
    assert sorted(splits["train"]) == sorted(plain["train"])
    moved = set(splits["val"]) - set(plain["val"])
    assert len(moved) == 1 and moved <= set(plain["test"])
