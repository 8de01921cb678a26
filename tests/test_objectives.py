"""Likelihood objectives: the losses against independent formulas, the head, the batches that carry
counts, a run of each objective end to end, and the likelihood baselines."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats
import torch

from cellscale.config import DataConfig, ModelConfig, SimulateConfig, TrainConfig
from cellscale.data.baselines import compute_baselines, nb_nats
from cellscale.data.build import build_dataset
from cellscale.data.loader import RankBatches, TrainBatches, eval_batches
from cellscale.data.store import Dataset
from cellscale.model import CellTransformer, count_params, flops_per_cell
from cellscale.model.ladder import get_size
from cellscale.rules import objectives
from cellscale.train import evaluate, train_run


def test_gaussian_nll_is_the_normal_log_density():
    g = torch.Generator().manual_seed(0)
    out = torch.randn(500, 2, generator=g, dtype=torch.float64) * 2
    y = torch.randn(500, generator=g, dtype=torch.float64) * 3
    got = objectives.position_loss("gaussian-nll", out, y)
    ref = -torch.distributions.Normal(out[:, 0], torch.exp(0.5 * out[:, 1])).log_prob(y)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_nb_loss_is_scipy_nbinom():
    rng = np.random.default_rng(0)
    mu = np.exp(rng.normal(0, 2, 400))
    theta = np.exp(rng.normal(0, 1.5, 400))
    k = rng.negative_binomial(theta, theta / (theta + mu)).astype(np.float64)
    scale = np.exp(rng.normal(0, 0.5, 400))
    out = torch.tensor(np.stack([np.log(mu / scale), np.log(theta)], 1))
    got = objectives.position_loss("nb", out, torch.zeros(400), counts=torch.tensor(k),
                                   log_scale=torch.tensor(np.log(scale))).double().numpy()
    ref = -scipy.stats.nbinom.logpmf(k, theta, theta / (theta + mu))
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10)  # float64 in, float64 out
    f32 = objectives.position_loss("nb", out.float(), torch.zeros(400), counts=torch.tensor(k).float(),
                                   log_scale=torch.tensor(np.log(scale)).float())
    assert f32.dtype == torch.float32
    np.testing.assert_allclose(f32.double().numpy(), ref, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(nb_nats(k, mu, theta), ref, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="needs the masked genes' counts"):
        objectives.position_loss("nb", out, torch.zeros(400))


def test_point_predictions_and_units():
    out = torch.tensor([[0.5, 1.0], [-2.0, 0.0], [30.0, 3.0]])
    torch.testing.assert_close(objectives.point_prediction("gaussian-nll", out), out[:, 0])
    # nb: the predictive mean of log1p(k * target_sum / library), against a long direct sum
    eta = np.array([-1.5, 0.5, 2.0, 4.0, 7.0])
    theta = np.array([0.5, 1.0, 3.0, 2.0, 10.0])
    log_scale = np.array([0.9, -0.2, 0.0, 0.4, 0.0])
    got = objectives.point_prediction("nb", torch.tensor(np.stack([eta, np.log(theta)], 1)),
                                      log_scale=torch.tensor(log_scale)).numpy()
    k = np.arange(200_000)[:, None]
    mu = np.exp(eta + log_scale)
    ref = (scipy.stats.nbinom.pmf(k, theta, theta / (theta + mu)) * np.log1p(k * np.exp(-log_scale))).sum(0)
    np.testing.assert_allclose(got[:3], ref[:3], rtol=1e-9)  # exact sum: mass below 256 counts
    np.testing.assert_allclose(got[3:], ref[3:], rtol=5e-3)  # delta method for large counts (0.47% here)
    with pytest.raises(ValueError, match="needs each position's log"):
        objectives.point_prediction("nb", out)
    assert objectives.to_report_units("mse", 0.7) == 0.7
    assert objectives.to_report_units("nb", math.log(2) * 3) == pytest.approx(3.0)
    assert [objectives.head_outputs(o) for o in objectives.OBJECTIVES] == [1, 2, 2]
    with pytest.raises(ValueError, match="unknown objective 'poisson'"):
        objectives.head_outputs("poisson")


def test_head_parameters_and_flops():
    mse = get_size("XS", n_genes=512)
    assert count_params(mse) == 132_993  # the study's count is untouched
    for name in ("gaussian-nll", "nb"):
        cfg = get_size("XS", n_genes=512, objective=name)
        assert count_params(cfg) == 132_993 + 65 == CellTransformer(cfg).num_params()
        extra = flops_per_cell(cfg)["forward"] - flops_per_cell(mse)["forward"]
        assert extra == pytest.approx(2 * 64 * 0.15 * 512)


def test_masked_position_loss_takes_each_cell_scale():
    values = torch.zeros(2, 3)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    counts = torch.tensor([[1.0, 9.0, 2.0], [9.0, 3.0, 9.0]])
    log_scale = torch.tensor([0.0, math.log(4.0)])
    out = torch.zeros(3, 2)  # eta = 0, theta = 1 at every masked position
    got = objectives.masked_position_loss("nb", out, values, mask, counts=counts, log_scale=log_scale)
    mu = np.array([1.0, 1.0, 4.0])
    ref = -scipy.stats.nbinom.logpmf([1, 2, 3], 1.0, 1.0 / (1.0 + mu))
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5)


def test_batches_carry_counts_and_library_scale(tiny_dataset_dir):
    ds = Dataset.open(tiny_dataset_dir)
    plain = TrainBatches(ds, batch_size=32, seed=3)
    withc = TrainBatches(ds, batch_size=32, seed=3, with_counts=True)
    v0, m0 = plain.batch(5)
    v1, m1, counts, log_scale = withc.batch(5)
    assert torch.equal(v0, v1) and torch.equal(m0, m1)
    rows = withc.rows(5)
    np.testing.assert_array_equal(counts.numpy(), np.asarray(ds.counts[np.sort(rows)])[np.argsort(np.argsort(rows))])
    target = ds.manifest["preprocessing"]["target_sum"]
    np.testing.assert_allclose(log_scale.numpy(), np.log(ds.library_size[rows] / target), rtol=1e-6)
    # values are log1p(counts / library * target_sum): the batch's counts are the cells' own
    np.testing.assert_allclose(v1.numpy(), np.log1p(counts.numpy() * np.exp(-log_scale.numpy())[:, None]), rtol=1e-4, atol=1e-5)
    # DDP ranks: their slices put together are the single-process batch
    parts = [RankBatches(ds, world_size=2, rank=r, batch_size=32, seed=3, with_counts=True).batch(5) for r in (0, 1)]
    assert torch.equal(torch.cat([p[2] for p in parts]), counts)
    assert torch.equal(torch.cat([p[3] for p in parts]), log_scale)
    assert parts[0][4] == parts[1][4] == int(m1.sum())
    ev = next(eval_batches(ds, "test", batch_size=8, with_counts=True))
    assert len(ev) == 4 and ev[2].shape == (8, ds.n_genes) and ev[3].shape == (8,)


@pytest.mark.parametrize("objective", ["gaussian-nll", "nb"])
def test_likelihood_run_records_bits(tiny_dataset_dir, tmp_path, objective):
    model = get_size("TINY", n_genes=64, objective=objective)
    res = train_run(tiny_dataset_dir, model, TrainConfig(cells_seen=3200, batch_size=32, eval_every=25),
                    out=tmp_path / "run")
    assert res["status"] == "ok" and res["objective"] == objective and res["loss_unit"] == "bits"
    assert res["params"] == count_params(model.model_copy(update={"n_genes": 64}))
    for key in ("best_val_loss", "test_loss", "best_val_mse", "test_mse"):
        assert math.isfinite(res[key]), key
    assert res["best_val_loss"] != res["best_val_mse"]
    gene = json.loads((tmp_path / "run" / "per_gene.json").read_text())
    bits, n = gene["test_bits"], gene["n_masked"]
    weighted = sum(b * c for b, c in zip(bits, n) if b is not None) / sum(n)
    assert weighted == pytest.approx(res["test_loss"], rel=1e-9)
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert evals and all("val_bits" in e and "val_mse" in e for e in evals)
    # the checkpoint is chosen by the likelihood, not by the MSE
    assert res["best_step"] == min(evals, key=lambda e: e["val_bits"])["step"]
    # training moved the likelihood: the untrained model scores far worse on the same masks
    ds = Dataset.open(tiny_dataset_dir)
    torch.manual_seed(0)
    fresh = evaluate(CellTransformer(model.model_copy(update={"n_genes": 64})), ds, "test",
                     cfg=TrainConfig(), device=torch.device("cpu"))
    assert res["test_loss"] < fresh.loss - 0.5


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["gaussian-nll", "nb"])
def test_likelihood_objectives_beat_the_gene_mean_baseline(tmp_path, objective):
    cfg = DataConfig(source="simulate", cells=3000, genes=64, seed=0, simulate=SimulateConfig(n_genes=1000))
    ds = build_dataset(cfg, out=tmp_path / "ds", progress=False)
    res = train_run(ds, get_size("XS", n_genes=64, objective=objective), TrainConfig(cells_seen=60000, batch_size=32),
                    out=tmp_path / "run")
    base = compute_baselines(Dataset.open(ds))["likelihood"][objective]["gene_mean"]
    # measured: gaussian-nll 1.806 vs 1.936 bits, nb 2.827 vs 3.086 bits (test)
    assert res["test_loss"] < base["test"] - 0.08


def test_nb_refused_without_counts(tmp_path):
    cfg = DataConfig(source="simulate", genes=16, cells=200,
                     simulate=SimulateConfig(mode="gaussian", n_genes=16, n_programs=2))
    ds = build_dataset(cfg, out=tmp_path / "g", progress=False)
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "cellscale.cli", "train", "--data", str(ds), "--size", "TINY",
                           "--objective", "nb", "--cells-seen", "64", "--out", str(run)],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "the nb objective needs counts" in lines[0]
    assert not run.exists()


def test_likelihood_baselines_match_direct_formulas(tiny_dataset_dir):
    ds = Dataset.open(tiny_dataset_dir)
    lik = compute_baselines(ds, splits=("test",))["likelihood"]
    train, rows, mask = ds.splits["train"], ds.splits["test"], ds.eval_mask("test")
    x_tr = np.asarray(ds.values[np.sort(train)], dtype=np.float64)
    mean, var = x_tr.mean(0), x_tr.var(0)
    x = np.asarray(ds.values[rows], dtype=np.float64)
    nats = -scipy.stats.norm.logpdf(x, mean, np.sqrt(var))[mask]
    assert lik["gaussian-nll"]["gene_mean"]["test"] == pytest.approx(nats.mean() / math.log(2), rel=1e-9)
    assert lik["gaussian-nll"]["bayes_linear"]["test"] < lik["gaussian-nll"]["gene_mean"]["test"]
    # nb: rate = counts / scale totals over training cells; the moment theta; scipy's pmf
    scale = ds.library_size / ds.manifest["preprocessing"]["target_sum"]
    k_tr = np.asarray(ds.counts[np.sort(train)], dtype=np.float64)
    rate = k_tr.sum(0) / scale[np.sort(train)].sum()
    mu_tr = scale[np.sort(train), None] * rate
    theta = np.clip((mu_tr**2).sum(0) / ((k_tr - mu_tr) ** 2 - mu_tr).sum(0), 1e-3, 1e6)
    theta = np.where(((k_tr - mu_tr) ** 2 - mu_tr).sum(0) > 0, theta, 1e6)
    k = np.asarray(ds.counts[rows], dtype=np.float64)
    mu = scale[rows, None] * rate
    ref = -scipy.stats.nbinom.logpmf(k, theta, theta / (theta + mu))[mask]
    assert lik["nb"]["gene_mean"]["test"] == pytest.approx(ref.mean() / math.log(2), rel=1e-8)


def test_gaussian_mode_floor_in_bits(tmp_path):
    cfg = DataConfig(source="simulate", genes=24, cells=6000, seed=1,
                     simulate=SimulateConfig(mode="gaussian", n_genes=24, n_programs=3))
    ds = Dataset.open(build_dataset(cfg, out=tmp_path / "g", progress=False))
    lik = compute_baselines(ds)["likelihood"]["gaussian-nll"]
    for s in ("val", "test"):
        floor = lik["bayes_floor"][s]
        # the training-covariance Bayes-linear predictive lands on the exact conditional's entropy
        assert floor < lik["gene_mean"][s]
        assert lik["bayes_linear"][s] == pytest.approx(floor, abs=0.06)


def test_fit_of_a_likelihood_table_is_in_bits():
    import pandas as pd

    from cellscale.errors import FitError
    from cellscale.fit import fit_table

    P = np.logspace(2, 6, 9)
    frame = pd.DataFrame({"run_id": [f"r{i}" for i in range(9)], "params": P, "status": "ok", "objective": "nb",
                          "best_val_loss": 1.3 * P**-0.3 + 2.1, "best_val_mse": 9.0})
    d = fit_table(frame, law="power-floor", bootstrap=0).to_dict()
    assert d["y"] == "best_val_loss" and d["loss_unit"] == "bits"
    assert d["params"]["c"] == pytest.approx(2.1, rel=1e-4) and d["params"]["alpha"] == pytest.approx(0.3, rel=1e-3)
    ent = d["entropy_bits"]
    assert ent["gaussian"] is None and ent["likelihood"] == d["params"]["c"]
    # an explicit MSE column is an MSE fit again, read through the Gaussian
    mse = fit_table(frame.assign(best_val_mse=frame["best_val_loss"] / 2), law="power-floor", y="best_val_mse",
                    bootstrap=0).to_dict()
    assert mse["loss_unit"] == "mse" and mse["entropy_bits"]["gaussian"] == pytest.approx(
        0.5 * math.log2(2 * math.pi * math.e * 1.05), rel=1e-3)
    with pytest.raises(FitError, match=r"the table mixes objectives \(mse, nb\)"):
        fit_table(frame.assign(objective=["nb"] * 8 + ["mse"]), law="power-floor", bootstrap=0)


def test_likelihood_sweep_report_is_in_bits_and_sets_the_true_floor_beside_the_fit(tmp_path):
    """A gaussian-nll sweep on data with a known floor: fitted on bits, baselines in bits, and the
    report's fit table sets the exact floor (in bits) beside the fitted one."""
    from cellscale.config import StudyConfig
    from cellscale.pipeline import run_study

    cfg = StudyConfig.model_validate({
        "name": "lik", "data": {"source": "simulate", "genes": 12, "cells": 900,
                                 "simulate": {"mode": "gaussian", "n_genes": 12, "n_programs": 2}},
        "model": {"objective": "gaussian-nll"},
        "train": {"cells_seen": 1600, "batch_size": 32, "eval_every": 10},
        "sweep": {"sizes": ["XXS", "TINY", "XS"], "seeds": [0, 1]},
        "fit": {"law": "power-floor", "bootstrap": 50, "keep_unconverged": True}})  # 50 steps: no plateau
    out = tmp_path / "lik"
    run_study(cfg, out=out, progress=False)
    fit = json.loads((out / "fit.json").read_text())
    assert fit["y"] == "test_loss" and fit["loss_unit"] == "bits"  # the loss that chose nothing
    assert fit["entropy_bits"]["likelihood"] == fit["params"]["c"]
    lik = json.loads((out / "baselines.json").read_text())["likelihood"]["gaussian-nll"]
    md = (out / "report.md").read_text()
    assert "true Bayes floor (simulator, test)" in md and f"{lik['bayes_floor']['test']:.4g} bits" in md
    assert "best_val_loss (bits)" in md
    assert "Validation loss of the gaussian-nll objective in bits per masked gene" in md
    # the entropy table gives bits exactly when the fit's judgement (cellscale.fit.judge) identifies the floor
    identified = fit["judgement"]["floor_identified"]
    assert ("no entropy from these points" in md) == (not identified)
    assert ("fitted floor of the gaussian-nll loss (measured)" in md) == identified
    # an identified floor of a likelihood is given in bits, beside the baselines and the exact floor
    from types import SimpleNamespace

    from cellscale.report.fitting import FitOutcome
    from cellscale.report.tables import _fitted_entropy_rows

    sd = SimpleNamespace(objective="gaussian-nll", likelihood_refs={"bayes_floor": lik["bayes_floor"]}, split="test",
                         refs=lambda block: {k: v["test"] for k, v in block.items()})
    identified = {**fit, "judgement": {**fit["judgement"], "floor_identified": True}}
    rows = _fitted_entropy_rows(FitOutcome(law="power-floor", method="huber-log", data=identified), sd, None)
    assert rows[0][:2] == ["fitted floor of the gaussian-nll loss (measured)", f"{fit['params']['c']:.4g} bits"]
    assert rows[2][:2] == ["bayes-floor (gaussian-nll, test)", f"{lik['bayes_floor']['test']:.4g} bits"]


