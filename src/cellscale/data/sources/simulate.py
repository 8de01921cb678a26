"""Negative-binomial count simulator with latent cell states.

Generative model (per cell c, gene g)::

    logit[c, g] = b[g]                       base log-expression (wide spread: many low genes)
                + T[type[c], g]              marker genes of the cell's type, shifted up
                + z[c] @ W[:, g]             continuous programs (low-rank loadings x scores)
                + B[batch[c], g]             mild batch effect
    mu[c, g]    = L[c] * softmax_g(logit[c])  L ~ LogNormal(log(library_median), library_sigma)
    count       ~ NB(mean mu, dispersion phi[g])   (Gamma-Poisson; var = mu + phi mu^2)

Gene parameters are drawn from their own seed stream, so they do not depend on ``n_cells``;
cells are drawn in fixed-size chunks from a second stream, so the same seed and shape give
identical counts.

Calibrated defaults: a config field left at its ``SimulateConfig`` default takes its value
from a parameter file — ``cfg.params_file``, or the shipped ``sim_params.json`` (written by
``scripts/derive_sim_params.py`` from a real 10x count matrix; see its ``provenance``) —
together with the shape of the gene base log-expression distribution (``low_gene_frac``,
``low_gene_shift``, ``base_log_sd``). A field set to anything else wins over the file. The
rule compares values, not "was it set", so a config dumped to YAML and read back simulates
the same data.

Known-floor mode (``mode="gaussian"``): values ARE log-scale expression, not counts::

    x[c] = mean + W z[c] + eps[c],   z ~ N(0, I_k),  eps ~ N(0, diag(psi))

with ``k = n_programs`` factors, ``W[g, j] ~ program_effect * N(0, 1)``, ``psi[g] ~
dispersion_median * LogNormal(0, dispersion_sigma)`` (here a noise VARIANCE on the log scale)
and ``mean[g] ~ N(1, 0.5^2)``; no batch effect (the model stays exactly Gaussian; obs columns
are still drawn, ``cell_type`` = the argmax of the first ``min(n_types, k)`` factor scores).
The parameter file is not used in this mode. The Bayes-optimal predictor of masked genes is
the Gaussian conditional mean, and its MSE under Bernoulli masks (``bayes_floor_mse``) is
known: per mask, the exact conditional covariance of the masked block is
``Psi_m + W_m (I + W_o^T Psi_o^{-1} W_o)^{-1} W_m^T`` (Woodbury: k x k solves only).
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from cellscale.config import SimulateConfig
from cellscale.data.mask import draw_mask, seed_sequence
from cellscale.errors import DataError
from cellscale.rules.bits import gaussian_bits

__all__ = [
    "simulate",
    "simulation_params",
    "resolve_config",
    "load_sim_params",
    "gaussian_params",
    "bayes_floors",
    "bayes_floor_mse",
    "bayes_floor_bits",
    "gene_names",
    "SHIPPED_PARAMS",
    "FLOOR_MASK_PROB",
]

SHIPPED_PARAMS = Path(__file__).with_name("sim_params.json")
FLOOR_MASK_PROB = 0.15  # the dataset's evaluation mask probability (data.build.EVAL_MASK_PROB)
FLOOR_N_MASKS = 8192  # Monte-Carlo masks for the floor recorded at simulation time

N_BATCHES = 3
DONORS_PER_BATCH = 3
# ~85% zeros at 2000 genes and 4k UMIs (sparser with more genes, as in real data)
LOW_GENE_FRAC = 0.85
LOW_GENE_SHIFT = 5.0
BASE_LOG_SD = 1.5  # spread of per-gene base log-expression
BATCH_SD = 0.1  # per-gene batch shift (log scale): mild
PROGRAM_GENE_FRAC = 0.15
_CHUNK = 2048
GAUSS_MEAN = 1.0  # gaussian mode: per-gene mean ~ N(GAUSS_MEAN, GAUSS_MEAN_SD^2)
GAUSS_MEAN_SD = 0.5
# parameters a file may set: SimulateConfig fields (used when the config leaves them at their
# default) and the gene base-distribution shape (not config fields)
FILE_CONFIG_FIELDS = (
    "library_median", "library_sigma", "dispersion_median", "dispersion_sigma",
    "type_effect", "program_effect", "marker_frac",
)
GENE_DIST_FIELDS = {"low_gene_frac": LOW_GENE_FRAC, "low_gene_shift": LOW_GENE_SHIFT, "base_log_sd": BASE_LOG_SD}


# --------------------------------------------------------------------------- parameter file
@lru_cache(maxsize=16)
def _read_params_file(path: str, mtime_ns: int) -> tuple[dict[str, Any], str]:
    raw = Path(path).read_bytes()
    try:
        doc = json.loads(raw)
    except ValueError as err:
        raise DataError(f"simulate params file {path} is not valid JSON ({err}): re-derive it with scripts/derive_sim_params.py") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("params"), dict):
        raise DataError(f"simulate params file {path} has no 'params' mapping: re-derive it with scripts/derive_sim_params.py")
    known = set(FILE_CONFIG_FIELDS) | set(GENE_DIST_FIELDS)
    unknown = sorted(set(doc["params"]) - known)
    if unknown:
        raise DataError(f"simulate params file {path}: unknown parameter(s) {unknown}: use {sorted(known)}")
    for k, v in doc["params"].items():
        if not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
            raise DataError(f"simulate params file {path}: '{k}' must be a finite number >= 0, got {v!r}")
    return doc, hashlib.sha256(raw).hexdigest()


def load_sim_params(path: str | Path | None = None) -> dict[str, Any]:
    """The parameter document of ``path`` (the shipped file when None), with its sha256 under
    ``"sha256"`` and its path under ``"path"``."""
    p = Path(path) if path is not None else SHIPPED_PARAMS
    try:
        st = p.stat()
    except OSError:
        raise DataError(f"simulate params file not found: {p}: fix simulate.params_file or remove it") from None
    doc, digest = _read_params_file(str(p.absolute()), int(st.st_mtime_ns))
    return {**doc, "sha256": digest, "path": str(p)}


def resolve_config(cfg: SimulateConfig) -> tuple[SimulateConfig, dict[str, float], dict[str, Any]]:
    """``(cfg with file values for the fields left at their defaults, gene-distribution shape,
    provenance info)``. The gaussian mode uses no file (returns ``cfg`` unchanged)."""
    if cfg.mode == "gaussian":
        return cfg, dict(GENE_DIST_FIELDS), {"params_file": None}
    if cfg.params_file is None and not SHIPPED_PARAMS.is_file():
        return cfg, dict(GENE_DIST_FIELDS), {"params_file": None}
    doc = load_sim_params(cfg.params_file)
    params = doc["params"]
    defaults = SimulateConfig()
    update = {
        f: float(params[f]) for f in FILE_CONFIG_FIELDS
        if f in params and getattr(cfg, f) == getattr(defaults, f)
    }
    try:
        resolved = SimulateConfig.model_validate({**cfg.model_dump(), **update})
    except ValueError as err:
        first = str(err).splitlines()[1:3]
        raise DataError(f"simulate params file {doc['path']}: invalid value ({' '.join(x.strip() for x in first)})") from None
    gene_dist = {k: float(params.get(k, v)) for k, v in GENE_DIST_FIELDS.items()}
    if gene_dist["low_gene_frac"] > 1:
        raise DataError(f"simulate params file {doc['path']}: low_gene_frac must be <= 1")
    info = {
        "params_file": "shipped" if cfg.params_file is None else cfg.params_file,
        "params_sha256": doc["sha256"],
        "from_file": sorted(update) + sorted(k for k in GENE_DIST_FIELDS if k in params),
    }
    return resolved, gene_dist, info


def gene_names(n_genes: int) -> list[str]:
    width = len(str(max(n_genes - 1, 1)))
    return [f"gene{g:0{width}d}" for g in range(n_genes)]


# --------------------------------------------------------------------------- NB mode
def simulation_params(cfg: SimulateConfig, seed: int) -> dict[str, np.ndarray]:
    """Gene- and type-level parameters of the NB simulator (independent of the number of
    cells), with the parameter file applied (``resolve_config``)."""
    cfg, gene_dist, _ = resolve_config(cfg)
    return _nb_params(cfg, gene_dist, seed)


def _nb_params(cfg: SimulateConfig, gene_dist: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    G, K, P = cfg.n_genes, cfg.n_types, cfg.n_programs
    rng = np.random.default_rng(seed_sequence(seed, "simulate-params"))
    # two populations of genes, as in real data: a majority barely expressed, the rest
    # spread over several decades
    low = rng.random(G) < gene_dist["low_gene_frac"]
    base = rng.normal(0.0, gene_dist["base_log_sd"], size=G) - gene_dist["low_gene_shift"] * low
    dispersion = cfg.dispersion_median * np.exp(rng.normal(0.0, cfg.dispersion_sigma, size=G))
    type_probs = rng.dirichlet(np.full(K, 3.0))
    # marker genes, drawn preferentially among the better-expressed genes so types are visible
    n_markers = int(round(cfg.marker_frac * G))
    weight = np.where(base >= np.quantile(base, 0.7), 1.0, 0.1)
    weight /= weight.sum()
    type_shift = np.zeros((K, G), dtype=np.float64)
    for k in range(K):
        if n_markers:
            markers = rng.choice(G, size=min(n_markers, G), replace=False, p=weight)
            type_shift[k, markers] = cfg.type_effect * rng.uniform(0.5, 1.5, size=markers.size)
    loadings = np.zeros((P, G), dtype=np.float64)
    for p in range(P):
        genes = rng.random(G) < PROGRAM_GENE_FRAC
        loadings[p, genes] = cfg.program_effect * rng.normal(0.0, 1.0, size=int(genes.sum()))
    program_type_means = rng.normal(0.0, 0.5, size=(K, P))
    batch_shift = rng.normal(0.0, BATCH_SD, size=(N_BATCHES, G))
    batch_lib = np.exp(rng.normal(0.0, 0.1, size=N_BATCHES))
    return {
        "base": base,
        "dispersion": dispersion,
        "type_probs": type_probs,
        "type_shift": type_shift,
        "loadings": loadings,
        "program_type_means": program_type_means,
        "batch_shift": batch_shift,
        "batch_lib": batch_lib,
    }


# --------------------------------------------------------------------------- gaussian mode
def gaussian_params(cfg: SimulateConfig, seed: int) -> dict[str, np.ndarray]:
    """``{"mean": (G,), "loadings": (G, k), "noise_var": (G,)}`` of the gaussian mode:
    covariance ``loadings @ loadings.T + diag(noise_var)``."""
    G, k = cfg.n_genes, cfg.n_programs
    rng = np.random.default_rng(seed_sequence(seed, "simulate-gaussian-params"))
    mean = rng.normal(GAUSS_MEAN, GAUSS_MEAN_SD, size=G)
    loadings = cfg.program_effect * rng.normal(0.0, 1.0, size=(G, k))
    noise_var = cfg.dispersion_median * np.exp(rng.normal(0.0, cfg.dispersion_sigma, size=G))
    return {"mean": mean, "loadings": loadings, "noise_var": noise_var}


def _masked_condvar_diag(W: np.ndarray, psi: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Var(x_g | x_o) for every gene g of each mask row (True = masked; meaningful where the
    row masks g) of x ~ N(., W W^T + diag(psi)): ``psi_g + w_g^T A^{-1} w_g`` with
    ``A = I + W_o^T Psi_o^{-1} W_o`` (Woodbury: one k x k inverse per row)."""
    M = masks.astype(np.float64)
    k = W.shape[1]
    if k == 0:
        return np.broadcast_to(psi, masks.shape).copy()
    outer = (W[:, :, None] * W[:, None, :]).reshape(W.shape[0], k * k)
    A = np.eye(k).reshape(1, k * k) + (1.0 - M) @ (outer / psi[:, None])
    Ainv = np.linalg.inv(A.reshape(-1, k, k)).reshape(-1, k * k)
    return psi + Ainv @ outer.T


