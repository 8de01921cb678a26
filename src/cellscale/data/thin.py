"""Binomial thinning: a dataset as it would look sequenced to a fraction of its depth.

Every count c of ``counts.npy`` becomes Binomial(c, fraction): each captured molecule is kept
independently with probability ``fraction``, which is what sequencing fewer reads of the same
library does to UMI counts (the measurement-noise axis of Gowri et al. 2025). Values are then
normalised + log1p exactly as ``build.py`` does, with the parent's ``target_sum``.

The library size is the total over ALL genes, not just the V kept ones, so it is thinned too,
and exactly: the kept genes' thinned counts are summed, and the other genes' total
(library - kept-gene sum) is thinned as ONE binomial. A sum of independent Binomial(n_g, f) is
Binomial(sum n_g, f), so this has the distribution of thinning every unseen gene and adding
them up, without the genes themselves.

Cells, genes, splits, obs and the evaluation mask (seed, V, D) are the parent's; only counts,
values, library size and the gene-mean baseline change. The result is a new dataset dir written
atomically by ``DatasetWriter``, its manifest the parent's plus ``depth_fraction`` and
``thinning``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from cellscale.config import ConfigError, config_hash
from cellscale.data.build import EVAL_MASK_PROB, _Steps, gene_mean_baselines
from cellscale.data.mask import seed_sequence
from cellscale.data.preprocess import normalize_log1p
from cellscale.data.store import Dataset, DatasetWriter, _read_manifest, check_target, target_state
from cellscale.errors import DataError

__all__ = ["thin_dataset", "thin_counts", "is_thinned_from", "check_thinnable", "THIN_CHUNK"]

# rows per generator: fixed, so the thinned value of a cell depends on (seed, fraction, its
# chunk) only, never on how many cells the dataset holds or how the work is split
THIN_CHUNK = 4096
# manifest keys the writer sets itself on commit
_COMMIT_KEYS = ("format", "format_version", "files", "checksums", "cellscale_version", "created")


def _check_fraction(fraction: Any) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.integer, np.floating)):
        raise ConfigError(f"--fraction must be a number in (0, 1], got {fraction!r}")
    f = float(fraction)
    if not math.isfinite(f) or not 0.0 < f <= 1.0:
        raise ConfigError(f"--fraction must be in (0, 1] (the share of the reads kept), got {fraction!r}")
    return f


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or int(seed) < 0:
        raise ConfigError(f"--seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def check_thinnable(ds: Dataset) -> None:
    """Refuse (DataError, saying why) a dataset without raw counts to thin."""
    if ds.counts is not None:
        return
    m = ds.manifest
    src = m.get("source") if isinstance(m.get("source"), dict) else {}
    sim = ((m.get("config") or {}).get("simulate") or {}) if isinstance(m.get("config"), dict) else {}
    if src.get("mode") == "gaussian" or sim.get("mode") == "gaussian":
        why = "it was simulated in gaussian mode, whose values are log-scale numbers, not counts"
    elif (m.get("preprocessing") or {}).get("normalized_input"):
        why = "it was built from normalised input (--normalized), which keeps no counts"
    else:
        why = "it has no counts.npy"
    raise DataError(f"cannot thin {ds.path}: {why}; binomial thinning needs a dataset built from raw counts")


def _check_out(out: Path, parent: Path) -> None:
    parent = parent.resolve()
    target = out.resolve()
    if target == parent or parent in target.parents:
        raise DataError(f"--out {out} is the dataset being thinned (or inside it): choose another --out")
    if target in parent.parents:  # --overwrite would replace the parent with its own thinning
        raise DataError(f"--out {out} holds the dataset being thinned: choose another --out")


def _fraction_key(fraction: float) -> str:
    """The fraction as the string that seeds its generators (repr: exact and stable)."""
    return repr(float(fraction))


def thin_counts(counts: np.ndarray, library_size: np.ndarray, *, fraction: float, seed: int,
                chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Thin one row chunk: ``(kept-gene counts int64, library size over all genes float64)``.

    ``chunk`` is the chunk's index; its generator is ``seed_sequence(seed, "thin", fraction, chunk)``.
    Kept genes are thinned one by one; the rest of the library (library - kept sum) as one
    binomial, exact in distribution."""
    rng = np.random.default_rng(seed_sequence(seed, "thin", _fraction_key(fraction), chunk))
    n = np.asarray(counts)
    n = np.rint(n).astype(np.int64) if n.dtype.kind == "f" else n.astype(np.int64)
    kept = rng.binomial(n, fraction)
    # the unseen genes' total; a library below the kept sum (inconsistent input) counts as 0
    rest = np.rint(np.asarray(library_size, dtype=np.float64) - n.sum(axis=1)).clip(min=0).astype(np.int64)
    lib = kept.sum(axis=1) + rng.binomial(rest, fraction)
    return kept, lib.astype(np.float64)


def _same_thinning(manifest: dict[str, Any], fraction: float, seed: int, parent_checksum: str | None) -> bool:
    t = manifest.get("thinning") if isinstance(manifest.get("thinning"), dict) else {}
    return (t.get("fraction") == fraction and t.get("seed") == seed
            and parent_checksum is not None and t.get("parent_checksum") == parent_checksum)


