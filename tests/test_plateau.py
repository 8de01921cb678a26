"""The convergence rule on cooled-down points (cellscale.rules.plateau), for losses of either sign."""

import math

import numpy as np
import pytest

from cellscale.config import TrainConfig
from cellscale.rules.plateau import (
    converged_at,
    doubling_gain,
    gains,
    has_learned,
    is_converged,
    ladder_converged_at,
    next_doubling,
    paired_gain_se,
    relative_fall,
)
from cellscale.train import lr_at


def test_an_mse_doubling_gain_is_the_relative_fall():
    assert doubling_gain(1.1, 1.0) == pytest.approx(0.1)
    assert doubling_gain(1.0, 1.0) == 0.0
    assert doubling_gain(1.0, 1.05) == pytest.approx(-0.05 / 1.05)  # a rise: negative, converged
    assert is_converged(doubling_gain(1.0, 1.05)) and not is_converged(doubling_gain(1.1, 1.0))
    assert doubling_gain(1.0101, 1.0) == pytest.approx(0.0101)
    assert not is_converged(doubling_gain(1.0101, 1.0)) and is_converged(doubling_gain(1.0099, 1.0))


def test_a_loss_in_bits_is_judged_as_the_variance_of_a_gaussian_of_that_entropy():
    # the same MSEs read as Gaussian entropies give the same gain
    h = [0.5 * math.log2(2 * math.pi * math.e * m) for m in (1.1, 1.0)]
    assert doubling_gain(h[0], h[1], "bits") == pytest.approx(doubling_gain(1.1, 1.0))
    # negative bits (a differential entropy below zero) are judged like any other
    assert doubling_gain(-1.0, -1.5, "bits") == pytest.approx(2.0 ** 1.0 - 1.0)
    assert doubling_gain(-2.0, -2.0, "bits") == 0.0
    assert doubling_gain(0.3, 0.3 - 0.5 * math.log2(1.009), "bits") == pytest.approx(0.009)
    assert is_converged(doubling_gain(0.3, 0.3 - 0.5 * math.log2(1.009), "bits"))


def test_the_next_doubling_is_read_where_gains_read_one():
    doubling = [30_000, 60_000, 120_000, 240_000]
    assert [next_doubling(doubling, i) for i in range(4)] == [1, 2, 3, None]
    root2 = [30_000, 42_426, 60_000, 84_853, 120_000]  # sqrt(2) apart: two points on
    assert [next_doubling(root2, i) for i in range(5)] == [2, 3, 4, None, None]
    # a point 1.6x on is not a doubling, 1.7x is (HALF = 0.6)
    assert next_doubling([100_000, 160_000, 170_000], 0) == 2


def test_a_relative_fall_is_a_share_of_the_loss_before():
    assert relative_fall(1.25, 1.0) == pytest.approx(0.2)
    h = [0.5 * math.log2(2 * math.pi * math.e * m) for m in (1.25, 1.0)]
    assert relative_fall(h[0], h[1], "bits") == pytest.approx(0.2)
    assert relative_fall(None, 1.0) is None


def test_the_gains_standard_error_pairs_the_cells():
    rng = np.random.default_rng(0)
    n = rng.integers(3, 8, size=2000).astype(float)
    after = n * rng.gamma(4.0, 0.25, size=2000)  # per-cell squared-error sums, mean MSE about 1
    before = after * 1.01 * np.exp(0.02 * rng.standard_normal(2000))  # 1% worse, cell by cell
    gain = doubling_gain(before.sum() / n.sum(), after.sum() / n.sum())
    se = paired_gain_se((before, n), (after, n))
    assert gain == pytest.approx(0.0102, abs=0.002) and 0.0002 < se < 0.001
    # the delta method against a bootstrap over cells
    idx = rng.integers(0, 2000, size=(2000, 2000))
    boot = before[idx].sum(1) / after[idx].sum(1) - 1
    assert se == pytest.approx(boot.std(), rel=0.1)
    assert not is_converged(0.009, 0.01, se=0.002) and is_converged(0.005, 0.01, se=0.002)
    # a few cells: the same 0.5% gain is no longer clear of the noise
    few = paired_gain_se((before[:35] * 1.0, n[:35]), (before[:35] / 1.005 * np.exp(0.05 * rng.standard_normal(35)),
                                                      n[:35]))
    assert few > 0.005 and not is_converged(0.005, 0.01, se=few)
    assert paired_gain_se((before, n), (after[:10], n[:10])) is None
    # in bits (per-cell sums in nats, of either sign): the delta method against a bootstrap again
    nats_after = n * (-0.3 + 0.5 * rng.standard_normal(2000))
    nats_before = nats_after + n * (0.01 + 0.02 * rng.standard_normal(2000))
    g = [2 ** (2 * (nats_before[i].sum() - nats_after[i].sum()) / n[i].sum() / np.log(2)) - 1 for i in idx[:500]]
    assert paired_gain_se((nats_before, n), (nats_after, n), "bits") == pytest.approx(np.std(g), rel=0.15)


def test_points_without_a_figure():
    assert doubling_gain(None, 1.0) is None and doubling_gain(1.0, float("nan")) is None
    assert doubling_gain(1.0, 0.0) is None  # an MSE of 0 is no loss to divide by
    assert not is_converged(None)
    assert gains([1, 2, 4], [1.2, None, 1.0]) == [None, None, None]


