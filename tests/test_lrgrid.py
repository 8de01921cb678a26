"""Learning rate chosen per size on validation loss only; a choice on the grid's edge is flagged."""

import pandas as pd
import pytest

from cellscale.lrgrid import select_lr


def _grid(val: dict[str, list[float]], test: dict[str, list[float]], scales=(0.5, 1.0, 2.0), seeds=(0, 1)):
    rows = []
    for size in val:
        for i, m in enumerate(scales):
            for s in seeds:
                rows.append({"run_id": f"{size}-s{s}-lr{m}", "size": size, "train_cells": None, "depth": 1.0,
                             "seed": s, "lr_scale": m, "best_val_mse": val[size][i] + 0.001 * s,
                             "test_mse": test[size][i]})
    return pd.DataFrame(rows)


def test_the_choice_follows_validation_and_ignores_test():
    # test loss would pick 2.0 for XS; validation picks 1.0
    runs = _grid({"XS": [0.60, 0.55, 0.58], "S": [0.50, 0.52, 0.56]},
                 {"XS": [0.70, 0.66, 0.40], "S": [0.10, 0.90, 0.90]})
    sel = select_lr(runs)
    by = {c.size: c for c in sel.choices}
    assert by["XS"].best == 1.0 and by["XS"].losses == pytest.approx({0.5: 0.6005, 1.0: 0.5505, 2.0: 0.5805})
    assert by["S"].best == 0.5
    assert sorted(sel.kept["run_id"]) == ["S-s0-lr0.5", "S-s1-lr0.5", "XS-s0-lr1.0", "XS-s1-lr1.0"]
    assert len(sel.dropped) == 8
    with pytest.raises(ValueError, match="chosen on validation loss, not on 'test_mse'"):
        select_lr(runs, loss_col="test_mse")


def test_a_best_rate_on_the_edge_of_its_grid_is_flagged():
    runs = _grid({"XS": [0.60, 0.55, 0.58], "S": [0.50, 0.52, 0.56], "M": [0.70, 0.60, 0.50]},
                 {"XS": [0] * 3, "S": [0] * 3, "M": [0] * 3})
    sel = select_lr(runs)
    assert sorted((c.size, c.best, c.at_edge) for c in sel.choices) == [
        ("M", 2.0, True), ("S", 0.5, True), ("XS", 1.0, False)]
    assert sorted(c.size for c in sel.at_edge) == ["M", "S"]
    two = _grid({"XS": [0.6, 0.5]}, {"XS": [0, 0]}, scales=(1.0, 2.0))
    assert select_lr(two).at_edge == []  # two multiples have no inside: nothing to flag


def test_runs_without_a_grid_are_kept_as_they_are():
    runs = _grid({"XS": [0.6]}, {"XS": [0.6]}, scales=(1.0,))
    sel = select_lr(runs)
    assert sel.choices == [] and sel.dropped == [] and len(sel.kept) == 2
    plain = runs.drop(columns="lr_scale")
    assert select_lr(plain).kept is plain


def test_the_sweep_plans_each_size_at_each_multiple():
    from cellscale.config import RunConfig
    from cellscale.schedule import resolve_lr
    from cellscale.sweep.plan import plan_runs

    cfg = RunConfig.model_validate({"sweep": {"sizes": ["TINY", "XS"], "seeds": [0], "lr_multipliers": [0.5, 1.0, 2.0],
                                              "overrides": {"XS": {"lr_scale": 0.8}}}})
    specs = plan_runs(cfg, n_genes=64)
    assert [s.run_id for s in specs] == ["TINY-dall-s0-lr0.5", "TINY-dall-s0", "TINY-dall-s0-lr2",
                                         "XS-dall-s0-lr0.5", "XS-dall-s0", "XS-dall-s0-lr2"]
    assert [s.train.lr_scale for s in specs] == [0.5, 1.0, 2.0, 0.4, 0.8, 1.6]
    base = resolve_lr(specs[1].model, specs[1].train)
    assert resolve_lr(specs[0].model, specs[0].train) == pytest.approx(0.5 * base)
