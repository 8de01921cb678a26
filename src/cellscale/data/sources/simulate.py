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
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from cellscale.config import SimulateConfig
from cellscale.data.mask import seed_sequence
from cellscale.errors import DataError

__all__ = ["simulate", "simulation_params"]

N_BATCHES = 3
DONORS_PER_BATCH = 3
# ~85% zeros at 2000 genes and 4k UMIs (sparser with more genes, as in real data)
LOW_GENE_FRAC = 0.85
LOW_GENE_SHIFT = 5.0
BASE_LOG_SD = 1.5  # spread of per-gene base log-expression
BATCH_SD = 0.1  # per-gene batch shift (log scale): mild
PROGRAM_GENE_FRAC = 0.15
_CHUNK = 2048


def simulation_params(cfg: SimulateConfig, seed: int) -> dict[str, np.ndarray]:
    """Gene- and type-level parameters of the simulator (independent of the number of cells)."""
    G, K, P = cfg.n_genes, cfg.n_types, cfg.n_programs
    rng = np.random.default_rng(seed_sequence(seed, "simulate-params"))
    # two populations of genes, as in real data: a majority barely expressed, the rest
    # spread over several decades
    low = rng.random(G) < LOW_GENE_FRAC
    base = rng.normal(0.0, BASE_LOG_SD, size=G) - LOW_GENE_SHIFT * low
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


def simulate(*, n_cells: int, cfg: SimulateConfig | None = None, seed: int = 0) -> AnnData:
    """Simulate ``n_cells`` x ``cfg.n_genes`` raw counts (CSR int32) with obs
    ``cell_type``, ``dataset_id``, ``donor_id``."""
    cfg = cfg or SimulateConfig()
    if cfg.mode != "nb":
        raise DataError(
            f"simulate mode '{cfg.mode}' is not available yet: use mode 'nb' (the default)"
        )
    if cfg.params_file is not None:
        raise DataError("simulate.params_file is not available yet: remove it from the config")
    if n_cells < 1:
        raise DataError(f"simulate: n_cells must be >= 1, got {n_cells}")
    prm = simulation_params(cfg, seed)
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
    width = len(str(max(G - 1, 1)))
    var = pd.DataFrame(index=pd.Index([f"gene{g:0{width}d}" for g in range(G)], name="gene"))
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([f"type{t}" for t in cell_type]),
            "dataset_id": pd.Categorical([f"sim_batch{b}" for b in batch]),
            "donor_id": pd.Categorical([f"sim_donor{d}" for d in donor]),
        },
        index=pd.Index([f"cell{i}" for i in range(n_cells)], name="cell"),
    )
    adata = AnnData(X=X, obs=obs, var=var)
    adata.uns["simulate"] = {"seed": int(seed), **cfg.model_dump(mode="json")}
    return adata