def test_the_first_converged_point_respects_patience_and_the_minimum():
    cells = [1000, 2000, 4000, 8000, 16000]
    losses = [2.0, 1.5, 1.495, 1.40, 1.399]  # gains: -, 33%, 0.33%, 6.8%, 0.07%
    assert [round(g, 4) if g is not None else None for g in gains(cells, losses)] == [None, 0.3333, 0.0033, 0.0679, 0.0007]
    assert converged_at(cells, losses) == 2
    assert converged_at(cells, losses, min_cells=5000) == 4  # the early plateau is not counted
    assert converged_at(cells, losses, patience=2) is None  # never two in a row
    assert converged_at(cells, [2.0, 1.99, 1.985, 1.984, 1.0], patience=2) == 2
    assert converged_at(cells, losses, tol=0.001) == 4
    assert converged_at(cells, [5.0, 4.0, 3.0, 2.0, 1.0]) is None


def test_no_point_on_the_gene_mean_plateau_counts_towards_convergence():
    cells = [10_000, 20_000, 40_000, 80_000, 160_000]
    losses = [1.006, 1.004, 1.001, 0.95, 0.949]  # flat at the gene mean (1.005), then a takeoff, then flat
    learned = [has_learned(v, 1.005) for v in losses]
    assert learned == [False, False, False, True, True]
    assert converged_at(cells, losses, patience=2) == 2  # without the baseline: the plateau before the takeoff
    assert converged_at(cells, losses, patience=2, learned=learned) is None
    assert converged_at(cells, losses, patience=1, learned=learned) == 4
    assert has_learned(0.99, None) and has_learned(None, 1.0)


# TINY, seed 0, on the demo's data trained to 1.92M cells (docs/ablations.md, "Does converged hold up?"):
# cooled-down validation losses and their paired gains' standard errors from 120k cells seen on
TINY_S0_CELLS = [120_000, 240_000, 480_000, 960_000, 1_920_000]
TINY_S0_LOSSES = [1.128197, 1.104218, 1.093837, 1.088582, 1.075123]
TINY_S0_SES = [0.00642, 0.00531, 0.00445, 0.00405, 0.00470]


def test_one_flat_doubling_is_not_enough_by_default():
    gain = gains(TINY_S0_CELLS, TINY_S0_LOSSES)
    assert [round(100 * g, 2) for g in gain[1:]] == [2.17, 0.95, 0.48, 1.25]
    # one doubling within 1% by one standard error at 960k, and the next one bought 1.25%:
    assert converged_at(TINY_S0_CELLS, TINY_S0_LOSSES, ses=TINY_S0_SES, patience=1) == 3
    patience = TrainConfig().plateau_patience
    assert patience == 2
    assert converged_at(TINY_S0_CELLS, TINY_S0_LOSSES, ses=TINY_S0_SES, patience=patience) is None
    flat = TINY_S0_LOSSES[:4] + [TINY_S0_LOSSES[3] / 1.004]  # had it bought 0.4% instead
    assert converged_at(TINY_S0_CELLS, flat, ses=TINY_S0_SES, patience=patience) == 4


def test_a_branch_table_is_judged_as_the_trainer_judges_it():
    rows = [{"cells_seen": c, "val_loss": v, "val_mse": v, "gain_se": se}
            for c, v, se in zip(TINY_S0_CELLS, TINY_S0_LOSSES, TINY_S0_SES)]
    assert ladder_converged_at(rows, 1.6, patience=1) == 3  # well below the gene mean: every point counts
    assert ladder_converged_at(rows, 1.6, patience=2) is None
    assert ladder_converged_at(rows, 1.09, patience=1) is None  # 960k is within 1% of this gene mean


def test_a_denser_ladder_reads_each_gain_over_a_whole_doubling():
    cells = [1000, 1414, 2000, 2828, 4000]
    losses = [2.0, 1.8, 1.5, 1.49, 1.485]
    # each point against the one at half its cells: two points back, none for the first two
    assert gains(cells, losses) == [None, None, pytest.approx(0.5 / 1.5), pytest.approx(0.31 / 1.49),
                                    pytest.approx(0.015 / 1.485)]
    assert converged_at(cells, losses) is None and converged_at(cells, losses, tol=0.011) == 4


def test_wsd_schedule_warms_up_holds_and_cools_down_as_its_shape_says():
    cfg = TrainConfig(budget="plateau", warmup_frac=0.1, final_lr_frac=0.1, cooldown_shape="linear")
    kw = {"total_steps": 100, "peak": 1.0, "cfg": cfg}
    assert [lr_at(s, **kw) for s in (0, 9)] == [pytest.approx(0.1), pytest.approx(1.0)]
    assert lr_at(60, **kw) == 1.0  # no cooldown yet: the peak, whatever the maximum
    assert lr_at(50, decay_start=50, end=60, **kw) == pytest.approx(1.0 - 0.9 * 1 / 10)
    assert lr_at(59, decay_start=50, end=60, **kw) == pytest.approx(0.1)
    sqrt = {**kw, "cfg": cfg.model_copy(update={"cooldown_shape": "1-sqrt"})}
    # a quarter of the way through, 1-sqrt has made half of the fall
    assert lr_at(52, decay_start=50, end=62, **sqrt) == pytest.approx(1.0 - 0.9 * 0.5)
    assert lr_at(61, decay_start=50, end=62, **sqrt) == pytest.approx(0.1)


def test_a_warmup_in_cells_does_not_depend_on_the_maximum():
    from cellscale.rules.schedule import warmup_steps

    frac = TrainConfig(batch_size=32, warmup_frac=0.05)
    assert (warmup_steps(frac, 1000), warmup_steps(frac, 4000)) == (50, 200)
    cells = frac.model_copy(update={"warmup_cells": 6000})
    assert (warmup_steps(cells, 1000), warmup_steps(cells, 4000)) == (188, 188)
    kw = {"total_steps": 4000, "peak": 1.0, "cfg": cells.model_copy(update={"budget": "plateau"})}
    assert lr_at(187, **kw) == 1.0 and lr_at(93, **kw) == pytest.approx(94 / 188)
