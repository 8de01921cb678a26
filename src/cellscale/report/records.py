"""What the report knows about a sweep: ``SweepData`` (read by ``load``) and the best run's
per-gene errors (``GeneBest``). Plain records with derived views; no file is read here but the
sweep's ``baselines.json``, once."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellscale.config import FitConfig
from cellscale.data.manifest import Manifest, Scores, finite_or_none
from cellscale.fit.entropy import entropy_bits
from cellscale.rules.bits import count_weighted_bits
from cellscale.rules.lrgrid import CHOICE_COLUMN, FITTED_COLUMN, fitted_column
from cellscale.rules.plateau import PLATEAU_TOL
from cellscale.schema import RESULT_FIELDS

# the reference predictors a sweep scores itself (cellscale.data.baselines), besides the gene mean
SWEEP_BASELINES = ("bayes_linear", "knn")


def scores(obj: Any) -> dict[str, float | None]:
    """{"val", "test"} of a baseline entry (None where not a finite number)."""
    s = obj if isinstance(obj, Scores) else Scores.model_validate(obj)
    return {"val": s.val, "test": s.test}


def gaussian_bits(mse: float | None) -> float | None:
    """The homoscedastic-Gaussian entropy of an MSE in bits; None without a positive MSE."""
    if mse is None or not (mse > 0):
        return None
    return entropy_bits(mse)


def weighted_bits(mse: np.ndarray, n: np.ndarray) -> float | None:
    """Count-weighted mean over genes of their Gaussian entropies (the run's result.json figure,
    ``cellscale.rules.bits.count_weighted_bits``), over the genes whose MSE is a finite positive number."""
    return count_weighted_bits(mse, n, partial=True)


def first_finite(col: pd.Series | None) -> float | None:
    if col is None:
        return None
    vals = pd.to_numeric(col, errors="coerce").dropna()
    vals = vals[np.isfinite(vals)]
    return float(vals.iloc[0]) if len(vals) else None


@dataclass
class PerGene:
    """One run's per_gene.json: test MSE per gene (NaN: never masked) and masked counts."""

    genes: list[str]
    mse: np.ndarray
    n: np.ndarray


