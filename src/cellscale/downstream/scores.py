"""Downstream scores of a cell embedding: a linear probe, kNN label transfer and batch mixing.

Torch-free (numpy and scikit-learn); ``cellscale.sweep.scoring`` embeds the runs and calls these.

Protocol. The cells are the dataset's own splits: every model is fitted on (at most
``MAX_FIT_CELLS`` of) the **training** split, in its fixed seeded order, so every run of a sweep
is probed with the same cells whatever its ``train_cells``; the scores are measured on the
**validation** and **test** splits (at most ``MAX_SCORE_CELLS`` each, a seeded subset). Validation
and test cells never enter a fit. Cells without a label (missing, empty, "nan") are left out.

* **Linear probe**: scikit-learn ``LogisticRegression`` (multinomial, lbfgs, L2 with C = 1; at most
  500 iterations) on the embedding centred and divided by **one** scale, its root-mean-square
  coordinate on the training cells; macro-F1 and accuracy. Macro-F1 weighs every cell type
  alike, so a rare type counts as much as a common one. One scale for all coordinates makes the
  L2 penalty the same for every embedding whatever its units (a transformer's hidden states are
  about 0.01 in size, PCA scores about 1: with no scaling at all the same penalty smothered the
  transformers' probes), and keeps the embedding's geometry as kNN sees it. Per-coordinate
  z-scoring is deliberately not used: it blows a direction the model barely expresses up to unit
  variance (docs/downstream.md).
* **kNN label transfer**: each scored cell takes the majority label of its ``K_NEIGHBOURS``
  nearest training cells (Euclidean, the embedding as it is); macro-F1.
* **Batch mixing** (kNN batch entropy, normalised; scib-metrics does not install offline here):
  within one split S, each cell's ``k = min(K_NEIGHBOURS, |S| - 1)`` nearest other cells of S;
  ``H_i`` = the entropy of their batch labels. The score is ``mean_i H_i`` divided by the same mean
  with the batch labels randomly permuted over S (``N_PERMUTATIONS`` seeded draws, the same
  neighbour graph). About 1: neighbourhoods as mixed as chance allows; 0: every neighbourhood is
  one batch. The permutation normaliser accounts for k and for unbalanced batches, which the
  plain log(number of batches) does not. Needs at least two batches in S.

Reference embeddings (``reference_embeddings``): ``pca50``, PCA to min(50, V, n - 1) components of
the dataset's log1p values fitted on the training cells; ``hvg``, the V log1p values themselves.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cellscale.config import DOWNSTREAM_BATCH_KEYS, DOWNSTREAM_LABEL

__all__ = ["LABEL_DEFAULT", "BATCH_KEYS", "ProbeCells", "probe_cells", "probe_scores", "knn_scores",
           "batch_mixing", "score_embedding", "reference_embeddings", "score_fields", "SPLITS"]

# the label probed and the obs columns tried, in order, as the batch key (cellscale.config: the
# command line reads them there without loading this module's pandas)
LABEL_DEFAULT, BATCH_KEYS = DOWNSTREAM_LABEL, DOWNSTREAM_BATCH_KEYS
MAX_FIT_CELLS = 20_000
MAX_SCORE_CELLS = 10_000
K_NEIGHBOURS = 15
N_PERMUTATIONS = 5
PCA_COMPONENTS = 50
SPLITS = ("val", "test")
_NO_LABEL = {"", "nan", "none", "null", "na", "<na>"}


def score_fields() -> tuple[str, ...]:
    """The numeric result fields of one embedding's scores, in order."""
    out = []
    for split in SPLITS:
        out += [f"probe_{split}_f1", f"probe_{split}_accuracy", f"knn_{split}_f1", f"batch_mixing_{split}"]
    return tuple(out)


@dataclass(frozen=True)
class ProbeCells:
    """The dataset rows of each split's probed cells, their labels and batches (None: no batch key)."""

    label: str
    batch_key: str | None
    rows: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    batches: dict[str, np.ndarray] | None

    @property
    def all_rows(self) -> np.ndarray:
        return np.concatenate([self.rows[s] for s in ("train", *SPLITS)])


