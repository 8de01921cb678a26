"""The one masking rule shared by the fixed evaluation mask and the training loader.

Each gene of each cell is masked independently with probability ``mask_prob``; a cell whose
draw masked no gene gets exactly one masked gene, chosen uniformly by the same generator.
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["draw_mask", "seed_sequence", "name_key"]


def name_key(name: str) -> int:
    """A stable 32-bit integer for a string (used to derive seeds from split names)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def seed_sequence(*parts: int | str) -> np.random.SeedSequence:
    """SeedSequence from a tuple of ints and strings (strings hashed with ``name_key``)."""
    entropy = [name_key(p) if isinstance(p, str) else int(p) for p in parts]
    return np.random.SeedSequence(entropy)


def draw_mask(rng: np.random.Generator, n_rows: int, n_genes: int, mask_prob: float) -> np.ndarray:
    """Bernoulli(mask_prob) bool mask of shape (n_rows, n_genes), at least one True per row."""
    mask = rng.random((n_rows, n_genes), dtype=np.float32) < np.float32(mask_prob)
    empty = np.flatnonzero(~mask.any(axis=1))
    if empty.size:
        mask[empty, rng.integers(0, n_genes, size=empty.size)] = True
    return mask
