"""A run's cell embedding: the best checkpoint's pooled final hidden state, and the same for new cells.

**Pooling.** The embedding of a cell is the mean over its V gene tokens of the final hidden state
(``CellTransformer.encode``), computed with **no mask**: every value is seen. Mean pooling, because
the model has no CLS token (a token position would be a gene, and no gene summarises a cell), the
masked-reconstruction objective trains every token's state alike, and the mean keeps the
embedding independent of gene order (the model has no positional encoding either). It is also
the usual default of single-cell foundation models' cell embeddings. Max pooling was not chosen:
one outlying gene would set a coordinate. The hidden states are taken as they are (the model has
no final LayerNorm), so the embedding's scale is the model's own.

**New cells** are preprocessed exactly as the run's dataset was (``cellscale.data.preprocess``):
the library size is the total over ALL genes of the file, the values are
log1p(counts / library size x the dataset's ``target_sum``), and the dataset's V genes are
picked by name (the var index, or a ``feature_id``/``gene_ids``/``feature_name``/``gene_symbols``
column, whichever matches most of them), in the model's order. A dataset built from normalised
input takes the values as given. A model gene the file lacks is a ``DataError`` unless
``allow_missing`` fills it with zeros (the count is returned). A cell whose library is empty
keeps values 0 (as ``data.thin`` does).

``embed_run(run_dir, ...)``: the CLI's ``cellscale embed``. Batches run on CUDA when it is present.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from cellscale import __version__
from cellscale.config import ModelConfig, parse_config
from cellscale.data.preprocess import library_size, normalize_log1p
from cellscale.data.store import Dataset
from cellscale.errors import DataError, RunError
from cellscale.model import CellTransformer
from cellscale.schema import sweep_datasets

__all__ = ["EMBED_KEY", "RunModel", "load_run_model", "embed_values", "embed_dataset", "find_dataset",
           "match_genes", "preprocess_cells", "embed_run"]

EMBED_KEY = "X_cellscale"  # scanpy's convention: obsm["X_pca"], obsm["X_scvi"], ...
BEST_FILE = "best.safetensors"
# var columns that may hold the dataset's gene names (Census datasets use Ensembl feature ids)
GENE_COLUMNS = ("feature_id", "gene_ids", "gene_id", "feature_name", "gene_symbols", "gene_name")
_ROW_CHUNK = 4096  # cells preprocessed at a time (dense float64 blocks stay small)


@dataclass
class RunModel:
    """A run's model at its best checkpoint and what it was trained on."""

    run_dir: Path
    model: CellTransformer
    config: ModelConfig
    dataset_checksum: str | None
    device: torch.device

    @property
    def dim(self) -> int:
        return int(self.config.d_model)


