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

__all__ = ["read_counts_h5ad", "check_values", "open_h5ad", "H5adBacked", "BACKED_MIN_BYTES"]

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


def _counts_node(f: h5py.File, path: Path, layer: str | None):
    """The X matrix, or the named layer, of an open .h5ad (a DataError when absent)."""
    if layer is None:
        if "X" not in f:
            raise DataError(f"{path} has no X matrix: name a counts layer with --layer")
        return f["X"]
    layers = list(f["layers"].keys()) if "layers" in f else []
    if layer not in layers:
        raise _missing_layer(path, layer, layers)
    return f["layers"][layer]


def _read_parts(path: Path, layer: str | None):
    """X (or the layer), obs and var, read element-wise: other layers are never loaded."""
    with h5py.File(path, "r") as f:
        X = _read_elem(_counts_node(f, path, layer))
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


def _check_path(path: str | os.PathLike) -> Path:
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
    return path


def _check_names(names: pd.Index, path: Path) -> pd.Index:
    names = names.astype(str)
    if names.has_duplicates:
        dups = names[names.duplicated()].unique()[:3]
        raise DataError(
            f"{path.name}: duplicate gene names ({', '.join(dups)}): make them unique "
            "(e.g. adata.var_names_make_unique()) and save again"
        )
    return pd.Index(names)


def read_counts_h5ad(path: str | os.PathLike, *, layer: str | None = None, normalized: bool = False) -> AnnData:
    """Read raw counts (X or ``layer``) with obs and var from an .h5ad file.

    Refuses (DataError): a missing, unreadable, truncated or non-HDF5 file; an unknown layer;
    NaN/inf; negative or non-integer values unless ``normalized=True`` (the values are then
    taken as already normalised log values); duplicate gene names.
    """
    path = _check_path(path)
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
    var = var.copy()
    var.index = _check_names(var.index, path)
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


# --------------------------------------------------------------------------- backed (large files)
# Files at least this large are read in row chunks straight from the HDF5 groups instead of
# being loaded whole (X stored as CSR or dense; normalised input is always read whole).
BACKED_MIN_BYTES = 256 << 20
_CHUNK_NNZ = 8 << 20  # stored values per chunk (about 100 MB of float64 work arrays)
_CHUNK_ROWS = 16384


class _NotBackable(Exception):
    """The matrix is stored in a layout that row chunks cannot be read from (e.g. CSC)."""


