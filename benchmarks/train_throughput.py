"""Training throughput: the study's setup vs cellscale's training step, side by side.

In one process: (1) the measured fp32 matmul peak of this machine; (2) a study-style
reference: the stock ``nn.TransformerEncoder`` (norm_first, GELU, dropout 0.1), head on every
token, micro-batches of 4 cells from a per-cell ``torch.utils.data.DataLoader`` over an
in-memory AnnData, gradient accumulation 8 (effective batch 32), one AdamW step per 8
micro-batches, gradient clip 1.0; (3) cellscale's step: ``CellTransformer`` (fused QKV,
the fused CPU dropout attention of ``cellscale.kernels``, head on masked positions only), whole batches sliced
from an in-memory array with vectorised masks, fused AdamW, clip 1.0.

Prints cells/s, achieved GFLOP/s (``flops_per_cell(cfg)["train"]``: 2 x MACs of every matmul,
attention included, training = 3 x forward) and MFU (achieved / measured matmul peak) for each
size, and ends with ``speedup_xs=<x> speedup_s=<x> mfu_s=<x>``.

    python benchmarks/train_throughput.py                 # XXS, TINY, XS, S at V=512, ~4 min
    python benchmarks/train_throughput.py --seconds 5     # quicker, noisier
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_description, load_average, matmul_peak_gflops, setup_threads, time_steps  # noqa: E402

from cellscale.model import CellTransformer, flops_per_cell  # noqa: E402
from cellscale.model.ladder import get_size  # noqa: E402
from cellscale.model.reference import ReferenceCellTransformer  # noqa: E402

MASK_PROB = 0.15
LR = 2.5e-4 * 32 / 256  # the study's rule: 2.5e-4 x (effective batch / 256)


# -- data -----------------------------------------------------------------------------------
def make_anndata(n_cells: int, n_genes: int, seed: int = 0):
    """Normalised log1p AnnData (dense X, as the study's per-cell Dataset read it)."""
    import anndata as ad

    try:  # the project's simulator, if present
        from cellscale.config import SimulateConfig
        from cellscale.data.sources.simulate import simulate

        raw = simulate(n_cells=n_cells, cfg=SimulateConfig(n_genes=n_genes), seed=seed)
        counts = raw.X.toarray() if hasattr(raw.X, "toarray") else np.asarray(raw.X)
        source = "cellscale.data.sources.simulate"
    except Exception:  # a local negative-binomial stand-in
        rng = np.random.default_rng(seed)
        mu = rng.lognormal(0.0, 1.5, size=n_genes) * rng.lognormal(0.0, 0.5, size=(n_cells, 1))
        counts = rng.poisson(rng.gamma(2.0, mu / 2.0)).astype(np.float32)
        source = "numpy negative-binomial stand-in"
    counts = counts.astype(np.float32)
    lib = counts.sum(1, keepdims=True)
    lib[lib == 0] = 1.0
    X = np.log1p(counts / lib * 1e4).astype(np.float32)
    return ad.AnnData(X=X), source


class StudyCellDataset(torch.utils.data.Dataset):
    """One cell per item, mask resampled at every draw (the study's Dataset)."""

    def __init__(self, adata, mask_prob: float = MASK_PROB):
        self.adata = adata
        self.mask_prob = mask_prob

    def __len__(self) -> int:
        return self.adata.n_obs

    def __getitem__(self, i: int):
        x = self.adata.X[i]
        x = x.toarray().ravel() if hasattr(x, "toarray") else np.asarray(x).ravel()
        values = torch.from_numpy(x.astype(np.float32))
        mask = torch.rand(values.shape[0]) < self.mask_prob
        return values, mask


# -- (2) the study-style reference ------------------------------------------------------------
def reference_runner(cfg, adata, *, micro_batch: int = 4, accum: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    model = ReferenceCellTransformer(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    loader = torch.utils.data.DataLoader(
        StudyCellDataset(adata), batch_size=micro_batch, shuffle=True, num_workers=0, drop_last=True
    )
    it = iter(loader)

    def group() -> int:  # one optimizer update = accum micro-batches
        nonlocal it
        for _ in range(accum):
            try:
                values, mask = next(it)
            except StopIteration:
                it = iter(loader)
                values, mask = next(it)
            loss = model.loss(values, mask) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return micro_batch * accum

    return group


# -- (3) cellscale's step ----------------------------------------------------------------------
def cellscale_runner(cfg, X: np.ndarray, *, batch: int, seed: int = 0, fused: bool = True):
    torch.manual_seed(seed)
    model = CellTransformer(cfg).train()
    for layer in model.layers:
        layer.cpu_fused_attention = fused
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01, fused=True)
    data = torch.from_numpy(X)
    n = data.shape[0]
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    pos = 0

    def step() -> int:
        nonlocal perm, pos
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        values = data[perm[pos: pos + batch]]
        pos += batch
        mask = torch.rand(values.shape, generator=gen) < MASK_PROB
        loss = model.loss(values, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return batch

    return step


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="XXS,TINY,XS,S")
    ap.add_argument("--genes", type=int, default=512)
    ap.add_argument("--cells", type=int, default=2048, help="cells in the in-memory AnnData")
    ap.add_argument("--seconds", type=float, default=20.0, help="time box per measurement")
    ap.add_argument("--batch", default="XXS=256,TINY=256,XS=16,S=16",
                    help="cellscale batch per size, e.g. XS=64,S=64 (default 64)")
    ap.add_argument("--attention", choices=["fused", "sdpa"], default="fused",
                    help="CPU training attention with dropout: the fused kernel (default) or SDPA's math path")
    ap.add_argument("--rounds", type=int, default=2,
                    help="alternate reference/cellscale this many times per size (same load for both)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-reference", action="store_true")
    return ap


def _measure_size(name: str, args, adata, X: np.ndarray, batches: dict[str, int], peaks: list[float]):
    """Both implementations' cells/s for one size, interleaved in rounds so that both see the
    same machine load; a short peak measurement right after each cellscale window pairs its MFU
    with the load it ran under. Returns ({impl: cells/s}, paired MFU, table rows)."""
    cfg = get_size(name, n_genes=args.genes, dropout=0.1)
    f_train = flops_per_cell(cfg, mask_prob=MASK_PROB)["train"]
    runs = []
    if not args.skip_reference:
        runs.append(("reference", "4x8", reference_runner(cfg, adata)))
    b = batches.get(name, 64)
    runs.append(("cellscale", str(b), cellscale_runner(cfg, X, batch=b, fused=args.attention == "fused")))
    stats = {impl: [0, 0, 0.0] for impl, _, _ in runs}  # steps, cells, seconds
    pair_mfus = []
    for _, _, fn in runs:
        fn()  # warmup
    for _ in range(args.rounds):
        for impl, _, fn in runs:
            t = time.perf_counter()
            cps, steps, cells = time_steps(fn, seconds=args.seconds / args.rounds, warmup=0, min_steps=1)
            st = stats[impl]
            st[0] += steps
            st[1] += cells
            st[2] += time.perf_counter() - t
            if impl == "cellscale":
                peaks.append(matmul_peak_gflops(2048, seconds=1.0))
                pair_mfus.append(cps * f_train / 1e9 / peaks[-1])
    speeds, table = {}, []
    for impl, bdesc, _ in runs:
        steps, cells, secs = stats[impl]
        speeds[impl] = cells / secs
        table.append((name, impl, bdesc, cells / secs, cells / secs * f_train / 1e9, steps))
    return speeds, float(np.median(pair_mfus)), table


def _print_table(table, rows, paired, peak: float) -> None:
    print(f"{'size':5s} {'impl':10s} {'batch':>9s} {'cells/s':>9s} {'GFLOP/s':>8s} {'MFU':>6s} {'paired':>7s} {'steps':>6s}")
    for name, impl, bdesc, cps, gfs, steps in table:
        pair = f"{paired[name]:7.1%}" if impl == "cellscale" else f"{'':7s}"
        print(f"{name:5s} {impl:10s} {bdesc:>9s} {cps:9.1f} {gfs:8.2f} {gfs / peak:6.1%} {pair} {steps:6d}")
        if impl == "cellscale" and name in ("XS", "S") and (name, "reference") in rows:
            print(f"      speedup {name}: {cps / rows[(name, 'reference')]:.2f}x")


def _print_summary(rows, paired, peak: float, genes: int, t_start: float) -> None:
    def speed(n: str) -> float:
        if (n, "reference") in rows and (n, "cellscale") in rows:
            return rows[(n, "cellscale")] / rows[(n, "reference")]
        return float("nan")

    mfu_s = float("nan")
    if ("S", "cellscale") in rows:
        cfg = get_size("S", n_genes=genes)
        mfu_s = rows[("S", "cellscale")] * flops_per_cell(cfg, mask_prob=MASK_PROB)["train"] / 1e9 / peak
    print("MFU: against the highest peak of the run (conservative; the final line's mfu_s); paired: "
          "median over rounds of each cellscale window against the peak measured right after it")
    if "S" in paired:
        print(f"mfu_s_paired={paired['S']:.3f}")
    print(f"wall {time.perf_counter() - t_start:.0f} s; load average at end: {load_average()}")
    print(f"speedup_xs={speed('XS'):.2f} speedup_s={speed('S'):.2f} mfu_s={mfu_s:.3f}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    threads = setup_threads(args.threads)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    batches = {k: int(v) for k, v in (kv.split("=") for kv in args.batch.split(",") if kv)}
    t_start = time.perf_counter()
    print(f"device: {device_description()}; threads={threads}; load average at start: {load_average()}")

    # the VM's speed drifts with its neighbours' load: the peak is re-measured after every
    # cellscale window and the HIGHEST value seen is used for all MFUs (a conservative
    # denominator); the paired MFU divides each window by the peak measured right after it
    peaks = [matmul_peak_gflops(2048, seconds=3.0)]
    print(f"(1) fp32 matmul peak (2048^3 sgemm, best of 3 s): {peaks[0]:.1f} GFLOP/s")

    adata, source = make_anndata(args.cells, args.genes)
    print(f"data: {adata.n_obs} cells x {adata.n_vars} genes from {source}")
    X = np.ascontiguousarray(adata.X, dtype=np.float32)
    # as cellscale.train.frozen_gc does for a run: Python's collector skips the objects alive
    # now (both implementations profit; its full passes were ~2% of an S step)
    gc.collect()
    gc.freeze()

    rows: dict[tuple[str, str], float] = {}
    paired: dict[str, float] = {}  # median over rounds of (window GFLOP/s / the peak right after it)
    table: list[tuple[str, str, str, float, float, int]] = []
    for name in sizes:
        speeds, paired[name], size_rows = _measure_size(name, args, adata, X, batches, peaks)
        rows.update({(name, impl): v for impl, v in speeds.items()})
        table += size_rows
        line = "  ".join(f"{impl} {v:.1f} cells/s" for impl, v in speeds.items())
        print(f"{name}: {line}", flush=True)
    peak = max(peaks)
    print(f"matmul peak used for MFU: {peak:.1f} GFLOP/s (highest of {len(peaks)} measurements: "
          f"{', '.join(f'{p:.0f}' for p in peaks)})")
    _print_table(table, rows, paired, peak)
    _print_summary(rows, paired, peak, args.genes, t_start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
