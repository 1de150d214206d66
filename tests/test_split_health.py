"""Split health: the counts behind "these metrics cannot tell models apart", checked by hand and by oracle."""

from __future__ import annotations

import math
from fractions import Fraction

import pandas as pd
import pytest

from cliptune.data.split_health import (
    MIN_GROUPS,
    SplitError,
    check_trainable,
    judge_eval,
    judge_rows,
    judge_split,
    suggest_split,
)


def _exact_random_mrr(groups: int, per_group: int) -> float:
    """Expected 1 / rank of the first relevant item under a uniformly random ranking (exact fractions).

    n = per_group relevant among N = groups * per_group: P(first relevant at k) = C(N - k, n - 1) / C(N, n).
    """
    n, total = per_group, groups * per_group
    return float(
        sum(Fraction(math.comb(total - k, n - 1), math.comb(total, n)) / k for k in range(1, total - n + 2))
    )


def _groups(sizes: list[int]) -> list[set[str]]:
    """Per query (one per item), the items of its group: group g has sizes[g] items."""
    sets = [{f"g{g}_{i}" for i in range(size)} for g, size in enumerate(sizes)]
    return [s for s, size in zip(sets, sizes, strict=True) for _ in range(size)]


def test_one_group_is_called_out_in_the_issue_sentence() -> None:
    health = judge_split("val", _groups([8]), gallery=8)
    assert health.classes == 1 and health.mostly_relevant == 1.0 and health.chance_mrr == 1.0
    assert health.warning == (
        "val has 1 group: every item is relevant to every query; these metrics cannot tell models apart"
    )


def test_chance_mrr_matches_an_exact_random_ranking() -> None:
    # ln(g) / (g - 1) is the many-items limit; 400 items per group is close to it
    for g in (2, 3, 5, 10):
        assert _exact_random_mrr(g, 400) == pytest.approx(math.log(g) / (g - 1), abs=0.005)
    # 3 groups: ln 3 / 2 = 0.549 -> "about 0.55" in the warning
    health = judge_split("test", _groups([4, 4, 4]), gallery=12)
    assert health.chance_mrr == pytest.approx(math.log(3) / 2)
    assert health.warning == (
        "test has 3 groups (fewer than 5): a random ranking already scores MRR about 0.55; these metrics "
        "can hardly tell models apart"
    )


def test_five_even_groups_pass_and_one_dominant_group_does_not() -> None:
    assert judge_split("test", _groups([3] * MIN_GROUPS), gallery=3 * MIN_GROUPS).warning is None
    # 91 items in one group and 9 singletons: 91 of 100 queries find 91% of the gallery relevant
    health = judge_split("test", _groups([91] + [1] * 9), gallery=100)
    assert health.classes == 10 and health.mostly_relevant == pytest.approx(0.91)
    assert health.warning is not None and "91% of queries find most items relevant" in health.warning


def test_judge_rows_by_group_and_by_item() -> None:
    # 2 products x 4 photos, two captions for the first photo: 9 caption queries over 8 images
    rows = pd.DataFrame(
        {
            "file_name": ["a0", "a0", "a1", "a2", "a3", "b0", "b1", "b2", "b3"],
            "group": ["a"] * 5 + ["b"] * 4,
            "split": ["test"] * 9,
        }
    )
    by_group = judge_rows(rows, "test", "group")
    assert (by_group.classes, by_group.queries, by_group.gallery) == (2, 9, 8)
    assert by_group.warning is not None and "test has 2 groups" in by_group.warning
    by_item = judge_rows(rows, "test", "item")
    assert by_item.classes == 8 and by_item.warning is None  # each image is its own class


def test_judge_eval_reads_the_eval_json() -> None:
    result = {
        "split": "val",
        "relevant": "group",
        "n_images": 3,
        "per_query": {"t2i": {"relevant": [["x", "y", "z"]] * 3}},
    }
    health = judge_eval(result)
    assert health is not None and health.classes == 1 and health.warning is not None
    assert judge_eval({"per_query": {}}) is None


def test_suggestions_follow_the_group_count() -> None:
    # 30 groups, 2 held-out splits: ceil(100 * 5 / 30) / 100 = 0.17 each, train 1 - 0.34 = 0.66
    assert suggest_split(30, ["val", "test"]) == (
        "with 30 groups, data.split.ratios {train: 0.66, val: 0.17, test: 0.17} gives val and test 5 groups each"
    )
    # 10 groups: 2 x 5 x 2 = 20 needed for two held-out splits; one of 5 fits (train keeps 5)
    ten = suggest_split(10, ["val", "test"])
    assert "only one held-out split of 5 groups fits" in ten and "{train: 0.5, test: 0.5}" in ten
    assert "eval.relevant: item" in suggest_split(8, ["val", "test"], n_images=64)
    assert "fixed by the catalogue's split column" in suggest_split(30, ["val", "test"], fixed="test")


def test_check_trainable_names_the_fix() -> None:
    with pytest.raises(SplitError, match="the train split has no rows") as info:
        check_trainable({"train": [], "val": [], "test": ["x"]}, {"train": 0.8, "val": 0.2}, "metadata.csv")
    assert info.value.split == "train" and info.value.counts == {"test": 1, "train": 0, "val": 0}
    with pytest.raises(SplitError, match="drop 'val' from data.split.ratios") as info:
        check_trainable(
            {"train": ["a"], "val": [], "test": ["x"]}, {"train": 0.9, "val": 0.1}, "metadata.csv"
        )
    assert info.value.split == "val"
    check_trainable({"train": ["a"], "test": ["x"]}, {"train": 0.8, "test": 0.2})  # no val asked: fine