def _masked_condvar_traces(W: np.ndarray, psi: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """tr Cov(x_m | x_o) of each mask row: the sum of its masked genes' conditional variances."""
    return np.where(masks, _masked_condvar_diag(W, psi, masks), 0.0).sum(axis=1)


def _restricted(params: dict[str, np.ndarray], genes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(loadings, noise variances) of the model restricted to ``genes`` (all when None)."""
    W, psi = np.asarray(params["loadings"], float), np.asarray(params["noise_var"], float)
    if genes is not None:
        genes = np.asarray(genes, dtype=np.int64)
        W, psi = W[genes], psi[genes]
    return W, psi


def _checked_masks(masks: np.ndarray, V: int) -> np.ndarray:
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 2 or masks.shape[1] != V:
        raise ValueError(f"masks must be (n, {V}), got {masks.shape}")
    return masks


def bayes_floors(params: dict[str, np.ndarray], *, masks: np.ndarray,
                 genes: np.ndarray | None = None) -> tuple[float, float]:
    """``(mse, bits)``: the Bayes-optimal ``mse`` and ``gaussian-nll`` losses of the gaussian-mode
    model (``gaussian_params``) restricted to ``genes``, for the given masks (n x V bool, e.g. a
    dataset's fixed eval mask), exact for those masks, from one pass over the conditionals.

    ``mse`` = sum over masked positions of the exact conditional variance / number of masked
    positions (the ratio of sums that the evaluation computes); ``bits`` = the mean over masked
    positions of the differential entropy ``0.5 log2(2 pi e Var(x_g | x_o))`` of each masked
    gene's exact conditional (a per-gene predictive cannot do better: the expected NLL of a
    Gaussian predictive is minimised by the true conditional mean and variance)."""
    W, psi = _restricted(params, genes)
    masks = _checked_masks(masks, psi.size)
    sq, bits, n = 0.0, 0.0, 0
    for i in range(0, masks.shape[0], 4096):
        m = masks[i : i + 4096]
        var = _masked_condvar_diag(W, psi, m)[m]
        sq += float(var.sum())
        bits += float(np.sum(gaussian_bits(var)))
        n += int(m.sum())
    return sq / n, bits / n


def bayes_floor_bits(params: dict[str, np.ndarray], *, masks: np.ndarray, genes: np.ndarray | None = None) -> float:
    """The ``bits`` of :func:`bayes_floors`."""
    return bayes_floors(params, masks=masks, genes=genes)[1]


def bayes_floor_mse(
    params: dict[str, np.ndarray], *, mask_prob: float = FLOOR_MASK_PROB, n_masks: int = FLOOR_N_MASKS,
    seed: int = 0, genes: np.ndarray | None = None, masks: np.ndarray | None = None,
    return_se: bool = False,
) -> float | tuple[float, float]:
    """Bayes-optimal masked-reconstruction MSE of the gaussian-mode model (``gaussian_params``)
    restricted to ``genes`` (all when None): E[sum over masked positions of the exact
    conditional variance] / E[number of masked positions] — the ratio of sums that the
    evaluation computes.

    With ``masks`` (n x V bool, e.g. a dataset's fixed eval mask) the expectation is exact
    for those masks (standard error 0). Otherwise ``n_masks`` masks are drawn with the
    evaluation's own rule (``draw_mask``: Bernoulli(mask_prob), >= 1 masked gene per row),
    seeded by ``seed``; the Monte-Carlo standard error (delta method for the ratio) is
    returned too with ``return_se`` (relative SE ~ 1e-4 at V=512, 8192 masks)."""
    if masks is not None:
        floor = bayes_floors(params, masks=masks, genes=genes)[0]
        return (floor, 0.0) if return_se else floor
    W, psi = _restricted(params, genes)
    V = psi.size
    rng = np.random.default_rng(seed_sequence(seed, "bayes-floor"))
    trs, ns = [], []
    for start in range(0, n_masks, 4096):
        m = draw_mask(rng, min(4096, n_masks - start), V, mask_prob)
        trs.append(_masked_condvar_traces(W, psi, m))
        ns.append(m.sum(axis=1).astype(np.float64))
    tr, n = np.concatenate(trs), np.concatenate(ns)
    floor = float(tr.sum() / n.sum())
    if not return_se:
        return floor
    resid = tr - floor * n
    se = float(np.sqrt(np.sum(resid**2)) / n.sum())
    return floor, se


def _obs(cell_type: np.ndarray, batch: np.ndarray, donor: np.ndarray, n_cells: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "cell_type": pd.Categorical([f"type{t}" for t in cell_type]),
            "dataset_id": pd.Categorical([f"sim_batch{b}" for b in batch]),
            "donor_id": pd.Categorical([f"sim_donor{d}" for d in donor]),
        },
        index=pd.Index([f"cell{i}" for i in range(n_cells)], name="cell"),
    )


def _simulate_gaussian(n_cells: int, cfg: SimulateConfig, seed: int) -> AnnData:
    prm = gaussian_params(cfg, seed)
    G, k = cfg.n_genes, cfg.n_programs
    n_type_dims = min(cfg.n_types, k)
    blocks, types, batches, donors = [], [], [], []
    for chunk, start in enumerate(range(0, n_cells, _CHUNK)):
        rng = np.random.default_rng(seed_sequence(seed, "simulate-gaussian-cells", chunk))
        n = min(_CHUNK, n_cells - start)
        z = rng.normal(0.0, 1.0, size=(_CHUNK, k))[:n]
        eps = rng.normal(0.0, 1.0, size=(_CHUNK, G))[:n] * np.sqrt(prm["noise_var"])
        batch = rng.integers(0, N_BATCHES, size=_CHUNK)[:n]
        donor = batch * DONORS_PER_BATCH + rng.integers(0, DONORS_PER_BATCH, size=_CHUNK)[:n]
        blocks.append((prm["mean"] + z @ prm["loadings"].T + eps).astype(np.float32))
        types.append(np.argmax(z[:, :n_type_dims], axis=1) if n_type_dims else np.zeros(n, dtype=np.int64))
        batches.append(batch)
        donors.append(donor)
    # CSR like the count modes (the build's row checks read ``indptr``); the values are dense
    X = sp.csr_matrix(np.concatenate(blocks), dtype=np.float32)
    cell_type, batch, donor = (np.concatenate(x) for x in (types, batches, donors))
    var = pd.DataFrame(index=pd.Index(gene_names(G), name="gene"))
    adata = AnnData(X=X, obs=_obs(cell_type, batch, donor, n_cells), var=var)
    floor, se = bayes_floor_mse(prm, mask_prob=FLOOR_MASK_PROB, n_masks=FLOOR_N_MASKS, seed=seed, return_se=True)
    adata.uns["simulate"] = {"seed": int(seed), **cfg.model_dump(mode="json")}
    adata.uns["source"] = {
        "kind": "simulate",
        "mode": "gaussian",
        "normalized": True,
        "values": "log-scale values of a Gaussian latent-factor model (not counts)",
        "bayes_floor_mse": floor,
        "bayes_floor_se": se,
        "bayes_floor_n_genes": int(G),
        "bayes_floor_mask_prob": FLOOR_MASK_PROB,
        "bayes_floor_n_masks": FLOOR_N_MASKS,
        "bayes_floor_note": "for all simulated genes; a dataset keeping fewer genes has its own "
        "floor (cellscale.data.baselines recomputes it for the kept genes on the eval masks)",
    }
    return adata


# --------------------------------------------------------------------------- simulate
def simulate(*, n_cells: int, cfg: SimulateConfig | None = None, seed: int = 0) -> AnnData:
    """Simulate ``n_cells`` x ``cfg.n_genes`` raw counts (CSR int32) with obs
    ``cell_type``, ``dataset_id``, ``donor_id``; in ``mode="gaussian"`` float32 log-scale
    values instead (CSR, all entries stored), with ``uns["source"]["bayes_floor_mse"]``."""
    cfg = cfg or SimulateConfig()
    if n_cells < 1:
        raise DataError(f"simulate: n_cells must be >= 1, got {n_cells}")
    if cfg.mode == "gaussian":
        return _simulate_gaussian(n_cells, cfg, seed)
    user_cfg = cfg
    cfg, gene_dist, file_info = resolve_config(cfg)
    prm = _nb_params(cfg, gene_dist, seed)
    G, K, P = cfg.n_genes, cfg.n_types, cfg.n_programs
    shape = (1.0 / prm["dispersion"]).astype(np.float32)
    phi = prm["dispersion"]
    blocks, types, batches, donors = [], [], [], []
    for chunk, start in enumerate(range(0, n_cells, _CHUNK)):
        # one generator per chunk: the first n cells do not depend on how many follow
        # (per-cell variables are drawn for a whole chunk, then cut; the element-wise Gamma
        # and Poisson draws use their own generators, so they are prefix-stable too)
        rng, rng_gamma, rng_poisson = (
            np.random.default_rng(s) for s in seed_sequence(seed, "simulate-cells", chunk).spawn(3)
        )
        n = min(_CHUNK, n_cells - start)
        cell_type = rng.choice(K, size=_CHUNK, p=prm["type_probs"])[:n]
        batch = rng.integers(0, N_BATCHES, size=_CHUNK)[:n]
        donor = batch * DONORS_PER_BATCH + rng.integers(0, DONORS_PER_BATCH, size=_CHUNK)[:n]
        lib = cfg.library_median * prm["batch_lib"][batch] * np.exp(
            rng.normal(0.0, cfg.library_sigma, size=_CHUNK)[:n]
        )
        program_noise = rng.normal(0.0, 1.0, size=(_CHUNK, P))[:n]
        logit = prm["base"] + prm["type_shift"][cell_type] + prm["batch_shift"][batch]
        if P:
            scores = prm["program_type_means"][cell_type] + program_noise
            logit += scores @ prm["loadings"]
        logit -= logit.max(axis=1, keepdims=True)
        np.exp(logit, out=logit)
        logit *= (lib / logit.sum(axis=1))[:, None]  # now mu
        # Gamma-Poisson: lambda ~ Gamma(1/phi, phi*mu), count ~ Poisson(lambda)
        gam = rng_gamma.standard_gamma(shape, size=logit.shape, dtype=np.float32)
        counts = rng_poisson.poisson(gam * (logit * phi)).astype(np.int32)
        blocks.append(sp.csr_matrix(counts))
        types.append(cell_type)
        batches.append(batch)
        donors.append(donor)
    cell_type, batch, donor = (np.concatenate(x) for x in (types, batches, donors))
    X = sp.vstack(blocks, format="csr") if len(blocks) > 1 else blocks[0]
    X = sp.csr_matrix(X, dtype=np.int32)
    var = pd.DataFrame(index=pd.Index(gene_names(G), name="gene"))
    adata = AnnData(X=X, obs=_obs(cell_type, batch, donor, n_cells), var=var)
    adata.uns["simulate"] = {"seed": int(seed), **user_cfg.model_dump(mode="json")}
    resolved = {f: getattr(cfg, f) for f in FILE_CONFIG_FIELDS}
    adata.uns["source"] = {
        "kind": "simulate",
        "mode": "nb",
        "normalized": False,
        **file_info,
        "resolved": {**resolved, **gene_dist},
    }
    return adata
