"""Training-batch throughput: cellscale's memmap TrainBatches vs a backed-AnnData per-cell loader.

The reference is the seed study's way of feeding cells: a torch ``Dataset`` whose
``__getitem__`` reads one row of a backed AnnData (h5py) and draws its mask, batched by a
``torch.utils.data.DataLoader`` (batch 32, shuffled). Both read the same normalised values
of the same training cells; both produce ``(values float32 [B, V], mask bool [B, V])``.

    python benchmarks/bench_loader.py                  # 50k cells x V=512 (built once, reused)
    python benchmarks/bench_loader.py --cells 20000 --genes 256 --seconds 3

Prints cells/s for each and the ratio. Timings depend on the machine and its load: compare
numbers from the same run only.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cellscale.config import DataConfig, SimulateConfig
from cellscale.data.build import build_dataset
from cellscale.data.loader import TrainBatches
from cellscale.data.store import Dataset


class BackedCells(torch.utils.data.Dataset):
    """Reference: one backed-AnnData row per item, mask drawn per cell (as in the study)."""

    def __init__(self, path: Path, rows: np.ndarray, mask_prob: float = 0.15) -> None:
        import anndata as ad

        self.adata = ad.read_h5ad(path, backed="r")
        self.rows = rows
        self.mask_prob = mask_prob

    def __len__(self) -> int:
        return self.rows.size

    def __getitem__(self, i: int):
        row = self.adata.X[int(self.rows[i])]
        row = row.toarray() if hasattr(row, "toarray") else np.asarray(row)
        x = torch.as_tensor(row.ravel(), dtype=torch.float32)
        return x, torch.rand(x.shape[0]) < self.mask_prob


def time_iter(batches, seconds: float, max_batches: int) -> tuple[float, int]:
    cells, start = 0, time.perf_counter()
    for k, (values, _mask) in enumerate(batches):
        cells += values.shape[0]
        if k + 1 >= max_batches or time.perf_counter() - start > seconds:
            break
    return cells / (time.perf_counter() - start), cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=50_000)
    ap.add_argument("--genes", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=256, help="cellscale batch size (the reference uses 32)")
    ap.add_argument("--seconds", type=float, default=5.0, help="time budget per measurement")
    ap.add_argument("--sparse-reference", action="store_true", help="store the reference .h5ad X as CSR")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "cellscale-bench"))
    args = ap.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cfg = DataConfig(cells=args.cells, genes=args.genes, seed=0, simulate=SimulateConfig(n_genes=max(2000, args.genes)))
    t0 = time.perf_counter()
    ds_dir = build_dataset(cfg, out=work / f"ds-{args.cells}-{args.genes}", progress=False)
    ds = Dataset.open(ds_dir, verify="quick")
    print(f"dataset {ds_dir}: {ds.n_cells} cells x {ds.n_genes} genes (ready in {time.perf_counter() - t0:.1f} s)")

    ref_path = work / f"ref-{args.cells}-{args.genes}{'-csr' if args.sparse_reference else ''}.h5ad"
    if not ref_path.exists():
        import anndata as ad
        import scipy.sparse as sp

        X = np.asarray(ds.values, dtype=np.float32)
        a = ad.AnnData(X=sp.csr_matrix(X) if args.sparse_reference else X)
        tmp = ref_path.with_suffix(".tmp.h5ad")
        a.write_h5ad(tmp)
        os.replace(tmp, ref_path)

    train = ds.splits["train"]
    torch.set_num_threads(1)
    results = {}
    for bs in sorted({32, args.batch_size}):
        tb = TrainBatches(ds, batch_size=bs, seed=0)
        time_iter(tb.iterate(0, 20), 1.0, 20)  # warm-up (page cache, threads)
        rate, n = time_iter(tb.iterate(100, None), args.seconds, 10**9)
        results[f"cellscale TrainBatches (memmap, batch {bs}, prefetch thread)"] = rate
        print(f"cellscale TrainBatches  batch {bs:4d}: {rate:12,.0f} cells/s  ({n} cells)")

    loader = torch.utils.data.DataLoader(
        BackedCells(ref_path, train), batch_size=32, shuffle=True, num_workers=0,
        generator=torch.Generator().manual_seed(0),
    )
    time_iter(iter(loader), 0.5, 5)
    ref_rate, n = time_iter(iter(loader), args.seconds, 10**9)
    kind = "CSR" if args.sparse_reference else "dense"
    print(f"reference backed AnnData ({kind} X) per-cell DataLoader batch 32: {ref_rate:12,.0f} cells/s  ({n} cells)")
    for name, rate in results.items():
        print(f"ratio  {name} / reference: {rate / ref_rate:8.1f}x")


if __name__ == "__main__":
    main()
