"""A small model trains: its test MSE ends well below the gene-mean baseline, and the same run at a
learning rate of 0 (the control) does not, so the test fails when the optimiser's steps or the
loss's gradient do not reach the weights (checked by hand: with the training step's backward pass
or its rate removed, it fails)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellscale.config import DataConfig, SimulateConfig, TrainConfig
from cellscale.model.ladder import get_size
from cellscale.train import train_run

# cell types that move half the genes by e^3, little NB noise: a model that reads a cell's other
# genes predicts a masked one far better than its gene's mean
SIM = SimulateConfig(n_genes=200, n_types=4, n_programs=2, type_effect=3.0, marker_frac=0.5, dispersion_median=0.05)
DATA = DataConfig(source="simulate", cells=1000, genes=64, seed=0, simulate=SIM)  # train 900, val 50, test 50
TRAIN = TrainConfig(cells_seen=32_000, batch_size=32, num_threads=1, device="cpu")  # 1,000 steps
# trained test MSE must be below MARGIN x the gene-mean test MSE. Measured on 2 CPU cores (TINY, V=64,
# 32,000 cells seen, ~4 s a run): trained 0.2715, lr = 0 6.5428, gene-mean baseline 0.7550
# (ratios 0.36 and 8.67). Over data seeds 0-2 x run seeds 0-1 the trained ratio was 0.36-0.73; at
# 16,000 cells seen one of those six stayed on the gene-mean plateau (0.995), hence 32,000.
MARGIN = 0.8


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    from cellscale.data.build import build_dataset

    return build_dataset(DATA, out=tmp_path_factory.mktemp("learns") / "ds", progress=False)


def test_trained_model_beats_the_gene_mean_and_the_zero_lr_control_does_not(dataset_dir: Path, tmp_path: Path,
                                                                           monkeypatch):
    model = get_size("TINY", n_genes=DATA.genes)
    lrs: dict[str, list[float]] = {"trained": [], "lr0": []}
    trained = train_run(dataset_dir, model, TRAIN, out=tmp_path / "trained",
                        on_step=lambda rec: lrs["trained"].append(rec["lr"]))
    # the control: the same run with the schedule the loop reads forced to 0 at every step
    monkeypatch.setattr("cellscale.train.loop.lr_at", lambda *a, **kw: 0.0)
    frozen = train_run(dataset_dir, model, TRAIN, out=tmp_path / "lr0", on_step=lambda rec: lrs["lr0"].append(rec["lr"]))

    baseline = trained["gene_mean_test_mse"]
    assert baseline == frozen["gene_mean_test_mse"] == pytest.approx(0.7550, abs=1e-3)  # the same test cells
    assert trained["status"] == frozen["status"] == "ok"
    assert trained["steps"] == frozen["steps"] == len(lrs["trained"]) == len(lrs["lr0"]) == 1000
    assert min(lrs["trained"]) > 0 and set(lrs["lr0"]) == {0.0}

    # the control: at lr 0 the weights stay at their initialisation, far from even the gene means
    assert not frozen["test_mse"] < MARGIN * baseline, (frozen["test_mse"], baseline)
    assert frozen["test_mse"] > baseline
    # trained: well below the gene mean on the test cells, and on the validation cells it was chosen on
    assert trained["test_mse"] < MARGIN * baseline, (trained["test_mse"], baseline)
    assert trained["best_val_mse"] < MARGIN * trained["gene_mean_val_mse"]
    assert trained["test_mse"] < frozen["test_mse"] / 10
