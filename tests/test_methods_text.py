"""The methods paragraph follows the settings that did the work: learning rate, schedule,
budget, dropout. Each test changes one setting and checks the words change with it."""

import pandas as pd
import pytest

from cellscale.config import ModelConfig, TrainConfig
from cellscale.fit.entropy import entropy_summary, reaches_zero
from cellscale.report.meaning import meaning_paragraph
from cellscale.report.methods import methods_paragraph
from cellscale.rules.schedule import resolve_lr


def _text(train: dict, runs: pd.DataFrame | None = None, model: dict | None = None) -> str:
    config = {"data": {"source": "simulate", "genes": 64, "cells": 1000}, "train": train,
              "sweep": {"sizes": ["XS"], "seeds": [0]}, "model": model or {}, "fit": {}}
    return methods_paragraph(config, None, runs)


def test_lr_rule_is_the_one_resolve_lr_applies():
    text = _text({"batch_size": 32})
    assert "peak learning rate per size 0.005 x 64 / d_model, clipped to [0.0001, 0.03], times sqrt(batch / 64) " \
           "(x0.707 at batch 32)" in text
    assert resolve_lr(ModelConfig(d_model=64, n_layers=1, n_heads=1), TrainConfig(batch_size=32)) == \
        pytest.approx(0.005 * 0.5**0.5)


@pytest.mark.parametrize("train, words", [
    ({"lr_base": 0.002}, "0.002 x 64 / d_model"),
    ({"lr_min": 0.001, "lr_max": 0.01}, "clipped to [0.001, 0.01]"),
    ({"lr_batch_ref": 256, "batch_size": 64}, "times sqrt(batch / 256) (x0.5 at batch 64)"),
    ({"lr_batch_scaling": "linear", "batch_size": 128}, "times batch / 64 (x2 at batch 128)"),
    ({"lr": 0.00003125, "lr_batch_scaling": "none"}, "peak learning rate 3.13e-05 for every size"),
])
def test_lr_text_follows_each_setting(train, words):
    text = _text(train)
    assert words in text
    if train.get("lr_batch_scaling") == "none":
        assert "times" not in text.split("peak learning rate")[1].split(";")[0]


def test_schedule_and_budget_text_follow_the_budget_mode():
    fixed = _text({"warmup_frac": 0.1})
    assert "linear warm-up over the first 10% of steps, then cosine decay to 10% of the peak" in fixed
    assert ("Runs trained for a fixed budget; convergence was not judged (it is read on cooldown branches, "
            "which only the plateau budget takes)") in fixed
    assert "a constant learning rate" in _text({"schedule": "constant"})
    plateau = _text({"budget": "plateau", "plateau_tol": 0.005, "plateau_patience": 3, "cooldown_frac": 0.25,
                     "cooldown_shape": "linear", "cells_seen": 500000})
    assert ("Runs trained at their peak rate with a cooldown branch at every doubling of cells seen (a linear "
            "cooldown over 25% of the steps before it, then the cooled-down weights scored on the validation and "
            "test cells and training resumed from the stable phase); a run ended at the first branch whose "
            "cooled-down validation loss had improved by at most 0.5% over the doubling before it, by at least that "
            "gain's standard error over the validation cells, for 3 doublings in a row, with its validation MSE below "
            "the gene-mean baseline's by more than 0.5% (converged), or at its last branch, at most 500,000 cells "
            "seen") in plateau
    assert ("then the peak rate, with cooldown branches taken off it; the run's own end is its last branch: a "
            "linear cooldown to 10% of the peak over 25% of the steps before it") in plateau
    assert "none counted before" not in plateau and "1-sqrt" in _text({"budget": "plateau"})
    held = _text({"budget": "plateau", "plateau_min_cells": 40000, "cells_seen": 500000})
    assert ("improved by at most 1% over the doubling before it, by at least that gain's standard error over the "
            "validation cells, for 2 doublings in a row, none counted before 40,000 cells seen, with its "
            "validation MSE below the gene-mean "
            "baseline's by more than 1% (converged)") in held


