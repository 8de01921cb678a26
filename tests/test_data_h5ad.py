import numpy as np
import pytest
import scipy.sparse as sp
from conftest import counts_matrix

from cellscale.config import DataConfig
from cellscale.data.build import build_dataset
from cellscale.data.sources.h5ad import read_counts_h5ad
from cellscale.data.store import Dataset
from cellscale.errors import DataError


def _one_line(err):
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 300
    return msg


def test_reads_counts_sparse_and_dense(write_h5ad):
    X = counts_matrix(40, 30)
    a = read_counts_h5ad(write_h5ad(X))
    assert a.shape == (40, 30) and sp.issparse(a.X)
    assert np.array_equal(a.X.toarray(), X.toarray())
    b = read_counts_h5ad(write_h5ad(X.toarray().astype(np.int64), name="dense.h5ad"))
    assert np.array_equal(np.asarray(b.X), X.toarray())


@pytest.mark.parametrize(
    "bad, pattern",
    [(np.nan, "NaN"), (np.inf, "infinite"), (-1.0, "negative"), (0.5, "non-integer")],
)
@pytest.mark.parametrize("sparse", [True, False])
def test_refuses_non_counts(write_h5ad, bad, pattern, sparse):
    X = counts_matrix(20, 10, sparse=False)
    X[3, 4] = bad
    path = write_h5ad(sp.csr_matrix(X) if sparse else X)
    with pytest.raises(DataError, match=pattern) as err:
        read_counts_h5ad(path)
    msg = _one_line(err)
    if pattern in ("negative", "non-integer"):
        assert "--layer" in msg and "--normalized" in msg


def test_normalized_accepted_but_nan_still_refused(write_h5ad):
    X = np.log1p(counts_matrix(20, 10, sparse=False) * 0.37)
    a = read_counts_h5ad(write_h5ad(X), normalized=True)
    assert np.allclose(np.asarray(a.X), X)
    X[0, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        read_counts_h5ad(write_h5ad(X, name="nan.h5ad"), normalized=True)


def test_layer(write_h5ad):
    C = counts_matrix(20, 10)
    logX = sp.csr_matrix(np.log1p(C.toarray()))
    path = write_h5ad(logX, layers={"counts": C})
    with pytest.raises(DataError, match="non-integer"):
        read_counts_h5ad(path)
    a = read_counts_h5ad(path, layer="counts")
    assert np.array_equal(a.X.toarray(), C.toarray())
    with pytest.raises(DataError, match=r"no layer 'raw' \(layers: counts\)"):
        read_counts_h5ad(path, layer="raw")


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_duplicate_genes(write_h5ad):
    genes = [f"g{i}" for i in range(10)]
    genes[7] = "g2"
    with pytest.raises(DataError, match="duplicate gene names \\(g2\\)") as err:
        read_counts_h5ad(write_h5ad(counts_matrix(5, 10), genes=genes))
    assert "var_names_make_unique" in _one_line(err)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_counts_h5ad(tmp_path / "nope.h5ad")


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        read_counts_h5ad(tmp_path)


def test_non_hdf5_file(tmp_path):
    p = tmp_path / "x.h5ad"
    p.write_text("cell,gene\n1,2\n")
    with pytest.raises(DataError, match="not an HDF5"):
        read_counts_h5ad(p)


def test_truncated_file(write_h5ad):
    path = write_h5ad(counts_matrix(200, 50))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated or damaged") as err:
        read_counts_h5ad(path)
    _one_line(err)


def _cfg(path, **kw):
    return DataConfig(source="h5ad", input=str(path), **kw)


def test_build_too_few_genes(write_h5ad, tmp_path):
    path = write_h5ad(counts_matrix(50, 20))
    with pytest.raises(DataError, match="20 genes but --genes is 64"):
        build_dataset(_cfg(path, genes=64, cells=50), out=tmp_path / "ds", progress=False)
    assert not (tmp_path / "ds").exists()


def test_build_too_few_cells(write_h5ad, tmp_path):
    X = counts_matrix(50, 20, sparse=False)
    X[:5] = 0  # five empty cells are dropped first
    path = write_h5ad(X)
    with pytest.raises(DataError, match=r"only 45 usable cells \(5 of 50 dropped with zero counts\) but --cells is 50"):
        build_dataset(_cfg(path, genes=10, cells=50), out=tmp_path / "ds", progress=False)
    assert not (tmp_path / "ds").exists()


def test_build_all_cells_empty(write_h5ad, tmp_path):
    path = write_h5ad(sp.csr_matrix((30, 20), dtype=np.float32))
    with pytest.raises(DataError, match="all 30 cells have zero counts"):
        build_dataset(_cfg(path, genes=10, cells=10), out=tmp_path / "ds", progress=False)


def test_build_missing_input(tmp_path):
    with pytest.raises(DataError, match="not found"):
        build_dataset(_cfg(tmp_path / "none.h5ad", genes=10, cells=10), out=tmp_path / "ds", progress=False)
    with pytest.raises(DataError, match="--input"):
        build_dataset(DataConfig(source="h5ad", genes=10, cells=10), out=tmp_path / "ds", progress=False)


def test_build_normalized_input(write_h5ad, tmp_path):
    C = counts_matrix(60, 40, sparse=False)
    X = np.log1p(C / np.maximum(C.sum(1, keepdims=True), 1) * 1e4).astype(np.float32)
    path = write_h5ad(X)
    with pytest.raises(DataError, match="non-integer"):
        build_dataset(_cfg(path, genes=40, cells=60), out=tmp_path / "a", progress=False)
    ds = Dataset.open(build_dataset(_cfg(path, genes=40, cells=60, normalized=True), out=tmp_path / "b", progress=False))
    assert ds.manifest["preprocessing"]["hvg_flavor"] == "all"
    assert ds.counts is None
    keep = ds.obs["cell_id"].str[1:].astype(int).to_numpy()
    assert np.allclose(ds.values, X[keep], atol=1e-6)
    ds2 = Dataset.open(build_dataset(_cfg(path, genes=10, cells=60, normalized=True), out=tmp_path / "c", progress=False))
    assert ds2.manifest["preprocessing"]["hvg_flavor"] == "variance"
    train = np.sort(ds2.splits["train"])
    var = X[keep][train].astype(np.float64).var(axis=0)
    expected = np.sort(np.argsort(-var, kind="stable")[:10])
    assert ds2.genes == [f"g{i}" for i in expected]
