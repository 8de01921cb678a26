"""Learning rate chosen per size on validation loss only; a choice on the grid's edge is flagged."""

import dataclasses

import pandas as pd
import pytest

from cellscale.rules.lrgrid import select_lr


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
    from cellscale.config import StudyConfig
    from cellscale.rules.schedule import resolve_lr
    from cellscale.sweep.plan import plan_runs

    cfg = StudyConfig.model_validate({"sweep": {"sizes": ["TINY", "XS"], "seeds": [0], "lr_multipliers": [0.5, 1.0, 2.0],
                                              "overrides": {"XS": {"lr_scale": 0.8}}}})
    specs = plan_runs(cfg, n_genes=64)
    assert [s.run_id for s in specs] == ["TINY-dall-s0-lr0.5", "TINY-dall-s0", "TINY-dall-s0-lr2",
                                         "XS-dall-s0-lr0.5", "XS-dall-s0", "XS-dall-s0-lr2"]
    assert [s.train.lr_scale for s in specs] == [0.5, 1.0, 2.0, 0.4, 0.8, 1.6]
    base = resolve_lr(specs[1].model, specs[1].train)
    assert resolve_lr(specs[0].model, specs[0].train) == pytest.approx(0.5 * base)


def test_multiples_are_compared_on_the_seeds_they_all_have():
    # sweep.lr_search first-seed: seed 0 at 1x and 2x, seed 1 at the chosen 2x only. Over all seeds
    # 2x's mean (0.55) would lose to 1x's seed-0 loss (0.52); on seed 0 alone 2x (0.50) wins
    rows = [("XS-s0", 0, 1.0, 0.52), ("XS-s0-lr2", 0, 2.0, 0.50), ("XS-s1-lr2", 1, 2.0, 0.60)]
    runs = pd.DataFrame([{"run_id": r, "size": "XS", "train_cells": None, "depth": 1.0, "seed": s, "lr_scale": m,
                          "best_val_mse": v} for r, s, m, v in rows])
    sel = select_lr(runs)
    assert [(c.best, c.losses) for c in sel.choices] == [(2.0, {1.0: 0.52, 2.0: 0.50})]
    assert sorted(sel.kept["run_id"]) == ["XS-s0-lr2", "XS-s1-lr2"] and sel.dropped == ["XS-s0"]


def _seed_search_cfg(**sweep):
    from cellscale.config import StudyConfig

    return StudyConfig.model_validate({"sweep": {"sizes": ["TINY", "XS"], "seeds": [3, 4, 5], "lr_multipliers": [0.5, 1.0],
                                               "lr_search": "first-seed", **sweep}})


def test_the_first_seed_searches_the_rate_and_the_others_train_at_its_choice():
    from cellscale.sweep.lrsearch import later_runs, planned_count, search_runs, waiting_groups
    from cellscale.sweep.plan import plan_runs

    cfg = _seed_search_cfg()
    specs = plan_runs(cfg, n_genes=64)
    first = search_runs(cfg, specs)
    assert sorted(s.run_id for s in first) == ["TINY-dall-s3", "TINY-dall-s3-lr0.5", "XS-dall-s3", "XS-dall-s3-lr0.5"]
    assert planned_count(cfg, specs) == 4 + 2 * 2  # not 12
    loss = {"TINY-dall-s3": 0.6, "TINY-dall-s3-lr0.5": 0.7, "XS-dall-s3": 0.5, "XS-dall-s3-lr0.5": 0.4}
    results = [{"run_id": s.run_id, "size": s.size, "train_cells": None, "depth": 1.0, "seed": s.seed,
                "lr_scale": s.train.lr_scale, "best_val_mse": loss[s.run_id], "status": "ok"} for s in first]
    assert sorted(s.run_id for s in later_runs(cfg, specs, results)) == [
        "TINY-dall-s4", "TINY-dall-s5", "XS-dall-s4-lr0.5", "XS-dall-s5-lr0.5"]
    # one of XS's first-seed runs failed (a rerun retries it, so it may yet win): XS's later seeds wait
    results[3]["status"] = "failed"
    assert [s.size for s in later_runs(cfg, specs, results)] == ["TINY", "TINY"]
    assert waiting_groups(cfg, specs, results) == ["XS"]
    # it (XS at 1x) diverged, which is final: the one ok rate is the choice; both diverged: every rate
    results[3]["status"] = "diverged"
    assert sorted(s.run_id for s in later_runs(cfg, specs, results) if s.size == "XS") == [
        "XS-dall-s4-lr0.5", "XS-dall-s5-lr0.5"]
    results[2]["status"] = "diverged"
    assert sorted(s.run_id for s in later_runs(cfg, specs, results) if s.size == "XS") == [
        "XS-dall-s4", "XS-dall-s4-lr0.5", "XS-dall-s5", "XS-dall-s5-lr0.5"]
    assert waiting_groups(cfg, specs, results) == []
    # a likelihood objective chooses on its loss in bits, as the report does: there XS's 1x is better
    nll = [{**r, "status": "ok", "objective": "gaussian-nll", "best_val_loss": 2.0 - r["best_val_mse"]} for r in results]
    nll_specs = [dataclasses.replace(s, model=s.model.model_copy(update={"objective": "gaussian-nll"})) for s in specs]
    assert sorted(s.run_id for s in later_runs(cfg, nll_specs, nll) if s.size == "XS") == ["XS-dall-s4", "XS-dall-s5"]
    every = _seed_search_cfg(lr_search="every-seed")
    assert search_runs(every, specs) == specs and later_runs(every, specs, results) == []
    assert planned_count(every, specs) == 12