def test_the_rate_search_text_follows_sweep_lr_search():
    def text(**sweep):
        config = {"data": {"source": "simulate", "genes": 64, "cells": 1000}, "train": {}, "model": {}, "fit": {},
                  "sweep": {"sizes": ["XS"], "seeds": [0], "lr_multipliers": [1.0, 2.0], **sweep}}
        return methods_paragraph(config, None, None)

    every = text(seeds=[0, 1])
    assert "each size was trained at 1x, 2x that rate and the law fitted to the multiple with the lowest mean" in every
    first = text(seeds=[7, 8], lr_search="first-seed")
    assert ("each size was trained with seed 7 at 1x, 2x that rate, the multiple with the lowest validation loss "
            "chosen per size, and the other seeds trained at the chosen multiple only (so the choice rests on one "
            "seed;") in first
    # one seed: nothing was reused, so the text is the full grid's
    assert "trained with seed 7 at" not in text(seeds=[7], lr_search="first-seed")


def test_verdicts_are_counted_from_the_runs():
    runs = pd.DataFrame({"run_id": ["a", "b", "c"], "size": ["XS", "S", "M"], "status": "ok",
                         "params": [1, 2, 3], "converged": [True, False, True]})
    assert "; 2 of 3 finished runs were converged (not: b)." in _text({}, runs)


def test_dropout_text_follows_the_model_and_the_runs():
    assert "dropout 0 (residual branches, FFN and attention probabilities)" in _text({})
    assert "dropout 0.1 (residual branches, FFN and attention probabilities)" in _text({}, model={"dropout": 0.1})
    assert "dropout 0 on the residual branches and FFN and 0.1 on the attention probabilities" in \
        _text({}, model={"dropout": 0.0, "attention_dropout": 0.1})
    runs = pd.DataFrame({"run_id": ["a"], "size": ["XS"], "status": "ok", "params": [1], "dropout": [0.2],
                         "attention_dropout": [0.0]})
    assert "dropout 0.2 on the residual branches and FFN and 0 on the attention probabilities" in _text({}, runs)


# ---------------------------------------------------------------- "What this means"

REAL_10X = {"gene_mean": 2.1, "knn": 1.30, "bayes_linear": 1.235}  # V = 64 PBMC, demo settings (issue 15)


def _ladder(best: float, converged=(True, True, True)) -> pd.DataFrame:
    return pd.DataFrame({"run_id": ["a", "b", "c"], "size": ["XXS", "TINY", "XS"], "status": "ok",
                         "params": [100, 1_000, 10_000], "best_val_mse": [best + 0.2, best + 0.1, best],
                         "test_mse": [best + 0.2, best + 0.1, best], "converged": list(converged)})


def _fit(c: float, lo: float, hi: float) -> dict:
    return {"params": {"a": 2.0, "alpha": 0.3, "c": c}, "ci95": {"alpha": [0.2, 0.4], "c": [lo, hi]},
            "floor_param": "c", "floor_at_boundary": False, "entropy_bits": entropy_summary(c, (lo, hi))}


def test_best_model_is_placed_against_every_baseline():
    text = meaning_paragraph(_ladder(1.25), None, baselines=REAL_10X)
    assert "The best size on validation loss is XS (10,000 parameters); its test MSE, on cells that chose nothing, is 1.25." in text
    assert ("On the same test cells and masks it is 40.5% below the gene-mean baseline (2.1); 3.8% below kNN "
            "regression on the visible genes (1.3); 1.2% above Bayes-linear regression on the visible genes") in text
    assert "A simpler model (bayes-linear) is at least as good as the best transformer" in text
    good = meaning_paragraph(_ladder(1.1), None, baselines=REAL_10X)
    assert "10.9% below Bayes-linear" in good and "A simpler model" not in good


def test_the_best_model_is_its_chosen_rate_not_a_mean_over_rates():
    runs = pd.concat([_ladder(1.1).assign(lr_scale=1.0),
                      _ladder(1.3).assign(lr_scale=2.0, run_id=["a2", "b2", "c2"])], ignore_index=True)
    text = meaning_paragraph(runs, None)
    # XS at its chosen rate (1.1), not "1.2 (mean of 2 seeds)" over both rates
    assert "The best size on validation loss is XS (10,000 parameters); its test MSE, on cells that chose nothing, is 1.1." in text
    seeds = pd.concat([runs, _ladder(1.0).assign(lr_scale=1.0, run_id=["a3", "b3", "c3"])], ignore_index=True)
    assert "is XS (10,000 parameters); its test MSE, on cells that chose nothing, is 1.05 (mean of 2 seeds)" in meaning_paragraph(seeds, None)


