"""train.ema_decay: the weight average's arithmetic, its swap in and out, a run that evaluates it
and resumes to the same numbers, and the methods sentence that says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cellscale.config import TrainConfig
from cellscale.data.store import Dataset
from cellscale.model.ladder import get_size
from cellscale.rules.schedule import averaging_text, warm_decay
from cellscale.train import train_run
from cellscale.train.ema import WeightAverage


def test_warm_decay_starts_low_and_reaches_the_decay():
    assert warm_decay(0.999, 1) == pytest.approx(2 / 11)
    assert warm_decay(0.999, 10) == pytest.approx(11 / 20)
    assert warm_decay(0.9, 10**6) == 0.9


def test_update_is_the_warmed_exponential_average_and_applied_swaps_back():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    avg = WeightAverage(model, decay=0.5)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 6.0]]))
    avg.update(1)  # decay min(0.5, 2/11): weight 9/11 on the new value
    expected = torch.tensor([[1.0, 2.0]]) * (2 / 11) + torch.tensor([[3.0, 6.0]]) * (9 / 11)
    assert torch.allclose(avg.shadow[0], expected)
    with avg.applied():
        assert torch.allclose(model.weight, expected)
    assert torch.equal(model.weight, torch.tensor([[3.0, 6.0]]))
    restored = WeightAverage(model, decay=0.5)
    restored.load(avg.tensors())
    assert torch.equal(restored.shadow[0], avg.shadow[0])
    with pytest.raises(KeyError):
        restored.load({})


CFG = TrainConfig(cells_seen=32 * 120, batch_size=32, eval_every=20, eval_batch_size=64, num_threads=1,
                  device="cpu", ema_decay=0.98)


def _evals(run_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m["val_mse"] for m in lines if m["kind"] == "eval"]


def test_a_run_evaluates_the_average_and_resumes_to_the_same_numbers(tiny_dataset_dir: Path, tmp_path: Path):
    ds = Dataset.open(tiny_dataset_dir)
    model = get_size("TINY", n_genes=ds.n_genes)
    whole = train_run(ds, model, CFG, out=tmp_path / "whole")
    raw = train_run(ds, model, CFG.model_copy(update={"ema_decay": None}), out=tmp_path / "raw")
    assert whole["ema_decay"] == 0.98 and raw["ema_decay"] is None
    # the same steps on the same batches: only what is evaluated differs
    assert whole["steps"] == raw["steps"] and _evals(tmp_path / "whole") != _evals(tmp_path / "raw")
    assert whole["best_val_mse"] == pytest.approx(min(_evals(tmp_path / "whole")), rel=1e-6)
    part = train_run(ds, model, CFG, out=tmp_path / "split", stop_after_steps=70)
    assert part["status"] == "incomplete"
    again = train_run(ds, model, CFG, out=tmp_path / "split")
    assert again["resumed_at"] == [60]
    assert _evals(tmp_path / "split") == pytest.approx(_evals(tmp_path / "whole"), rel=1e-6)
    assert again["test_mse"] == pytest.approx(whole["test_mse"], rel=1e-6)


def test_the_methods_text_names_the_average():
    assert averaging_text(None) == ""
    text = averaging_text(0.999)
    assert "exponential moving average of the weights (decay 0.999, about the last 1,000 steps" in text
