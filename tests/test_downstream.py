"""Downstream scores of the embeddings: the probe, kNN transfer, batch mixing, the sweep step and the
report's section (cellscale.downstream, cellscale.sweep.scoring, cellscale.report.downstream)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import counts_matrix, train_probe_run

from cellscale.config import DataConfig, StudyConfig, parse_config
from cellscale.data.store import Dataset
from cellscale.downstream import scores as dn
from cellscale.schema import DOWNSTREAM_FIELDS, RESULT_FIELDS
from cellscale.sweep import run_sweep
from cellscale.sweep.scoring import score_run


@pytest.fixture(scope="module")
def untrained_run_dir(tmp_path_factory, probe_dataset_dir) -> Path:
    """The same model after one optimiser step: its best checkpoint is (almost) the initialisation."""
    return train_probe_run(probe_dataset_dir, tmp_path_factory.mktemp("untrained") / "run", 32)


def _chance(labels: np.ndarray) -> float:
    """Macro-F1 of a guess that ignores the cell: the better of uniform guessing (1/K) and always
    naming the commonest type."""
    _, counts = np.unique(labels, return_counts=True)
    p = counts.max() / counts.sum()
    return max(1.0 / counts.size, 2 * p / (1 + p) / counts.size)


def test_schema_lists_the_score_fields():
    assert set(dn.score_fields()) <= set(DOWNSTREAM_FIELDS) <= set(RESULT_FIELDS)


def test_probe_above_chance_when_trained_and_above_the_untrained_model(probe_dataset_dir, trained_run_dir,
                                                                      untrained_run_dir):
    """A trained model's embedding is probed well above chance and above the same model after
    one step. The untrained embedding is not at chance: a random network's pooled hidden states
    are random features of the expression profile, and the scale-free kNN transfer finds the
    same signal in them (about 0.55 macro-F1 on these 4 types) as the probe does."""
    ds = Dataset.open(probe_dataset_dir)
    trained = score_run(trained_run_dir, ds)
    untrained = score_run(untrained_run_dir, ds)
    chance = _chance(ds.obs["cell_type"].to_numpy()[ds.splits["val"]])
    assert trained["downstream_note"] is None and trained["downstream_label"] == "cell_type"
    assert trained["downstream_batch_key"] == "dataset_id"  # the simulator's batch column
    for split in ("val", "test"):
        assert trained[f"probe_{split}_f1"] > chance + 0.3, (trained, chance)
        assert trained[f"probe_{split}_f1"] > untrained[f"probe_{split}_f1"] + 0.05, (trained, untrained)
        assert trained[f"knn_{split}_f1"] > chance + 0.3
        assert 0.8 < trained[f"batch_mixing_{split}"] < 1.2  # mild simulated batch effect: well mixed


def test_probe_is_at_chance_on_an_embedding_without_signal_and_ignores_units(probe_dataset_dir):
    ds = Dataset.open(probe_dataset_dir)
    cells = dn.probe_cells(ds.obs, ds.splits)
    chance = _chance(cells.labels["val"])
    rng = np.random.default_rng(0)
    noise = {s: rng.normal(size=(r.size, 16)) for s, r in cells.rows.items()}
    assert dn.score_embedding(noise, cells)["probe_val_f1"] < chance + 0.1
    # the same embedding in other units scores the same: one scale for every coordinate
    values = {s: np.asarray(ds.values[r], dtype=np.float64) for s, r in cells.rows.items()}
    base = dn.score_embedding(values, cells)
    small = dn.score_embedding({s: 1e-3 * v for s, v in values.items()}, cells)
    assert small["probe_val_f1"] == pytest.approx(base["probe_val_f1"], abs=1e-9)
    assert base["probe_val_f1"] > chance + 0.3


def test_probe_never_fits_on_validation_or_test_cells(probe_dataset_dir, monkeypatch):
    """Every fit (probe, kNN, PCA) sees the training cells' rows and nothing else."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    ds = Dataset.open(probe_dataset_dir)
    cells = dn.probe_cells(ds.obs, ds.splits)
    assert set(cells.rows["train"]) <= set(ds.splits["train"])
    for split in dn.SPLITS:
        assert set(cells.rows[split]) <= set(ds.splits[split])
        assert not set(cells.rows[split]) & set(ds.splits["train"])
    # an embedding that is the row number: what a fit saw tells which cells it was given
    emb = {s: np.column_stack([r, r % 7]).astype(np.float64) for s, r in cells.rows.items()}
    seen = []
    for cls in (LogisticRegression, KNeighborsClassifier, PCA):
        real = cls.fit

        def spy(self, X, y=None, _real=real, **kw):
            seen.append(np.array(X, dtype=np.float64))
            return _real(self, X, y, **kw) if y is not None else _real(self, X, **kw)

        monkeypatch.setattr(cls, "fit", spy)
    dn.score_embedding(emb, cells)
    dn.reference_embeddings({s: np.asarray(ds.values[r]) for s, r in cells.rows.items()})
    assert len(seen) == 3
    rows = cells.rows["train"].astype(np.float64)
    probe_x, knn_x = seen[0][:, 0], seen[1][:, 0]  # the probe (centred and scaled), then kNN
    np.testing.assert_allclose((probe_x - probe_x.mean()) * (rows.std() / probe_x.std()), rows - rows.mean(),
                               atol=1e-6)  # the training cells' rows, each once, in order
    assert sorted(knn_x.astype(int)) == sorted(cells.rows["train"])
    np.testing.assert_array_equal(seen[2], np.asarray(ds.values[cells.rows["train"]], dtype=np.float64))


