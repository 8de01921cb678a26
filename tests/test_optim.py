"""The optimiser a run builds (cellscale.train.setup.build_run, settings.make_optimizer) and its step
(cellscale.train.step.train_step): weight decay on exactly the matrices, the gradient clipped to
``train.grad_clip``, checked on the run's own objects."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cellscale.config import ModelConfig, TrainConfig
from cellscale.data.store import Dataset
from cellscale.runtime.distributed import DistContext
from cellscale.train.setup import Run, build_run
from cellscale.train.step import train_step

# non-default decay and clip, so that a hard-coded 0.01 or 1.0 would show
CFG = TrainConfig(cells_seen=64, batch_size=16, weight_decay=0.037, grad_clip=0.25, num_threads=1, device="cpu")
N_LAYERS = 2

# the rule (settings.make_optimizer): parameters of 2 or more dimensions are decayed. By name, for
# this model: the gene embedding, every Linear weight (value_proj's is [d, 1]); not decayed: every
# bias, the LayerNorm gains and biases, and the mask vector
DECAY = {"gene_embed.weight", "value_proj.weight", "head.weight"} | {
    f"layers.{i}.{lin}.weight" for i in range(N_LAYERS) for lin in ("qkv", "out", "ff1", "ff2")}
NO_DECAY = {"value_proj.bias", "mask_embed", "head.bias"} | {
    f"layers.{i}.{name}" for i in range(N_LAYERS)
    for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
                 "qkv.bias", "out.bias", "ff1.bias", "ff2.bias")}


@pytest.fixture()
def run(tiny_dataset_dir: Path, tmp_path: Path) -> Run:
    ds = Dataset.open(tiny_dataset_dir)
    model = ModelConfig(name="T2", d_model=8, n_layers=N_LAYERS, n_heads=2, ffn_ratio=2, n_genes=ds.n_genes)
    return build_run(ds, model, CFG, out=tmp_path, train_cells=None, seed=0, n_train=len(ds.train_indices(None)),
                     run_id="optim", device=torch.device("cpu"), dist=DistContext())


def _groups_by_name(run: Run) -> list[set[str]]:
    name_of = {id(p): n for n, p in run.model.named_parameters()}
    return [{name_of[id(p)] for p in g["params"]} for g in run.optimizer.param_groups]


def test_weight_decay_is_on_exactly_the_matrices(run: Run):
    named = dict(run.model.named_parameters())
    assert set(named) == DECAY | NO_DECAY and not DECAY & NO_DECAY  # the model has the parameters named above
    assert all(p.requires_grad for p in named.values())

    groups = run.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [CFG.weight_decay, 0.0]
    assert _groups_by_name(run) == [DECAY, NO_DECAY]
    # every trainable parameter in exactly one group, none twice
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(named)
    assert all(named[n].dim() >= 2 for n in DECAY) and all(named[n].dim() == 1 for n in NO_DECAY)
    assert isinstance(run.optimizer, torch.optim.AdamW)
    assert all(g["lr"] == run.peak_lr and g["betas"] == CFG.betas for g in groups)


def _zero_grad_loss(run: Run):
    params = list(run.model.parameters())
    return lambda values, mask, **kw: sum((p * 0.0).sum() for p in params)


def test_a_step_shrinks_the_decayed_parameters_only(run: Run):
    """With every gradient 0 Adam's update is 0, and AdamW's decoupled decay multiplies each decayed
    parameter by 1 - lr x weight_decay: the step moves exactly the DECAY parameters."""
    run.loss_fn = _zero_grad_loss(run)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    lr = 0.5
    train_step(run, run.batches.batch(0), lr)
    for name, p in run.model.named_parameters():
        assert torch.count_nonzero(p.grad) == 0
        if name in DECAY:
            torch.testing.assert_close(p.detach(), before[name] * (1 - lr * CFG.weight_decay), rtol=1e-6, atol=0)
            assert not torch.equal(p.detach(), before[name])
        else:
            assert torch.equal(p.detach(), before[name]), name


def _directions(run: Run) -> dict[str, torch.Tensor]:
    """A fixed gradient for each parameter, of total norm 1."""
    gen = torch.Generator().manual_seed(0)
    g = {n: torch.randn(p.shape, generator=gen) for n, p in run.model.named_parameters()}
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in g.values()]))
    return {n: t / total for n, t in g.items()}


def _known_grad_loss(run: Run, direction: dict[str, torch.Tensor], scale: float):
    """A loss whose gradient is exactly ``scale x direction``."""
    named = list(run.model.named_parameters())
    return lambda values, mask, **kw: scale * sum((p * direction[n]).sum() for n, p in named)


def _grad_norm(run: Run) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.double())
                                                        for p in run.model.parameters()])))


def test_a_gradient_over_the_norm_is_clipped_to_it(run: Run):
    direction = _directions(run)
    run.loss_fn = _known_grad_loss(run, direction, scale=40.0)  # norm 40, 160 x grad_clip
    train_step(run, run.batches.batch(0), 1e-3)
    assert _grad_norm(run) == pytest.approx(CFG.grad_clip, rel=1e-5)
    for n, p in run.model.named_parameters():  # scaled down, direction kept
        clipped = direction[n] * CFG.grad_clip
        torch.testing.assert_close(p.grad, clipped, rtol=1e-5, atol=1e-9)
        # and clipped before the optimiser stepped: Adam's first moment after one step is (1 - beta1) x grad
        torch.testing.assert_close(run.optimizer.state[p]["exp_avg"], (1 - CFG.betas[0]) * clipped,
                                   rtol=1e-5, atol=1e-9)


def test_a_gradient_under_the_norm_is_untouched(run: Run):
    direction = _directions(run)
    scale = 0.1  # norm 0.1 < grad_clip 0.25
    loss = _known_grad_loss(run, direction, scale)
    # the same gradient without the step: autograd's own numbers, unclipped
    loss(None, None).backward()
    expected = {n: p.grad.clone() for n, p in run.model.named_parameters()}
    assert sum(float(t.double().square().sum()) for t in expected.values()) ** 0.5 == pytest.approx(scale, rel=1e-5)
    run.loss_fn = loss
    train_step(run, run.batches.batch(0), 1e-3)
    for n, p in run.model.named_parameters():
        assert torch.equal(p.grad, expected[n]), n


def test_the_models_own_loss_scaled_up_is_clipped_to_the_norm(run: Run):
    """The real loss path (the model's masked MSE on a real batch) with the loss x 1e4."""
    item = run.batches.batch(0)
    values, mask, _ = item
    (1e4 * run.model.loss(values, mask)).backward()
    raw = _grad_norm(run)
    assert raw > 100 * CFG.grad_clip
    model_loss = run.loss_fn
    run.loss_fn = lambda v, m, **kw: 1e4 * model_loss(v, m, **kw)
    train_step(run, item, 1e-3)
    assert _grad_norm(run) == pytest.approx(CFG.grad_clip, rel=1e-5)