@dataclass
class SweepData:
    sweep_dir: Path
    config: dict[str, Any] | None = None
    sweep_meta: dict[str, Any] | None = None
    dataset_dir: Path | None = None
    manifest: Manifest | None = None
    runs: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(RESULT_FIELDS)))
    metrics: dict[str, pd.DataFrame] = field(default_factory=dict)
    per_gene: dict[str, PerGene] = field(default_factory=dict)
    # depth fraction -> {"gene_mean"|"bayes_linear"|"knn": {"val", "test"}} of that depth's dataset
    depth_baselines: dict[float, dict[str, dict[str, float | None]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    branches: pd.DataFrame | None = None  # branches.csv: the runs' cooldown branch points, when taken

    @property
    def fit_config(self) -> dict[str, Any]:
        return {**FitConfig().model_dump(), **((self.config or {}).get("fit") or {})}

    @functools.cached_property
    def baselines_json(self) -> dict[str, Any]:
        """SWEEP_DIR/baselines.json (written by the sweep, cellscale.data.baselines), read once; {}
        when missing or unreadable."""
        try:
            cached = json.loads((self.sweep_dir / "baselines.json").read_text())
        except (OSError, ValueError):
            return {}
        return cached if isinstance(cached, dict) else {}

    @property
    def baselines(self) -> dict[str, dict[str, float | None]]:
        """{name: {"val": mse, "test": mse}} from the manifest, else from results.csv."""
        out = {k: scores(s) for k, s in self.manifest.baselines.items() if s.recorded} if self.manifest else {}
        for name in SWEEP_BASELINES:
            v = self.baselines_json.get(name)
            if name not in out and isinstance(v, dict) and Scores.model_validate(v).recorded:
                out[name] = scores(v)
        if "gene_mean" not in out and not self.runs.empty:
            vals = {k: first_finite(self.runs.get(f"gene_mean_{k}_mse")) for k in ("val", "test")}
            if any(x is not None for x in vals.values()):
                out["gene_mean"] = vals
        return out

    @property
    def objective(self) -> str:
        """The sweep's objective (cellscale.rules.objectives): ``mse`` unless its runs say otherwise."""
        col = self.runs.get("objective") if not self.runs.empty else None
        names = sorted({str(o) for o in col.dropna().unique()}) if col is not None else []
        return names[0] if len(names) == 1 else "mse"

    @property
    def loss_col(self) -> str:
        """The results column the law is fitted to and losses are reported in: the test loss at the
        validation-chosen checkpoint and rate, in MSE or a likelihood's bits (``cellscale.rules.lrgrid``)."""
        return fitted_column(self.runs) if not self.runs.empty else FITTED_COLUMN[self.unit]

    @property
    def choice_col(self) -> str:
        """The validation column the sweep's choices (rates, the best size) are made on."""
        return CHOICE_COLUMN[self.unit]

    @property
    def unit(self) -> str:
        return "mse" if self.objective == "mse" else "bits"

    @property
    def split(self) -> str:
        """The split the fitted loss is scored on ("test"; "val" for a table without test losses):
        every reference set beside it (baselines, the known floor) is read on the same cells."""
        return "test" if self.loss_col.startswith("test") else "val"

    @property
    def likelihood_refs(self) -> dict[str, dict[str, float | None]]:
        """{name: {"val", "test"}} in bits of the sweep objective's likelihood baselines
        (gene mean, Bayes-linear, and the exact floor of gaussian-mode data); empty for mse."""
        if self.objective == "mse":
            return {}
        block = (self.baselines_json.get("likelihood") or {}).get(self.objective) or {}
        return {k: scores(v) for k, v in block.items() if isinstance(v, dict)}

    @property
    def true_floor(self) -> float | None:
        """The exact Bayes floor on the fitted loss's cells (``split``) in its unit, when known."""
        if self.objective == "mse":
            return self.bayes_floor
        return (self.likelihood_refs.get("bayes_floor") or {}).get(self.split)

    @property
    def bayes_floor(self) -> float | None:
        """The exact Bayes floor (MSE) on the fitted loss's cells and masks (``split``) and the kept
        genes, as the sweep's baselines.json records it; else the simulator's own figure (over random
        masks and all its genes) from the manifest."""
        exact = (self.baselines_json.get("bayes_floor") or {}).get(self.split)
        if isinstance(exact, (int, float)) and exact > 0:
            return float(exact)
        return None if self.manifest is None else self.manifest.bayes_floor_mse

    @property
    def n_masked(self) -> int | None:
        """Masked positions the fitted loss's scores average over (``split``: their sampling error);
        None for a sweep written before baselines.json recorded them."""
        n = (self.baselines_json.get("n_masked") or {}).get(self.split)
        return int(n) if isinstance(n, (int, float)) and n >= 1 else None

    @property
    def full_train(self) -> float | None:
        """The train split's size: what "all training cells" means in laws of data."""
        return finite_or_none(None if self.manifest is None else self.manifest.train_cells)

    @property
    def gene_mean(self) -> float | None:
        """The gene-mean baseline on the fitted loss's cells (``split``), in MSE."""
        return self.baselines.get("gene_mean", {}).get(self.split)

    @property
    def plateau_tol(self) -> float:
        """The convergence rule's tolerance the study trained at (its config's ``train.plateau_tol``): the
        data axis reads "has learned" at the same one (``fit.data_axis.learned_points``)."""
        tol = ((self.config or {}).get("train") or {}).get("plateau_tol")
        return float(tol) if isinstance(tol, (int, float)) and not isinstance(tol, bool) else PLATEAU_TOL

    @property
    def gene_mean_val(self) -> float | None:
        """The gene-mean baseline on the validation cells, where choices are made."""
        return self.baselines.get("gene_mean", {}).get("val")

    def refs(self, block: dict[str, dict[str, float | None]]) -> dict[str, float]:
        """{name: value on ``split``} of a {name: {"val", "test"}} block, the finite ones."""
        return {k: float(v[self.split]) for k, v in block.items() if v.get(self.split) is not None}


@dataclass
class GeneBest:
    """The run whose per-gene errors the report describes: the best ok run by validation MSE."""

    run_id: str
    size: str
    genes: list[str]
    mse: np.ndarray
    n: np.ndarray
    note: str = ""

    @property
    def test_mse(self) -> float | None:
        ok = np.isfinite(self.mse) & (self.n > 0)
        return float(np.sum(self.mse[ok] * self.n[ok]) / self.n[ok].sum()) if ok.any() else None

    @property
    def positive(self) -> np.ndarray:
        ok = np.isfinite(self.mse) & (self.mse > 0)
        return self.mse[ok]


def gene_best(sd: SweepData) -> GeneBest | None:
    ok = sd.runs[(sd.runs["status"] == "ok") & np.isfinite(sd.runs["best_val_mse"])]
    ok = ok.sort_values(["best_val_mse", "run_id"])
    if ok.empty:
        return None
    with_pg = ok[ok["run_id"].isin(sd.per_gene)]
    if with_pg.empty:
        return None
    r = with_pg.iloc[0]
    note = ""
    if r["run_id"] != ok.iloc[0]["run_id"]:
        note = (f"the best run by validation MSE, {ok.iloc[0]['run_id']}, has no per-gene errors; "
                f"{r['run_id']} is the best run that has them")
    pg = sd.per_gene[str(r["run_id"])]
    return GeneBest(str(r["run_id"]), str(r["size"]), pg.genes, pg.mse, pg.n, note)
