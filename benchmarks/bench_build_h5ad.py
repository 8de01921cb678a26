"""Building a dataset from a large .h5ad: cellscale's chunked build vs a naive in-memory pipeline.

Generates (once, cached under --workdir) a 200k x 20k sparse count .h5ad (~94% zeros,
written row-chunk by row-chunk so generation needs well under 1 GB), then measures, each in a
fresh process:

- cellscale: ``cellscale data build --source h5ad --genes 512 --cells 200000`` (the file is
  above ``BACKED_MIN_BYTES``, so it is read in row chunks: validation and library sizes,
  seurat_v3 statistics on the training cells, then only the 512 kept columns);
- reference: ``anndata.read_h5ad`` fully in memory, library sizes, scanpy seurat_v3 on the
  same training cells, cut to the same genes, normalise + log1p, save values and counts.

Reports wall time and peak resident memory (``ru_maxrss`` of the measuring process) side
by side, as ratios, against the target (peak RSS under 4 GiB), and checks that both chose
the same genes.

    python benchmarks/bench_build_h5ad.py                       # 200k x 20k, V=512, D=200k
    python benchmarks/bench_build_h5ad.py --cells 20000 --genes 5000 --no-reference
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TARGET_RSS_GIB = 4.0


def generate(path: Path, *, n_cells: int, n_genes: int, seed: int = 0, chunk: int = 5000) -> None:
    """Sparse NB-like counts written straight into the .h5ad CSR layout, chunk by chunk."""
    import h5py
    import pandas as pd

    try:
        from anndata.io import write_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import write_elem

    rng = np.random.default_rng(seed)
    gene_w = rng.gamma(0.3, 1.0, size=n_genes) + 1e-4  # detection weights: a few genes dominate
    gene_w /= gene_w.sum()
    gene_mu = rng.gamma(0.6, 1.5, size=n_genes)
    # lookup table for drawing genes by weight (a gather instead of a search per draw)
    table = np.minimum(np.searchsorted(np.cumsum(gene_w), (np.arange(1 << 22) + 0.5) / (1 << 22)), n_genes - 1)
    batch = rng.integers(0, 8, size=n_cells)
    tmp = path.with_suffix(".partial")
    with h5py.File(tmp, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        X = f.create_group("X")
        X.attrs["encoding-type"] = "csr_matrix"
        X.attrs["encoding-version"] = "0.1.0"
        X.attrs["shape"] = (n_cells, n_genes)
        data = X.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 20,))
        indices = X.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 20,))
        indptr = np.zeros(n_cells + 1, dtype=np.int64)
        for start in range(0, n_cells, chunk):
            n = min(chunk, n_cells - start)
            depth = rng.lognormal(np.log(1000), 0.5, size=n)  # detected genes per cell (~5%)
            k = np.maximum(1, depth.astype(np.int64))
            row = np.repeat(np.arange(n), k)
            key = row * n_genes + table[rng.integers(0, table.size, size=k.sum())]
            key.sort()
            key = key[np.r_[True, key[1:] != key[:-1]]]  # sorted, no duplicates
            r, g = key // n_genes, (key % n_genes).astype(np.int32)
            vals = 1 + rng.poisson(gene_mu[g] * (depth[r] / 1000.0))
            counts = np.bincount(r, minlength=n)
            indptr[start + 1 : start + n + 1] = indptr[start] + np.cumsum(counts)
            lo = data.shape[0]
            data.resize((lo + key.size,))
            indices.resize((lo + key.size,))
            data[lo:] = vals.astype(np.float32)
            indices[lo:] = g
        X.create_dataset("indptr", data=indptr)
        obs = pd.DataFrame({"batch": pd.Categorical([f"b{b}" for b in batch])}, index=[f"cell{i}" for i in range(n_cells)])
        var = pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)])
        write_elem(f, "obs", obs)
        write_elem(f, "var", var)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ measured runs
def run_cellscale(path: Path, out: Path, genes: int, cells: int) -> dict:
    from cellscale.config import DataConfig
    from cellscale.data.build import build_dataset
    from cellscale.data.store import Dataset

    cfg = DataConfig(source="h5ad", input=str(path), genes=genes, cells=cells, seed=0)
    build_dataset(cfg, out=out, overwrite=True, progress=False)
    ds = Dataset.open(out, verify="quick")
    return {"genes": ds.genes, "read": ds.manifest["source"].get("read", "in memory")}


def run_reference(path: Path, out: Path, genes: int, cells: int) -> dict:
    """The naive way: the whole file in memory, scanpy on the training cells."""
    import warnings

    import anndata as ad
    import scanpy as sc

    from cellscale.data.split import make_splits

    a = ad.read_h5ad(path)
    lib = np.asarray(a.X.sum(axis=1)).ravel()
    keep = np.flatnonzero(lib > 0)[:cells]
    a = a[keep].copy()
    lib = lib[keep]
    splits = make_splits(a.n_obs, fractions=(0.9, 0.05, 0.05), seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hvg = sc.pp.highly_variable_genes(a[np.sort(splits["train"])], flavor="seurat_v3", n_top_genes=genes, inplace=False)
    gidx = np.flatnonzero(np.asarray(hvg["highly_variable"], dtype=bool))
    counts = a.X[:, gidx].toarray()
    values = np.log1p(counts / lib[:, None] * 1e4).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "values.npy", values)
    np.save(out / "counts.npy", counts.astype(np.int32))
    return {"genes": [str(g) for g in a.var_names[gidx]], "read": "anndata.read_h5ad (whole file)"}


def _measure(mode: str, path: Path, out: Path, genes: int, cells: int) -> None:
    t0 = time.perf_counter()
    res = (run_cellscale if mode == "cellscale" else run_reference)(path, out, genes, cells)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"mode": mode, "wall_s": wall, "peak_rss": peak, **res}))


def measure(mode: str, path: Path, out: Path, genes: int, cells: int) -> dict:
    """Run one mode in a fresh process; its own peak RSS (imports included) is reported."""
    proc = subprocess.run(
        [sys.executable, __file__, "--_measure", mode, "--_path", str(path), "--_out", str(out),
         "--genes", str(genes), "--cells", str(cells)],
        capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp", help="where the generated .h5ad is cached (default /tmp)")
    p.add_argument("--n-cells", type=int, default=200_000, help="cells in the generated file")
    p.add_argument("--n-genes", type=int, default=20_000, help="genes in the generated file")
    p.add_argument("--genes", type=int, default=512, help="V")
    p.add_argument("--cells", type=int, default=200_000, help="D")
    p.add_argument("--no-reference", action="store_true", help="skip the in-memory reference")
    p.add_argument("--_measure", help=argparse.SUPPRESS)
    p.add_argument("--_path", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._measure:
        _measure(a._measure, Path(a._path), Path(a._out), a.genes, a.cells)
        return

    work = Path(a.workdir) / "cellscale-bench-h5ad"
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"counts_{a.n_cells}x{a.n_genes}.h5ad"
    if not path.exists():
        t0 = time.perf_counter()
        generate(path, n_cells=a.n_cells, n_genes=a.n_genes)
        print(f"generated {path} in {time.perf_counter() - t0:.0f} s")
    import h5py

    with h5py.File(path, "r") as f:
        nnz = f["X/data"].shape[0]
    size = path.stat().st_size
    print(f"input: {path} ({a.n_cells:,} x {a.n_genes:,}, {nnz:,} stored counts, "
          f"{100 * (1 - nnz / (a.n_cells * a.n_genes)):.1f}% zeros, {size / 2**30:.2f} GiB)")
    print(f"build: V={a.genes}, D={a.cells:,}; target peak RSS < {TARGET_RSS_GIB} GiB")

    rows = [measure("cellscale", path, work / "ds-cellscale", a.genes, a.cells)]
    if not a.no_reference:
        rows.append(measure("reference", path, work / "ds-reference", a.genes, a.cells))
    print(f"\n{'':<11} {'wall s':>8} {'peak RSS GiB':>13}  read")
    for r in rows:
        print(f"{r['mode']:<11} {r['wall_s']:>8.1f} {r['peak_rss'] / 2**30:>13.2f}  {r['read']}")
    cs = rows[0]
    verdict = "meets" if cs["peak_rss"] < TARGET_RSS_GIB * 2**30 else "MISSES"
    print(f"cellscale {verdict} the target: peak RSS {cs['peak_rss'] / 2**30:.2f} GiB < {TARGET_RSS_GIB} GiB")
    if len(rows) > 1:
        ref = rows[1]
        print(f"ratio cellscale / reference: peak memory {cs['peak_rss'] / ref['peak_rss']:.2f}x, "
              f"time {cs['wall_s'] / ref['wall_s']:.2f}x")
        same = cs["genes"] == ref["genes"]
        print(f"same {a.genes} genes chosen by both: {same}"
              + ("" if same else f" ({len(set(cs['genes']) & set(ref['genes']))} in common)"))


if __name__ == "__main__":
    main()
