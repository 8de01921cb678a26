"""GPU training throughput (issue 5's GPU part): cellscale's step for the large sizes in bf16,
MFU against the measured bf16 matmul peak, and the study's V = 512 ladder time projected from
the measured step rates.

    python benchmarks/gpu_throughput.py                  # a CUDA machine: M, L at V=512 in bf16
    python benchmarks/gpu_throughput.py --device cpu --sizes TINY --ladder-sizes TINY \\
        --seconds 1 --precision fp32                     # a smoke run anywhere

One process: (1) the matmul peak (8192^3 on CUDA, 2048^3 on CPU, best of a few seconds) in the
step's dtype; (2) for each of ``--sizes``, ``cellscale.model.CellTransformer``'s training step
(bf16 autocast, fp32 master weights, fused AdamW, clip 1.0, masked-only head) on device-resident
batches, timed with the device synchronised, MFU = cells/s x ``flops_per_cell(cfg)["train"]`` /
peak; (3) the ladder: each of ``--ladder-sizes`` timed the same way at the ladder's batch, and
``cells_seen / (cells/s) x seeds`` summed (training steps only: evaluation and checkpoints
excluded, so it is a lower bound of a sweep's wall time).

Ends with ``mfu_m=<x> mfu_l=<x> ladder_hours=<x>`` (nan where a size was not measured). Record
the device line, the command and the output in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import matmul_peak_gflops, setup_threads  # noqa: E402

from cellscale.model import CellTransformer, flops_per_cell  # noqa: E402
from cellscale.model.ladder import get_size  # noqa: E402

MASK_PROB = 0.15


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}"
    from common import device_description

    return device_description()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_rate(name: str, *, genes: int, batch: int, device: torch.device, precision: str,
              seconds: float, compile_model: bool) -> float:
    """Training cells/s of size ``name`` at ``batch`` (after warm-up), device synchronised."""
    torch.manual_seed(0)
    cfg = get_size(name, n_genes=genes, dropout=0.1)
    model = CellTransformer(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
    loss_fn = torch.compile(model.loss) if compile_model else model.loss
    # normalised log1p-like values, resident on the device (the loader is measured elsewhere)
    values = torch.log1p(torch.rand(batch, genes, device=device) * 20.0)
    mask = torch.rand(batch, genes, device=device) < MASK_PROB
    use_bf16 = precision == "bf16"

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = loss_fn(values, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    sync(device)
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < seconds:
        step()
        n += 1
        if n % 10 == 0:
            sync(device)
    sync(device)
    return n * batch / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="M,L", help="sizes whose MFU is measured")
    ap.add_argument("--batch", default="M=64,L=64", help="batch per size for the MFU runs (default 64)")
    ap.add_argument("--genes", type=int, default=512)
    ap.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                    help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--seconds", type=float, default=15.0, help="time box per size")
    ap.add_argument("--compile", action="store_true", help="torch.compile the loss")
    ap.add_argument("--ladder-sizes", default="XXS,TINY,XS,S,M,L", help="empty to skip the ladder")
    ap.add_argument("--ladder-batch", type=int, default=64)
    ap.add_argument("--ladder-cells", type=int, default=240_000, help="cells seen per run")
    ap.add_argument("--ladder-seeds", type=int, default=3)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if device.type == "cpu":
        setup_threads()
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 runs: what a user would enable
    print(f"device: {describe(device)}; precision {precision}; compile {args.compile}")
    n_peak = 8192 if device.type == "cuda" else 2048
    peak = matmul_peak_gflops(n_peak, dtype=dtype, seconds=3.0, device=device.type)
    print(f"(1) {precision} matmul peak ({n_peak}^3, best of 3 s): {peak / 1e3:.3g} TFLOP/s")

    batches = {k: int(v) for k, v in (kv.split("=") for kv in args.batch.split(",") if kv)}
    mfu: dict[str, float] = {}
    print(f"{'size':5s} {'batch':>6s} {'cells/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s}")
    for name in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        b = batches.get(name, 64)
        cps = step_rate(name, genes=args.genes, batch=b, device=device, precision=precision,
                        seconds=args.seconds, compile_model=args.compile)
        f = flops_per_cell(get_size(name, n_genes=args.genes), mask_prob=MASK_PROB)["train"]
        mfu[name] = cps * f / 1e9 / peak
        print(f"{name:5s} {b:6d} {cps:10.1f} {cps * f / 1e12:8.2f} {mfu[name]:6.1%}", flush=True)

    ladder = [s.strip() for s in args.ladder_sizes.split(",") if s.strip()]
    hours = float("nan")
    if ladder:
        print(f"(3) ladder: {len(ladder)} sizes x {args.ladder_seeds} seeds x {args.ladder_cells:,} cells "
              f"seen, batch {args.ladder_batch}, V={args.genes}")
        total = 0.0
        for name in ladder:
            cps = step_rate(name, genes=args.genes, batch=args.ladder_batch, device=device,
                            precision=precision, seconds=min(args.seconds, 5.0), compile_model=args.compile)
            t = args.ladder_cells / cps * args.ladder_seeds
            total += t
            print(f"  {name:5s} {cps:10.1f} cells/s -> {t / 60:7.1f} min for {args.ladder_seeds} seeds", flush=True)
        hours = total / 3600
        print(f"ladder training time (steps only, projected from the measured rates): {hours:.2f} h")
    print(f"mfu_m={mfu.get('M', float('nan')):.3f} mfu_l={mfu.get('L', float('nan')):.3f} ladder_hours={hours:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
