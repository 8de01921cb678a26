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

**A run is enough.** Every run keeps ``registry.json`` (``cellscale.data.store.Dataset.registry``):
its genes in the model's order, the counts per cell and whether the values were made from counts,
so embedding new cells needs the run directory and nothing else. A dataset that is given is checked
against it; a run from before the registry finds its dataset through the sweep above it.

``embed(adata, run)``: the notebook API (scanpy style: ``obsm[key_added]`` and ``uns[key_added]``
written in memory, or on a copy); ``RunModel.load(run_dir)`` and ``RunModel.embed(adata)`` give the
latent representation itself. ``embed_run(run_dir, ...)``: the CLI's ``cellscale embed``, a thin
wrapper. Batches run on CUDA when it is present.
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
from cellscale.schema import RUN_REGISTRY, sweep_datasets

__all__ = ["EMBED_KEY", "RunModel", "Preprocessing", "embed", "load_run_model", "embed_values", "embed_dataset",
           "find_dataset", "run_preprocessing", "match_genes", "preprocess_cells", "embed_run"]

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
    registry: dict[str, Any] | None = None  # RUN_DIR/registry.json (None: a run from before it)

    @property
    def dim(self) -> int:
        return int(self.config.d_model)

    @classmethod
    def load(cls, run_dir: str | os.PathLike, *, device: str | torch.device | None = None) -> RunModel:
        """The run's model at its best checkpoint (:func:`load_run_model`)."""
        return load_run_model(run_dir, device=device)

    def embed(self, adata, *, layer: str | None = None, allow_missing: bool = False,
              dataset: str | os.PathLike | None = None) -> np.ndarray:
        """The latent representation [n_obs, d] (float32) of an AnnData's raw counts (``X``, or
        ``layer``), preprocessed as the run's training values were (:func:`embed`)."""
        pre = run_preprocessing(self, dataset)
        return _embed_adata(self, adata, layer=layer, allow_missing=allow_missing, pre=pre)[0]


@dataclass(frozen=True)
class Preprocessing:
    """How a run's values were made: its genes (the model's order), the counts per cell, whether
    they were stored as given (normalised input), and where these facts came from."""

    genes: list[str]
    target_sum: float
    normalized: bool
    source: str  # "registry.json" or the dataset's path


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
    from cellscale.runtime.checkpoint import load_weights

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
    return RunModel(run_dir, model, model_cfg, cfg.get("dataset_checksum"), dev, _read_registry(run_dir, model_cfg))


def _read_registry(run_dir: Path, model_cfg: ModelConfig) -> dict[str, Any] | None:
    path = run_dir / RUN_REGISTRY
    if not path.is_file():
        return None
    try:
        reg = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunError(f"{path} is unreadable ({err}): the run directory is damaged") from None
    if len(reg.get("genes") or []) != model_cfg.n_genes:
        raise RunError(f"{path} names {len(reg.get('genes') or [])} genes but the model knows {model_cfg.n_genes}: "
                       "the run directory is damaged")
    return reg


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


# ----------------------------------------------------------------------------- what the run needs
def run_preprocessing(rm: RunModel, dataset: str | os.PathLike | None = None) -> Preprocessing:
    """How the run's values were made: from its ``registry.json``, or from ``dataset`` when given
    (it must be the run's own dataset, and hold the registry's genes), or, for a run from before the
    registry, from the dataset the sweep above the run names (:func:`find_dataset`)."""
    reg = rm.registry
    if dataset is None and reg is not None:
        return Preprocessing([str(g) for g in reg["genes"]], float(reg["target_sum"]), bool(reg["normalized_input"]),
                             RUN_REGISTRY)
    ds = find_dataset(rm, dataset)
    genes = _model_genes(rm, ds)
    if reg is not None and [str(g) for g in reg["genes"]] != list(genes):
        raise DataError(f"dataset {ds.path} holds other genes than {rm.run_dir / RUN_REGISTRY} records: pass the run's "
                        "own dataset, or none (the registry is enough)")
    return Preprocessing(list(genes), ds.target_sum, ds.normalized_input, str(ds.path))


def _matrix(adata, layer: str | None):
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        shown = ", ".join(map(str, adata.layers)) or "none"
        raise DataError(f"the AnnData has no layer '{layer}' (layers: {shown}): pass the layer of raw counts")
    return adata.layers[layer]


