"""Exact, seeded, disjoint train/val/test splits with nested training subsets."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cellscale.data.mask import seed_sequence
from cellscale.errors import DataError

__all__ = ["make_splits", "split_sizes"]

SPLITS = ("train", "val", "test")


def split_sizes(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """Exact sizes: val and test are rounded, train takes the rest; each must be >= 1."""
    if len(fractions) != 3:
        raise DataError(f"split needs 3 fractions (train, val, test), got {len(fractions)}")
    n_val = int(round(n * fractions[1]))
    n_test = int(round(n * fractions[2]))
    n_val, n_test = max(n_val, 1), max(n_test, 1)
    n_train = n - n_val - n_test
    if n_train < 1:
        raise DataError(f"{n} cells are too few for a train/val/test split: use more cells")
    return n_train, n_val, n_test


def make_splits(
    n: int,
    *,
    fractions: Sequence[float] = (0.9, 0.05, 0.05),
    seed: int = 0,
    groups: Sequence | np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Split ``n`` cells into disjoint int64 index arrays ``train``, ``val``, ``test``.

    ``train`` is in one fixed seeded permutation order, so ``train[:N]`` is the nested
    training subset of size N; ``val`` and ``test`` are sorted. Without ``groups`` the sizes
    are exact (``split_sizes``). With ``groups`` (one label per cell) every group lies
    wholly in one split; groups are assigned greedily (largest first, seeded tie-break) to
    the split furthest below its target size, so the fractions are met approximately.
    """
    n = int(n)
    if groups is None:
        n_train, n_val, n_test = split_sizes(n, fractions)
        perm = np.random.default_rng(seed_sequence(seed, "split")).permutation(n).astype(np.int64)
        val = np.sort(perm[:n_val])
        test = np.sort(perm[n_val : n_val + n_test])
        train = perm[n_val + n_test :]
        return {"train": train, "val": val, "test": test}

    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise DataError(f"split groups: expected {n} labels, got shape {groups.shape}")
    labels, codes = np.unique(groups.astype(str), return_inverse=True)
    if labels.size < 3:
        raise DataError(
            f"a group-held-out split needs at least 3 groups, found {labels.size}: "
            "use another split_by column or none"
        )
    rng = np.random.default_rng(seed_sequence(seed, "group-split"))
    sizes = np.bincount(codes, minlength=labels.size)
    tiebreak = rng.permutation(labels.size)
    order = np.lexsort((tiebreak, -sizes))  # largest first, seeded tie-break
    targets = np.asarray(fractions, dtype=float) * n
    current = np.zeros(3)
    assign = np.empty(labels.size, dtype=np.int64)
    for g in order:
        k = int(np.argmax(targets - current))
        assign[g] = k
        current[k] += sizes[g]
    # every split needs at least one group: move the smallest group of the largest split
    for k in (1, 2, 0):
        if not np.any(assign == k):
            donors = [j for j in range(3) if np.sum(assign == j) > 1]
            j = max(donors, key=lambda d: current[d])
            members = np.flatnonzero(assign == j)
            g = members[np.argmin(sizes[members])]
            assign[g] = k
            current[j] -= sizes[g]
            current[k] += sizes[g]
    cell_split = assign[codes]
    val = np.flatnonzero(cell_split == 1).astype(np.int64)
    test = np.flatnonzero(cell_split == 2).astype(np.int64)
    train_sorted = np.flatnonzero(cell_split == 0).astype(np.int64)
    perm = np.random.default_rng(seed_sequence(seed, "split")).permutation(train_sorted.size)
    return {"train": train_sorted[perm], "val": val, "test": test}