def test_batch_mixing_formula():
    rng = np.random.default_rng(0)
    batches = np.repeat(["a", "b", "c"], 40)
    apart = np.repeat(np.eye(3) * 100, 40, axis=0) + rng.normal(size=(120, 3))  # each batch its own blob
    mixed = rng.normal(size=(120, 3))  # nothing tells the batches apart
    assert dn.batch_mixing(apart, batches) == pytest.approx(0.0, abs=1e-9)
    assert dn.batch_mixing(mixed, batches) == pytest.approx(1.0, abs=0.1)
    assert dn.batch_mixing(mixed, np.repeat(["a"], 120)) is None  # one batch: nothing to mix


def test_no_labels_is_a_reason_not_an_error():
    obs = pd.DataFrame({"cell_id": [f"c{i}" for i in range(10)]})
    splits = {"train": np.arange(6), "val": np.arange(6, 8), "test": np.arange(8, 10)}
    reason = dn.probe_cells(obs, splits)
    assert isinstance(reason, str) and "no 'cell_type' labels" in reason


def _sweep_cfg(dataset: Path) -> StudyConfig:
    return parse_config(StudyConfig, {
        "name": "ds", "dataset": str(dataset),
        "train": {"cells_seen": 640, "batch_size": 32, "num_threads": 1, "device": "cpu"},
        "sweep": {"sizes": ["XXS", "TINY", "XS"], "seeds": [0]},
        "fit": {"bootstrap": 20, "keep_unconverged": True},
    })


def test_sweep_scores_every_run_and_the_report_shows_it(probe_dataset_dir, tmp_path, capsys):
    from cellscale.report.writer import write_report

    out = tmp_path / "sw"
    table = pd.read_csv(run_sweep(_sweep_cfg(probe_dataset_dir), out=out, progress=False))
    assert list(table.columns) == list(RESULT_FIELDS)
    assert table["probe_val_f1"].between(0, 1).all() and table["knn_test_f1"].between(0, 1).all()
    assert set(table["downstream_label"]) == {"cell_type"}
    refs = json.loads((out / "downstream.json").read_text())["references"]["1"]
    assert set(refs) == {"pca50", "hvg"} and refs["pca50"]["probe_val_f1"] > 0.8
    result = json.loads((out / "runs" / "XS-dall-s0" / "result.json").read_text())
    assert result["downstream_n_train"] == len(Dataset.open(probe_dataset_dir).splits["train"])

    _, md = write_report(out)
    text = md.read_text()
    assert "## Downstream: does a lower loss buy better cell embeddings?" in text
    assert "(reference)" in text and "Downstream law (power-floor" in text
    meaning = text.split("## What this means", 1)[1].split("##", 1)[0]
    assert "Downstream " in meaning and "reference embeddings" in meaning
    assert (out / "figures" / "downstream_vs_params.png").is_file()
    assert (out / "figures" / "downstream_vs_loss.png").is_file()
    fit = json.loads((out / "downstream_fit.json").read_text())
    assert fit["law"] == "power-floor" and fit["y"] == "downstream_error"

    # rescored on another label from the command line; results.csv keeps the plan's order
    from cellscale.cli import main

    assert main(["downstream", str(out), "--label", "donor_id", "--batch-key", "dataset_id", "--force"]) == 0
    assert "scored 3 run(s) on 'donor_id'" in capsys.readouterr().out
    again = pd.read_csv(out / "results.csv")
    assert list(again["run_id"]) == list(table["run_id"])
    assert set(again["downstream_label"]) == {"donor_id"} and set(again["downstream_batch_key"]) == {"dataset_id"}
    assert json.loads((out / "downstream.json").read_text())["label"] == "donor_id"