def is_thinned_from(path: str | os.PathLike, parent: Dataset, *, fraction: float, seed: int) -> bool:
    """True when ``path`` holds a dataset thinned from ``parent`` (its values checksum) with
    this fraction and seed, i.e. what ``thin_dataset`` would write there (files not verified)."""
    parent_checksum = (parent.manifest.get("checksums") or {}).get("values.npy")
    return _same_thinning(_read_manifest(Path(path)) or {}, float(fraction), int(seed), parent_checksum)


def thin_dataset(
    ds: Dataset | str | os.PathLike,
    *,
    fraction: float,
    seed: int = 0,
    out: str | os.PathLike,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write ``out``: ``ds`` with every count binomially thinned to ``fraction`` of its depth.

    ``fraction`` in (0, 1]; 1.0 copies counts, values and library size byte for byte. An
    existing dataset at ``out`` thinned from the same parent (values checksum) with the same
    fraction and seed is reused as it is; anything else at ``out`` is refused unless
    ``overwrite``. A dataset without counts (normalised input, the gaussian simulator) is a
    DataError; so is an ``out`` that is the parent or lies inside it.
    """
    fraction, seed = _check_fraction(fraction), _check_seed(seed)
    parent = ds if isinstance(ds, Dataset) else Dataset.open(ds, verify="full")
    check_thinnable(parent)
    out = Path(out).absolute()
    _check_out(out, parent.path)
    parent_checksum = (parent.manifest.get("checksums") or {}).get("values.npy")
    if not overwrite and target_state(out) == "dataset" and is_thinned_from(out, parent, fraction=fraction, seed=seed):
        Dataset.open(out, verify="quick")
        return out
    check_target(out, overwrite=overwrite)
    with _Steps(progress) as steps, DatasetWriter(out, overwrite=overwrite) as w:
        n_zero = _write_arrays(parent, w, fraction=fraction, seed=seed, steps=steps)
        values = np.load(w.tmp / "values.npy", mmap_mode="r")
        with steps.step("gene-mean baseline under the evaluation mask"):
            baseline = gene_mean_baselines(values, parent.splits, eval_mask_seed=parent.eval_mask_seed,
                                           mask_prob=float(parent.manifest.get("mask_prob", EVAL_MASK_PROB)))
        del values
        manifest = _manifest(parent, fraction=fraction, seed=seed, parent_checksum=parent_checksum,
                             baseline=baseline, n_zero=n_zero)
        with steps.step("checksums and atomic rename"):
            return w.commit(manifest)


def _write_arrays(parent: Dataset, w: DatasetWriter, *, fraction: float, seed: int, steps: _Steps) -> int:
    """Fill the writer's arrays; return the number of cells thinned to an empty library."""
    # splits and obs are the parent's files, so "same cells, same splits" holds to the byte
    for name in ("splits.npz", "obs.parquet"):
        w.copy_file(name, parent.path / name)
    if fraction == 1.0:  # Binomial(c, 1) = c: the parent's arrays, copied rather than redrawn
        for name in ("values.npy", "counts.npy", "library_size.npy"):
            w.copy_file(name, parent.path / name)
        return int((parent.library_size <= 0).sum())
    D, V = parent.n_cells, parent.n_genes
    src_counts, src_lib = parent.counts, parent.library_size
    values = w.array("values.npy", (D, V), parent.values.dtype)
    counts = w.array("counts.npy", (D, V), src_counts.dtype)
    lib = np.empty(D, dtype=np.float64)
    n_chunks = math.ceil(D / THIN_CHUNK)
    with steps.step(f"thinning counts to {fraction:g} of the depth", total=n_chunks) as advance:
        for k in range(n_chunks):
            rows = slice(k * THIN_CHUNK, min((k + 1) * THIN_CHUNK, D))
            kept, lib[rows] = thin_counts(src_counts[rows], src_lib[rows], fraction=fraction, seed=seed, chunk=k)
            counts[rows] = kept
            # a cell thinned to nothing has all-zero counts: dividing by 1 keeps its values 0
            values[rows] = normalize_log1p(kept, np.where(lib[rows] > 0, lib[rows], 1.0), target_sum=parent.target_sum)
            advance()
    w.save("library_size.npy", lib)
    del values, counts
    return int((lib <= 0).sum())


def _manifest(parent: Dataset, *, fraction: float, seed: int, parent_checksum: str | None,
              baseline: dict[str, float], n_zero: int) -> dict[str, Any]:
    pm = parent.manifest
    parent_depth = float(pm.get("depth_fraction", 1.0))
    thinning = {
        "fraction": fraction,
        "seed": seed,
        "parent_checksum": parent_checksum,
        "parent_path": str(parent.path.resolve()),
        "parent_depth_fraction": parent_depth,
        "chunk_rows": THIN_CHUNK,
        "library_size": "thinned kept-gene counts + Binomial(parent library size - parent kept-gene sum, fraction)",
        "n_cells_empty_library": n_zero,
    }
    return {
        **{k: v for k, v in pm.items() if k not in _COMMIT_KEYS},
        "depth_fraction": fraction * parent_depth,
        "thinning": thinning,
        "baselines": {"gene_mean": baseline},
        # not the parent's: `data build` must never take this dataset for the one its config builds
        "config_hash": config_hash({"thinned_from": pm.get("config_hash"), "fraction": fraction, "seed": seed,
                                    "parent_checksum": parent_checksum}),
    }