def test_the_advice_for_a_beaten_ladder_follows_how_it_was_trained():
    beaten = {"gene_mean": 2.1, "knn": 1.0}
    plain = meaning_paragraph(_ladder(1.1), None, baselines=beaten)
    assert "can learn: train to a plateau (budget: plateau) and search the learning rate." in plain
    both = pd.concat([_ladder(1.1).assign(lr_scale=1.0), _ladder(1.3).assign(lr_scale=2.0)], ignore_index=True)
    trained = meaning_paragraph(both.assign(budget="plateau"), None, baselines=beaten)
    assert "can learn: raise the plateau budget's maximum (train.cells_seen)." in trained
    assert "search the learning rate" not in trained


def test_plateau_status_is_stated():
    assert "All 3 finished runs converged: their last doublings of cells seen, cooled down, bought at most the " \
           "tolerance" in meaning_paragraph(_ladder(1.1), None)
    text = meaning_paragraph(_ladder(1.1, converged=(True, False, False)), None)
    assert "Only 1 of 3 finished runs converged; the others were still improving, cooled down, when their " \
           "budget ended, the best size among them." in text
    unjudged = meaning_paragraph(_ladder(1.1, converged=(None, None, None)), None)
    assert "Whether the runs converged is not judged" in unjudged


def _rates(*scales_and_best: tuple[float, float]) -> pd.DataFrame:
    """The ladder at each (multiple, best loss) pair; XS is best at its lowest-loss multiple."""
    return pd.concat([_ladder(b).assign(lr_scale=m, run_id=[f"a{m}", f"b{m}", f"c{m}"]) for m, b in scales_and_best],
                     ignore_index=True)


def test_the_learning_rate_status_is_stated():
    one = meaning_paragraph(_ladder(1.1), None)
    assert ("Each size was trained at one learning rate, so whether its point is at its best rate was not tested "
            "(sweep.lr_multipliers).") in one
    inside = meaning_paragraph(_rates((0.5, 1.3), (1.0, 1.1), (2.0, 1.2)), None)
    assert "Every size's best learning rate lies inside its grid of rates." in inside
    edge = meaning_paragraph(_rates((0.5, 1.3), (1.0, 1.2), (2.0, 1.1)), None)
    assert ("The best learning rate sits on the edge of its grid for XXS (2x), TINY (2x), XS (2x): those points "
            "may not be at their optimum (widen sweep.lr_multipliers).") in edge
    assert "inside its grid" not in edge
    # a likelihood sweep's rate is the one its fit uses: chosen on the bits, not on the MSE
    nll = _rates((1.0, 1.2), (2.0, 1.1)).assign(objective="gaussian-nll")
    nll["best_val_loss"] = 3.0 - nll["best_val_mse"]  # the bits favour 1x
    assert "chosen: XXS (1x), TINY (1x), XS (1x)." in meaning_paragraph(nll, None)
    pair = meaning_paragraph(_rates((1.0, 1.2), (2.0, 1.1)), None)
    assert ("With two learning rates per size no choice lies inside its grid, so no point is shown to be at its "
            "best rate; chosen: XXS (2x), TINY (2x), XS (2x).") in pair
    # a size whose other rates did not finish is named, not skipped
    lone = _rates((0.5, 1.3), (1.0, 1.1), (2.0, 1.2))
    lone = lone[~((lone["size"] == "XS") & (lone["lr_scale"] != 1.0))]
    text = meaning_paragraph(lone, None)
    assert ("Every other size's best learning rate lies inside its grid of rates. XS has a finished run at one "
            "learning rate only, so whether that point is at its best rate was not tested.") in text


