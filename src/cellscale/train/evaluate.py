"""Scores of a model on a held-out split under the dataset's fixed evaluation mask."""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cellscale.config import TrainConfig
from cellscale.data.loader import eval_batches
from cellscale.data.store import Dataset
from cellscale.model import CellTransformer
from cellscale.rules import objectives
from cellscale.rules.bits import count_weighted_bits
from cellscale.runtime.distributed import DistContext
from cellscale.runtime.io import atomic_write_with


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
    # the share of masked positions whose variance (dispersion) sits on its clamp; None for mse
    clamp_share: float | None = None
    sse_g: np.ndarray | None = None
    nats_g: np.ndarray | None = None
    n_g: np.ndarray | None = None
    cells: CellSums | None = None


@dataclass(frozen=True)
class CellSums:
    """Per-cell sums over a split's masked positions, in split order (``per_cell``): squared
    errors (``sse``), the objective's loss in nats (squared errors again for mse; ``loss``) and
    masked counts (``n``). Any subset of cells, or a resample of them, is scored from these
    exactly: its loss is sum(loss) / sum(n) (in nats; ``objectives.to_report_units``)."""

    sse: np.ndarray
    loss: np.ndarray
    n: np.ndarray

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}_sse": self.sse, f"{prefix}_loss": self.loss, f"{prefix}_n": self.n}


class _CellTotals:
    """Per-cell sums (see :class:`CellSums`), accumulated on the host; under DDP each rank fills
    the rows of its own batches and the arrays are summed."""

    def __init__(self, objective: str, n_cells: int) -> None:
        self.objective = objective
        self.sq = np.zeros(n_cells, dtype=np.float64)
        self.loss = np.zeros(n_cells, dtype=np.float64)
        self.n = np.zeros(n_cells, dtype=np.float64)

    def add(self, start: int, diff: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> None:
        rows = mask.nonzero()[:, 0].cpu().numpy()  # outputs are in mask.nonzero() order
        size = int(mask.shape[0])
        sq = np.bincount(rows, weights=(diff.double() ** 2).cpu().numpy(), minlength=size)
        self.sq[start : start + size] += sq
        self.loss[start : start + size] += sq if self.objective == "mse" else np.bincount(
            rows, weights=pos.double().cpu().numpy(), minlength=size)
        self.n[start : start + size] += np.bincount(rows, minlength=size)

    def result(self, dist: DistContext | None) -> CellSums:
        sq, loss, n = self.sq, self.loss, self.n
        if dist is not None and dist.active:
            sq, loss, n = (dist.all_reduce_array(a) for a in (sq, loss, n))
        return CellSums(sse=sq, loss=loss, n=np.rint(n).astype(np.int64))


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
                  ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor | None]:
    """(point-prediction error, the objective's loss, mask) at the batch's masked positions, and
    which of them sit on the head's clamp (``objectives.at_clamp``)."""
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
    return (diff, pos, mask), objectives.at_clamp(objective, out)


@torch.no_grad()
def evaluate(
    model: CellTransformer, ds: Dataset, split: str, *, cfg: TrainConfig, device: torch.device,
    autocast=nullcontext, max_cells: int | None = None, dist: DistContext | None = None,
    per_gene: bool = False, per_cell: bool = False,
) -> EvalResult:
    """Score every masked position of the split under the dataset's fixed evaluation mask.

    Under DDP (``dist`` active) rank ``r`` scores eval batches ``r, r+W, ...`` and the sums are
    all-reduced, so every rank returns the same numbers. With ``per_gene`` the split totals are
    the ratios of the per-gene sums (see :class:`_GeneTotals`); with ``per_cell`` the result also
    holds each cell's sums (:class:`CellSums`), and its totals are their ratios."""
    was_training = model.training
    model.eval()
    objective = model.cfg.objective
    totals = _GeneTotals(objective, ds.n_genes) if per_gene else _SplitTotals(objective)
    world = dist.world_size if dist is not None and dist.active else 1
    rank = dist.rank if world > 1 else 0
    n_split = int(ds.splits[split].size) if split in ds.splits else 0
    cells = _CellTotals(objective, min(n_split, max_cells or n_split)) if per_cell else None
    batches = eval_batches(ds, split, batch_size=cfg.eval_batch_size, max_cells=max_cells,
                           with_counts=objectives.needs_counts(objective))
    clamped, masked = 0, 0  # summed on the device: read once, after the loop
    for i, item in enumerate(batches):
        if i % world == rank:
            errors, on_clamp = _batch_errors(model, item, device=device, autocast=autocast)
            totals.add(*errors)
            if on_clamp is not None:
                clamped, masked = clamped + on_clamp.sum(), masked + on_clamp.numel()
            if cells is not None:
                cells.add(i * cfg.eval_batch_size, *errors)
    model.train(was_training)
    result = totals.result(dist)
    if objective != "mse":
        clamped, masked = float(clamped), float(masked)
        if dist is not None and dist.active:
            clamped, masked = dist.all_reduce_sum([clamped, masked])
        result = dataclasses.replace(result, clamp_share=clamped / masked if masked else None)
    if cells is None:
        return result
    # the split totals as ratios of the float64 per-cell sums, as with per_gene
    sums = cells.result(dist)
    n = max(int(sums.n.sum()), 1)
    loss = objectives.to_report_units(objective, float(sums.loss.sum()) / n)
    return dataclasses.replace(result, loss=loss, mse=float(sums.sse.sum()) / n, cells=sums)


def write_cell_sums(path: Path, val: EvalResult, test: EvalResult) -> None:
    """The validation and test per-cell sums of one set of weights, as one .npz (atomically):
    ``val_sse, val_loss, val_n, test_sse, test_loss, test_n`` (:class:`CellSums`)."""
    arrays = {**val.cells.arrays("val"), **test.cells.arrays("test")}

    def write(p: Path) -> None:
        with open(p, "wb") as fh:
            np.savez(fh, **arrays)

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(path, write)


def per_gene_summary(sse: np.ndarray, counts: np.ndarray) -> tuple[list[float | None], dict[str, float | None]]:
    """Per-gene MSE (None for a gene never masked) and the run-level numbers of result.json.

    ``entropy_bits_per_gene`` is the heteroscedastic Gaussian entropy WEIGHTED BY MASKED COUNTS
    (``cellscale.rules.bits.count_weighted_bits``; None where a masked gene's MSE is 0 or not finite):
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
        out["entropy_bits_per_gene"] = count_weighted_bits(mse, counts)
    return values, out
