"""Build a dataset directory from a source: QC + library size on ALL genes -> subsample to D
-> splits -> HVG on train cells -> read only the kept genes, normalise + log1p -> arrays +
manifest (atomic).

Every source is a ``CellSource`` (row-wise access: ``scan``, ``obs``, ``select_genes``,
``blocks``, ``describe``): an AnnData in memory, a large .h5ad read in row chunks, or the
CELLxGENE Census (library size = obs ``raw_sum``, HVGs Census-side, kept genes fetched in
chunks). One build path serves them all.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from cellscale.config import DataConfig, config_hash
from cellscale.data.manifest import LEAK_SHARE
from cellscale.data.preprocess import (
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
from cellscale.runtime.io import warn

__all__ = ["build_dataset", "load_source", "open_source", "AnnDataSource", "CellSource", "gene_mean_baseline",
           "gene_mean_baselines", "EVAL_MASK_PROB"]

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


def load_source(cfg: DataConfig, *, min_cells: int | None = None) -> "AnnData | CellSource":
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
        adata.uns["source"] = {**dict(adata.uns.get("source", {})), "kind": "simulate", "n_simulated": int(n),
                               "simulate": cfg.simulate.model_dump(mode="json")}
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
        if isinstance(adata, AnnData) and dict(adata.uns.get("source", {})).get("kind") != "census":
            adata.uns["source"] = {"kind": "census", "census": cfg.census.model_dump(mode="json")}
        return adata  # an AnnData, or a CellSource that reads the Census in chunks
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


def gene_mean_baselines(values: np.ndarray, splits: dict[str, np.ndarray], *, eval_mask_seed: int,
                        mask_prob: float = EVAL_MASK_PROB) -> dict[str, float]:
    """The manifest's ``baselines.gene_mean``: ``gene_mean_baseline`` on the val and test splits
    under the dataset's fixed evaluation masks (shared by build and thin)."""
    n_genes = int(values.shape[1])
    return {
        split: gene_mean_baseline(
            values, splits["train"], splits[split],
            eval_mask(splits[split].size, n_genes, seed=eval_mask_seed, split=split, mask_prob=mask_prob),
        )
        for split in ("val", "test")
    }


