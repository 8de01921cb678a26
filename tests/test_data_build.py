import sys
import types

import numpy as np
import pytest

import cellscale.data.sources as sources_pkg
from cellscale.config import DataConfig, SimulateConfig
from cellscale.data.build import build_dataset
from cellscale.data.store import Dataset
from cellscale.errors import DataError


def test_census_without_its_module_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delattr(sources_pkg, "census", raising=False)
    monkeypatch.setitem(sys.modules, "cellscale.data.sources.census", None)
    with pytest.raises(DataError, match=r"census source is not available .*pip install 'cellscale\[census\]'"):
        build_dataset(DataConfig(source="census", cells=10, genes=5), out=tmp_path / "ds", progress=False)
    assert not (tmp_path / "ds").exists()


def test_census_dispatches_to_load_census(monkeypatch, tmp_path, tiny_adata):
    seen = {}

    def load_census(cfg):
        seen["cfg"] = cfg
        return tiny_adata.copy()

    fake = types.ModuleType("cellscale.data.sources.census")
    fake.load_census = load_census
    monkeypatch.setitem(sys.modules, "cellscale.data.sources.census", fake)
    monkeypatch.setattr(sources_pkg, "census", fake, raising=False)
    cfg = DataConfig(source="census", cells=200, genes=32)
    ds = Dataset.open(build_dataset(cfg, out=tmp_path / "ds", progress=False))
    assert seen["cfg"] is cfg
    assert ds.n_cells == 200 and ds.manifest["source"]["kind"] == "census"


def test_simulate_more_genes_than_simulated(tmp_path, tiny_sim_cfg):
    cfg = DataConfig(cells=50, genes=201, simulate=tiny_sim_cfg)
    with pytest.raises(DataError, match="more than the 200 simulated genes"):
        build_dataset(cfg, out=tmp_path / "ds", progress=False)


def test_normalized_flag_only_for_h5ad(tmp_path):
    with pytest.raises(DataError, match="--normalized applies to --source h5ad"):
        build_dataset(DataConfig(cells=50, genes=10, normalized=True), out=tmp_path / "ds", progress=False)


def test_group_held_out_build(tmp_path, tiny_data_cfg):
    cfg = tiny_data_cfg.model_copy(update={"split_by": "donor_id"})
    ds = Dataset.open(build_dataset(cfg, out=tmp_path / "ds", progress=False))
    donors = ds.obs["donor_id"].to_numpy()
    where = {}
    for split, idx in ds.splits.items():
        for d in np.unique(donors[idx]):
            assert where.setdefault(d, split) == split
    assert ds.manifest["split"]["split_by"] == "donor_id"
    with pytest.raises(DataError, match="split_by column 'tissue'"):
        build_dataset(tiny_data_cfg.model_copy(update={"split_by": "tissue"}), out=tmp_path / "x", progress=False)


def test_progress_is_shown(tmp_path, tiny_data_cfg, capsys):
    build_dataset(tiny_data_cfg, out=tmp_path / "ds", progress=True)
    out = capsys.readouterr()
    assert "selecting 64 genes" in out.out + out.err


@pytest.mark.slow
def test_structure_is_learnable(tmp_path):
    """A small masked-reconstruction network beats the per-gene mean clearly."""
    import torch

    from cellscale.data.loader import TrainBatches, eval_batches

    cfg = DataConfig(cells=6000, genes=256, simulate=SimulateConfig(n_genes=1000))
    ds = Dataset.open(build_dataset(cfg, out=tmp_path / "ds", progress=False))
    V = ds.n_genes
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2 * V, 256), torch.nn.GELU(), torch.nn.Linear(256, V))
    opt = torch.optim.AdamW(net.parameters(), 2e-3)

    def predict(v, m):
        return net(torch.cat([v.masked_fill(m, 0.0), m.float()], dim=1))

    for v, m in TrainBatches(ds, batch_size=128, seed=0).iterate(0, 800):
        loss = ((predict(v, m) - v)[m] ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    sse, n = 0.0, 0
    with torch.no_grad():
        for v, m in eval_batches(ds, "val", batch_size=512):
            sse += float(((predict(v, m) - v)[m] ** 2).sum())
            n += int(m.sum())
    assert sse / n < 0.75 * ds.baselines["gene_mean"]["val"]


def test_keeping_every_gene_is_recorded_and_warned(tmp_path, tiny_sim_cfg, capsys):
    """Normalised by the library size over all genes, kept genes holding every count give away the
    masked genes' total (docs/own-data.md): the share is recorded, one line warns, the report says so."""
    from cellscale.config import DataConfig
    from cellscale.data.build import build_dataset
    from cellscale.data.store import Dataset

    every = Dataset.open(build_dataset(DataConfig(source="simulate", cells=300, genes=200, hvg_flavor="all",
                                                  simulate=tiny_sim_cfg), out=tmp_path / "all", progress=False))
    err = capsys.readouterr().err
    share = every.meta.preprocessing.kept_count_share
    assert share == {"median": 1.0, "min": 1.0} and every.meta.preprocessing.leaks_masked_total
    assert ("warning: the kept genes hold 100.0% of a median cell's counts: normalised by the library size over all "
            "genes, the visible genes give away the masked genes' total") in err
    values = np.expm1(np.asarray(every.values, dtype=np.float64))
    assert values.sum(axis=1) == pytest.approx(every.target_sum, rel=1e-4)  # the constraint behind the leak
    some = Dataset.open(build_dataset(DataConfig(source="simulate", cells=300, genes=32, simulate=tiny_sim_cfg),
                                      out=tmp_path / "some", progress=False))
    part = some.meta.preprocessing.kept_count_share
    counts = np.asarray(some.counts, dtype=np.float64).sum(axis=1) / np.asarray(some.library_size)
    assert part["median"] == pytest.approx(float(np.median(counts))) and part["min"] == pytest.approx(counts.min())
    assert part["median"] < 0.95 and not some.meta.preprocessing.leaks_masked_total
    assert "give away" not in capsys.readouterr().err
