"""Every sentence of "What this means" is in the fitted loss's unit (issue 26, part 4): a sweep of a
likelihood objective is read in bits, against the baselines' bits on the same (test) cells; no MSE
number appears beside them."""

from __future__ import annotations

import json

import pytest

from cellscale.config import StudyConfig
from cellscale.pipeline import run_study
from cellscale.report.fmt import fmt_num


def _meaning(md: str) -> str:
    return md.split("## What this means", 1)[1].split("\n## ", 1)[0]


def _study(tmp_path, objective: str, mode: str):
    cfg = StudyConfig.model_validate({
        "name": objective, "data": {"source": "simulate", "genes": 12, "cells": 900,
                                    "simulate": {"mode": mode, "n_genes": 12, "n_programs": 2}},
        "model": {"objective": objective},
        "train": {"cells_seen": 1600, "batch_size": 32, "eval_every": 10},
        "sweep": {"sizes": ["XXS", "TINY", "XS"], "seeds": [0]},
        "fit": {"law": "power-floor", "bootstrap": 20, "keep_unconverged": True}})
    out = tmp_path / objective
    run_study(cfg, out=out, progress=False)
    return out


@pytest.mark.parametrize(("objective", "mode"), [("gaussian-nll", "gaussian"), ("nb", "nb"), ("mse", "nb")])
def test_no_sentence_sets_bits_against_an_mse(tmp_path, objective, mode):
    out = _study(tmp_path, objective, mode)
    text = _meaning((out / "report.md").read_text())
    base = json.loads((out / "baselines.json").read_text())
    mse_refs = {fmt_num(v[s]) for k in ("gene_mean", "bayes_linear", "knn", "bayes_floor") if k in base
                for v in [base[k]] for s in ("val", "test")}
    fit = json.loads((out / "fit.json").read_text())
    if objective == "mse":
        assert fit["y"] == "test_mse" and fit["loss_unit"] == "mse"
        assert "Best model: XS, test MSE" in text or "Best model: TINY, test MSE" in text
        assert f"the gene-mean baseline ({fmt_num(base['gene_mean']['test'])})" in text
        return
    assert fit["y"] == "test_loss" and fit["loss_unit"] == "bits"
    assert "MSE" not in text
    assert not [v for v in mse_refs if v in text], "an MSE reference appears beside bits"
    bits = base["likelihood"][objective]["gene_mean"]["test"]
    # the best model is set against the gene-mean baseline's bits on the same test cells
    assert f"the gene-mean baseline ({fmt_num(bits)})" in text
    assert "test loss (bits per masked gene)" in text.splitlines()[2]  # the first verdict line