def _labelled(values: pd.Series) -> np.ndarray:
    text = values.astype(str).str.strip()
    return (values.notna() & ~text.str.lower().isin(_NO_LABEL)).to_numpy()


def _pick_batch_key(obs: pd.DataFrame, batch_key: str | None) -> str | None:
    if batch_key is not None:
        return batch_key if batch_key in obs else None
    for key in BATCH_KEYS:
        if key in obs and obs[key].nunique(dropna=True) > 1:
            return key
    return None


def probe_cells(obs: pd.DataFrame, splits: dict[str, np.ndarray], *, label: str = LABEL_DEFAULT,
                batch_key: str | None = None, seed: int = 0) -> ProbeCells | str:
    """The probed cells of a dataset (obs in dataset row order, its splits), or why there are none."""
    if label not in obs:
        shown = ", ".join(str(c) for c in obs.columns if c != "cell_id")[:200] or "none"
        return f"the data have no '{label}' labels (obs columns: {shown})"
    ok = _labelled(obs[label])
    rng = np.random.default_rng(seed)
    rows = {"train": np.asarray(splits["train"], dtype=np.int64)}
    rows["train"] = rows["train"][ok[rows["train"]]][:MAX_FIT_CELLS]  # the fixed seeded order: nested
    for split in SPLITS:
        idx = np.asarray(splits[split], dtype=np.int64)
        idx = idx[ok[idx]]
        if idx.size > MAX_SCORE_CELLS:
            idx = np.sort(rng.choice(idx, size=MAX_SCORE_CELLS, replace=False))
        rows[split] = idx
    labels = {s: obs[label].astype(str).to_numpy()[r] for s, r in rows.items()}
    if np.unique(labels["train"]).size < 2:
        return f"the training cells have fewer than two '{label}' labels: nothing to classify"
    if any(r.size == 0 for r in rows.values()):
        return f"a split has no cell with a '{label}' label"
    key = _pick_batch_key(obs, batch_key)
    batches = None if key is None else {s: obs[key].astype(str).to_numpy()[r] for s, r in rows.items()}
    return ProbeCells(label, key, rows, labels, batches)


def _macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro-F1 over the labels of the scored cells: the same classes for every embedding scored on
    them (sklearn's default adds any label an embedding predicts that the cells lack, a zero-F1 class
    that would move one embedding's average and not another's)."""
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, labels=np.unique(y_true), average="macro", zero_division=0))


def _one_scale(train: np.ndarray):
    """x -> (x - the training mean) / the training cells' root-mean-square centred coordinate."""
    train = np.asarray(train, dtype=np.float64)
    mean = train.mean(axis=0)
    rms = float(np.sqrt(np.mean((train - mean) ** 2)))
    scale = rms if rms > 0 else 1.0
    return lambda x: (np.asarray(x, dtype=np.float64) - mean) / scale


