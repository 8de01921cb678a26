"""Scores of a model on a held-out split under the dataset's fixed evaluation mask."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from cellscale import objectives
from cellscale.bits import gaussian_bits
from cellscale.config import TrainConfig
from cellscale.data.loader import eval_batches
from cellscale.data.store import Dataset
from cellscale.distributed import DistContext
from cellscale.model import CellTransformer


@dataclass(frozen=True)
class EvalResult:
    """Scores of one split under the fixed evaluation mask.

    ``loss``: the objective's number (the MSE for ``mse``; bits per masked gene for the
    likelihoods); ``mse``: the MSE of the point prediction (``objectives.point_prediction``) of
    the log1p values, comparable across objectives. With ``per_gene``: float64 per-gene sums of
    squared errors (``sse_g``) and of the loss in nats (``nats_g``; squared errors again for mse)
    and masked counts (``n_g``)."""

    loss: float
    mse: float
    sse_g: np.ndarray | None = None
    nats_g: np.ndarray | None = None
    n_g: np.ndarray | None = None


class _SplitTotals:
    """Sums over the split's masked positions: squared error, the objective's loss, count."""

    def __init__(self, objective: str) -> None:
        self.objective = objective
        self.sq, self.loss, self.n = 0.0, 0.0, 0

    def add(self, diff: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> None:
        self.sq += float((diff**2).sum())
        self.loss += float(pos.sum())
        self.n += int(mask.sum())

    def result(self, dist: DistContext | None) -> EvalResult:
        sq, loss, n = self.sq, self.loss, self.n
        if dist is not None and dist.active:
            sq, loss, n = dist.all_reduce_sum([sq, loss, float(n)])
            n = int(round(n))
        return EvalResult(loss=objectives.to_report_units(self.objective, loss / max(n, 1)),
                          mse=sq / max(n, 1))


class _GeneTotals:
    """Per-gene sums, accumulated on the host with bincount: a fixed summation order on any
    device. The split totals are their ratios, so the count-weighted mean of the per-gene
    errors equals them exactly."""

    def __init__(self, objective: str, n_genes: int) -> None:
        self.objective, self.n_genes = objective, n_genes
        self.sq = np.zeros(n_genes, dtype=np.float64)
        self.nats = np.zeros(n_genes, dtype=np.float64)
        self.n = np.zeros(n_genes, dtype=np.int64)

    def add(self, diff: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> None:
        # outputs are in mask.nonzero() order: column 1 of nonzero() is the gene of each entry
        genes = mask.nonzero()[:, 1].cpu().numpy()
        sq = np.bincount(genes, weights=(diff.double() ** 2).cpu().numpy(), minlength=self.n_genes)
        self.sq += sq
        self.nats += sq if self.objective == "mse" else np.bincount(
            genes, weights=pos.double().cpu().numpy(), minlength=self.n_genes)
        self.n += np.bincount(genes, minlength=self.n_genes)

    def result(self, dist: DistContext | None) -> EvalResult:
        if dist is not None and dist.active:  # float64 sums; counts are exact in float64 (< 2^53)
            v = self.n_genes
            reduced = np.asarray(dist.all_reduce_sum(
                [*self.sq.tolist(), *self.nats.tolist(), *self.n.astype(np.float64).tolist()]))
            self.sq, self.nats = reduced[:v], reduced[v : 2 * v]
            self.n = np.rint(reduced[2 * v :]).astype(np.int64)
        total = max(int(self.n.sum()), 1)
        return EvalResult(
            loss=objectives.to_report_units(self.objective, float(self.nats.sum()) / total),
            mse=float(self.sq.sum()) / total, sse_g=self.sq, nats_g=self.nats, n_g=self.n)


def _batch_errors(model: CellTransformer, item: tuple, *, device: torch.device, autocast,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(point-prediction error, the objective's loss, mask) at the batch's masked positions."""
    objective = model.cfg.objective
    values, mask, *extra = (t.to(device, non_blocking=True) for t in item)
    with autocast():
        out = model(values, mask)
    # the masked positions' targets (and counts, scales), gathered once for both numbers
    target = values[mask]
    kw = {}
    if extra:
        counts, log_scale = extra
        kw = {"counts": counts[mask], "log_scale": objectives.at_positions(log_scale, mask)}
    diff = objectives.point_prediction(objective, out, log_scale=kw.get("log_scale")) - target
    pos = diff**2 if objective == "mse" else objectives.position_loss(objective, out, target, **kw)
    return diff, pos, mask


@torch.no_grad()
def evaluate(
    model: CellTransformer, ds: Dataset, split: str, *, cfg: TrainConfig, device: torch.device,
    autocast=nullcontext, max_cells: int | None = None, dist: DistContext | None = None,
    per_gene: bool = False,
) -> EvalResult:
    """Score every masked position of the split under the dataset's fixed evaluation mask.

    Under DDP (``dist`` active) rank ``r`` scores eval batches ``r, r+W, ...`` and the sums are
    all-reduced, so every rank returns the same numbers. With ``per_gene`` the split totals are
    the ratios of the per-gene sums (see :class:`_GeneTotals`)."""
    was_training = model.training
    model.eval()
    objective = model.cfg.objective
    totals = _GeneTotals(objective, ds.n_genes) if per_gene else _SplitTotals(objective)
    world = dist.world_size if dist is not None and dist.active else 1
    rank = dist.rank if world > 1 else 0
    batches = eval_batches(ds, split, batch_size=cfg.eval_batch_size, max_cells=max_cells,
                           with_counts=objectives.needs_counts(objective))
    for i, item in enumerate(batches):
        if i % world == rank:
            totals.add(*_batch_errors(model, item, device=device, autocast=autocast))
    model.train(was_training)
    return totals.result(dist)


def per_gene_summary(sse: np.ndarray, counts: np.ndarray) -> tuple[list[float | None], dict[str, float | None]]:
    """Per-gene MSE (None for a gene never masked) and the run-level numbers of result.json.

    ``entropy_bits_per_gene`` is the heteroscedastic Gaussian entropy WEIGHTED BY MASKED COUNTS:
    sum_g n_g 0.5 log2(2 pi e mse_g) / sum_g n_g, i.e. the mean over masked positions of the
    entropy of that position's gene. With the same weights the test MSE is the count-weighted
    mean of the mse_g, so by Jensen (log is concave) it is never above 0.5 log2(2 pi e test_mse).
    ``per_gene_mse_spread`` is the (unweighted, population) standard deviation of mse_g over the
    genes that were masked at least once."""
    seen = counts > 0
    mse = np.full(sse.shape, np.nan)
    mse[seen] = sse[seen] / counts[seen]
    values = [float(v) if s else None for v, s in zip(mse, seen)]
    out: dict[str, float | None] = {"per_gene_mse_spread": None, "entropy_bits_per_gene": None}
    if seen.any():
        out["per_gene_mse_spread"] = float(np.std(mse[seen]))
        m, w = mse[seen], counts[seen].astype(np.float64)
        if np.all(m > 0) and np.all(np.isfinite(m)):
            out["entropy_bits_per_gene"] = float(np.sum(w * gaussian_bits(m)) / np.sum(w))
    return values, out