class H5adBacked:
    """Row-chunked access to the counts of an .h5ad file (CSR group or dense dataset).

    Only ``indptr`` (one int per cell), obs and var are held in memory; the values are read
    in chunks of rows bounded by ``_CHUNK_NNZ`` stored values. Implements the cell-source
    protocol of ``cellscale.data.build``: ``scan``, ``obs``, ``select_genes``, ``blocks``,
    ``describe``, ``close``.
    """

    normalized = False

    def __init__(self, path: Path, layer: str | None) -> None:
        self.path, self.layer = path, layer
        self.where = f"{path.name} " + ("X" if layer is None else f"layer '{layer}'")
        self._f = h5py.File(path, "r")
        try:
            f = self._f
            node = _counts_node(f, path, layer)
            enc = node.attrs.get("encoding-type", "")
            enc = enc.decode() if isinstance(enc, bytes) else str(enc)
            if isinstance(node, h5py.Group) and enc == "csr_matrix":
                self.kind = "csr"
                self.shape = tuple(int(x) for x in node.attrs["shape"])
                self._data, self._indices = node["data"], node["indices"]
                self.indptr = np.asarray(node["indptr"][...], dtype=np.int64)
                if self.indptr.size != self.shape[0] + 1 or self.indptr[-1] != self._data.shape[0]:
                    raise DataError(f"{path} is truncated or damaged (X indptr does not match its data): re-export it")
            elif isinstance(node, h5py.Dataset) and node.ndim == 2:
                self.kind = "dense"
                self.shape = tuple(int(x) for x in node.shape)
                self._dense = node
                self.indptr = None
            else:
                raise _NotBackable(enc or type(node).__name__)
            obs = _read_elem(f["obs"]) if "obs" in f else pd.DataFrame(index=pd.RangeIndex(self.shape[0]).astype(str))
            var = _read_elem(f["var"]) if "var" in f else pd.DataFrame(index=pd.RangeIndex(self.shape[1]).astype(str))
        except BaseException:
            self._f.close()
            raise
        if len(obs) != self.shape[0] or len(var) != self.shape[1]:
            self._f.close()
            raise DataError(f"{path}: {self.where} shape {self.shape} does not match obs/var ({len(obs)}, {len(var)}): the file is inconsistent")
        self.n_obs, self.n_vars = self.shape
        self.var_names = list(_check_names(var.index, path))
        obs = obs.copy()
        obs.index = pd.Index(obs.index.astype(str))
        self._obs = obs
        st = path.stat()
        self._info = {
            "kind": "h5ad", "path": str(path.resolve()), "layer": layer, "normalized": False,
            "file_size": int(st.st_size), "file_mtime_ns": int(st.st_mtime_ns),
            "n_obs": int(self.n_obs), "n_vars": int(self.n_vars), "read": f"backed ({self.kind}, row chunks)",
        }

    # ---------------------------------------------------------------- chunks
    def _row_groups(self, rows: np.ndarray):
        """Consecutive groups of (sorted) ``rows`` whose span holds at most _CHUNK_NNZ values."""
        rows = np.asarray(rows, dtype=np.int64)
        i, n = 0, rows.size
        while i < n:
            cand = rows[i : i + _CHUNK_ROWS]
            if self.kind == "csr":
                ends = self.indptr[cand + 1] - self.indptr[cand[0]]
            else:
                ends = (cand - cand[0] + 1) * self.n_vars
            k = max(1, int(np.searchsorted(ends, _CHUNK_NNZ, side="right")))
            yield cand[:k]
            i += k

    def _read(self, rows: np.ndarray) -> sp.csr_matrix:
        """CSR block of the given sorted rows (all genes)."""
        a, b = int(rows[0]), int(rows[-1]) + 1
        if self.kind == "csr":
            lo, hi = int(self.indptr[a]), int(self.indptr[b])
            M = sp.csr_matrix(
                (self._data[lo:hi], self._indices[lo:hi], self.indptr[a : b + 1] - lo), shape=(b - a, self.n_vars)
            )
        else:
            M = sp.csr_matrix(np.asarray(self._dense[a:b]))
        if rows.size != b - a:
            M = M[rows - a]
        if M.dtype.kind in "fb":
            M = M.astype(np.float32, copy=False)
        return M

    def _chunks(self, rows: np.ndarray):
        for group in self._row_groups(rows):
            yield self._read(group)

    # ---------------------------------------------------------------- source protocol
    def scan(self):
        """Validate every value (chunk-wise) and return (library size over all genes, non-empty, max)."""
        lib = np.zeros(self.n_obs)
        nonempty = np.zeros(self.n_obs, dtype=bool)
        vmax = 0.0
        start = 0
        for block in self._chunks(np.arange(self.n_obs)):
            check_values(block, normalized=False, where=self.where)
            stop = start + block.shape[0]
            lib[start:stop] = np.asarray(block.sum(axis=1, dtype=np.float64)).ravel()
            nonempty[start:stop] = (np.diff(block.indptr) > 0) & (lib[start:stop] > 0)
            if block.nnz:
                vmax = max(vmax, float(block.data.max()))
            start = stop
        return lib, nonempty, vmax

    def obs(self, rows: np.ndarray) -> pd.DataFrame:
        return self._obs.iloc[np.asarray(rows)]

    def select_genes(self, rows, *, n_top_genes, flavor, batch_key, target_sum, lib):
        from cellscale.data.preprocess import log_variance_chunked, seurat_v3_genes_chunked

        rows = np.sort(np.asarray(rows, dtype=np.int64))
        V = int(n_top_genes)
        if V > self.n_vars:
            raise DataError(f"asked for {V} genes but the data has only {self.n_vars}: lower --genes to at most {self.n_vars}")
        if flavor == "all" or (flavor == "seurat_v3" and V == self.n_vars):
            if V != self.n_vars:
                raise DataError(
                    f"hvg_flavor 'all' keeps every gene, but --genes is {V} and the data has {self.n_vars}: "
                    f"set --genes {self.n_vars} or choose another hvg_flavor"
                )
            return np.arange(self.n_vars, dtype=np.int64)
        if flavor == "variance":
            var = log_variance_chunked(lambda: self._chunks(rows), n_vars=self.n_vars, lib_size=lib[rows], target_sum=target_sum)
            return np.sort(np.argsort(-var, kind="stable")[:V]).astype(np.int64)
        if flavor != "seurat_v3":
            raise DataError(f"unknown hvg_flavor '{flavor}': use seurat_v3, variance or all")
        labels = None
        if batch_key is not None:
            if batch_key not in self._obs:
                raise DataError(f"hvg batch key '{batch_key}' is not an obs column: pick one of {list(self._obs.columns)[:10]}")
            labels = self._obs[batch_key].astype(str).to_numpy()[rows]
        try:
            return seurat_v3_genes_chunked(lambda: self._chunks(rows), n_vars=self.n_vars, n_top_genes=V, batch_labels=labels)
        except ImportError as err:
            raise DataError(f"seurat_v3 HVG selection needs scikit-misc ({err}): pip install scikit-misc") from None

    def blocks(self, rows: np.ndarray, genes: np.ndarray):
        """Dense (rows x genes) blocks of the given sorted rows, in order."""
        for block in self._chunks(np.asarray(rows, dtype=np.int64)):
            yield block[:, genes].toarray()

    def describe(self, rows, genes) -> dict:
        return dict(self._info)

    def close(self) -> None:
        self._f.close()


def open_h5ad(path: str | os.PathLike, *, layer: str | None = None, normalized: bool = False, backed: bool | None = None):
    """A cell source for an .h5ad file: ``H5adBacked`` (row chunks) for files of at least
    ``BACKED_MIN_BYTES`` (or ``backed=True``) holding counts as CSR or dense, else the whole
    file read by ``read_counts_h5ad`` (returned as an AnnData)."""
    path = _check_path(path)
    if backed is None:
        backed = not normalized and path.stat().st_size >= BACKED_MIN_BYTES
    if backed and not normalized:
        try:
            return H5adBacked(path, layer)
        except DataError:
            raise
        except _NotBackable:
            pass  # e.g. CSC: read whole
        except Exception:  # noqa: BLE001 - damaged/old files: read_counts_h5ad gives the message
            pass
    return read_counts_h5ad(path, layer=layer, normalized=normalized)
