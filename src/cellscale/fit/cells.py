"""The evaluation cells' sampling error, for the fit's intervals.

Every run of a sweep is scored on the same evaluation cells (one split, a few hundred cells). A
split that happened to hold easier cells than the population lowers every point of the ladder
together: a common shift of the curve, which moves the floor one for one and never shows in the
residuals, so no interval built from the residuals or the runs holds it. Each fitted point keeps
its per-cell error sums on disk (``RUN_DIR/cells.npz``: ``val_sse, val_loss, val_n, test_sse,
test_loss, test_n``, one entry per cell in split order, the same cells in the same order for every
run; ``cellscale.train.evaluate.CellSums``), so a resample of the cells is scored exactly:
sum(loss) / sum(n) over the drawn cells (in nats; / ln 2 for bits).

:func:`cell_draws` draws the cells once per resample and scores every point on that SAME draw:
drawing them apart for each point would make the shift independent from point to point, so it
would look like residual noise and average out over the ladder, the opposite of what shared cells
do. ``fit_table(..., cell_draws=...)`` adds these draws to its resamples
(``cellscale.fit.intervals.compute_intervals``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cellscale.errors import FitError
from cellscale.fit.data import finished_mask
from cellscale.schema import BRANCH_CELLS_DIR, RUN_CELLS, RUNS_DIR

SPLITS = ("val", "test")
# what is summed per cell: the objective's loss in nats, or the squared errors (an MSE column of a
# likelihood objective's table); their count is ``<split>_n`` either way
MEASURES = ("loss", "sse")
LN2 = float(np.log(2.0))
# the cells' random stream is its own: mixed into the seed, so that a fit seeded like the cells
# (``fit_table(seed=s)`` with ``cell_draws(seed=s)``) does not draw its residuals from the same
# numbers (numpy maps integer draws of equal streams onto one another, whatever their ranges)
CELL_STREAM = 0xCE11
# resamples scored at a time (bounds the (chunk, n_cells) matrix of draw counts)
_CHUNK = 256


@dataclass(frozen=True)
class CellDraws:
    """What ``fit_table(cell_draws=...)`` takes besides a bare (B, n_rows) array: the draws with
    what they were drawn from. ``values``: (B, n_rows) losses of each row of the table on each
    resample of the cells (rows of unfinished runs may hold anything; they are dropped with the
    rows); ``observed``: (n_rows,) each row's loss on all the cells, the centre the resamples move
    around (None: the table's own y); ``n_cells`` and ``split`` are recorded in fit.json."""

    values: np.ndarray
    observed: np.ndarray | None = None
    n_cells: int | None = None
    split: str | None = None


def read_point_sums(paths, split: str, measure: str = "loss") -> tuple[np.ndarray, np.ndarray]:
    """(n_points, n_cells) per-cell sums of ``measure`` (``loss``: the objective's loss in nats;
    ``sse``: squared errors) and masked counts of ``split`` from one .npz per point (``paths``).
    A FitError when a file is missing or unreadable, lacks the split's arrays, or when the points
    do not share one number of cells (they must be scored on the same evaluation cells)."""
    if split not in SPLITS:
        raise FitError(f"split must be one of {', '.join(SPLITS)}, got '{split}'")
    if measure not in MEASURES:
        raise FitError(f"measure must be one of {', '.join(MEASURES)}, got '{measure}'")
    keys = (f"{split}_{measure}", f"{split}_n")
    sums, counts = [], []
    for path in map(Path, paths):
        if not path.is_file():
            raise FitError(f"per-cell sums not found: {path}")
        try:
            with np.load(path) as npz:
                missing = [k for k in keys if k not in npz.files]
                if missing:
                    raise FitError(f"{path}: no {', '.join(missing)} (has {', '.join(npz.files) or 'nothing'})")
                s, n = (np.asarray(npz[k], dtype=np.float64).ravel() for k in keys)
        except FitError:
            raise
        except Exception as err:  # noqa: BLE001 - any unreadable file is one line for the user
            raise FitError(f"{path}: not a readable .npz ({type(err).__name__})") from None
        if s.shape != n.shape:
            raise FitError(f"{path}: {keys[0]} has {s.size} cells but {keys[1]} has {n.size}")
        sums.append(s)
        counts.append(n)
    sizes = sorted({s.size for s in sums})
    if len(sizes) > 1:
        raise FitError(f"the points were scored on different numbers of {split} cells ({', '.join(map(str, sizes))});"
                       " they must share the evaluation cells")
    if not sums:
        raise FitError("no per-cell sums to read (no points)")
    return np.vstack(sums), np.vstack(counts)


def _check(loss_sums, counts, unit: str) -> tuple[np.ndarray, np.ndarray, float]:
    sums, n = np.atleast_2d(np.asarray(loss_sums, float)), np.atleast_2d(np.asarray(counts, float))
    if sums.shape != n.shape:
        raise FitError(f"loss sums {sums.shape} and counts {n.shape} differ in shape")
    if unit not in ("mse", "bits"):
        raise FitError(f"unit must be 'mse' or 'bits', got '{unit}'")
    if sums.shape[1] == 0:
        raise FitError("no evaluation cells (the sums are empty)")
    return sums, n, (LN2 if unit == "bits" else 1.0)


def observed(loss_sums, counts, unit: str = "mse") -> np.ndarray:
    """Each point's loss on all its cells: sum(loss) / sum(n), / ln 2 for ``unit="bits"``."""
    sums, n, scale = _check(loss_sums, counts, unit)
    with np.errstate(divide="ignore", invalid="ignore"):
        return sums.sum(axis=1) / n.sum(axis=1) / scale


def cell_draws(loss_sums, counts, *, unit: str = "mse", n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_points) losses of every point on ``n_boot`` resamples of the cells.

    ``loss_sums`` and ``counts`` are (n_points, n_cells) (:func:`read_point_sums`). Each resample
    draws the cells once, with replacement (W: (n_boot, n_cells) draw counts, multinomial), and
    scores every point on that same draw: (W @ sums.T) / (W @ counts.T), / ln 2 for bits. The
    points share the cells, so their cell noise is one shared draw (a common shift of the ladder),
    not independent noise per point. Seeded by ``seed`` on a stream of its own (``CELL_STREAM``):
    the draws depend on nothing else."""
    sums, n, scale = _check(loss_sums, counts, unit)
    if n_boot < 0:
        raise FitError(f"n_boot must be >= 0, got {n_boot}")
    rng = np.random.default_rng([CELL_STREAM, int(seed)])
    n_cells = sums.shape[1]
    p = np.full(n_cells, 1.0 / n_cells)
    out = np.empty((n_boot, sums.shape[0]))
    for start in range(0, n_boot, _CHUNK):
        W = rng.multinomial(n_cells, p, size=min(_CHUNK, n_boot - start)).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[start : start + W.shape[0]] = (W @ sums.T) / (W @ n.T) / scale
    return out


def cell_shift(draws, keep: np.ndarray, y_kept: np.ndarray, lowest: float = 0.0) -> np.ndarray:
    """(B, n_kept) shifts of the fitted points by the cells: each resample's loss minus the loss on
    all the cells, both measured from ``lowest`` (as ``fit_table`` fits the excess over the least
    loss; it cancels). ``draws``: a (B, n_rows) array or :class:`CellDraws`, aligned with the
    table's rows as passed; ``keep``: (n_rows,) the fitted rows (``fit.data.finished_mask``);
    ``y_kept``: the fitted excess losses, the centre where ``draws`` has no ``observed``."""
    values = np.asarray(draws.values if isinstance(draws, CellDraws) else draws, dtype=float)
    keep = np.asarray(keep, dtype=bool)
    if values.ndim != 2 or values.shape[1] != keep.size:
        raise FitError(f"cell_draws must be (resamples, {keep.size} rows of the table), got {values.shape}")
    centre = np.asarray(y_kept, dtype=float)
    if isinstance(draws, CellDraws) and draws.observed is not None:
        obs = np.asarray(draws.observed, dtype=float)
        if obs.shape != (keep.size,):
            raise FitError(f"cell_draws.observed must have one loss per row of the table ({keep.size}), got {obs.shape}")
        centre = obs[keep] - lowest
    return (values[:, keep] - lowest) - centre[None, :]


# the results columns a resample of the cells scores: (split, what is summed per cell)
CELL_COLUMNS = {"best_val_mse": ("val", "sse"), "test_mse": ("test", "sse"),
                "best_val_loss": ("val", "loss"), "test_loss": ("test", "loss")}


def _cell_column(y: str) -> tuple[str, str]:
    if y not in CELL_COLUMNS:
        raise FitError(f"'{y}' is not scored from per-cell sums (only {', '.join(CELL_COLUMNS)})")
    return CELL_COLUMNS[y]


def run_cell_draws(paths: list, *, y: str, unit: str, n_boot: int, seed: int) -> CellDraws:
    """:class:`CellDraws` for the rows of a results table from their runs' per-cell sums: ``paths``
    has one .npz per row (``RUN_DIR/cells.npz``), None for a row that is not fitted (its values are
    NaN). ``y`` is the fitted column (``CELL_COLUMNS``: its split, and loss or squared-error sums);
    a FitError when it is not one a resample of the cells can score, or when a file is missing."""
    split, measure = _cell_column(y)
    rows = [i for i, p in enumerate(paths) if p is not None]
    sums, counts = read_point_sums([paths[i] for i in rows], split, measure)
    values = np.full((n_boot, len(paths)), np.nan)
    obs = np.full(len(paths), np.nan)
    values[:, rows] = cell_draws(sums, counts, unit=unit, n_boot=n_boot, seed=seed)
    obs[rows] = observed(sums, counts, unit)
    return CellDraws(values=values, observed=obs, n_cells=int(sums.shape[1]), split=split)


def sweep_cell_paths(sweep_dir, run_ids, cells_seen=None) -> list[Path]:
    """Where a sweep keeps each point's per-cell sums: ``SWEEP_DIR/runs/<run_id>/cells.npz`` for a
    run's own weights, ``.../branches/<cells seen>.npz`` for a cooldown branch (``cells_seen`` given,
    one per run id)."""
    runs = Path(sweep_dir) / RUNS_DIR
    if cells_seen is None:
        return [runs / str(r) / RUN_CELLS for r in run_ids]
    return [runs / str(r) / BRANCH_CELLS_DIR / f"{int(c)}.npz" for r, c in zip(run_ids, cells_seen)]


class NotResampled(FitError):
    """No resamples asked for (bootstrap = 0): there is nothing to draw the cells for."""


class CellsMissing(FitError):
    """Points without per-cell sums on disk (a sweep written before cellscale kept them, or files
    removed): ``missing``, of the ``n_points`` fitted rows."""

    def __init__(self, missing: list[Path], n_points: int):
        super().__init__(f"per-cell sums not found: {missing[0]}")
        self.missing, self.n_points = missing, n_points


def sweep_cell_draws(sweep_dir, frame: pd.DataFrame, *, y: str | None, n_boot: int, seed: int,
                     branches: bool = False) -> CellDraws:
    """:func:`run_cell_draws` for the rows of ``frame``, a sweep's results table (or with ``branches``
    its cooldown-branch points, by ``run_id`` and ``cells_seen``), from the per-cell sums in
    ``sweep_dir`` (:func:`sweep_cell_paths`): ``n_boot`` resamples seeded by ``seed``, of the fitted
    column ``y`` (None: the table's own) in its unit (``cellscale.fit.core.fitted_unit``). Rows that
    are not fitted (``cellscale.fit.data.finished_mask``) are NaN. A FitError says why there are
    none: :class:`NotResampled`, :class:`CellsMissing`, or the first bad file or column."""
    from cellscale.fit.core import fitted_unit  # the fit's unit rule; core imports this module

    if "run_id" not in frame.columns:
        raise FitError("the table has no run_id column to find each run's cells")
    if n_boot <= 0:
        raise NotResampled("bootstrap = 0: the evaluation cells were not resampled")
    y, unit, _ = fitted_unit(frame, y)
    _cell_column(y)  # a column no resample scores is said before any file is looked for
    paths = sweep_cell_paths(sweep_dir, frame["run_id"], frame["cells_seen"] if branches else None)
    paths = [p if ok else None for p, ok in zip(paths, finished_mask(frame))]
    missing = [p for p in paths if p is not None and not p.is_file()]
    if missing:
        raise CellsMissing(missing, sum(p is not None for p in paths))
    return run_cell_draws(paths, y=y, unit=unit, n_boot=n_boot, seed=seed)
