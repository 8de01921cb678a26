"""The fast model computes the study's model: same loss, same masking, masked-only head."""

from __future__ import annotations

import pytest
import torch

from cellscale.model import (
    CellTransformer,
    count_params,
    dropout,
    flops_per_cell,
    keep_mask,
    non_embedding_params,
    reference_to_fast_state_dict,
)
from cellscale.model.ladder import get_size
from cellscale.model.reference import ReferenceCellTransformer, copy_from_fast, copy_to_fast

SIZES = [  # (name, custom spec or None, V)
    ("XXS", None, 48),
    ("TINY", None, 40),
    ("XS", None, 64),
    ("S", None, 32),
    ("mh", {"d_model": 24, "n_layers": 3, "n_heads": 6, "ffn_ratio": 2}, 50),
]


def _cfg(name, spec, V, **kw):
    return get_size(name, n_genes=V, custom={name: spec} if spec else None, **kw)


def _batch(B, V, seed=0, p=0.3):
    g = torch.Generator().manual_seed(seed)
    values = torch.log1p(torch.poisson(torch.rand(B, V, generator=g) * 5, generator=g))
    mask = torch.rand(B, V, generator=g) < p
    mask[0, 0] = True
    return values, mask


def _pair(cfg, seed=0):
    torch.manual_seed(seed)
    ref = ReferenceCellTransformer(cfg)
    # make the (default-initialised) reference less trivial: random LayerNorm affine, biases
    with torch.no_grad():
        for name, prm in ref.named_parameters():
            if "norm" in name or name.endswith("bias"):
                prm.add_(0.1 * torch.randn_like(prm))
    fast = copy_to_fast(ref)
    return ref.eval(), fast.eval()


@pytest.mark.parametrize("name,spec,V", SIZES)
def test_fast_loss_equals_reference(name, spec, V):
    cfg = _cfg(name, spec, V)
    ref, fast = _pair(cfg)
    values, mask = _batch(5, V)
    with torch.no_grad():
        l_ref = ref.loss(values, mask)
        l_fast = fast.loss(values, mask)
        # masked-only head == head on every token, read at the masked positions
        pred_all = ref.forward_all(values, mask)
        pred = fast(values, mask)
    assert torch.allclose(l_fast, l_ref, rtol=1e-5, atol=1e-5), (l_fast.item(), l_ref.item())
    assert pred.shape == (int(mask.sum()),)
    torch.testing.assert_close(pred, pred_all[mask], rtol=1e-5, atol=1e-5)
    # and the loss is exactly the MSE over masked positions, computed by hand
    by_hand = ((pred_all[mask] - values[mask]) ** 2).sum() / mask.sum()
    assert torch.allclose(l_ref, by_hand, rtol=1e-6, atol=1e-6)


def test_gradients_match_reference():
    cfg = _cfg("mh", SIZES[-1][1], 50)
    ref, fast = _pair(cfg, seed=3)
    values, mask = _batch(4, 50, seed=3)
    ref.loss(values, mask).backward()
    fast.loss(values, mask).backward()
    ref_grads = reference_to_fast_state_dict({k: p.grad for k, p in ref.named_parameters()})
    for k, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)