def _column_means(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    rows = np.sort(rows)
    total = np.zeros(values.shape[1], dtype=np.float64)
    for start in range(0, rows.size, _ROW_CHUNK):
        total += np.asarray(values[rows[start : start + _ROW_CHUNK]], dtype=np.float64).sum(axis=0)
    return total / rows.size


# --------------------------------------------------------------------------- cell sources
class CellSource(Protocol):
    """What ``build_dataset`` needs from a source; rows are source row indices (sorted).

    ``AnnDataSource`` (any in-memory AnnData: simulate, small .h5ad files), ``H5adBacked``
    (large .h5ad files, row chunks) and ``CensusSource`` (a SOMA experiment) implement it,
    so QC, subsampling, splits, normalisation, the writer and the baseline are shared."""

    n_obs: int
    n_vars: int
    var_names: list[str]
    normalized: bool

    def scan(self) -> tuple[np.ndarray, np.ndarray, float | None]:
        """(library size over ALL genes, non-empty mask, largest value or None) of every row."""

    def obs(self, rows: np.ndarray) -> pd.DataFrame:
        """Cell metadata of ``rows`` (index = cell ids)."""

    def select_genes(self, rows: np.ndarray, *, n_top_genes: int, flavor: str, batch_key: str | None,
                     target_sum: float, lib: np.ndarray) -> np.ndarray:
        """Ascending indices of the V genes, chosen on the (training) ``rows``."""

    def blocks(self, rows: np.ndarray, genes: np.ndarray) -> Iterator[np.ndarray]:
        """Dense blocks (consecutive rows of ``rows`` x ``genes``), in order."""

    def describe(self, rows: np.ndarray, genes: np.ndarray) -> dict[str, Any]:
        """The manifest's ``source`` entry for the kept rows and genes."""

    def close(self) -> None: ...


class AnnDataSource:
    """A cell source over an AnnData held in memory."""

    def __init__(self, adata: AnnData, *, normalized: bool = False) -> None:
        adata.X = sp.csr_matrix(adata.X) if sp.issparse(adata.X) else np.asarray(adata.X)
        self.adata, self.normalized = adata, normalized
        self.n_obs, self.n_vars = adata.shape
        self.var_names = [str(g) for g in adata.var_names]

    def scan(self):
        X = self.adata.X
        lib = library_size(self.adata, normalized=self.normalized)
        if self.normalized:
            nonempty = np.abs(X).sum(axis=1).A1 > 0 if sp.issparse(X) else np.abs(X).sum(axis=1) > 0
        else:
            nonempty = (np.diff(X.indptr) > 0) & (lib > 0) if sp.issparse(X) else lib > 0
        vmax = float(X.max()) if X.shape[0] and X.shape[1] else 0.0
        return lib, np.asarray(nonempty).ravel(), vmax

    def obs(self, rows):
        return self.adata.obs.iloc[np.asarray(rows)]

    def select_genes(self, rows, *, n_top_genes, flavor, batch_key, target_sum, lib):
        return select_genes(
            self.adata, n_top_genes=n_top_genes, train_idx=rows, flavor=flavor,
            batch_key=batch_key, normalized=self.normalized, target_sum=target_sum,
        )

    def blocks(self, rows, genes):
        X = self.adata.X[np.asarray(rows)][:, genes]
        for start in range(0, X.shape[0], _ROW_CHUNK):
            block = X[start : start + _ROW_CHUNK]
            yield block.toarray() if sp.issparse(block) else np.asarray(block)

    def describe(self, rows, genes):
        return dict(self.adata.uns.get("source", {}))

    def close(self) -> None:
        pass


def open_source(cfg: DataConfig) -> CellSource:
    """The cell source of ``cfg``: large .h5ad files and the Census are read in chunks."""
    if cfg.source == "h5ad" and not cfg.normalized:
        from cellscale.data.sources.h5ad import open_h5ad

        if not cfg.input:
            raise DataError("source h5ad needs an input file: pass --input PATH.h5ad")
        src = open_h5ad(cfg.input, layer=cfg.layer)
    else:
        src = load_source(cfg)
    if isinstance(src, AnnData):
        # a source may declare its values normalised (the Gaussian simulator does)
        normalized = bool(cfg.normalized or dict(src.uns.get("source", {})).get("normalized", False))
        src = AnnDataSource(src, normalized=normalized)
    return src


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
    with _Steps(progress) as steps:
        with steps.step(f"loading source '{cfg.source}'"):
            src = open_source(cfg)
        try:
            return _build(cfg, src, out=out, overwrite=overwrite, steps=steps, chash=chash)
        finally:
            src.close()


@dataclass(frozen=True)
class _Cells:
    """The kept cells: sorted source rows, their library sizes (all genes) and metadata, and
    what quality control saw."""

    rows: np.ndarray
    lib: np.ndarray
    lib_all: np.ndarray
    obs: pd.DataFrame
    n_loaded: int
    n_empty: int
    vmax: float | None


def _keep_cells(cfg: DataConfig, src: CellSource) -> _Cells:
    D, V = int(cfg.cells), int(cfg.genes)
    n_loaded = int(src.n_obs)
    lib_all, nonempty, vmax = src.scan()  # library size over ALL genes, before the cut to V
    usable = np.flatnonzero(nonempty)
    n_empty = n_loaded - usable.size
    if usable.size == 0:
        raise DataError(
            f"all {n_loaded} cells have zero counts: the matrix is empty; check the input "
            "(or the --layer you named)"
        )
    if src.n_vars < V:
        raise DataError(
            f"the data has {src.n_vars} genes but --genes is {V}: lower --genes to at most {src.n_vars}"
        )
    if usable.size < D:
        raise DataError(
            f"only {usable.size} usable cells ({n_empty} of {n_loaded} dropped with zero counts) "
            f"but --cells is {D}: lower --cells to at most {usable.size}"
        )
    rows = usable[subsample(usable.size, n_keep=D, seed=cfg.seed)]  # sorted source rows
    return _Cells(rows=rows, lib=np.asarray(lib_all[rows], dtype=np.float64), lib_all=lib_all,
                  obs=src.obs(rows), n_loaded=n_loaded, n_empty=int(n_empty), vmax=vmax)


def _split_cells(cfg: DataConfig, obs: pd.DataFrame) -> dict[str, np.ndarray]:
    if cfg.split_by is not None and cfg.split_by not in obs:
        raise DataError(f"split_by column '{cfg.split_by}' is not in the cell metadata: pick one of {list(obs.columns)[:12]}")
    groups = obs[cfg.split_by].astype(str).to_numpy() if cfg.split_by else None
    return make_splits(int(cfg.cells), fractions=cfg.split, seed=cfg.seed, groups=groups)


def _hvg_settings(cfg: DataConfig, src: CellSource) -> tuple[str, str | None]:
    """(flavor, batch key) of the gene selection; normalised input has no counts for seurat_v3."""
    flavor = cfg.hvg_flavor
    batch_key = cfg.hvg_batch_key or (cfg.census.hvg_batch_key if cfg.source == "census" else None)
    if src.normalized and flavor == "seurat_v3":
        flavor = "all" if int(cfg.genes) == src.n_vars else "variance"
    return flavor, batch_key


def _counts_dtype(src: CellSource, vmax: float | None) -> str | None:
    if src.normalized:
        return None
    return "int32" if vmax is None or vmax <= np.iinfo(np.int32).max else "float32"


def _write_blocks(cfg: DataConfig, src: CellSource, cells: _Cells, gene_idx, *, values, counts,
                  counts_dtype: str | None, advance) -> None:
    """Stream the kept genes of the kept cells into the arrays (normalised + log1p values)."""
    start = 0
    for block in src.blocks(cells.rows, gene_idx):
        stop = start + block.shape[0]
        if counts is None:
            values[start:stop] = block
        else:
            if counts_dtype == "int32" and block.size and block.max() > np.iinfo(np.int32).max:
                raise DataError("a count exceeds the int32 range: the source is not raw counts per cell")
            counts[start:stop] = block
            values[start:stop] = normalize_log1p(block, cells.lib[start:stop], target_sum=cfg.target_sum)
        advance(max(1, round(block.shape[0] / _ROW_CHUNK)))
        start = stop
    if start != int(cfg.cells):
        raise DataError(f"the source returned {start} cells instead of {cfg.cells}: rebuild (the source changed?)")


def kept_count_share(counts: np.ndarray, lib: np.ndarray) -> dict[str, float] | None:
    """The median and smallest share of a cell's counts (``lib``: over all genes) held by the kept
    genes (``counts``: cells x kept genes), read in row chunks; None without counts."""
    if counts is None or len(lib) == 0:
        return None
    share = np.empty(len(lib))
    for start in range(0, len(lib), _ROW_CHUNK):
        stop = min(start + _ROW_CHUNK, len(lib))
        share[start:stop] = np.asarray(counts[start:stop], dtype=np.float64).sum(axis=1) / np.maximum(lib[start:stop], 1)
    return {"median": float(np.median(share)), "min": float(share.min())}


def _warn_leak(share: dict[str, float] | None) -> None:
    if share is not None and share["median"] >= LEAK_SHARE:
        warn(f"the kept genes hold {100 * share['median']:.1f}% of a median cell's counts: normalised by the library "
             "size over all genes, the visible genes give away the masked genes' total, and masked reconstruction "
             "is easier than it should be (recorded in the manifest and the report; keep fewer genes than the data has)")


def _preprocessing(cfg: DataConfig, src: CellSource, cells: _Cells, source_info: dict, flavor: str,
                   batch_key: str | None, share: dict[str, float] | None = None) -> dict[str, Any]:
    normalized = bool(src.normalized)
    return {
        "kept_count_share": share,
        "normalized_input": normalized,
        "n_loaded_cells": cells.n_loaded,
        "n_empty_cells_dropped": cells.n_empty,
        "n_usable_cells": int(cells.n_loaded - cells.n_empty),
        "subsampled": bool(cells.n_loaded - cells.n_empty > int(cfg.cells)),
        "n_source_genes": int(src.n_vars),
        "library_size": source_info.get("library_size", "total over all source genes, before gene selection"),
        "target_sum": float(cfg.target_sum),
        "transform": "log1p" if not normalized else "as given (already normalised)",
        "hvg_flavor": flavor,
        "hvg_batch_key": batch_key,
        "hvg_cells": "train split",
    }


def _build(cfg: DataConfig, src: CellSource, *, out: Path, overwrite: bool, steps: _Steps, chash: str) -> Path:
    D, V = int(cfg.cells), int(cfg.genes)
    with steps.step("quality control and library sizes (all genes)"):
        cells = _keep_cells(cfg, src)
    splits = _split_cells(cfg, cells.obs)
    flavor, batch_key = _hvg_settings(cfg, src)
    with steps.step(f"selecting {V} genes ({flavor}) on {splits['train'].size} training cells"):
        gene_idx = src.select_genes(
            cells.rows[np.sort(splits["train"])], n_top_genes=V, flavor=flavor, batch_key=batch_key,
            target_sum=cfg.target_sum, lib=cells.lib_all,
        )
    genes = [str(src.var_names[g]) for g in gene_idx]
    counts_dtype = _counts_dtype(src, cells.vmax)
    with DatasetWriter(out, overwrite=overwrite) as w:
        values = w.array("values.npy", (D, V), np.dtype(cfg.dtype))
        counts = None if counts_dtype is None else w.array("counts.npy", (D, V), np.dtype(counts_dtype))
        total = math.ceil(D / _ROW_CHUNK)
        with steps.step("reading the kept genes, normalising and writing arrays", total=total) as advance:
            _write_blocks(cfg, src, cells, gene_idx, values=values, counts=counts, counts_dtype=counts_dtype,
                          advance=advance)
        w.save("library_size.npy", cells.lib)
        share = kept_count_share(counts, cells.lib)
        _warn_leak(share)
        w.save_splits(splits)
        w.save_obs(cells.obs)

        eval_mask_seed = int(cfg.seed)
        with steps.step("gene-mean baseline under the evaluation mask"):
            baseline = gene_mean_baselines(values, splits, eval_mask_seed=eval_mask_seed, mask_prob=EVAL_MASK_PROB)
        shapes = {"values.npy": [D, V], "library_size.npy": [D]}
        if counts is not None:
            shapes["counts.npy"] = [D, V]
        source_info = src.describe(cells.rows, gene_idx) or {"kind": cfg.source}
        manifest = {
            "source": source_info,
            "source_fingerprint": _source_fingerprint(cfg),
            "V": V,
            "D": D,
            "seed": int(cfg.seed),
            "preprocessing": _preprocessing(cfg, src, cells, source_info, flavor, batch_key, share),
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