def probe_scores(train: np.ndarray, y_train: np.ndarray, evals: dict[str, tuple[np.ndarray, np.ndarray]]
                 ) -> dict[str, dict[str, float]]:
    """Logistic regression fitted on ``train`` only; {split: {"f1", "accuracy"}} on each held-out set."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    # 500 lbfgs iterations: on a 128-d embedding the predictions were the same as at 1,454 (converged)
    scaled = _one_scale(train)
    with warnings.catch_warnings():  # lbfgs at its cap still gives a usable probe
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = LogisticRegression(max_iter=500, C=1.0).fit(scaled(train), y_train)
    out = {}
    for split, (X, y) in evals.items():
        pred = clf.predict(scaled(X))
        out[split] = {"f1": _macro_f1(y, pred), "accuracy": float(np.mean(pred == y))}
    return out


def knn_scores(train: np.ndarray, y_train: np.ndarray, evals: dict[str, tuple[np.ndarray, np.ndarray]]
               ) -> dict[str, float]:
    """kNN label transfer from the training cells: {split: macro-F1}."""
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(n_neighbors=min(K_NEIGHBOURS, len(train))).fit(train, y_train)
    return {split: _macro_f1(y, knn.predict(X)) for split, (X, y) in evals.items()}


def _mean_entropy(neigh: np.ndarray, codes: np.ndarray, n_batches: int) -> float:
    counts = np.zeros((neigh.shape[0], n_batches))
    np.add.at(counts, (np.repeat(np.arange(neigh.shape[0]), neigh.shape[1]), codes[neigh].ravel()), 1.0)
    p = counts / neigh.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return float(h.mean())


def batch_mixing(X: np.ndarray, batches: np.ndarray, *, seed: int = 0) -> float | None:
    """kNN batch entropy of the cells X, over that of randomly permuted batch labels (module
    docstring); None with fewer than two batches or three cells."""
    from sklearn.neighbors import NearestNeighbors

    _, codes = np.unique(np.asarray(batches).astype(str), return_inverse=True)
    n_batches = int(codes.max()) + 1 if codes.size else 0
    if n_batches < 2 or len(X) < 3:
        return None
    k = min(K_NEIGHBOURS, len(X) - 1)
    neigh = NearestNeighbors(n_neighbors=k + 1).fit(X).kneighbors(X, return_distance=False)[:, 1:]
    observed = _mean_entropy(neigh, codes, n_batches)
    rng = np.random.default_rng(seed)
    chance = np.mean([_mean_entropy(neigh, rng.permutation(codes), n_batches) for _ in range(N_PERMUTATIONS)])
    return float(observed / chance) if chance > 0 else None


def score_embedding(emb: dict[str, np.ndarray], cells: ProbeCells) -> dict[str, float | None]:
    """All scores of one embedding ({split: [n, d]} for train, val, test) as result fields."""
    evals = {s: (emb[s], cells.labels[s]) for s in SPLITS}
    probe = probe_scores(emb["train"], cells.labels["train"], evals)
    knn = knn_scores(emb["train"], cells.labels["train"], evals)
    out: dict[str, float | None] = {}
    for s in SPLITS:
        mixing = None if cells.batches is None else batch_mixing(emb[s], cells.batches[s])
        out.update({f"probe_{s}_f1": probe[s]["f1"], f"probe_{s}_accuracy": probe[s]["accuracy"],
                    f"knn_{s}_f1": knn[s], f"batch_mixing_{s}": mixing})
    return out


def reference_embeddings(values: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """{"pca50": {split: X}, "hvg": {split: X}} of the log1p values of each split's cells; the
    PCA is fitted on the training cells only."""
    from sklearn.decomposition import PCA

    train = np.asarray(values["train"], dtype=np.float64)
    n_comp = int(min(PCA_COMPONENTS, train.shape[1], train.shape[0] - 1))
    pca = PCA(n_components=n_comp, svd_solver="full").fit(train)
    return {"pca50": {s: pca.transform(np.asarray(v, dtype=np.float64)).astype(np.float32) for s, v in values.items()},
            "hvg": {s: np.asarray(v, dtype=np.float32) for s, v in values.items()}}


def split_rows(cells: ProbeCells, emb_all: np.ndarray) -> dict[str, np.ndarray]:
    """An embedding of ``cells.all_rows`` (in that order) cut back into its splits."""
    out, start = {}, 0
    for s in ("train", *SPLITS):
        n = cells.rows[s].size
        out[s] = emb_all[start:start + n]
        start += n
    return out


def describe(cells: ProbeCells) -> dict[str, Any]:
    """The protocol facts stored beside the scores."""
    return {"downstream_label": cells.label, "downstream_batch_key": cells.batch_key,
            "downstream_n_train": int(cells.rows["train"].size),
            "downstream_n_classes": int(np.unique(cells.labels["train"]).size)}
