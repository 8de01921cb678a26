"""Raw counts from an .h5ad file (X or a named layer), validated without densifying."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from cellscale.errors import DataError

__all__ = ["read_counts_h5ad", "check_values"]

_CHUNK_VALUES = 1 << 22  # values checked per chunk


def _read_elem(node):
    try:
        from anndata.io import read_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import read_elem
    return read_elem(node)


def check_values(X, *, normalized: bool, where: str) -> None:
    """Refuse NaN/inf always; negative or non-integer values unless ``normalized``.

    Sparse matrices are checked on their stored values, dense ones by row blocks."""
    if sp.issparse(X):
        data = np.asarray(X.data)
        blocks = (data[i : i + _CHUNK_VALUES] for i in range(0, data.size, _CHUNK_VALUES))
    else:
        X = np.asarray(X)
        if X.ndim != 2:
            raise DataError(f"{where}: expected a 2-d matrix, got shape {X.shape}")
        rows = max(1, _CHUNK_VALUES // max(X.shape[1], 1))
        blocks = (X[i : i + rows] for i in range(0, X.shape[0], rows))
    kind = np.asarray(X.data if sp.issparse(X) else X[:0]).dtype.kind
    if kind not in "iufb":
        raise DataError(f"{where}: values of type {kind!r} are not numbers: store counts as numbers")
    hint = "name a counts layer with --layer, or pass --normalized if the values are already normalised"
    for block in blocks:
        if kind == "f":
            bad = ~np.isfinite(block)
            if bad.any():
                what = "NaN" if np.isnan(block[bad]).any() else "infinite"
                raise DataError(f"{where} holds {what} values: fix or remove those cells/genes")
        if normalized:
            continue
        if kind in "if" and (block < 0).any():
            raise DataError(f"{where} holds negative values, so it is not raw counts: {hint}")
        if kind == "f" and (block != np.round(block)).any():
            raise DataError(f"{where} holds non-integer values, so it is not raw counts: {hint}")


def _missing_layer(path: Path, layer: str, layers: list[str]) -> DataError:
    avail = ", ".join(sorted(layers)) if layers else "none"
    return DataError(f"{path} has no layer '{layer}' (layers: {avail}): pick one of them or use X")


def _read_parts(path: Path, layer: str | None):
    """X (or the layer), obs and var, read element-wise: other layers are never loaded."""
    with h5py.File(path, "r") as f:
        if layer is None:
            if "X" not in f:
                raise DataError(f"{path} has no X matrix: name a counts layer with --layer")
            node = f["X"]
        else:
            layers = list(f["layers"].keys()) if "layers" in f else []
            if layer not in layers:
                raise _missing_layer(path, layer, layers)
            node = f["layers"][layer]
        X = _read_elem(node)
        obs = _read_elem(f["obs"]) if "obs" in f else None
        var = _read_elem(f["var"]) if "var" in f else None
    return X, obs, var


def _read_whole(path: Path, layer: str | None):
    import anndata as ad

    a = ad.read_h5ad(path)
    if layer is None:
        if a.X is None:
            raise DataError(f"{path} has no X matrix: name a counts layer with --layer")
        return a.X, a.obs, a.var
    if layer not in a.layers:
        raise _missing_layer(path, layer, list(a.layers.keys()))
    return a.layers[layer], a.obs, a.var


def read_counts_h5ad(path: str | os.PathLike, *, layer: str | None = None, normalized: bool = False) -> AnnData:
    """Read raw counts (X or ``layer``) with obs and var from an .h5ad file.

    Refuses (DataError): a missing, unreadable, truncated or non-HDF5 file; an unknown layer;
    NaN/inf; negative or non-integer values unless ``normalized=True`` (the values are then
    taken as already normalised log values); duplicate gene names.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"input file not found: {path}: check the --input path")
    if path.is_dir():
        raise DataError(f"input {path} is a directory, not an .h5ad file: pass the file itself")
    if not os.access(path, os.R_OK):
        raise DataError(f"input file {path} is not readable: check its permissions")
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError as err:
        raise DataError(f"cannot read {path} ({err}): check the file") from None
    if not is_hdf5:
        raise DataError(f"{path} is not an HDF5 (.h5ad) file: pass an AnnData .h5ad file")
    where = "X" if layer is None else f"layer '{layer}'"
    try:
        X, obs, var = _read_parts(path, layer)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - h5py/anndata raise many kinds on damaged files
        try:  # files from old anndata versions lack the encoding metadata read_elem needs
            X, obs, var = _read_whole(path, layer)
        except DataError:
            raise
        except Exception:  # noqa: BLE001
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise DataError(f"{path} is truncated or damaged ({msg}): re-download or re-export it") from None
    if not (sp.issparse(X) or isinstance(X, np.ndarray)):
        raise DataError(f"{path}: {where} is a {type(X).__name__}, not a matrix: store counts in X or a layer")
    if X.ndim != 2:
        raise DataError(f"{path}: {where} has shape {X.shape}, not cells x genes")
    n_obs, n_vars = X.shape
    if obs is None:
        obs = pd.DataFrame(index=pd.RangeIndex(n_obs).astype(str))
    if var is None:
        var = pd.DataFrame(index=pd.RangeIndex(n_vars).astype(str))
    if len(obs) != n_obs or len(var) != n_vars:
        raise DataError(f"{path}: {where} shape {X.shape} does not match obs/var ({len(obs)}, {len(var)}): the file is inconsistent")
    check_values(X, normalized=normalized, where=f"{path.name} {where}")
    names = var.index.astype(str)
    if names.has_duplicates:
        dups = names[names.duplicated()].unique()[:3]
        raise DataError(
            f"{path.name}: duplicate gene names ({', '.join(dups)}): make them unique "
            "(e.g. adata.var_names_make_unique()) and save again"
        )
    var = var.copy()
    var.index = pd.Index(names)
    obs = obs.copy()
    obs.index = pd.Index(obs.index.astype(str))
    if sp.issparse(X):
        X = sp.csr_matrix(X)
    if not normalized and X.dtype.kind in "fb":
        X = X.astype(np.float32)
    adata = AnnData(X=X, obs=obs, var=var)
    st = path.stat()
    adata.uns["source"] = {
        "kind": "h5ad",
        "path": str(path.resolve()),
        "layer": layer,
        "normalized": bool(normalized),
        "file_size": int(st.st_size),
        "file_mtime_ns": int(st.st_mtime_ns),
        "n_obs": int(n_obs),
        "n_vars": int(n_vars),
    }
    return adata
