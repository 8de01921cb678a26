"""The methods paragraph follows the settings that did the work: learning rate, schedule,
budget, dropout. Each test changes one setting and checks the words change with it."""

import pandas as pd
import pytest

from cellscale.config import ModelConfig, TrainConfig
from cellscale.report.methods import methods_paragraph
from cellscale.schedule import resolve_lr


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
    assert "Runs trained for a fixed budget; a run counts as trained to its plateau when the best validation " \
           "loss improved by at most 1% over the last doubling" in fixed
    assert "a constant learning rate" in _text({"schedule": "constant"})
    plateau = _text({"budget": "plateau", "plateau_tol": 0.005, "plateau_patience": 3, "cooldown_frac": 0.25,
                     "cells_seen": 500000})
    assert ("Runs trained until their validation curve plateaued: once the best validation loss had improved "
            "by at most 0.5% over the last doubling of cells seen at 3 evaluation(s) in a row, the rate was "
            "cooled down over 25% of the steps so far and the run ended; at most 500,000 cells seen") in plateau
    assert "then the peak rate until the plateau, then a linear cooldown to 10% of the peak over 25%" in plateau


def test_verdicts_are_counted_from_the_runs():
    runs = pd.DataFrame({"run_id": ["a", "b", "c"], "size": ["XS", "S", "M"], "status": "ok",
                         "params": [1, 2, 3], "converged": [True, False, True]})
    assert "; 2 of 3 finished runs reached it (not: b)." in _text({}, runs)


def test_dropout_text_follows_the_model_and_the_runs():
    assert "dropout 0.1 (residual branches, FFN and attention probabilities)" in _text({})
    assert "dropout 0 on the residual branches and FFN and 0.1 on the attention probabilities" in \
        _text({}, model={"dropout": 0.0, "attention_dropout": 0.1})
    runs = pd.DataFrame({"run_id": ["a"], "size": ["XS"], "status": "ok", "params": [1], "dropout": [0.2],
                         "attention_dropout": [0.0]})
    assert "dropout 0.2 on the residual branches and FFN and 0 on the attention probabilities" in _text({}, runs)
