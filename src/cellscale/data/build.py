"""Build a dataset directory from a source: QC -> subsample -> splits -> library size on ALL
genes -> HVG on train cells -> normalise + log1p -> arrays + manifest (atomic)."""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from cellscale.config import DataConfig, config_hash
from cellscale.data.preprocess import (
    drop_empty_cells,
    library_size,
    normalize_log1p,
    select_genes,
    subsample,
)
from cellscale.data.split import make_splits
from cellscale.data.store import (
    Dataset,
    DatasetWriter,
    _read_manifest,
    check_target,
    eval_mask,
    target_state,
)
from cellscale.errors import DataError

__all__ = ["build_dataset", "load_source", "gene_mean_baseline", "EVAL_MASK_PROB"]

EVAL_MASK_PROB = 0.15
_ROW_CHUNK = 8192


# --------------------------------------------------------------------------- progress
class _Steps:
    """Rich progress for the long steps (silent when disabled)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress = None

    def __enter__(self) -> "_Steps":
        if self.enabled:
            from rich.progress import (
                BarColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                SpinnerColumn(), TextColumn("[bold]data[/] {task.description}"), BarColumn(),
                TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), transient=False,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    @contextlib.contextmanager
    def step(self, description: str, total: int = 1) -> Iterator[Any]:
        if self._progress is None:
            yield lambda n=1: None
            return
        task = self._progress.add_task(description, total=total)
        yield lambda n=1: self._progress.advance(task, n)
        self._progress.update(task, completed=total)


# --------------------------------------------------------------------------- sources
def _source_fingerprint(cfg: DataConfig) -> dict[str, Any] | None:
    if cfg.source == "h5ad" and cfg.input:
        try:
            st = Path(cfg.input).stat()
        except OSError:
            return None
        return {"file_size": int(st.st_size), "file_mtime_ns": int(st.st_mtime_ns)}
    return None


def load_source(cfg: DataConfig, *, min_cells: int | None = None) -> AnnData:
    """The source's AnnData of raw counts (or normalised values when ``cfg.normalized``).

    For ``simulate``, ``min_cells`` non-empty cells are guaranteed (more are simulated)."""
    if cfg.normalized and cfg.source != "h5ad":
        raise DataError(f"--normalized applies to --source h5ad only, not '{cfg.source}': drop it")
    if cfg.source == "simulate":
        from cellscale.data.sources.simulate import simulate

        if cfg.genes > cfg.simulate.n_genes:
            raise DataError(
                f"--genes {cfg.genes} is more than the {cfg.simulate.n_genes} simulated genes: "
                f"lower --genes or raise simulate.n_genes"
            )
        need = int(min_cells or cfg.cells)
        n = need + max(16, math.ceil(0.01 * need))
        for _ in range(6):
            adata = simulate(n_cells=n, cfg=cfg.simulate, seed=cfg.seed)
            n_ok = int((np.diff(adata.X.indptr) > 0).sum())
            if n_ok >= need:
                break
            n = int(n * 1.5) + 16
        adata.uns["source"] = {"kind": "simulate", "n_simulated": int(n), "simulate": cfg.simulate.model_dump(mode="json")}
        return adata
    if cfg.source == "h5ad":
        from cellscale.data.sources.h5ad import read_counts_h5ad

        if not cfg.input:
            raise DataError("source h5ad needs an input file: pass --input PATH.h5ad")
        return read_counts_h5ad(cfg.input, layer=cfg.layer, normalized=cfg.normalized)
    if cfg.source == "census":
        try:
            from cellscale.data.sources import census

            adata = census.load_census(cfg)
        except ModuleNotFoundError as err:
            if _is_census_dependency(err):
                raise DataError(
                    f"census source is not available ({err.name or 'census module'} missing): "
                    "pip install 'cellscale[census]'"
                ) from None
            raise
        adata.uns.setdefault("source", {"kind": "census", "census": cfg.census.model_dump(mode="json")})
        return adata
    raise DataError(f"unknown data source '{cfg.source}': use simulate, h5ad or census")


def _is_census_dependency(err: ModuleNotFoundError) -> bool:
    name = err.name or ""
    return name == "" or any(k in name for k in ("census", "tiledbsoma", "somacore", "tiledb"))


# --------------------------------------------------------------------------- baseline
def gene_mean_baseline(values: np.ndarray, train: np.ndarray, split: np.ndarray, mask: np.ndarray) -> float:
    """MSE of predicting each gene's training-split mean at the masked positions of ``split``
    (sum of squared errors / number of masked positions)."""
    means = _column_means(values, train)
    sse, n = 0.0, 0
    for start in range(0, split.size, _ROW_CHUNK):
        rows = split[start : start + _ROW_CHUNK]
        m = mask[start : start + _ROW_CHUNK]
        err = np.asarray(values[rows], dtype=np.float64) - means
        sse += float(np.sum(err[m] ** 2))
        n += int(m.sum())
    return sse / n


def _column_means(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    rows = np.sort(rows)
    total = np.zeros(values.shape[1], dtype=np.float64)
    for start in range(0, rows.size, _ROW_CHUNK):
        total += np.asarray(values[rows[start : start + _ROW_CHUNK]], dtype=np.float64).sum(axis=0)
    return total / rows.size


# --------------------------------------------------------------------------- build
def build_dataset(cfg: DataConfig, *, out: str | os.PathLike, overwrite: bool = False, progress: bool = True) -> Path:
    """Build the dataset directory ``out`` from ``cfg`` and return its path.

    An existing dataset at ``out`` built from the same config (and the same input file) is
    reused as it is; anything else already at ``out`` is refused unless ``overwrite``.
    """
    out = Path(out).absolute()
    chash = config_hash(cfg)
    if not overwrite and target_state(out) == "dataset":
        m = _read_manifest(out) or {}
        if m.get("config_hash") == chash and m.get("source_fingerprint") == _source_fingerprint(cfg):
            Dataset.open(out, verify="quick")
            return out
    check_target(out, overwrite=overwrite)
    D, V = int(cfg.cells), int(cfg.genes)

    with _Steps(progress) as steps:
        with steps.step(f"loading source '{cfg.source}'"):
            adata = load_source(cfg)
        source_info = dict(adata.uns.get("source", {"kind": cfg.source}))
        normalized = bool(cfg.normalized)
        n_loaded = int(adata.n_obs)

        with steps.step("quality control"):
            adata, n_empty = drop_empty_cells(adata, normalized=normalized)
            if adata.n_vars < V:
                raise DataError(
                    f"the data has {adata.n_vars} genes but --genes is {V}: lower --genes to at most {adata.n_vars}"
                )
            if adata.n_obs < D:
                raise DataError(
                    f"only {adata.n_obs} usable cells ({n_empty} of {n_loaded} dropped with zero counts) "
                    f"but --cells is {D}: lower --cells to at most {adata.n_obs}"
                )
            keep = subsample(adata.n_obs, n_keep=D, seed=cfg.seed)
            if keep.size < adata.n_obs:
                adata = adata[keep].copy()
            adata.X = sp.csr_matrix(adata.X) if sp.issparse(adata.X) else np.asarray(adata.X)

        if cfg.split_by is not None and cfg.split_by not in adata.obs:
            raise DataError(f"split_by column '{cfg.split_by}' is not in the cell metadata: pick one of {list(adata.obs.columns)[:12]}")
        groups = adata.obs[cfg.split_by].astype(str).to_numpy() if cfg.split_by else None
        splits = make_splits(D, fractions=cfg.split, seed=cfg.seed, groups=groups)

        lib = library_size(adata, normalized=normalized)  # ALL genes, before the cut to V
        flavor = cfg.hvg_flavor
        batch_key = cfg.hvg_batch_key or (cfg.census.hvg_batch_key if cfg.source == "census" else None)
        if normalized and flavor == "seurat_v3":
            flavor = "all" if V == adata.n_vars else "variance"
        with steps.step(f"selecting {V} genes ({flavor}) on {splits['train'].size} training cells"):
            gene_idx = select_genes(
                adata, n_top_genes=V, train_idx=splits["train"], flavor=flavor,
                batch_key=batch_key, normalized=normalized, target_sum=cfg.target_sum,
            )
        genes = [str(g) for g in adata.var_names[gene_idx]]

        X = adata.X[:, gene_idx]
        n_chunks = math.ceil(D / _ROW_CHUNK)
        with DatasetWriter(out, overwrite=overwrite) as w:
            values = w.array("values.npy", (D, V), np.dtype(cfg.dtype))
            counts = None
            counts_dtype = None
            if not normalized:
                max_count = X.max() if X.shape[0] else 0
                counts_dtype = "int32" if max_count <= np.iinfo(np.int32).max else "float32"
                counts = w.array("counts.npy", (D, V), np.dtype(counts_dtype))
            with steps.step("normalising and writing arrays", total=n_chunks) as advance:
                for start in range(0, D, _ROW_CHUNK):
                    stop = min(start + _ROW_CHUNK, D)
                    block = X[start:stop]
                    block = block.toarray() if sp.issparse(block) else np.asarray(block)
                    if normalized:
                        values[start:stop] = block
                    else:
                        counts[start:stop] = block
                        values[start:stop] = normalize_log1p(block, lib[start:stop], target_sum=cfg.target_sum)
                    advance()
            w.save("library_size.npy", lib.astype(np.float64))
            w.save_splits(splits)
            w.save_obs(adata.obs)

            eval_mask_seed = int(cfg.seed)
            with steps.step("gene-mean baseline under the evaluation mask"):
                baseline = {
                    split: gene_mean_baseline(
                        values, splits["train"], splits[split],
                        eval_mask(splits[split].size, V, seed=eval_mask_seed, split=split, mask_prob=EVAL_MASK_PROB),
                    )
                    for split in ("val", "test")
                }
            shapes = {"values.npy": [D, V], "library_size.npy": [D]}
            if counts is not None:
                shapes["counts.npy"] = [D, V]
            manifest = {
                "source": source_info,
                "source_fingerprint": _source_fingerprint(cfg),
                "V": V,
                "D": D,
                "seed": int(cfg.seed),
                "preprocessing": {
                    "normalized_input": normalized,
                    "n_loaded_cells": n_loaded,
                    "n_empty_cells_dropped": int(n_empty),
                    "n_usable_cells": int(n_loaded - n_empty),
                    "subsampled": bool(n_loaded - n_empty > D),
                    "n_source_genes": int(adata.n_vars),
                    "library_size": "total over all source genes, before gene selection",
                    "target_sum": float(cfg.target_sum),
                    "transform": "log1p" if not normalized else "as given (already normalised)",
                    "hvg_flavor": flavor,
                    "hvg_batch_key": batch_key,
                    "hvg_cells": "train split",
                },
                "genes": genes,
                "split": {"fractions": list(cfg.split), "split_by": cfg.split_by, "seed": int(cfg.seed)},
                "split_sizes": {k: int(v.size) for k, v in splits.items()},
                "eval_mask_seed": eval_mask_seed,
                "mask_prob": EVAL_MASK_PROB,
                "baselines": {"gene_mean": baseline},
                "dtype": cfg.dtype,
                "counts_dtype": counts_dtype,
                "shapes": shapes,
                "config": cfg.model_dump(mode="json"),
                "config_hash": chash,
            }
            del values, counts
            with steps.step("checksums and atomic rename"):
                return w.commit(manifest)