def test_data_without_labels_skip_the_section(tmp_path, write_h5ad):
    from cellscale.data.build import build_dataset
    from cellscale.report.writer import write_report

    path = write_h5ad(counts_matrix(200, 40, seed=1), name="nolabels.h5ad")
    ds = build_dataset(DataConfig(source="h5ad", input=str(path), cells=180, genes=16, hvg_flavor="variance"),
                       out=tmp_path / "ds", progress=False)
    cfg = parse_config(StudyConfig, {"name": "nl", "dataset": str(ds),
                                   "train": {"cells_seen": 64, "batch_size": 32, "num_threads": 1},
                                   "sweep": {"sizes": ["XXS", "TINY"]}, "fit": {"bootstrap": 0}})
    table = pd.read_csv(run_sweep(cfg, out=tmp_path / "sw", progress=False))
    assert table["probe_val_f1"].isna().all()
    assert table["downstream_note"].str.contains("no 'cell_type' labels").all()
    _, md = write_report(tmp_path / "sw")
    section = md.read_text().split("## Downstream", 1)[1].split("##", 1)[0]
    assert "Skipped: the data have no 'cell_type' labels" in section


def _runs(loss, f1):
    sizes = [f"S{i}" for i in range(len(loss))]
    return pd.DataFrame({"size": sizes, "params": [10 ** (3 + i) for i in range(len(loss))],
                         "best_val_mse": loss, "probe_val_f1": f1, "run_id": [f"{s}-dall-s0" for s in sizes]})


def test_the_sentence_is_read_off_the_numbers():
    from cellscale.report.downstream import Downstream, reference_sentence, tracking_sentence

    saturates = Downstream(used=_runs([1.0, 0.8, 0.6, 0.5], [0.70, 0.90, 0.905, 0.90]), label="cell_type")
    text = tracking_sentence(saturates, "best_val_mse")
    assert text.startswith("Downstream saturates before the loss") and "from S1 (10,000 parameters) on" in text
    assert "a further 38%" in text  # 0.8 -> 0.5
    tracks = Downstream(used=_runs([1.0, 0.8, 0.6, 0.5], [0.5, 0.6, 0.7, 0.8]), label="cell_type")
    assert tracking_sentence(tracks, "best_val_mse").startswith("Downstream tracks the loss")
    opposite = Downstream(used=_runs([1.0, 0.8, 0.6, 0.5], [0.8, 0.7, 0.6, 0.5]), label="cell_type")
    assert tracking_sentence(opposite, "best_val_mse").startswith("Downstream does not follow the loss")
    tracks.scored = tracks.used.assign(status="ok")
    tracks.refs = {"pca50": {"probe_val_f1": 0.95}, "hvg": {"probe_val_f1": 0.7}}
    assert "beats only some of the reference embeddings" in reference_sentence(tracks)


def test_the_reference_comparison_is_the_best_models_not_the_best_f1_of_any_run():
    from cellscale.report.downstream import Downstream, reference_sentence

    # S1 has the highest F1 of any run, but S3 is the best model (lowest validation loss): it is compared
    runs = _runs([1.0, 0.8, 0.6, 0.5], [0.5, 0.96, 0.7, 0.8]).assign(status="ok")
    d = Downstream(used=runs, scored=runs, label="cell_type", refs={"pca50": {"probe_val_f1": 0.95},
                                                                   "hvg": {"probe_val_f1": 0.7}})
    assert reference_sentence(d) == ("The best model's embedding (S3, chosen on validation loss; probe macro-F1 "
                                     "0.800) beats only some of the reference embeddings: PCA-50 of the log values "
                                     "(0.950), the HVG log values (0.700).")


def test_macro_f1_averages_over_the_scored_cells_labels_only():
    from cellscale.downstream.scores import _macro_f1

    y = np.array(["a", "a", "b", "b"])
    # predicting a label the cells lack ("c") adds no class to the average: F1(a) = 2/3, F1(b) = 1
    assert _macro_f1(y, np.array(["a", "c", "b", "b"])) == pytest.approx((2 / 3 + 1.0) / 2)