def test_a_loss_below_the_known_floor_is_judged_against_the_validation_noise():
    # known-floor (issue 15): 0.3729 on 2,000 validation cells against the exact 0.3752 is sampling noise
    at = meaning_paragraph(_ladder(0.3729), None, bayes_floor=0.3752, n_masked=4_900)
    assert ("The best model is 0.6% below the known Bayes-optimal error of the simulator (0.3752), within the "
            "sampling error of the 4,900 masked test positions (z = -0.2): it is at the floor.") in at
    assert "impossible" not in at
    leak = meaning_paragraph(_ladder(0.30), None, bayes_floor=0.3752, n_masked=4_900)
    assert "BELOW the known Bayes-optimal error (0.3752) by 20.0%, beyond the sampling error" in leak
    assert "impossible without leakage" in leak
    unknown = meaning_paragraph(_ladder(0.3729), None, bayes_floor=0.3752)
    assert "the number of masked test positions is not recorded" in unknown
    above = meaning_paragraph(_ladder(0.39), None, bayes_floor=0.3752, n_masked=4_900)
    assert "The known Bayes-optimal error of the simulator is 0.3752; the best model is 3.9% above it." in above


def test_a_baseline_at_the_known_floor_is_not_called_a_better_model():
    # known-floor (issue 15): Bayes-linear (the Bayes-optimal predictor of gaussian data) 0.362 and the best
    # model 0.3729 are both within sampling error of the exact 0.3752 on 4,890 masked positions
    base = {"gene_mean": 1.092, "bayes_linear": 0.362}
    both = meaning_paragraph(_ladder(0.3729), None, baselines=base, bayes_floor=0.3752, n_masked=4_890)
    assert ("A simpler model (bayes-linear) scores lower on these cells, but it and the best transformer are both "
            "within the test cells' sampling error of the known Bayes-optimal error (0.3752): both have "
            "learned what these data allow.") in both
    assert "describe their training" not in both
    # a best model well above the floor is still told to train longer
    short = meaning_paragraph(_ladder(0.45), None, baselines=base, bayes_floor=0.3752, n_masked=4_890)
    assert "the ladder's points describe their training, not what the architecture can learn" in short


def test_the_true_floor_is_placed_against_the_fitted_interval():
    inside = meaning_paragraph(_ladder(0.3729), _fit(0.3729, 0.3565, 0.3869), bayes_floor=0.3752, n_masked=4_890)
    assert "The simulator's true floor, 0.3752, lies inside that interval." in inside
    outside = meaning_paragraph(_ladder(0.3729), _fit(0.30, 0.0, 0.33), bayes_floor=0.3752, n_masked=4_890)
    assert "The simulator's true floor, 0.3752, lies OUTSIDE that interval: the fit has not found it." in outside
    assert "true floor" not in meaning_paragraph(_ladder(0.3729), _fit(0.3729, 0.3565, 0.3869))
    # a baseline below the fitted floor by no more than the cells' noise around the true floor, which the
    # interval holds: not irreducible on these cells, but the fit and the truth agree
    noise = meaning_paragraph(_ladder(0.3729), _fit(0.3729, 0.3565, 0.3869), baselines={"bayes_linear": 0.362},
                              bayes_floor=0.3752, n_masked=4_890)
    assert ("As a loss on these cells it is not irreducible: Bayes-linear regression on the visible genes reaches "
            "0.362 on the same cells, below it, though within the cells' sampling error of the true floor (0.3752), "
            "so the fit and the truth agree within that error.") in noise
    assert "Read as a Gaussian noise level, the floor corresponds to" in noise
    # the best model itself below c, within the noise: no "not a floor of these models"
    best_below = meaning_paragraph(_ladder(0.3729), _fit(0.3745, 0.3565, 0.3869), bayes_floor=0.3759, n_masked=4_890)
    assert ("As a loss on these cells it is not irreducible: the best model reaches 0.3729 on the same cells, below "
            "it, though within the cells' sampling error of the true floor (0.3759)") in best_below
    assert "a floor of these models" not in best_below and "Read as a Gaussian noise level" in best_below
    bits = meaning_paragraph(_ladder(0.3729), {**_fit(0.3729, 0.3565, 0.3869), "loss_unit": "bits"},
                             bayes_floor=0.3752, n_masked=4_890)
    assert "true floor" not in bits  # a law in bits is not set against the MSE floor
    far = meaning_paragraph(_ladder(0.3729), _fit(0.3729, 0.3565, 0.3869), baselines={"bayes_linear": 0.30},
                            bayes_floor=0.3752, n_masked=4_890)
    assert "It is NOT an irreducible loss: Bayes-linear" in far and "inherits the floor's meaning" in far


