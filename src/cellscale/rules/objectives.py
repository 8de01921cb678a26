"""Training objectives for masked reconstruction: what the head predicts at a masked gene and
what it is scored by. Imports torch, the standard-library ``cellscale.rules.lossbounds`` (``model.py``
uses it) and, for the objectives' names, the torch-free ``cellscale.config``.

* ``mse`` (the seed study's): one output, the log1p-normalised value; loss = squared error.
* ``gaussian-nll``: two outputs, a mean ``m`` and a log-variance ``s`` of the log1p value;
  loss = ``0.5 (log 2 pi + s + (y - m)^2 e^-s)`` nats. Its mean over masked positions, in
  bits, estimates the conditional differential entropy of a masked gene's log value directly
  (an upper bound: the cross-entropy of the model's predictive), instead of guessing it from
  an MSE under a homoscedastic reading.
* ``nb``: two outputs, ``eta`` = log of the expected count per ``target_sum`` counts and
  ``t`` = log of the inverse dispersion ``theta``; the raw count ``k`` of the masked gene is
  NB with mean ``mu = exp(eta) * library_size / target_sum`` (library size over all genes)
  and variance ``mu + mu^2 / theta``. Loss = ``-log NB(k; mu, theta)`` nats; in bits it is a
  true entropy bound of discrete counts (unit-free, unlike the differential entropy of log
  values).

Every loss is returned per masked position in nats; :func:`to_report_units` turns a mean into
the number reported (MSE for ``mse``, bits per masked gene for the likelihoods).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cellscale.config import ModelConfig, literal_values
from cellscale.rules.lossbounds import LOG_THETA_RANGE, LOG_VAR_RANGE

__all__ = [
    "OBJECTIVES",
    "head_outputs",
    "needs_counts",
    "loss_unit",
    "position_loss",
    "masked_position_loss",
    "at_positions",
    "point_prediction",
    "nb_mean_log1p",
    "to_report_units",
    "at_clamp",
    "LOG_VAR_RANGE",
    "LOG_THETA_RANGE",
]

OBJECTIVES = literal_values(ModelConfig, "objective")  # the one list: ModelConfig.objective's Literal
LN2 = math.log(2.0)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _check(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}: use one of {', '.join(OBJECTIVES)}")


def head_outputs(objective: str) -> int:
    """Numbers the head predicts per masked gene."""
    _check(objective)
    return 1 if objective == "mse" else 2


def needs_counts(objective: str) -> bool:
    """Whether training and evaluation need the raw counts and library sizes."""
    _check(objective)
    return objective == "nb"


def loss_unit(objective: str) -> str:
    _check(objective)
    return "mse" if objective == "mse" else "bits"


def nb_log_prob(k: Tensor, log_mu: Tensor, log_theta: Tensor) -> Tensor:
    """log NB(k; mean mu, inverse dispersion theta), stable for large and small mu, theta."""
    theta = log_theta.exp()
    log_sum = torch.logaddexp(log_theta, log_mu)  # log(theta + mu)
    return (
        torch.lgamma(k + theta) - torch.lgamma(theta) - torch.lgamma(k + 1.0)
        + theta * (log_theta - log_sum) + k * (log_mu - log_sum)
    )


def position_loss(
    objective: str, out: Tensor, target: Tensor, *, counts: Tensor | None = None,
    log_scale: Tensor | None = None,
) -> Tensor:
    """Loss at each masked position, in nats (squared error for ``mse``).

    ``out``: head outputs at the masked positions ([M] for mse, [M, 2] otherwise); ``target``:
    their log1p-normalised values [M]; for ``nb`` also ``counts`` (raw counts, [M]) and
    ``log_scale`` = log(library_size / target_sum) of each position's cell [M]. Computed in
    float32 at least (bf16/fp16 outputs are promoted); float64 outputs stay float64."""
    dt = torch.promote_types(out.dtype, torch.float32)
    out = out.to(dt)
    if objective == "mse":
        return (out - target.to(dt)) ** 2
    if objective == "gaussian-nll":
        mean, s = out[:, 0], out[:, 1].clamp(*LOG_VAR_RANGE)
        return _HALF_LOG_2PI + 0.5 * (s + (target.to(dt) - mean) ** 2 * torch.exp(-s))
    if objective == "nb":
        if counts is None or log_scale is None:
            raise ValueError("the nb objective needs the masked genes' counts and their cells' library sizes")
        log_mu = out[:, 0] + log_scale.to(dt)
        return -nb_log_prob(counts.to(dt), log_mu, out[:, 1].clamp(*LOG_THETA_RANGE))
    _check(objective)
    raise AssertionError("unreachable")


def masked_position_loss(
    objective: str, out: Tensor, values: Tensor, mask: Tensor, *, counts: Tensor | None = None,
    log_scale: Tensor | None = None,
) -> Tensor:
    """:func:`position_loss` for head outputs at ``mask.nonzero()`` of a batch: ``values`` and
    ``counts`` are [B, V], ``log_scale`` is [B] (one per cell)."""
    kw = {}
    if counts is not None:
        kw["counts"] = counts[mask]
    if log_scale is not None:
        kw["log_scale"] = at_positions(log_scale, mask)
    return position_loss(objective, out, values[mask], **kw)


def at_positions(per_cell: Tensor, mask: Tensor) -> Tensor:
    """A per-cell value [B] repeated at each of the cell's masked positions [M]."""
    return per_cell.unsqueeze(1).expand_as(mask)[mask]