def test_fit_refuses_a_table_of_several_depths():
    import pandas as pd

    from cellscale.errors import FitError
    from cellscale.fit import fit_table

    P = np.logspace(2, 6, 6)
    frame = pd.DataFrame({"run_id": [f"r{i}" for i in range(6)], "params": P, "status": "ok",
                          "best_val_mse": 1.3 * P**-0.3 + 0.5, "depth": [1.0, 1.0, 1.0, 0.25, 0.25, 0.25]})
    with pytest.raises(FitError, match=r"the table mixes sequencing depths \(0.25, 1\)"):
        fit_table(frame, law="power-floor", bootstrap=0)
    assert fit_table(frame[frame["depth"] == 1.0], law="power-floor", bootstrap=0).n_points == 3


def test_objective_names_agree_everywhere():
    """The config's Literal, the CLI's choices (kept literal so `cellscale --help` loads no torch)
    and objectives.OBJECTIVES name the same objectives."""
    import typing

    from cellscale.cli import build_parser

    literal = typing.get_args(ModelConfig.model_fields["objective"].annotation)
    parser = build_parser()
    train = next(a for a in parser._subparsers._group_actions[0].choices["train"]._actions if a.dest == "objective")
    assert tuple(literal) == tuple(train.choices) == objectives.OBJECTIVES
