"""The fused CPU attention kernel computes the study's attention with dropout exactly."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from cellscale import kernels
from cellscale.config import ModelConfig
from cellscale.model import CellTransformer


def test_kernel_builds_here():
    assert kernels.available(), kernels.unavailable_reason()


def _reference(qkv: torch.Tensor, H: int, keep: torch.Tensor | None, scale: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) * keep * scale @ v, float64, the stock layer's layout."""
    B, V, d3 = qkv.shape
    d = d3 // 3
    q, k, v = qkv.view(B, V, 3, H, d // H).permute(2, 0, 3, 1, 4)
    p = ((q @ k.transpose(-1, -2)) / math.sqrt(d // H)).softmax(-1)
    if keep is not None:
        p = p * keep * scale
    return (p @ v).transpose(1, 2).reshape(B, V, d)


@pytest.mark.parametrize(
    "B,V,H,hd,p",
    [(2, 37, 3, 5, 0.1), (3, 512, 4, 16, 0.1), (2, 64, 1, 1, 0.3), (2, 100, 2, 8, 0.0), (1, 700, 2, 16, 0.5)],
)
def test_fused_attention_equals_math_with_the_same_mask(B, V, H, hd, p):
    torch.manual_seed(0)
    d = H * hd
    x = torch.randn(B, V, 3 * d, dtype=torch.float64)
    x32 = x.float().requires_grad_()
    out = kernels.fused_dropout_attention(x32, H, p, seed=1234)
    go = torch.randn(B, V, d, dtype=torch.float64)
    out.backward(go.float())
    keep = kernels.fused_keep_mask(B, H, V, p, 1234).double() if p > 0 else None
    xr = x.clone().requires_grad_()
    ref = _reference(xr, H, keep, kernels.fused_keep_scale(p))
    ref.backward(go)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x32.grad.double(), xr.grad, rtol=1e-5, atol=5e-5)


def test_mask_statistics_and_scale():
    keep = kernels.fused_keep_mask(4, 8, 512, 0.1, 7)
    n = keep.numel()  # 8.4 M draws: the drop rate within 5 standard errors of p
    drop = 1.0 - keep.double().mean().item()
    assert abs(drop - 0.1) < 5 * math.sqrt(0.1 * 0.9 / n)
    # rows and columns are not correlated: neighbours agree as often as independence says
    same_col = (keep[..., 1:, :] == keep[..., :-1, :]).double().mean().item()
    same_row = (keep[..., :, 1:] == keep[..., :, :-1]).double().mean().item()
    for agree in (same_col, same_row):
        assert abs(agree - (0.9**2 + 0.1**2)) < 1e-3
    assert kernels.fused_keep_scale(0.1) == pytest.approx(1 / 0.9, rel=1e-9)
    assert kernels.fused_keep_scale(0.0) == 1.0


def test_mask_is_a_function_of_the_seed_only():
    x = torch.randn(2, 64, 3 * 32)
    a = kernels.fused_dropout_attention(x, 4, 0.1, seed=5)
    b = kernels.fused_dropout_attention(x, 4, 0.1, seed=5)
    c = kernels.fused_dropout_attention(x, 4, 0.1, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.fused_dropout_attention(x, 4, 0.1, seed=5)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a, one)  # bit-identical whatever the thread count
    torch.manual_seed(3)
    d1 = kernels.fused_dropout_attention(x, 4, 0.1)
    torch.manual_seed(3)
    assert torch.equal(d1, kernels.fused_dropout_attention(x, 4, 0.1))  # torch.manual_seed repeats it


def test_dropout_is_unbiased():
    torch.manual_seed(0)
    x = torch.randn(1, 48, 3 * 8)
    no_drop = kernels.fused_dropout_attention(x, 1, 0.0, seed=0)
    mean = torch.stack([kernels.fused_dropout_attention(x, 1, 0.2, seed=s) for s in range(2000)]).mean(0)
    # E[keep * scale] = 1, so the dropped attention averages to the plain one (2000 draws)
    assert (mean - no_drop).abs().max().item() < 0.02
    assert (mean - no_drop).abs().mean().item() < 0.004


@pytest.mark.parametrize("shape,p", [((3, 1000, 7), 0.1), ((2, 1024), 0.0), ((5, 333), 0.5)])
def test_gelu_dropout_is_gelu_then_the_same_dropout(shape, p):
    import torch.nn.functional as F

    torch.manual_seed(0)
    x = (torch.randn(shape) * 3).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y = kernels.fused_gelu_dropout(x, p, seed=11)
    ref = kernels.fused_dropout(F.gelu(x_ref), p, seed=11)  # same seed -> same mask
    keep = kernels.fused_dropout(torch.ones(shape), p, seed=11) > 0  # the mask of this seed
    assert not y.detach()[~keep].any()
    # torch's own float32 GELU is off by up to ~1e-6 relative (its AVX-512 path more than its AVX2
    # one), so the comparison with it is relative; against float64 the kernel is held to 1e-6
    assert ((y - ref).abs() <= 2e-6 + 1e-6 * ref.abs()).all()
    xd = x.detach().double()
    exact = xd * 0.5 * (1 + torch.erf(xd / 2**0.5)) * keep / (1 - p)
    assert ((y.detach().double() - exact).abs() <= 1e-6 * exact.abs().clamp(min=1)).all()
    g = torch.randn(shape)
    y.backward(g)
    ref.backward(g)
    assert ((x.grad - x_ref.grad).abs() <= 2e-6 + 1e-6 * x_ref.grad.abs()).all()


def test_gelu_of_the_kernel_is_exact_gelu_to_float_precision():
    import torch.nn.functional as F

    x = torch.linspace(-12, 12, 240_001, dtype=torch.float64)
    exact = F.gelu(x)
    err = (kernels.fused_gelu_dropout(x.float(), 0.0, seed=0).double() - exact).abs()
    assert err.max().item() < 1e-6
    rel = err / exact.abs().clamp_min(1e-30)
    assert rel[(x.abs() < 1) & (x.abs() > 1e-3)].max().item() < 1e-6


def test_model_trains_on_the_kernel(monkeypatch):
    calls, gelu_calls = [], []
    real, real_gelu = kernels.fused_dropout_attention, kernels.fused_gelu_dropout
    monkeypatch.setattr(kernels, "fused_dropout_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(kernels, "fused_gelu_dropout", lambda *a, **k: gelu_calls.append(1) or real_gelu(*a, **k))
    cfg = ModelConfig(n_genes=32, d_model=16, n_layers=2, n_heads=2, ffn_ratio=2, dropout=0.1)
    model = CellTransformer(cfg).train()
    values = torch.randn(3, 32)
    mask = torch.rand(3, 32) < 0.3
    model.loss(values, mask).backward()
    assert len(calls) == len(gelu_calls) == 2  # one per layer
    model.eval()
    model.loss(values, mask)
    assert len(calls) == len(gelu_calls) == 2  # evaluation has no dropout: SDPA's kernel, F.gelu


def test_without_the_kernel_training_falls_back_with_one_warning(tmp_path):
    code = (
        "import warnings, torch\n"
        "from cellscale.config import ModelConfig\n"
        "from cellscale.model import CellTransformer\n"
        "cfg = ModelConfig(n_genes=16, d_model=8, n_layers=2, n_heads=2, ffn_ratio=1, dropout=0.1)\n"
        "m = CellTransformer(cfg).train()\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(2):\n"
        "        m.loss(torch.randn(2, 16), torch.rand(2, 16) < 0.5).backward()\n"
        "print(len([x for x in w if 'fused CPU attention kernel is unavailable' in str(x.message)]))\n"
    )
    env = {"CELLSCALE_KERNELS": "0", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1"


def test_custom_ops_pass_torch_opcheck():
    # schema, fake (meta) kernels and autograd registration, as torch.compile needs them
    seed = torch.tensor([5])
    torch.library.opcheck(kernels._attention_op, (torch.randn(2, 40, 48, requires_grad=True), 2, 0.1, seed))
    torch.library.opcheck(kernels._dropout_op, (torch.randn(3, 50, requires_grad=True), 0.2, seed))
    torch.library.opcheck(kernels._gelu_dropout_op, (torch.randn(3, 50, requires_grad=True), 0.2, seed))
    torch.library.opcheck(kernels._gelu_dropout_backward_op, (torch.randn(3, 50), torch.randn(3, 50), 0.2, seed))


def test_compiled_model_traces_the_kernels_and_matches_eager():
    import warnings

    cfg = ModelConfig(n_genes=64, d_model=32, n_layers=2, n_heads=2, ffn_ratio=2, dropout=0.1)
    model = CellTransformer(cfg).train()
    values = torch.randn(4, 64)
    mask = torch.rand(4, 64) < 0.3
    torch.manual_seed(1)
    eager = model.loss(values, mask)
    compiled_loss = torch.compile(model.loss, backend="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(1)
        compiled = compiled_loss(values, mask)
        compiled.backward()
    assert compiled.item() == eager.item()  # same seeds drawn, same masks
    assert not [w for w in caught if "does not know how to trace" in str(w.message)]


def test_a_failed_build_is_reported_and_training_falls_back(tmp_path):
    # no working compiler: the build fails, available() says why, training still runs
    code = (
        "import warnings, torch\n"
        "from cellscale import kernels\n"
        "from cellscale.config import ModelConfig\n"
        "from cellscale.model import CellTransformer\n"
        "assert not kernels.available()\n"
        "print('reason:', kernels.unavailable_reason())\n"
        "cfg = ModelConfig(n_genes=16, d_model=8, n_layers=1, n_heads=2, ffn_ratio=1, dropout=0.1)\n"
        "with warnings.catch_warnings():\n"
        "    warnings.simplefilter('ignore')\n"
        "    CellTransformer(cfg).train().loss(torch.randn(2, 16), torch.rand(2, 16) < 0.5).backward()\n"
        "print('trained')\n"
    )
    env = dict(os.environ, CXX="/bin/false", CELLSCALE_KERNEL_CACHE=str(tmp_path / "cache"))
    env.pop("CELLSCALE_KERNELS", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "reason: " in r.stdout and "trained" in r.stdout
    assert "compiling the fused CPU attention kernel" in r.stderr  # the user was told what it tried