def test_a_floor_above_a_baseline_is_not_called_irreducible():
    text = meaning_paragraph(_ladder(1.245), _fit(1.25, 1.2, 1.3), baselines=REAL_10X)
    assert "The fitted floor of the law (c) is 1.25 (95% CI 1.2 to 1.3); the best model is 0.4% below it." in text
    assert ("It is NOT an irreducible loss: Bayes-linear regression on the visible genes reaches 1.235 on the same "
            "cells, below it") in text
    assert "-0." not in text and "irreducible loss (floor" not in text
    below = meaning_paragraph(_ladder(1.1), _fit(1.0, 0.9, 1.05), baselines=REAL_10X)
    assert "NOT an irreducible loss" not in below and "the best model is 10.0% above it" in below


def test_a_floor_above_the_best_model_is_not_called_a_floor():
    """The real-10x demo settings: the fit's floor 0.837 above the best model's own 0.812, with
    every baseline above both."""
    ladder = _ladder(0.812)
    fit = {**_fit(0.837, 0.58, 0.969), "entropy_bits": {"gaussian": 1.92, "ci95": [1.65, 2.02]}}
    text = meaning_paragraph(ladder, fit, baselines={"gene_mean": 2.0, "bayes_linear": 0.989, "knn": 0.865})
    assert "the best model is 3.0% below it." in text
    assert ("It is NOT a floor of these models: the best model's own loss is already below it, so the law bends "
            "towards a level the ladder has passed") in text
    assert "NOT an irreducible loss" not in text  # no baseline is below the floor
    assert ("The entropy computed from that floor (1.92 bits per masked gene) is therefore not the entropy left "
            "in the data either") in text and "Read as a Gaussian noise level" not in text
    both = meaning_paragraph(_ladder(1.245), _fit(1.25, 1.2, 1.3), baselines=REAL_10X)
    assert "NOT an irreducible loss" in both and "Nor is it a floor of these models" in both
    fine = meaning_paragraph(_ladder(1.1), _fit(1.0, 0.9, 1.05), baselines=REAL_10X)
    assert "a floor of these models" not in fine


def test_an_entropy_interval_whose_floor_reaches_zero_is_unbounded_below():
    assert reaches_zero((5e-12, 0.68)) and reaches_zero((0.0, 0.68)) and not reaches_zero((0.05, 0.68))
    eb = entropy_summary(0.34, (5e-12, 0.68))
    assert eb["ci95"][0] is None and eb["ci95_unbounded_below"] is True
    text = meaning_paragraph(_ladder(1.1), _fit(0.34, 5e-12, 0.68))
    assert "(95% CI unbounded below, to 1.77: the floor's interval reaches 0" in text
    assert "-16" not in text and "-15" not in text
    bounded = meaning_paragraph(_ladder(1.1), _fit(0.34, 0.2, 0.68))
    assert "95% CI 0.886 to 1.77)" in bounded and "unbounded" not in bounded


def test_the_entropy_figure_draws_an_interval_unbounded_below():
    from cellscale.report import plots_genes

    fig = plots_genes.entropy_summary(1.244, [None, 1.85], refs={"true Bayes floor": 1.34})
    ax = fig.axes[0]
    assert any(t.get_text() == "95% CI unbounded below" for t in ax.texts)
    bar = [line for line in ax.lines if len(line.get_xdata()) == 2][0]
    assert bar.get_xdata()[1] == 1.85 and bar.get_xdata()[0] < 1.244


def test_convergence_is_counted_at_the_chosen_rates_only():
    from cellscale.report.verdicts import verdict_lines

    # the rule's rate (1x) is chosen for every size and none of its runs converged; the 0.5x runs did
    runs = pd.concat([_ladder(1.1, converged=(False, False, False)).assign(lr_scale=1.0),
                      _ladder(1.3).assign(lr_scale=0.5, run_id=["a0.5", "b0.5", "c0.5"])], ignore_index=True)
    text = meaning_paragraph(runs, None)
    assert ("Only 0 of 3 finished runs at each size's chosen learning rate converged; the others were still "
            "improving") in text
    assert verdict_lines(runs, None, {})[1] == ("Trained: 0 of 3 runs at their size's chosen rate converged; the "
                                                 "others were still improving when their budget ended.")
    # one rate per size: nothing set aside, nothing said about it
    assert "Only 0 of 3 finished runs converged" in meaning_paragraph(_ladder(1.1, converged=(False,) * 3), None)
