"""The report's first paragraph, "What this means": the best model against every baseline, whether
its points converged and were at their best learning rate, the exponent, the floor (and
whether anything on the same cells beats it) and the bits. Every sentence is computed from the
run table and the fit it describes."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cellscale.fit.judge import flag_lines
from cellscale.report.fmt import floor_name, fmt_int, fmt_num
from cellscale.rules.lossbounds import check_not_below_floor
from cellscale.rules.lrgrid import LRChoice, fitted_column, loss_column, select_lr
from cellscale.rules.plateau import got_worse

__all__ = ["meaning_paragraph", "best_model", "floor_beaten_by"]


def best_model(runs: pd.DataFrame) -> dict[str, Any] | None:
    """The best size (same train_cells) and its loss: chosen on the mean validation loss in the
    objective's unit (``cellscale.rules.lrgrid.loss_column``) at each size's chosen learning rate (other
    rates' runs are not more seeds of it), and scored by the mean of the loss that chose nothing
    (``fitted_column``: the test loss; ``column`` names it)."""
    if runs is None or runs.empty:
        return None
    ok = runs[runs["status"] == "ok"].copy()
    if ok.empty:
        return None
    choose_on, score = loss_column(ok), fitted_column(ok)
    ok = select_lr(ok, loss_col=choose_on).kept.copy()
    for col in (choose_on, score):
        ok[col] = pd.to_numeric(ok[col], errors="coerce")
    ok = ok[np.isfinite(ok[choose_on]) & np.isfinite(ok[score])]
    if ok.empty:
        return None
    keys = ["size"] + (["train_cells"] if "train_cells" in ok else [])
    g = ok.groupby(keys, dropna=False).agg(
        params=("params", "median"), choice=(choose_on, "mean"), mean=(score, "mean"), sd=(score, "std"),
        n=(score, "size")).reset_index()
    row = g.loc[g["choice"].idxmin()]
    return {**{k: row[k] for k in g.columns}, "column": score, "chosen_on": choose_on}


# how a results column reads in a sentence
LOSS_WORDS = {"best_val_mse": "validation MSE", "test_mse": "test MSE",
              "best_val_loss": "validation loss", "test_loss": "test loss"}
SPLIT_WORDS = {"val": "validation", "test": "test"}


def loss_words(column: str) -> str:
    words = LOSS_WORDS.get(column, column)
    return words + (" (bits per masked gene)" if column.endswith("_loss") else "")


def differ(best: float, value: float, unit: str) -> str:
    """How far ``best`` lies from ``value`` in words: relative for an MSE; in bits (a loss of either
    sign, where a ratio means nothing) for a likelihood."""
    if unit == "bits":
        d = best - value
        return f"{abs(d):.3f} bits {'below' if d < 0 else 'above'}"
    rel = 100 * (best / value - 1)
    return f"{abs(rel):.1f}% {'below' if rel < 0 else 'above'}"


BASELINE_NAMES = {"gene_mean": "the gene-mean baseline", "knn": "kNN regression on the visible genes",
                  "bayes_linear": "Bayes-linear regression on the visible genes"}


def _vs(best: float, name: str, value: float, unit: str = "mse") -> str:
    who = f"{BASELINE_NAMES.get(name, name)} ({fmt_num(value)})"
    if best < value:
        return f"{differ(best, value, unit)} {who}"
    return f"NOT better than {who}" if name == "gene_mean" else f"{differ(best, value, unit)} {who}"


def _training_advice(runs: pd.DataFrame | None) -> str:
    """What to do about under-trained points, given how these runs were already trained."""
    plateau = runs is not None and "budget" in runs and (runs["budget"] == "plateau").any()
    grid = runs is not None and "lr_scale" in runs and pd.to_numeric(runs["lr_scale"], errors="coerce").nunique() > 1
    if plateau and grid:
        return "raise the plateau budget's maximum (train.cells_seen)"
    if plateau:
        return "raise the plateau budget's maximum (train.cells_seen) and search the learning rate (sweep.lr_multipliers)"
    if grid:
        return "train to a plateau (budget: plateau)"
    return "train to a plateau (budget: plateau) and search the learning rate"


@dataclass(frozen=True)
class KnownFloor:
    """The simulator's exact floor on the fitted loss's cells (``split``), in its ``unit``, and the
    masked positions whose sampling error a loss on those cells is judged against (None: not
    recorded). The sampling check is the squared error's: for bits none is made."""

    value: float
    n_masked: int | None = None
    split: str = "val"
    unit: str = "mse"

    def holds(self, loss: float) -> bool:
        """Is ``loss`` within the sampling error of the floor (neither significantly below nor above)?"""
        if self.n_masked is None or self.unit != "mse":
            return False
        check = check_not_below_floor(loss, self.value, self.n_masked)
        return check.ok and check.z <= 2.0

    def inside(self, ci: Any) -> bool | None:
        """Whether the interval ``ci`` holds the floor; None without a two-sided interval."""
        if not ci or ci[0] is None or ci[1] is None:
            return None
        return float(ci[0]) <= self.value <= float(ci[1])


def _baseline_sentences(best: dict[str, Any], baselines: Mapping[str, float],
                        runs: pd.DataFrame | None = None, known_floor: KnownFloor | None = None,
                        split: str = "val", unit: str = "mse") -> list[str]:
    known = {k: float(v) for k, v in baselines.items()
             if v is not None and math.isfinite(float(v)) and (unit == "bits" or float(v) > 0)}
    if not known:
        return ["No baseline was recorded to compare it with."]
    out = [f"On the same {SPLIT_WORDS.get(split, split)} cells and masks it is "
           + "; ".join(_vs(best["mean"], k, v, unit) for k, v in known.items()) + "."]
    gm = known.get("gene_mean")
    if gm is not None and best["mean"] >= gm:
        out.append("The models have NOT learned anything beyond each gene's average: train longer or check the data.")
    beaten_by = [k for k, v in known.items() if k != "gene_mean" and v <= best["mean"]]
    if beaten_by and known_floor and all(known_floor.holds(v) for v in [best["mean"], *(known[k] for k in beaten_by)]):
        out.append("A simpler model (" + ", ".join(k.replace("_", "-") for k in beaten_by) + ") scores lower on "
                   f"these cells, but it and the best transformer are both within the {SPLIT_WORDS.get(split, split)} cells' sampling "
                   f"error of the known Bayes-optimal error ({fmt_num(known_floor.value)}): both have learned what these data "
                   "allow.")
    elif beaten_by:
        out.append("A simpler model (" + ", ".join(k.replace("_", "-") for k in beaten_by) + ") is at least as good "
                   "as the best transformer, so the ladder's points describe their training, not what the "
                   f"architecture can learn: {_training_advice(runs)}.")
    return out


def chosen_runs(runs: pd.DataFrame) -> tuple[pd.DataFrame, bool]:
    """The finished runs at each size's chosen learning rate (``cellscale.rules.lrgrid``), and whether runs
    at other rates were set aside: they are not more points of the ladder."""
    ok = runs[runs["status"] == "ok"] if "status" in runs else runs
    if ok.empty:
        return ok, False
    sel = select_lr(ok, loss_col=loss_column(ok))
    return (sel.kept, len(sel.dropped) > 0) if sel.choices else (ok, False)


def worse_runs(ok: pd.DataFrame) -> list[str]:
    """The converged runs of ``ok`` whose last doubling made them worse by more than its standard
    error (``rules.plateau.got_worse``): they ended past their best, overfitting their training cells."""
    if "plateau_gain" not in ok or "converged" not in ok:
        return []
    ok = ok[pd.to_numeric(ok["converged"], errors="coerce") == 1]
    gain = pd.to_numeric(ok["plateau_gain"], errors="coerce")
    se = pd.to_numeric(ok.get("plateau_gain_se", pd.Series(np.nan, index=ok.index)), errors="coerce")
    return [str(r) for r, g, s in zip(ok["run_id"], gain, se)
            if math.isfinite(g) and got_worse(float(g), float(s) if math.isfinite(s) else None)]


def worse_words(worse: list[str]) -> str:
    """The converged runs :func:`worse_runs` names, as a sentence (empty without any)."""
    if not worse:
        return ""
    one = len(worse) == 1
    return (f" {'One' if one else len(worse)} of the converged runs ended past {'its' if one else 'their'} best "
            f"({', '.join(worse)}): {'its' if one else 'their'} last doubling of cells seen made "
            f"{'it' if one else 'them'} worse, overfitting {'its' if one else 'their'} training cells; training "
            "longer would not help, more training cells might.")


def _plateau_sentence(runs: pd.DataFrame, best: dict[str, Any]) -> list[str]:
    if "converged" not in runs:
        return []
    ok, dropped = chosen_runs(runs)
    at = " at each size's chosen learning rate" if dropped else ""
    flag = pd.to_numeric(ok["converged"], errors="coerce")
    if flag.isna().all():
        return ["Whether the runs converged is not judged: that is read on cooldown branches, which only the plateau "
                "budget takes (or the results table is from before the check)."]
    n_ok, n_conv = len(ok), int((flag == 1).sum())
    past = worse_words(worse_runs(ok))
    if n_conv == n_ok:
        return [f"All {n_ok} finished runs{at} converged: their last doublings of cells seen, cooled down, bought at most "
                "the tolerance (rule in the methods)." + past]
    mine = ok[ok["size"] == best["size"]]
    best_conv = bool((pd.to_numeric(mine["converged"], errors="coerce") == 1).all())
    return [f"Only {n_conv} of {n_ok} finished runs{at} converged; the others were still improving, cooled down, when "
            f"their budget ended" + ("" if best_conv else ", the best size among them") + "." + past]


def _sizes(choices: list[LRChoice]) -> str:
    return ", ".join(dict.fromkeys(f"{c.size} ({fmt_num(c.best)}x)" for c in choices))


def _lr_sentence(runs: pd.DataFrame) -> list[str]:
    """Whether each point is at its best learning rate, as far as the grid can tell."""
    ok = runs[runs["status"] == "ok"] if "status" in runs else runs
    choices = select_lr(ok, loss_col=loss_column(ok)).choices if not ok.empty else []
    if not choices:
        return ["Each size was trained at one learning rate, so whether its point is at its best rate was not "
                "tested (sweep.lr_multipliers)."]
    out = []
    edge = [c for c in choices if c.at_edge]
    pairs = [c for c in choices if len(c.losses) == 2]
    if edge:
        out.append(f"The best learning rate sits on the edge of its grid for {_sizes(edge)}: those points may not "
                   "be at their optimum (widen sweep.lr_multipliers).")
    if pairs:
        out.append(f"With two learning rates per size no choice lies inside its grid, so no point is shown to be "
                   f"at its best rate; chosen: {_sizes(pairs)}.")
    single = sorted(set(ok["size"].astype(str)) - {c.size for c in choices})
    if not out:
        out.append(("Every other size's" if single else "Every size's") + " best learning rate lies inside its grid "
                   "of rates.")
    if single:  # a grid whose other rates did not finish (or were never run) tests nothing
        out.append(f"{', '.join(single)} {'has' if len(single) == 1 else 'have'} a finished run at one learning rate "
                   "only, so whether that point is at its best rate was not tested.")
    return out


def _best_sentences(best: dict[str, Any] | None, baselines: Mapping[str, float], known_floor: KnownFloor | None,
                    runs: pd.DataFrame | None = None, unit: str = "mse") -> list[str]:
    if best is None:
        return ["No run finished with a finite validation loss, so there is nothing to compare yet."]
    n = int(best["n"])
    seeds = f" (mean of {n} seeds)" if n > 1 else ""
    column = str(best.get("column") or "best_val_mse")
    if column == best.get("chosen_on", column):
        out = [f"The lowest {loss_words(column)}, {fmt_num(best['mean'])}{seeds}, is that of size {best['size']} "
               f"({fmt_int(best['params'])} parameters)."]
    else:  # chosen on validation, scored on cells that chose nothing
        out = [f"The best size on validation loss is {best['size']} ({fmt_int(best['params'])} parameters); its "
               f"{loss_words(column)}, on cells that chose nothing, is {fmt_num(best['mean'])}{seeds}."]
    split = "test" if column.startswith("test") else "val"
    out += _baseline_sentences(best, baselines, runs, known_floor, split, unit)
    if runs is not None:
        out += _plateau_sentence(runs, best) + _lr_sentence(runs)
    if known_floor is not None:
        out.append(_bayes_sentence(float(best["mean"]), known_floor))
    return out


def _bayes_sentence(best: float, known: KnownFloor) -> str:
    """The best model against the simulator's exact floor. Evaluation cells are a sample, so their
    loss scatters around the floor's expectation: below it is leakage only beyond that scatter
    (``rules.lossbounds.check_not_below_floor``, the test suite's own check, for squared errors)."""
    floor, n_masked, where = known.value, known.n_masked, SPLIT_WORDS.get(known.split, known.split)
    apart = differ(best, floor, known.unit)
    if best >= floor:
        return f"The known Bayes-optimal error of the simulator is {fmt_num(floor)}; the best model is {apart} it."
    if known.unit != "mse" or n_masked is None:
        why = ("the sampling check is made for squared errors only" if known.unit != "mse" else
               f"the number of masked {where} positions is not recorded")
        return (f"The best model is {apart} the known Bayes-optimal error of the simulator ({fmt_num(floor)}); "
                f"{why}, so whether that is more than the {where} cells' sampling error cannot be said.")
    check = check_not_below_floor(best, floor, n_masked)
    if check.ok:
        return (f"The best model is {apart} the known Bayes-optimal error of the simulator "
                f"({fmt_num(floor)}), within the sampling error of the {n_masked:,} masked {where} positions "
                f"(z = {check.z:.1f}): it is at the floor.")
    return (f"The best model is BELOW the known Bayes-optimal error ({fmt_num(floor)}) by {apart.split(' ')[0]}, beyond "
            f"the sampling error of the {n_masked:,} masked {where} positions (z = {check.z:.1f}): that is impossible "
            "without leakage between training and evaluation cells.")


def _alpha_sentence(params: Mapping[str, Any], ci: Mapping[str, Any], has_floor: bool) -> list[str]:
    if "alpha" not in params:
        return []
    a = params["alpha"]
    s = f"Loss falls with model size with exponent alpha = {fmt_num(a, 3)}"
    if "alpha" in ci:
        s += f" (95% CI {fmt_num(ci['alpha'][0], 3)} to {fmt_num(ci['alpha'][1], 3)})"
    if has_floor and a and math.isfinite(float(a)) and float(a) > 0:
        s += f"; each 10x more parameters shrinks the reducible part of the loss by a factor {10 ** float(a):.2f}"
    return [s + "."]


def floor_beaten_by(fit: Mapping[str, Any], fname: str, best: dict[str, Any] | None,
                    baselines: Mapping[str, float] | None = None) -> dict[str, float]:
    """The losses on the same cells that lie below the fitted floor: {baseline name: loss}, and
    "best_model" when the ladder's own best model is below it. Any of them means the floor is not
    an irreducible loss."""
    c = float((fit.get("params") or {})[fname])
    below = {k: float(v) for k, v in (baselines or {}).items() if v is not None and float(v) < c}
    if best is not None and float(best["mean"]) < c:
        below["best_model"] = float(best["mean"])
    return below


def _true_floor_sentence(ci: Any, known_floor: KnownFloor | None) -> list[str]:
    inside = known_floor.inside(ci) if known_floor is not None else None
    if inside is None:
        return []
    return [f"The simulator's true floor, {fmt_num(known_floor.value)}, lies {'inside' if inside else 'OUTSIDE'} "
            "that interval" + ("." if inside else ": the fit has not found it.")]


def _beaten_only_by_noise(below: Mapping[str, float], ci: Any, known_floor: KnownFloor | None) -> bool:
    """The losses below the fitted floor all sit within sampling error of the true floor, which the
    fitted interval holds: the floor is below them by the noise of these cells, not by a model."""
    return bool(below and known_floor and known_floor.inside(ci) and all(known_floor.holds(v) for v in below.values()))


def _reach(below: Mapping[str, float]) -> str:
    return ", ".join(f"{BASELINE_NAMES.get(k, k)} reaches {fmt_num(v)}" for k, v in below.items())


def _within_noise(below: Mapping[str, float], best_below: float | None, known_floor: KnownFloor) -> str:
    """A fitted floor undercut, on these cells, only by losses within their sampling error of the
    true floor (``_beaten_only_by_noise``)."""
    who = [_reach(below)] if below else []
    if best_below is not None:
        who.append(f"the best model reaches {fmt_num(best_below)}")
    return (f"As a loss on these cells it is not irreducible: {' and '.join(who)} on the same cells, below it, "
            f"though within the cells' sampling error of the true floor ({fmt_num(known_floor.value)}), so the fit "
            "and the truth agree within that error.")


def _floor_sentences(fit: Mapping[str, Any], fname: str, best: dict[str, Any] | None,
                     baselines: Mapping[str, float] | None = None, known_floor: KnownFloor | None = None,
                     unit: str = "") -> list[str]:
    params, ci = fit.get("params") or {}, fit.get("ci95") or {}
    at_boundary = bool(fit.get("floor_at_boundary"))
    c = float(params[fname])
    below = floor_beaten_by(fit, fname, best, baselines)
    noise = _beaten_only_by_noise(below, ci.get(fname), known_floor)
    best_below = below.pop("best_model", None)
    beaten_by_best = best_below is not None
    s = f"The fitted floor of the law ({fname}) is {fmt_num(c)}{unit}"
    if fname in ci and ci[fname] and ci[fname][0] is not None:
        s += f" (95% CI {fmt_num(ci[fname][0])} to {fmt_num(ci[fname][1])})"
    if best is not None and (c > 0 or unit) and not at_boundary:
        s += f"; the best model is {differ(float(best['mean']), c, 'bits' if unit else 'mse')} it"
    out = [s + "."] + _true_floor_sentence(ci.get(fname), known_floor)
    if noise:
        out.append(_within_noise(below, best_below, known_floor))
    elif below:
        out.append("It is NOT an irreducible loss: " + _reach(below) + " on the same cells, below it; the floor "
                   "describes these models as trained, not the data.")
    if beaten_by_best and not at_boundary and not noise:
        out.append(("Nor is it" if below else "It is NOT") + " a floor of these models: the best model's own "
                   "loss is already below it, so the law bends towards a level the ladder has passed, and the "
                   "floor is a property of this fit rather than a bound.")
    if at_boundary:
        out.append("WARNING: the floor estimate sits on the edge of its search range, so it is an artefact "
                   "of the fitting bounds rather than a measurement; do not quote it as the irreducible "
                   "loss. Larger models or more data are needed to pin it down.")
    return out


def _entropy_sentence(fit: Mapping[str, Any], *, floor_beaten: bool = False) -> list[str]:
    eb = fit.get("entropy_bits") or {}
    if not isinstance(eb, Mapping) or eb.get("gaussian") is None:
        return []
    if fit.get("floor_at_boundary"):
        return [f"The entropy computed from that floor ({fmt_num(eb['gaussian'], 3)} bits per masked gene) is "
                "therefore not a measurement either."]
    if floor_beaten:
        return [f"The entropy computed from that floor ({fmt_num(eb['gaussian'], 3)} bits per masked gene) is "
                "therefore not the entropy left in the data either; it inherits the floor's meaning."]
    s = f"Read as a Gaussian noise level, the floor corresponds to {fmt_num(eb['gaussian'], 3)} bits per masked gene"
    if eb.get("ci95_unbounded_below"):
        s += (f" (95% CI unbounded below, to {fmt_num(eb['ci95'][1], 3)}: the floor's interval reaches 0, "
              "where the entropy has no finite bound)")
    elif eb.get("ci95"):
        s += f" (95% CI {fmt_num(eb['ci95'][0], 3)} to {fmt_num(eb['ci95'][1], 3)})"
    s += (": the differential entropy of log1p expression left unexplained by the cell's other genes, under "
          "a homoscedastic-Gaussian assumption (an upper bound on the per-gene heteroscedastic figure, and unit-"
          "dependent, so compare it only across runs on the same preprocessing).")
    return [s]


def meaning_paragraph(
    runs: pd.DataFrame | None,
    fit: Mapping[str, Any] | None,
    *,
    baseline_val: float | None = None,
    bayes_floor: float | None = None,
    fit_error: str | None = None,
    baselines: Mapping[str, float] | None = None,
    n_masked: int | None = None,
) -> str:
    """Plain-language reading: the best model against every baseline, whether the runs were
    converged, the floor (and whether a baseline beats it), the bits. ``baselines`` (name -> loss;
    ``baseline_val`` alone stands for the gene mean) and ``bayes_floor`` are on the cells and in the
    unit of the loss the best model is scored by (``best_model``: the test loss, in MSE or a
    likelihood's bits); ``n_masked`` (the masked positions of those cells) sizes the sampling error
    a loss below a known floor is judged against."""
    best = best_model(runs) if runs is not None else None
    column = str((best or {}).get("column") or (fitted_column(runs) if runs is not None and not runs.empty
                                                 else "best_val_mse"))
    unit = "bits" if column.endswith("_loss") else "mse"
    split = "test" if column.startswith("test") else "val"
    baselines = dict(baselines or {})
    if baseline_val is not None:
        baselines.setdefault("gene_mean", baseline_val)
    known = (KnownFloor(float(bayes_floor), n_masked, split, unit)
             if bayes_floor is not None and math.isfinite(bayes_floor) else None)
    out = _best_sentences(best, baselines, known, runs, unit)
    if fit is None:
        out.append("No scaling law was fitted" + (f": {fit_error}" if fit_error else "") + ".")
        return " ".join(out)
    params = fit.get("params") or {}
    fname = fit.get("floor_param") or floor_name(params)
    fname = fname if fname in params else None
    out += _alpha_sentence(params, fit.get("ci95") or {}, fname is not None)
    others = {k: v for k, v in baselines.items() if k != "gene_mean"}
    # the best model, the baselines and the known floor are set against the fitted floor only when
    # they are in its unit (a law fitted to a likelihood's bits, of a table scored in MSE, is not)
    if fit.get("loss_unit", "mse") != unit:
        best, others, known = None, {}, None
    judgement = fit.get("judgement") or {}
    if fname:
        out += _floor_sentences(fit, fname, best, others, known, unit=" bits per masked gene" if unit == "bits" else "")
        if judgement.get("floor_identified") is False and not fit.get("floor_at_boundary"):
            why = "; ".join(flag_lines(judgement)) or "its 95% interval reaches the bottom of its range"
            out.append(f"These points do not identify a floor ({why}), so neither it nor its bits are a measurement.")
            return " ".join(out)
    below = floor_beaten_by(fit, fname, best, others) if fname else {}
    noise = _beaten_only_by_noise(below, (fit.get("ci95") or {}).get(fname), known)
    out += _entropy_sentence(fit, floor_beaten=bool(below) and not noise)
    return " ".join(out)
