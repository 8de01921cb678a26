"""FitResult: the fitted law, its bootstrap samples, and the JSON object the CLI prints."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cellscale.errors import FitError
from cellscale.fit.laws.base import Law
from cellscale.runtime.io import jsonable


@dataclass
class FitResult:
    law: Law
    method: str
    x: list[str]
    y: str
    theta: np.ndarray
    samples: np.ndarray  # (n_boot, k) natural parameters; NaN rows for failed resamples
    ci_lo: np.ndarray
    ci_hi: np.ndarray
    n_points: int
    r2: float
    floor_at_boundary: bool
    extra: dict = field(default_factory=dict)

    @property
    def params(self) -> dict[str, float]:
        return {n: float(v) for n, v in zip(self.law.param_names, self.theta)}

    @property
    def interval(self) -> str | None:
        """The interval method behind ``ci95`` (``cellscale.fit.intervals``)."""
        return self.extra.get("interval")

    @property
    def bootstrap_failed(self) -> int:
        """Resamples that could not be fitted (their reasons: ``extra["bootstrap_failures"]``)."""
        return int(self.extra.get("bootstrap_failed") or 0)

    @property
    def ci95(self) -> dict[str, list[float]]:
        return {n: [float(lo), float(hi)] for n, lo, hi in zip(self.law.param_names, self.ci_lo, self.ci_hi)}

    def _matrix(self, X) -> np.ndarray:
        if isinstance(X, dict):
            cols = []
            for col, var in zip(self.x, self.law.variables):
                if col in X:
                    cols.append(np.asarray(X[col], float))
                elif var in X:
                    cols.append(np.asarray(X[var], float))
                else:
                    raise FitError(f"predict needs '{col}' (the law's {var}); got {sorted(X)}")
            return np.column_stack(np.broadcast_arrays(*cols))
        X = np.asarray(X, dtype=float)
        if X.ndim == 1:
            X = X[:, None]
        if X.shape[1] != self.law.n_vars:
            raise FitError(f"predict needs {self.law.n_vars} columns ({', '.join(self.x)}), got {X.shape[1]}")
        return X

    def predict(self, X) -> np.ndarray:
        """Predicted y at X: an (n, m) array, an (n,) array for one-variable laws, or {column: values}."""
        return self.law.predict(self.theta, self._matrix(X))

    def band(self, X, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise bootstrap percentile band of the prediction at X."""
        M = self._matrix(X)
        ok = self.samples[np.all(np.isfinite(self.samples), axis=1)]
        if ok.shape[0] == 0:
            nan = np.full(M.shape[0], np.nan)
            return nan, nan.copy()
        preds = np.stack([self.law.predict(t, M) for t in ok])
        tail = 100 * (1 - level) / 2
        return np.percentile(preds, tail, axis=0), np.percentile(preds, 100 - tail, axis=0)

    def to_dict(self) -> dict:
        out = {
            "law": self.law.name,
            "formula": self.law.formula,
            "method": self.method,
            "x": list(self.x),
            "y": self.y,
            "params": self.params,
            "ci95": self.ci95,
            "n_points": self.n_points,
            "r2": self.r2,
            "floor_param": self.law.floor,
            "floor_at_boundary": self.floor_at_boundary,
        }
        out.update(self.extra)
        return jsonable(out)