def point_prediction(objective: str, out: Tensor, *, log_scale: Tensor | None = None) -> Tensor:
    """The log1p-normalised value a head predicts, for an MSE comparable across objectives: the
    value itself (mse), the predictive mean (gaussian-nll), or for nb the predictive mean of
    ``log1p(k * target_sum / library_size)`` (:func:`nb_mean_log1p`; ``log_scale`` per position
    needed) — the MSE-optimal point under the model's own count distribution. (Plugging the
    mean count into log1p instead overstates low genes badly: log1p is concave and most counts
    are 0.)"""
    out = out.to(torch.promote_types(out.dtype, torch.float32))
    if objective == "mse":
        return out
    if objective == "gaussian-nll":
        return out[:, 0]
    if objective == "nb":
        if log_scale is None:
            raise ValueError("the nb point prediction needs each position's log(library size / target_sum)")
        log_scale = log_scale.to(out.dtype)
        return nb_mean_log1p(out[:, 0] + log_scale, out[:, 1].clamp(*LOG_THETA_RANGE), log_scale)
    _check(objective)
    raise AssertionError("unreachable")


def nb_mean_log1p(log_mu: Tensor, log_theta: Tensor, log_scale: Tensor, *, n_terms: int = 256) -> Tensor:
    """E[log1p(k e^-log_scale)] for k ~ NB(mu, theta), per position.

    Summed exactly over k < ``n_terms`` where that covers all but 1e-7 of the mass (the low
    and mid genes, where the concavity of log1p matters); elsewhere (large counts) the
    second-order delta method ``f(mu) + f''(mu) Var(k) / 2`` (within 0.5% of the exact sum at
    mu = 81, theta = 2, and closer as mu grows)."""
    a = torch.exp(-log_scale)
    k = torch.arange(n_terms, dtype=log_mu.dtype, device=log_mu.device)
    p = nb_log_prob(k, log_mu[:, None], log_theta[:, None]).exp()
    exact = (p * torch.log1p(a[:, None] * k)).sum(1)
    mu = log_mu.exp()
    var = mu + mu * mu * torch.exp(-log_theta)
    delta = torch.log1p(a * mu) - 0.5 * a * a * var / (1.0 + a * mu) ** 2
    return torch.where(p.sum(1) > 1.0 - 1e-7, exact, delta)


def at_clamp(objective: str, out: Tensor) -> Tensor | None:
    """Which masked positions' second output (a log-variance, a log inverse dispersion) lies on
    or past its clamp (``LOG_VAR_RANGE``, ``LOG_THETA_RANGE``): there the loss is the clamp's, not
    the model's own statement. None for ``mse`` (one output, no clamp)."""
    _check(objective)
    if objective == "mse":
        return None
    lo, hi = LOG_VAR_RANGE if objective == "gaussian-nll" else LOG_THETA_RANGE
    second = out[:, 1].float()
    return (second <= lo) | (second >= hi)


def to_report_units(objective: str, mean_loss: float) -> float:
    """A mean of :func:`position_loss` in the unit reported: MSE, or bits per masked gene."""
    _check(objective)
    return mean_loss if objective == "mse" else mean_loss / LN2
