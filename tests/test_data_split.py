import numpy as np
import pytest

from cellscale.data.split import make_splits, split_sizes
from cellscale.errors import DataError


def _check_partition(s, n):
    allidx = np.concatenate([s["train"], s["val"], s["test"]])
    assert allidx.size == n
    assert np.array_equal(np.sort(allidx), np.arange(n))  # disjoint and complete


# (val, test, train) worked out by hand: 5% rounded half-to-even, at least one cell each
@pytest.mark.parametrize("n, sizes", [(3, (1, 1, 1)), (20, (1, 1, 18)), (101, (5, 5, 91)),
                                      (1000, (50, 50, 900)), (12345, (617, 617, 11111))])
def test_disjoint_and_exact_sizes(n, sizes):
    s = make_splits(n, fractions=(0.9, 0.05, 0.05), seed=0)
    _check_partition(s, n)
    assert (s["val"].size, s["test"].size, s["train"].size) == sizes
    assert split_sizes(n, (0.9, 0.05, 0.05)) == (sizes[2], sizes[0], sizes[1])


def test_exact_sizes_1000():
    s = make_splits(1000, fractions=(0.9, 0.05, 0.05), seed=3)
    assert (s["train"].size, s["val"].size, s["test"].size) == (900, 50, 50)
    s = make_splits(1000, fractions=(0.8, 0.15, 0.05), seed=3)
    assert (s["train"].size, s["val"].size, s["test"].size) == (800, 150, 50)


def test_deterministic_and_seeded():
    a = make_splits(500, seed=7)
    b = make_splits(500, seed=7)
    c = make_splits(500, seed=8)
    for k in ("train", "val", "test"):
        assert np.array_equal(a[k], b[k])
        assert a[k].dtype == np.int64
    assert not np.array_equal(a["val"], c["val"])


def test_val_test_sorted_train_permuted():
    s = make_splits(2000, seed=1)
    assert np.all(np.diff(s["val"]) > 0) and np.all(np.diff(s["test"]) > 0)
    assert not np.all(np.diff(s["train"]) > 0)  # a permutation, not sorted


def test_nested_train_subsets(tiny_dataset_dir):
    from cellscale.data.store import Dataset

    ds = Dataset.open(tiny_dataset_dir)
    prev = None
    for n in (10, 50, 100, 270):
        sub = ds.train_indices(n)
        assert sub.size == n
        if prev is not None:
            assert np.array_equal(sub[: prev.size], prev)
            assert set(prev) <= set(sub)
        prev = sub
    assert np.array_equal(ds.train_indices(), ds.splits["train"])
    with pytest.raises(DataError, match="train split has 270 cells"):
        ds.train_indices(271)


def test_too_few_cells():
    with pytest.raises(DataError, match="too few"):
        make_splits(2, seed=0)


def test_group_held_out():
    rng = np.random.default_rng(0)
    groups = rng.choice([f"d{i}" for i in range(20)], size=3000)
    s = make_splits(3000, fractions=(0.8, 0.1, 0.1), seed=0, groups=groups)
    _check_partition(s, 3000)
    seen = {}
    for name in ("train", "val", "test"):
        assert s[name].size > 0
        for g in np.unique(groups[s[name]]):
            assert g not in seen, f"group {g} in {seen.get(g)} and {name}"
            seen[g] = name
    assert abs(s["train"].size / 3000 - 0.8) < 0.1
    again = make_splits(3000, fractions=(0.8, 0.1, 0.1), seed=0, groups=groups)
    assert all(np.array_equal(s[k], again[k]) for k in s)
    assert np.all(np.diff(s["val"]) > 0)


def test_group_held_out_needs_three_groups():
    with pytest.raises(DataError, match="at least 3 groups"):
        make_splits(100, seed=0, groups=np.array(["a", "b"] * 50))


def test_group_split_three_groups_each_split_gets_one():
    groups = np.array(["a"] * 90 + ["b"] * 5 + ["c"] * 5)
    s = make_splits(100, seed=0, groups=groups)
    assert {tuple(np.unique(groups[s[k]])) for k in s} == {("a",), ("b",), ("c",)}
    assert s["train"].size == 90


def test_group_split_moves_a_group_into_an_empty_split():
    # Greedy: a (50) -> train, b (50) -> train (still furthest below 90.9), c (1) -> val; test
    # is left empty, so the smallest group of the split with most groups (train) moves there.
    groups = np.array(["a"] * 50 + ["b"] * 50 + ["c"] * 1)
    s = make_splits(101, seed=0, groups=groups)
    _check_partition(s, 101)
    assert [s[k].size for k in ("train", "val", "test")] == [50, 1, 50]
    assert set(groups[s["val"]]) == {"c"}
    assert len(set(groups[s["train"]])) == 1 and len(set(groups[s["test"]])) == 1
    assert set(groups[s["train"]]) | set(groups[s["test"]]) == {"a", "b"}