def _embed_adata(rm: RunModel, adata, *, layer: str | None, allow_missing: bool,
                 pre: Preprocessing, where: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    from cellscale.data.sources.h5ad import check_values

    X = _matrix(adata, layer)
    where = where or "the AnnData's " + ("X" if layer is None else f"layer '{layer}'")
    check_values(X, normalized=pre.normalized, where=where)
    values, info = preprocess_cells(X, adata.var, genes=pre.genes, target_sum=pre.target_sum,
                                    normalized=pre.normalized, allow_missing=allow_missing, where=where)
    return embed_values(rm, values), {"layer": layer, **info}


def _uns(prov: dict[str, Any]) -> dict[str, Any]:
    return {k: ("" if v is None else v) for k, v in prov.items()}  # h5ad stores no None


def embed(adata, run: RunModel | str | os.PathLike, *, layer: str | None = None, key_added: str = EMBED_KEY,
          copy: bool = False, allow_missing: bool = False, dataset: str | os.PathLike | None = None,
          device: str | None = None):
    """Embed the cells of ``adata`` with a run's best checkpoint, in memory (scanpy style).

    ``run``: a run directory or a loaded :class:`RunModel`. The raw counts in ``adata.X`` (or
    ``layer``) are preprocessed as the run's training values were (its genes picked by name, in the
    model's order; library size over all of ``adata``'s genes; log1p at the run's counts per cell).
    Writes ``adata.obsm[key_added]`` ([n_obs, d], float32) and the provenance to
    ``adata.uns["cellscale"]`` for the default key (as ``cellscale embed`` does), ``uns[key_added]``
    for another, so that two runs' embeddings keep their own. Returns the AnnData when ``copy``
    (``adata`` itself is untouched then), else None. ``dataset``: the run's training dataset, for a
    run from before ``registry.json`` that no sweep above names."""
    rm = run if isinstance(run, RunModel) else load_run_model(run, device=device)
    pre = run_preprocessing(rm, dataset)
    emb, info = _embed_adata(rm, adata, layer=layer, allow_missing=allow_missing, pre=pre)
    target = adata.copy() if copy else adata
    target.obsm[key_added] = emb
    prov = _provenance(rm, pre, {**info, "key": key_added, "n_cells": int(emb.shape[0])})
    target.uns["cellscale" if key_added == EMBED_KEY else key_added] = _uns(prov)
    return target if copy else None


# ----------------------------------------------------------------------------- the command
def _provenance(rm: RunModel, pre: Preprocessing, info: dict[str, Any]) -> dict[str, Any]:
    return {"run_dir": str(rm.run_dir.resolve()), "checkpoint": BEST_FILE, "key": EMBED_KEY,
            "pooling": "mean over the V gene tokens of the final hidden state, no mask",
            "size": rm.config.name, "d_model": rm.dim, "n_genes": rm.config.n_genes,
            "dataset": pre.source, "dataset_checksum": rm.dataset_checksum, "target_sum": pre.target_sum,
            "cellscale_version": __version__, **info}


def _embed_h5ad(rm: RunModel, path: Path, *, layer: str | None, allow_missing: bool,
                dataset: str | os.PathLike | None):
    import anndata as ad

    from cellscale.data.sources.h5ad import read_counts_h5ad

    pre = run_preprocessing(rm, dataset)
    counts = read_counts_h5ad(path, layer=layer, normalized=pre.normalized)  # validated, one-line errors
    adata = ad.read_h5ad(path)  # the whole file (layers, obsm, ...) goes to the output
    emb, info = _embed_adata(rm, counts, layer=None, allow_missing=allow_missing, pre=pre, where=str(path))
    return adata, emb, pre, {"input": str(path.resolve()), **info, "layer": layer}


def _embed_dataset_dir(rm: RunModel, pre: Preprocessing, data: str | os.PathLike, *, allow_missing: bool):
    import anndata as ad

    ds = Dataset.open(data, verify="quick")
    if _checksum(ds) != rm.dataset_checksum and (abs(ds.target_sum - pre.target_sum) > 1e-9 * pre.target_sum
                                                 or ds.normalized_input != pre.normalized):
        raise DataError(f"dataset {ds.path} was normalised differently from the run's ({ds.target_sum:g} vs "
                        f"{pre.target_sum:g} counts per cell, or normalised input): embed its source file with --input")
    values, n_missing = dataset_values(ds, pre.genes, allow_missing=allow_missing)
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
    write ``out`` (.h5ad) with ``obsm["X_cellscale"]`` and ``uns["cellscale"]`` (provenance): the
    CLI's ``cellscale embed``, around :func:`embed`'s parts. ``dataset``: the run's training dataset,
    checked against its registry (needed only for a run from before ``registry.json`` that no sweep
    above names). Returns the provenance (``n_cells``, ``n_missing_genes``, ...)."""
    from cellscale.runtime.io import atomic_write_with

    if (input is None) == (data is None):
        raise DataError("give the cells to embed with --input FILE.h5ad or --data DATASET_DIR (one of them)")
    rm = load_run_model(run_dir, device=device)
    if data is not None and dataset is None:
        given = Dataset.open(data, verify="none")
        dataset = data if _checksum(given) == rm.dataset_checksum else None
    if input is not None:
        adata, emb, pre, info = _embed_h5ad(rm, Path(input), layer=layer, allow_missing=allow_missing, dataset=dataset)
    else:
        pre = run_preprocessing(rm, dataset)
        adata, emb, info = _embed_dataset_dir(rm, pre, data, allow_missing=allow_missing)
    adata.obsm[EMBED_KEY] = emb
    prov = _provenance(rm, pre, {**info, "n_cells": int(emb.shape[0])})
    adata.uns["cellscale"] = _uns(prov)
    atomic_write_with(Path(out), lambda tmp: adata.write_h5ad(tmp))
    return prov