def test_weight_mapping_roundtrip():
    cfg = _cfg("XS", None, 20)
    torch.manual_seed(0)
    fast = CellTransformer(cfg)
    ref = copy_from_fast(fast)
    back = copy_to_fast(ref)
    for (k, a), (k2, b) in zip(fast.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    fast2 = CellTransformer(cfg)
    fast2.load_reference_state(ref)
    assert all(torch.equal(a, b) for a, b in zip(fast.state_dict().values(), fast2.state_dict().values()))


def test_loss_only_on_masked_positions():
    cfg = _cfg("XS", None, 64)
    ref, fast = _pair(cfg)
    values, mask = _batch(3, 64)
    with torch.no_grad():
        pred_all = ref.forward_all(values, mask)
        err = (pred_all.double() - values.double()) ** 2
        masked = float(err[mask].sum() / mask.sum())
        everywhere = float(err.mean())
        assert abs(everywhere - masked) > 0.05 * masked  # the two losses are told apart below
        assert float(ref.loss(values, mask)) == pytest.approx(masked, rel=1e-5)
        assert float(fast.loss(values, mask)) == pytest.approx(masked, rel=1e-5)
        assert fast(values, mask).numel() == int(mask.sum())


@pytest.mark.parametrize("model_cls", [CellTransformer, ReferenceCellTransformer])
def test_masked_values_do_not_leak(model_cls):
    cfg = _cfg("mh", SIZES[-1][1], 50)
    torch.manual_seed(1)
    model = model_cls(cfg).eval()
    values, mask = _batch(3, 50)
    changed = values.clone()
    changed[mask] = torch.randn(int(mask.sum())) * 50 + 7  # only masked inputs change
    with torch.no_grad():
        a = model(values, mask)
        b = model(changed, mask)
    assert torch.equal(a, b)
    # while an unmasked value does change predictions (the test is able to fail)
    changed2 = values.clone()
    changed2[~mask] += 1.0
    with torch.no_grad():
        assert not torch.allclose(model(changed2, mask), a)


def test_gradient_reaches_mask_vector():
    cfg = _cfg("XS", None, 32)
    torch.manual_seed(0)
    model = CellTransformer(cfg).train()
    values, mask = _batch(4, 32)
    model.loss(values, mask).backward()
    assert model.mask_embed.grad is not None and model.mask_embed.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


def test_training_mode_dropout_runs_and_is_random():
    cfg = _cfg("XS", None, 32).model_copy(update={"dropout": 0.1})  # the default is 0
    torch.manual_seed(0)
    model = CellTransformer(cfg).train()
    values, mask = _batch(4, 32)
    assert model.loss(values, mask).item() != model.loss(values, mask).item()
    model.eval()
    assert model.loss(values, mask).item() == model.loss(values, mask).item()


def test_fast_dropout_distribution():
    torch.manual_seed(0)
    keep, scale = keep_mask((1000, 1000), 0.1)
    assert keep.dtype == torch.bool
    assert abs((~keep).float().mean().item() - 0.1) < 2e-3
    assert abs(scale - 1 / (1 - 6554 / 65536)) < 1e-12
    x = torch.ones(2000, 500, requires_grad=True)
    y = dropout(x, 0.1, True)
    assert abs(y.mean().item() - 1.0) < 5e-3
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # grad = keep * scale
    assert dropout(x, 0.1, False) is x


def test_flops_per_cell_hand_computation():
    cfg = get_size("XS", n_genes=512)
    V, d, f, L = 512, 64, 4, 2
    per_layer = 2 * V * (3 * d * d) + 2 * V * d * d + 2 * 2 * V * d * (f * d) + 4 * V * V * d
    assert per_layer == 117_440_512
    fwd = 2 * V * d + L * per_layer + 2 * d * 0.15 * V
    fl = flops_per_cell(cfg)
    assert fl["forward"] == pytest.approx(234_956_390.4, rel=1e-12)
    assert fl["forward"] == pytest.approx(fwd, rel=1e-12)
    assert fl["train"] == pytest.approx(3 * 234_956_390.4, rel=1e-12)
    # the attention term matters: it is 4 V^2 d per layer
    assert flops_per_cell(get_size("XS", n_genes=1024))["forward"] > 2 * fl["forward"]


def test_flops_match_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = _cfg("XS", None, 128)
    model = CellTransformer(cfg).eval()
    values, mask = _batch(2, 128, p=0.15)
    counter = FlopCounterMode(display=False)
    # the math backend decomposes attention into counted matmuls
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(values, mask)
    measured = counter.get_total_flops() / 2  # per cell
    expected = flops_per_cell(cfg, mask_prob=mask.float().mean().item())["forward"]
    assert measured == pytest.approx(expected, rel=0.02)


def test_meta_device_and_counts():
    cfg = get_size("L", n_genes=512)
    with torch.device("meta"):
        model = CellTransformer(cfg)
    assert model.num_params() == count_params(cfg) == 100_510_801
    assert non_embedding_params(cfg) == 100_510_801 - 512 * 1020
