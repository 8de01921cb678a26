#!/usr/bin/env python
"""Estimate the NB simulator's parameters from a real count matrix and write the parameter
file that ``cellscale.data.sources.simulate`` uses for its defaults.

    python scripts/derive_sim_params.py INPUT.h5ad [--layer NAME] [--out PATH]
        [--log1p-input --library-key OBS_COLUMN] [--keep-gene-dist] [--set KEY=VALUE ...]

With no ``--out`` the shipped file ``src/cellscale/data/sources/sim_params.json`` is written.

What is estimated, and how (cells: at most ``--max-cells``, seeded subsample):

* ``library_median``, ``library_sigma``: median and robust SD (1.4826 x MAD) of log library
  size (row totals over all genes, or ``obs[--library-key]``).
* gene base log-expression distribution (``low_gene_frac``, ``low_gene_shift``,
  ``base_log_sd``): a two-component Gaussian mixture with a shared SD, fitted by EM to the
  per-gene log relative expression log((total counts + 0.5) / total library). This needs
  ALL genes (or an unbiased sample of them); skip it with ``--keep-gene-dist`` for a matrix of
  selected genes (HVGs): the simulator's built-in values are then kept.
* ``dispersion_median``, ``dispersion_sigma``: NB dispersion phi (var = mu + phi mu^2) per
  gene by the method of moments around a kNN-smoothed mean (each cell's mean = its library
  size x the average normalised profile of its k nearest neighbours in PCA space, itself
  excluded; residual variance corrected by k / (k + 1) for the noise of that average), so
  cell-type and program structure are not counted as dispersion. Genes: mean >= 0.1 counts
  per cell, and among those the quarter whose smoothed mean varies least across cells
  (structure the smoother misses inflates a gene's estimate in proportion to it). The median
  is over those genes; sigma is the SD of log phi net of estimation noise:
  sqrt(cov(log phi on one half of the cells, log phi on the other half)). On simulated data
  (true median 0.4, sigma 0.2 / 0.5 / 0.8) this gives medians 0.35-0.44 and sigmas
  0.25-0.30 / 0.42-0.53 / 0.63-0.76.
* ``type_effect``, ``program_effect``: one structure scale ``s`` multiplies the simulator's
  defaults (1.5, 0.6); ``s`` is calibrated by bisection so that a statistic of the data —
  the mean share of the variance of the 200 most variable genes' log-normalised values
  that the kNN-smoothed values explain — equals the same statistic on data simulated with
  the estimated library, dispersion and gene parameters.

``n_types``, ``n_programs`` and ``marker_frac`` are not estimated (config defaults).
``--set KEY=VALUE`` overrides an estimate (recorded under ``provenance``). The output records
the input file, its sha256, the estimates, the raw statistics, and every override.

``--log1p-input`` accepts a matrix of log1p(normalised counts) (for example scanpy's bundled
``10x_pbmc68k_reduced.h5ad``, whose ``.raw`` holds them; use ``--raw``): counts are recovered
per cell as expm1(value) / (smallest nonzero expm1(value) of the cell), i.e. assuming each cell
has at least one gene with exactly one count, rounded to integers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "src" / "cellscale" / "data" / "sources" / "sim_params.json"
DEFAULT_TYPE_EFFECT, DEFAULT_PROGRAM_EFFECT = 1.5, 0.6
MIN_MEAN = 0.1  # counts per cell, for dispersion estimates
N_TOP = 200  # genes for the structure statistic
N_PCS = 20
KNN = 15
HET_QUANTILE = 0.25  # dispersion from the least heterogeneous quarter of the informative genes


# --------------------------------------------------------------------------- pieces
def _csr(X) -> sp.csr_matrix:
    return sp.csr_matrix(X, dtype=np.float64) if not sp.issparse(X) else sp.csr_matrix(X, dtype=np.float64)


def library_stats(lib: np.ndarray) -> dict[str, float]:
    log = np.log(lib[lib > 0])
    med = float(np.median(log))
    mad = float(np.median(np.abs(log - med)))
    return {"library_median": float(math.exp(med)), "library_sigma": 1.4826 * mad}


def gene_distribution(X: sp.csr_matrix, lib: np.ndarray, *, iters: int = 500) -> dict[str, float]:
    """Two-Gaussian mixture (shared SD) of per-gene log relative expression, by EM."""
    totals = np.asarray(X.sum(axis=0)).ravel()
    r = np.log((totals + 0.5) / lib.sum())
    hi0, lo0 = np.quantile(r, 0.95), np.quantile(r, 0.3)
    pi, m_hi, m_lo, s = 0.7, hi0 - 1.0, lo0, max(np.std(r) / 2, 0.1)
    for _ in range(iters):
        l_hi = (1 - pi) * np.exp(-0.5 * ((r - m_hi) / s) ** 2)
        l_lo = pi * np.exp(-0.5 * ((r - m_lo) / s) ** 2)
        w = l_lo / np.maximum(l_hi + l_lo, 1e-300)
        pi = float(np.clip(w.mean(), 1e-3, 1 - 1e-3))
        m_lo = float(np.sum(w * r) / np.sum(w))
        m_hi = float(np.sum((1 - w) * r) / np.sum(1 - w))
        s = float(math.sqrt(np.sum(w * (r - m_lo) ** 2 + (1 - w) * (r - m_hi) ** 2) / r.size))
    if m_lo > m_hi:
        pi, m_lo, m_hi = 1 - pi, m_hi, m_lo
    return {"low_gene_frac": pi, "low_gene_shift": m_hi - m_lo, "base_log_sd": s}


def _lognorm(X: sp.csr_matrix, lib: np.ndarray) -> np.ndarray:
    return np.log1p(np.asarray(X.multiply(1e4 / lib[:, None]).todense()))


def _neighbours(L: np.ndarray, *, k: int, seed: int) -> np.ndarray:
    """Indices (cells x k) of each cell's k nearest neighbours (itself excluded) in PCA space
    of the N_TOP most variable genes of log-normalised ``L``."""
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    top = np.argsort(-L.var(axis=0), kind="stable")[: min(N_TOP * 5, L.shape[1])]
    Z = L[:, top] - L[:, top].mean(axis=0)
    n_pcs = min(N_PCS, Z.shape[0] - 1, Z.shape[1])
    pcs = PCA(n_components=n_pcs, random_state=seed).fit_transform(Z)
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(pcs).kneighbors(pcs)
    return idx[:, 1:]


def _smoothed_means(X: sp.csr_matrix, lib: np.ndarray, nn: np.ndarray) -> np.ndarray:
    P = np.asarray(X.multiply(1.0 / lib[:, None]).todense())
    k = nn.shape[1]
    S = np.zeros_like(P)
    for j in range(k):
        S += P[nn[:, j]]
    return (S / k) * lib[:, None]


def _mom_dispersion(Xd: np.ndarray, mu: np.ndarray, k: int) -> np.ndarray:
    resid = ((Xd - mu) ** 2).sum(axis=0) * k / (k + 1)
    return (resid - mu.sum(axis=0)) / np.maximum((mu**2).sum(axis=0), 1e-12)


def dispersion_stats(X: sp.csr_matrix, lib: np.ndarray, *, seed: int, nn: np.ndarray | None = None) -> dict[str, Any]:
    if nn is None:
        nn = _neighbours(_lognorm(X, lib), k=KNN, seed=seed)
    mu = _smoothed_means(X, lib, nn)
    Xd = np.asarray(X.todense())
    keep = Xd.mean(axis=0) >= MIN_MEAN
    # the genes whose smoothed mean varies least across cells: structure the smoother misses
    # inflates a gene's moment estimate in proportion to its heterogeneity
    het = np.log(mu[:, keep] / lib[:, None] + 1e-9).std(axis=0)
    sel = np.flatnonzero(keep)[het <= np.quantile(het, HET_QUANTILE)] if keep.any() else np.array([], dtype=int)
    if sel.size < 10:
        raise SystemExit(f"error: only {sel.size} usable genes with mean >= {MIN_MEAN} counts per cell: too few to estimate dispersion")
    Xd, mu = Xd[:, sel], mu[:, sel]
    k = nn.shape[1]
    phi = np.clip(_mom_dispersion(Xd, mu, k), 1e-3, 100.0)
    half = np.random.default_rng(seed).permutation(Xd.shape[0]) < Xd.shape[0] // 2
    pa = np.clip(_mom_dispersion(Xd[half], mu[half], k), 1e-3, 100.0)
    pb = np.clip(_mom_dispersion(Xd[~half], mu[~half], k), 1e-3, 100.0)
    c = float(np.cov(np.log(pa), np.log(pb))[0, 1])
    return {"dispersion_median": float(np.median(phi)), "dispersion_sigma": float(math.sqrt(max(c, 0.0))),
            "n_dispersion_genes": int(sel.size)}


def structure_statistic(X: sp.csr_matrix, lib: np.ndarray, *, seed: int) -> float:
    """Mean over the N_TOP most variable genes of var(kNN-smoothed log values) / var(log values)."""
    L = _lognorm(X, lib)
    nn = _neighbours(L, k=KNN, seed=seed)
    top = np.argsort(-L.var(axis=0), kind="stable")[: min(N_TOP, L.shape[1])]
    Lt = L[:, top]
    S = Lt[nn].mean(axis=1)
    return float(np.mean(S.var(axis=0) / np.maximum(Lt.var(axis=0), 1e-12)))


def _simulate_counts(params: dict[str, float], *, n_cells: int, n_genes: int, seed: int) -> sp.csr_matrix:
    """NB-simulator counts with every parameter taken from ``params`` (through a temporary
    parameter file, a new file per call: the simulator caches files by path and mtime)."""
    import tempfile

    from cellscale.config import SimulateConfig
    from cellscale.data.sources.simulate import FILE_CONFIG_FIELDS, GENE_DIST_FIELDS, simulate

    known = set(FILE_CONFIG_FIELDS) | set(GENE_DIST_FIELDS)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "calib.json"
        path.write_text(json.dumps({"params": {k: float(v) for k, v in params.items() if k in known}}))
        X = _csr(simulate(n_cells=n_cells, cfg=SimulateConfig(n_genes=n_genes, params_file=str(path)), seed=seed).X)
    return X[np.asarray(X.sum(axis=1)).ravel() > 0]


def _with_scale(params: dict[str, float], s: float) -> dict[str, float]:
    return {**params, "type_effect": DEFAULT_TYPE_EFFECT * s, "program_effect": DEFAULT_PROGRAM_EFFECT * s}


def calibrate_structure(target: float, params: dict[str, float], *, n_cells: int, n_genes: int, seed: int,
                        bracket: tuple[float, float] = (1 / 16, 4.0), iters: int = 8) -> tuple[float, list]:
    """Scale s of (type_effect, program_effect) = s x (1.5, 0.6) whose simulated structure
    statistic matches ``target`` (bisection on log s within ``bracket``)."""
    trace: list[list[float]] = []

    def stat(s: float) -> float:
        X = _simulate_counts(_with_scale(params, s), n_cells=n_cells, n_genes=n_genes, seed=seed)
        v = structure_statistic(X, np.asarray(X.sum(axis=1)).ravel(), seed=seed)
        trace.append([float(s), v])
        return v

    lo, hi = math.log(bracket[0]), math.log(bracket[1])
    if stat(math.exp(lo)) >= target:
        return math.exp(lo), trace
    if stat(math.exp(hi)) <= target:
        return math.exp(hi), trace
    for _ in range(iters):
        mid = (lo + hi) / 2
        if stat(math.exp(mid)) < target:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2), trace


# --------------------------------------------------------------------------- driver
def estimate(X, *, library: np.ndarray | None = None, seed: int = 0, max_cells: int = 5000,
             keep_gene_dist: bool = False, calibrate: bool = True, calib_cells: int = 3000,
             calib_genes: int | None = None) -> dict[str, Any]:
    """All estimates from a cells x genes count matrix (see the module doc).

    With ``calibrate`` the structure scale is calibrated by simulation, with
    ``min(cells, calib_cells)`` cells and ``calib_genes`` genes (default: the input's gene
    count, at most 5000); the structure statistic of the input is computed on that many of
    its cells, so both sides see the same sample size."""
    X = _csr(X)
    lib = np.asarray(X.sum(axis=1)).ravel() if library is None else np.asarray(library, dtype=np.float64)
    ok = np.asarray(X.sum(axis=1)).ravel() > 0
    X, lib = X[ok], lib[ok]
    rng = np.random.default_rng(seed)
    if X.shape[0] > max_cells:
        rows = np.sort(rng.choice(X.shape[0], size=max_cells, replace=False))
        X, lib = X[rows], lib[rows]
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {"n_cells_used": int(X.shape[0]), "n_genes": int(X.shape[1]),
                             "zero_fraction": float(1 - X.nnz / (X.shape[0] * X.shape[1]))}
    params.update(library_stats(lib))
    if not keep_gene_dist:
        params.update(gene_distribution(X, lib))
    d_real = dispersion_stats(X, lib, seed=seed)
    stats["n_dispersion_genes"] = d_real.pop("n_dispersion_genes")
    params.update(d_real)
    if not calibrate:
        return {"params": params, "statistics": stats}
    n_cal = min(X.shape[0], calib_cells)
    g_cal = int(calib_genes or min(X.shape[1], 5000))
    sub = np.sort(rng.permutation(X.shape[0])[:n_cal])
    # the structure statistic uses the cells' own totals over the given genes, as on the
    # simulated side
    Xs = X[sub]
    target = structure_statistic(Xs, np.asarray(Xs.sum(axis=1)).ravel(), seed=seed)
    stats["structure_statistic"] = target
    s, trace = calibrate_structure(target, params, n_cells=n_cal, n_genes=g_cal, seed=seed)
    stats["calibration_trace"] = trace
    stats["structure_scale"] = s
    params.update({k: v for k, v in _with_scale({}, s).items()})
    return {"params": params, "statistics": stats}


def read_input(path: Path, *, layer: str | None, raw: bool, log1p_input: bool, library_key: str | None):
    import anndata as ad

    a = ad.read_h5ad(path)
    X = a.raw.X if raw else (a.layers[layer] if layer else a.X)
    X = _csr(X)
    lib = None
    if log1p_input:
        E = X.copy()
        np.expm1(E.data, out=E.data)
        mins = np.array([E.data[E.indptr[i]:E.indptr[i + 1]].min() if E.indptr[i + 1] > E.indptr[i] else 1.0
                         for i in range(E.shape[0])])
        E = sp.csr_matrix(E.multiply(1.0 / mins[:, None]))
        dev = float(np.max(np.abs(E.data - np.round(E.data)))) if E.nnz else 0.0
        E.data = np.round(E.data)
        E.eliminate_zeros()
        X = E
        print(f"recovered counts from log1p values (largest distance to an integer before rounding: {dev:.3f})")
    if library_key:
        lib = np.asarray(a.obs[library_key], dtype=np.float64)
    elif not log1p_input:
        vals = X.data
        if vals.size and (np.any(vals < 0) or np.any(vals != np.round(vals))):
            raise SystemExit("error: X is not raw counts: pass --layer, --raw, or --log1p-input")
    return X, lib


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("input", type=Path)
    ap.add_argument("--out", type=Path, default=SHIPPED)
    ap.add_argument("--layer")
    ap.add_argument("--raw", action="store_true", help="read .raw.X")
    ap.add_argument("--log1p-input", action="store_true", help="X holds log1p(normalised counts)")
    ap.add_argument("--library-key", help="obs column with library sizes over ALL genes")
    ap.add_argument("--keep-gene-dist", action="store_true", help="do not estimate the gene distribution")
    ap.add_argument("--no-calibrate", action="store_true", help="do not calibrate the structure scale")
    ap.add_argument("--max-cells", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE[:REASON]")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)

    X, lib = read_input(args.input, layer=args.layer, raw=args.raw, log1p_input=args.log1p_input,
                        library_key=args.library_key)
    result = estimate(X, library=lib, seed=args.seed, max_cells=args.max_cells,
                      keep_gene_dist=args.keep_gene_dist, calibrate=not args.no_calibrate)
    params = dict(result["params"])
    provenance = {k: "estimated" for k in params}
    if args.keep_gene_dist:
        from cellscale.data.sources.simulate import GENE_DIST_FIELDS

        for k, v in GENE_DIST_FIELDS.items():
            params[k] = v
            provenance[k] = "simulator built-in (--keep-gene-dist: not estimated from this input)"
    for item in args.set:
        key, _, rest = item.partition("=")
        value, _, reason = rest.partition(":")
        params[key] = float(value)
        provenance[key] = f"set by hand: {reason or 'no reason given'} (estimate: {result['params'].get(key, 'none')})"
    doc = {
        "format": "cellscale-sim-params",
        "version": 1,
        "params": {k: float(v) for k, v in sorted(params.items())},
        "provenance": provenance,
        "statistics": result["statistics"],
        "input": {"path": args.input.name, "sha256": hashlib.sha256(args.input.read_bytes()).hexdigest(),
                  "layer": args.layer, "raw": args.raw, "log1p_input": args.log1p_input,
                  "library_key": args.library_key},
        "derived_by": "scripts/derive_sim_params.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "note": args.note,
    }
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["params"], indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