def _read_run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.json"
    if not path.is_file():
        raise RunError(f"{run_dir} is not a cellscale run (no config.json): pass a run directory (SWEEP_DIR/runs/<id>)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunError(f"{path} is unreadable ({err}): the run directory is damaged") from None


def load_run_model(run_dir: str | os.PathLike, *, device: str | torch.device | None = None) -> RunModel:
    """The run's model with its best checkpoint's weights, in eval mode on ``device``
    (default: CUDA when present, else CPU)."""
    from cellscale.checkpoint import load_weights

    run_dir = Path(run_dir)
    cfg = _read_run_config(run_dir)
    best = run_dir / BEST_FILE
    if not best.is_file():
        raise RunError(f"{run_dir} has no best checkpoint ({BEST_FILE}): the run never validated; train it first")
    model_cfg = parse_config(ModelConfig, cfg.get("model") or {}, origin=str(run_dir / "config.json"))
    model = CellTransformer(model_cfg)
    try:
        load_weights(model, best)
    except (OSError, ValueError, RuntimeError) as err:
        raise RunError(f"{best} is unreadable ({str(err).splitlines()[0]}): retrain the run") from None
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(dev).eval()
    return RunModel(run_dir, model, model_cfg, cfg.get("dataset_checksum"), dev)


def _rows_per_batch(rm: RunModel, n_genes: int) -> int:
    # the [B, V, d] hidden states (and the FFN's [B, V, f d]) bound the batch, not the cell count
    budget = (1 << 27) if rm.device.type == "cuda" else (1 << 23)
    width = rm.dim * max(1, rm.config.ffn_ratio)
    return int(max(1, min(4096, budget // max(1, n_genes * width))))


@torch.no_grad()
def embed_values(rm: RunModel, values: np.ndarray, *, batch_size: int | None = None) -> np.ndarray:
    """Mean-pooled final hidden states [n, d] (float32) of normalised log1p values [n, V] in the
    model's gene order, nothing masked."""
    values = np.asarray(values)
    n, V = values.shape
    if V != rm.config.n_genes:
        raise DataError(f"the values have {V} genes but the model of {rm.run_dir} knows {rm.config.n_genes}")
    rows = batch_size or _rows_per_batch(rm, V)
    out = np.empty((n, rm.dim), dtype=np.float32)
    for start in range(0, n, rows):
        x = torch.from_numpy(np.array(values[start:start + rows], dtype=np.float32)).to(rm.device)  # a copy: memmaps are read-only
        h = rm.model.encode(x, torch.zeros(x.shape, dtype=torch.bool, device=rm.device))
        out[start:start + x.shape[0]] = h.float().mean(dim=1).cpu().numpy()
    return out


# ----------------------------------------------------------------------------- which dataset
def _sweep_datasets(run_dir: Path) -> list[Path]:
    """The datasets of the sweep above ``run_dir`` (SWEEP_DIR/runs/<id>): base and depth datasets."""
    meta = run_dir.parent.parent / "sweep.json"
    try:
        obj = json.loads(meta.read_text()) if meta.is_file() else {}
    except (OSError, ValueError):
        obj = {}
    return [Path(p) for p in sweep_datasets(obj).values()]


def _checksum(ds: Dataset) -> str | None:
    return (ds.manifest.get("checksums") or {}).get("values.npy")


def find_dataset(rm: RunModel, dataset: str | os.PathLike | None = None) -> Dataset:
    """The dataset ``rm`` was trained on: ``dataset`` when given (it must be that dataset), else
    the one of the sweep above the run dir whose values checksum the run recorded."""
    if dataset is not None:
        ds = Dataset.open(dataset, verify="quick")
        if rm.dataset_checksum and _checksum(ds) != rm.dataset_checksum:
            raise DataError(f"{ds.path} is not the dataset {rm.run_dir} was trained on (its values.npy checksum "
                            "differs): pass that run's own dataset with --dataset")
        return ds
    for path in _sweep_datasets(rm.run_dir):
        if (path / "manifest.json").is_file():
            ds = Dataset.open(path, verify="none")
            if _checksum(ds) == rm.dataset_checksum:
                return ds
    raise RunError(f"cannot find the dataset {rm.run_dir} was trained on (no sweep.json above it names it): "
                   "pass it with --dataset DIR")


# ----------------------------------------------------------------------------- new cells
def _gene_keys(var: pd.DataFrame) -> list[tuple[str, pd.Index]]:
    keys = [("var_names", pd.Index(var.index.astype(str)))]
    keys += [(c, pd.Index(var[c].astype(str))) for c in GENE_COLUMNS if c in var.columns]
    return keys


def match_genes(genes: list[str], var: pd.DataFrame, *, where: str = "the file",
                allow_missing: bool = False) -> tuple[np.ndarray, str]:
    """Column of each model gene in ``var`` (-1: missing, allowed), matched by the var index or
    a gene-id column (whichever finds most), and that key's name."""
    best_key, best_pos = "var_names", None
    for key, names in _gene_keys(var):
        first = ~names.duplicated()  # a repeated id in a column: its first occurrence
        lookup = pd.Series(np.flatnonzero(first), index=names[first])
        pos = lookup.reindex(genes).fillna(-1).to_numpy(np.int64)
        if best_pos is None or (pos >= 0).sum() > (best_pos >= 0).sum():
            best_key, best_pos = key, pos
    missing = [g for g, p in zip(genes, best_pos) if p < 0]
    if missing and not allow_missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise DataError(f"{where} lacks {len(missing)} of the model's {len(genes)} genes ({shown}; matched by "
                        f"{best_key}): pass --allow-missing-genes to embed with zeros for them")
    return best_pos, best_key


def _picked(X, cols: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows start:stop of X at the columns ``cols`` (-1: a column of zeros), dense float64."""
    block = X[start:stop]
    keep = cols >= 0
    out = np.zeros((block.shape[0], cols.size), dtype=np.float64)
    sub = block[:, cols[keep]]
    out[:, keep] = sub.toarray() if sp.issparse(sub) else np.asarray(sub, dtype=np.float64)
    return out


def preprocess_cells(X, var: pd.DataFrame, *, genes: list[str], target_sum: float, normalized: bool = False,
                     allow_missing: bool = False, where: str = "the file") -> tuple[np.ndarray, dict[str, Any]]:
    """The model's input values [n, V] (float32) of raw counts ``X`` [n, genes of var] and what was
    done (``n_missing_genes``, ``gene_key``, ``n_empty_cells``)."""
    cols, key = match_genes(genes, var, where=where, allow_missing=allow_missing)
    from anndata import AnnData

    X = sp.csr_matrix(X) if sp.issparse(X) else np.asarray(X)
    n = X.shape[0]
    lib = None if normalized else library_size(AnnData(X=X))  # over ALL genes of the file, as data build
    out = np.empty((n, len(genes)), dtype=np.float32)
    for start in range(0, n, _ROW_CHUNK):
        stop = min(n, start + _ROW_CHUNK)
        block = _picked(X, cols, start, stop)
        if lib is None:  # normalised input: the dataset stored such values as given
            out[start:stop] = block
            continue
        part = lib[start:stop]
        vals = normalize_log1p(block, np.where(part > 0, part, 1.0), target_sum=target_sum)
        vals[part <= 0] = 0.0  # an empty library keeps zeros (as data.thin does)
        out[start:stop] = vals
    n_empty = 0 if lib is None else int((lib <= 0).sum())
    return out, {"n_missing_genes": int((cols < 0).sum()), "gene_key": key, "n_empty_cells": n_empty}


def _normalized_input(ds: Dataset) -> bool:
    return bool((ds.manifest.get("preprocessing") or {}).get("normalized_input", False)) or ds.counts is None


def dataset_values(ds: Dataset, genes: list[str], rows: np.ndarray | None = None, *,
                   allow_missing: bool = False) -> tuple[np.ndarray, int]:
    """A dataset's stored values in the model's gene order (its own genes: as stored), and how
    many model genes it lacks (filled with zeros when allowed)."""
    vals = ds.values if rows is None else ds.values[np.asarray(rows)]
    if list(ds.genes) == list(genes):
        return np.asarray(vals, dtype=np.float32), 0
    cols, _ = match_genes(genes, pd.DataFrame(index=pd.Index(ds.genes)), where=f"dataset {ds.path}",
                          allow_missing=allow_missing)
    out = np.zeros((vals.shape[0], len(genes)), dtype=np.float32)
    out[:, cols >= 0] = np.asarray(vals)[:, cols[cols >= 0]]
    return out, int((cols < 0).sum())


def embed_dataset(rm: RunModel, ds: Dataset, rows: np.ndarray | None = None) -> np.ndarray:
    """The embedding [n, d] of a dataset's cells (all, or ``rows``) under the run's model."""
    values, _ = dataset_values(ds, _model_genes(rm, ds), rows)
    return embed_values(rm, values)


def _model_genes(rm: RunModel, ds: Dataset) -> list[str]:
    """The model's genes: the genes of the dataset it was trained on (checked against V)."""
    if ds.n_genes != rm.config.n_genes:
        raise DataError(f"dataset {ds.path} has {ds.n_genes} genes but the model of {rm.run_dir} knows "
                        f"{rm.config.n_genes}: pass the run's own dataset with --dataset")
    return ds.genes


# ----------------------------------------------------------------------------- the command
def _provenance(rm: RunModel, ref: Dataset, info: dict[str, Any]) -> dict[str, Any]:
    return {"run_dir": str(rm.run_dir.resolve()), "checkpoint": BEST_FILE, "key": EMBED_KEY,
            "pooling": "mean over the V gene tokens of the final hidden state, no mask",
            "size": rm.config.name, "d_model": rm.dim, "n_genes": rm.config.n_genes,
            "dataset": str(ref.path), "dataset_checksum": rm.dataset_checksum, "target_sum": ref.target_sum,
            "cellscale_version": __version__, **info}


def _embed_h5ad(rm: RunModel, ref: Dataset, path: Path, *, layer: str | None, allow_missing: bool):
    import anndata as ad

    from cellscale.data.sources.h5ad import read_counts_h5ad

    normalized = _normalized_input(ref)
    counts = read_counts_h5ad(path, layer=layer, normalized=normalized)  # validated values
    values, info = preprocess_cells(counts.X, counts.var, genes=_model_genes(rm, ref), target_sum=ref.target_sum,
                                    normalized=normalized, allow_missing=allow_missing, where=str(path))
    adata = ad.read_h5ad(path)  # the whole file (layers, obsm, ...) goes to the output
    return adata, embed_values(rm, values), {"input": str(path.resolve()), "layer": layer, **info}


def _embed_dataset_dir(rm: RunModel, ref: Dataset, data: str | os.PathLike, *, allow_missing: bool):
    import anndata as ad

    ds = Dataset.open(data, verify="quick")
    if ds.path.resolve() != ref.path.resolve() and (abs(ds.target_sum - ref.target_sum) > 1e-9 * ref.target_sum
                                                    or _normalized_input(ds) != _normalized_input(ref)):
        raise DataError(f"dataset {ds.path} was normalised differently from the run's ({ds.target_sum:g} vs "
                        f"{ref.target_sum:g} counts per cell, or normalised input): embed its source file with --input")
    values, n_missing = dataset_values(ds, _model_genes(rm, ref), allow_missing=allow_missing)
    obs = ds.obs.copy()
    obs.index = pd.Index(obs.pop("cell_id").astype(str)) if "cell_id" in obs else obs.index.astype(str)
    split = np.full(ds.n_cells, "", dtype=object)
    for name, idx in ds.splits.items():
        split[idx] = name
    obs["split"] = pd.Categorical(split)
    adata = ad.AnnData(X=np.asarray(ds.values, dtype=np.float32), obs=obs, var=pd.DataFrame(index=ds.genes))
    info = {"input": str(ds.path), "n_missing_genes": n_missing, "gene_key": "dataset genes", "n_empty_cells": 0}
    return adata, embed_values(rm, values), info


def embed_run(run_dir: str | os.PathLike, *, out: str | os.PathLike, input: str | os.PathLike | None = None,
              data: str | os.PathLike | None = None, dataset: str | os.PathLike | None = None,
              layer: str | None = None, allow_missing: bool = False,
              device: str | None = None) -> dict[str, Any]:
    """Embed an .h5ad file (``input``) or a dataset dir (``data``) with the run's best checkpoint and
    write ``out`` (.h5ad) with ``obsm["X_cellscale"]`` and ``uns["cellscale"]`` (provenance).
    ``dataset``: the run's training dataset when no sweep.json above the run dir names it.
    Returns the provenance (``n_cells``, ``n_missing_genes``, ...)."""
    from cellscale.io import atomic_write_with

    if (input is None) == (data is None):
        raise DataError("give the cells to embed with --input FILE.h5ad or --data DATASET_DIR (one of them)")
    rm = load_run_model(run_dir, device=device)
    if data is not None and dataset is None:
        given = Dataset.open(data, verify="none")
        dataset = data if _checksum(given) == rm.dataset_checksum else None
    ref = find_dataset(rm, dataset)
    if input is not None:
        adata, emb, info = _embed_h5ad(rm, ref, Path(input), layer=layer, allow_missing=allow_missing)
    else:
        adata, emb, info = _embed_dataset_dir(rm, ref, data, allow_missing=allow_missing)
    adata.obsm[EMBED_KEY] = emb
    prov = _provenance(rm, ref, {**info, "n_cells": int(emb.shape[0])})
    adata.uns["cellscale"] = {k: ("" if v is None else v) for k, v in prov.items()}  # h5ad stores no None
    atomic_write_with(Path(out), lambda tmp: adata.write_h5ad(tmp))
    return prov
