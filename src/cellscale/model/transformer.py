"""The masked-reconstruction transformer of the seed study, written for speed.

Architecture (as in the study, docs/study.md):

* token ``i`` of a cell = ``gene_embed[i]`` (learned gene identity, ``nn.Embedding(V, d)``)
  + ``value_proj(log1p value)`` (``nn.Linear(1, d)``); at a masked position the value
  embedding is replaced by the learned ``mask_embed`` vector (d). No positional encoding.
* ``n_layers`` pre-LayerNorm encoder blocks, numerically the same function as
  ``nn.TransformerEncoderLayer(norm_first=True, activation="gelu", batch_first=True)``:
  ``x = x + drop(out_proj(attn(LN1(x))))``; ``x = x + drop(ff2(drop(gelu(ff1(LN2(x))))))``,
  with dropout also on the attention probabilities. No final LayerNorm.
* a linear head ``d -> 1``; the loss is the MSE over masked positions only. With a likelihood
  objective (``ModelConfig.objective``, :mod:`cellscale.rules.objectives`) the head is ``d -> 2``
  (a mean and a log-variance, or an NB log-rate and log inverse dispersion).

The fast path differs from the stock module only in *how* it computes:

* one fused QKV ``Linear(d, 3d)`` laid out exactly like ``MultiheadAttention.in_proj_weight``
  (q, k, v stacked along the output dim), so a reference state dict maps 1:1
  (:func:`reference_to_fast_state_dict`);
* attention through :func:`torch.nn.functional.scaled_dot_product_attention` (flash /
  memory-efficient kernels where the device has them), ``dropout_p`` only in training;
  on CPU *in training with dropout > 0*, SDPA has no fused kernel (it falls back to a
  memory-bound math path), so there attention runs on :mod:`cellscale.kernels`' fused C++
  kernel (same function and distribution; the dropout mask is a counter-based hash,
  recomputed in backward), straight from the fused projection's ``[B, V, 3d]`` output;
* CPU dropout (residual and FFN) uses the kernel's hash dropout (one pass, mask recomputed in
  backward), the FFN's GELU fused with its dropout (one pass each way; GELU to within 1e-6 of
  ``F.gelu``, which evaluation keeps); without the kernel, a cheaper RNG path than
  ``bernoulli_`` (:func:`drop_mask`; drop probability quantised to 1/65536, scale exact), see
  ``benchmarks/README.md``;
* no Python loop over cells; the head (and loss) run on the masked positions only — the
  hidden states at ``mask.nonzero()`` are gathered first. Predictions at unmasked positions
  never enter the study's loss, so the objective and its gradients are identical.

Parameter layout (reproduces the study's counts exactly, see ``count_params``)::

    gene_embed  V*d          value_proj  d + d        mask_embed  d
    per layer:  LN1 2d, qkv 3d*d + 3d, out d*d + d, LN2 2d, ff1 f*d*d + f*d, ff2 f*d*d + d
    head        d + 1   (k (d + 1) for an objective with k = 2 outputs)

Initialisation (documented choice; the study used PyTorch defaults): every Linear and the
gene embedding ~ N(0, 0.02), biases 0, LayerNorm weight 1 / bias 0, the mask vector
~ N(0, 0.02). The residual output projections (``out``, ``ff2``) are additionally scaled by
``1/sqrt(2 * n_layers)`` (GPT-2 style) so that deep sizes start with a bounded residual stream.

This module imports only torch, :mod:`cellscale.config` and the torch-only
:mod:`cellscale.rules.objectives` and :mod:`cellscale.kernels`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cellscale import kernels
from cellscale.config import ModelConfig
from cellscale.rules import objectives

__all__ = [
    "CellTransformer",
    "EncoderBlock",
    "count_params",
    "non_embedding_params",
    "flops_per_cell",
    "reference_to_fast_state_dict",
    "fast_to_reference_state_dict",
    "model_summary",
    "dropout",
    "keep_mask",
    "drop_mask",
    "fused_attention_enabled",
    "attention_impl",
]

INIT_STD = 0.02

# -- fast dropout on CPU ------------------------------------------------------------------
# torch's CPU bernoulli_ (used by F.dropout and by SDPA's math path) costs ~7 ns per element
# on this machine; one 32-bit MT19937 draw per TWO elements (16 bits each) costs ~0.9 ns.
# The drop probability is quantised to 1/65536 (p=0.1 -> 6554/65536 = 0.1000061) and the
# kept values are scaled by 1/(1 - p_quantised), so E[dropout(x)] = x exactly, as in
# F.dropout. On other devices F.dropout / SDPA's own dropout are used unchanged.
_DROP_BITS = 16
_DROP_ONE = 1 << _DROP_BITS


def _drop_threshold(p: float) -> tuple[int, float]:
    thr = min(_DROP_ONE - 1, max(0, round(p * _DROP_ONE)))
    return thr, 1.0 / (1.0 - thr / _DROP_ONE)


def drop_mask(shape: tuple[int, ...] | torch.Size, p: float, *, out: Tensor | None = None,
              scratch: Tensor | None = None,
              generator: torch.Generator | None = None) -> tuple[Tensor, float]:
    """Bernoulli(p) DROP mask (bool, CPU) and the matching 1/(1-p_quantised) keep scale.

    Each int32 draw (uniform on [-2^31, 2^31 - 1), bias 2^-32) gives two 16-bit values.
    ``out`` (bool, contiguous) receives the mask; ``scratch`` (int32, >= ceil(n/2)
    elements) avoids an allocation per call.
    """
    thr, scale = _drop_threshold(p)
    n = math.prod(shape)
    half = (n + 1) // 2
    r = torch.empty(half, dtype=torch.int32) if scratch is None else scratch[:half]
    r.random_(-(2**31), 2**31 - 1, generator=generator)
    r16 = r.view(torch.int16)[:n].view(shape)  # uniform on [-32768, 32767]
    if out is None:
        return r16 < thr - 32768, scale
    torch.lt(r16, thr - 32768, out=out)
    return out, scale


def keep_mask(shape: tuple[int, ...] | torch.Size, p: float, *,
              generator: torch.Generator | None = None) -> tuple[Tensor, float]:
    """Bernoulli(1 - p) keep mask (bool, CPU) and the matching 1/(1-p_quantised) scale."""
    drop, scale = drop_mask(shape, p, generator=generator)
    return drop.logical_not_(), scale


class _MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, drop: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(drop)
        ctx.scale = scale
        return x.mul(scale).masked_fill_(drop, 0.0)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None]:
        (drop,) = ctx.saved_tensors
        return g.mul(ctx.scale).masked_fill_(drop, 0.0), None, None


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """``F.dropout`` semantics; a cheaper random-number path on CPU."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    if x.dtype == torch.float32 and kernels.available():
        return kernels.fused_dropout(x, p)
    drop, scale = drop_mask(x.shape, p)
    return _MaskedScale.apply(x, drop, scale)


def gelu_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """``dropout(F.gelu(x), p, training)``; in CPU float32 training one fused pass each way
    (:func:`cellscale.kernels.fused_gelu_dropout`)."""
    if training and p > 0.0 and x.device.type == "cpu" and x.dtype == torch.float32 and kernels.available():
        return kernels.fused_gelu_dropout(x, p)
    return dropout(F.gelu(x), p, training)


def fused_attention_enabled(x: Tensor) -> bool:
    """Whether attention with dropout on ``x`` runs on the fused CPU kernel (float32 on CPU,
    the kernel built; otherwise SDPA's math path, with one warning)."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if kernels.available():
        return True
    kernels.warn_fallback()
    return False


def attention_impl(cfg: ModelConfig, device: torch.device | str, *, dtype: torch.dtype = torch.float32) -> str:
    """Which attention path a training step of ``cfg`` runs on ``device``: ``fused-cpu-kernel``
    (cellscale.kernels, CPU float32 with attention dropout), or SDPA's own choice for these
    shapes, as torch reports it (``sdpa-flash_attention``, ``sdpa-math``, ...)."""
    device = torch.device(device)
    p = cfg.attn_dropout
    probe = torch.zeros(1, cfg.n_heads, 8, cfg.d_model // cfg.n_heads, device=device, dtype=dtype)
    if p > 0.0 and fused_attention_enabled(probe):
        return "fused-cpu-kernel"
    try:
        choice = torch._fused_sdp_choice(probe, probe, probe, None, p, False)
        return "sdpa-" + str(torch.nn.attention.SDPBackend(choice)).split(".")[-1].lower()
    except (AttributeError, RuntimeError, TypeError, ValueError):  # a torch without the probe
        return "sdpa"


class EncoderBlock(nn.Module):
    """One pre-LN encoder layer (same function as the stock norm_first GELU layer)."""

    def __init__(self, d_model: int, n_heads: int, ffn_ratio: int, dropout: float,
                 attn_dropout: float | None = None) -> None:
        super().__init__()
        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout  # residual branches and FFN
        self.attn_dropout = dropout if attn_dropout is None else attn_dropout
        # CPU training with dropout: the fused C++ kernel (cellscale.kernels) where it can be
        # built; False forces SDPA's math path (same function, ~6x slower attention)
        self.cpu_fused_attention = True
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff1 = nn.Linear(d_model, ffn_ratio * d_model)
        self.ff2 = nn.Linear(ffn_ratio * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        B, V, d = x.shape
        H, hd = self.n_heads, self.head_dim
        p = self.dropout if self.training else 0.0
        pa = self.attn_dropout if self.training else 0.0
        h = self.norm1(x)
        qkv = self.qkv(h)
        if pa > 0.0 and self.cpu_fused_attention and fused_attention_enabled(x):
            a = kernels.fused_dropout_attention(qkv, H, pa)
        else:
            # [B, V, 3, H, hd] -> 3 x [B, H, V, hd]; q, k, v stacked as in in_proj_weight
            q, k, v = qkv.view(B, V, 3, H, hd).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, dropout_p=pa)
            a = a.transpose(1, 2).reshape(B, V, d)
        x = x + dropout(self.out(a), p, self.training)
        h = self.norm2(x)
        h = gelu_dropout(self.ff1(h), p, self.training)
        return x + dropout(self.ff2(h), p, self.training)


class CellTransformer(nn.Module):
    """Masked-value reconstruction transformer over the V genes of a cell.

    ``forward(values[B, V] float, mask[B, V] bool) -> pred``: head outputs at the masked
    positions, in ``mask.nonzero()`` order (row-major: cell, then gene), ``M = mask.sum()``:
    ``[M]`` for the ``mse`` objective, ``[M, 2]`` for the likelihoods.
    ``position_losses(values, mask, counts=, log_scale=)``: each masked position's loss (nats;
    squared error for mse); ``loss(...)`` is their mean (the MSE for ``mse``).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        V, d = cfg.n_genes, cfg.d_model
        self.gene_embed = nn.Embedding(V, d)
        self.value_proj = nn.Linear(1, d)
        self.mask_embed = nn.Parameter(torch.empty(d))
        self.layers = nn.ModuleList(
            EncoderBlock(d, cfg.n_heads, cfg.ffn_ratio, cfg.dropout, cfg.attn_dropout) for _ in range(cfg.n_layers)
        )
        self.head = nn.Linear(d, objectives.head_outputs(cfg.objective))
        self.reset_parameters()

    # -- init -------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.gene_embed.weight.is_meta:
            return
        resid_scale = 1.0 / math.sqrt(2 * self.cfg.n_layers)
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Linear):
                std = INIT_STD * (resid_scale if name.endswith((".out", ".ff2")) else 1.0)
                nn.init.normal_(mod.weight, 0.0, std)
                nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.LayerNorm):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)
        nn.init.normal_(self.gene_embed.weight, 0.0, INIT_STD)
        nn.init.normal_(self.mask_embed, 0.0, INIT_STD)

    # -- compute ----------------------------------------------------------------------
    def embed(self, values: Tensor, mask: Tensor) -> Tensor:
        """Token embeddings [B, V, d]; masked values never reach the network."""
        w = self.value_proj.weight[:, 0]  # [d]
        val = torch.addcmul(self.value_proj.bias, values.unsqueeze(-1), w)  # [B, V, d]
        val = torch.where(mask.unsqueeze(-1), self.mask_embed, val)
        return val + self.gene_embed.weight

    def encode(self, values: Tensor, mask: Tensor) -> Tensor:
        """Final hidden states [B, V, d] (no final LayerNorm, as in the study)."""
        x = self.embed(values, mask)
        for layer in self.layers:
            x = layer(x)
        return x

    def forward(self, values: Tensor, mask: Tensor) -> Tensor:
        mask = mask.bool()
        h = self.encode(values, mask)
        out = self.head(h[mask])
        return out.squeeze(-1) if out.shape[-1] == 1 else out

    def position_losses(self, values: Tensor, mask: Tensor, *, counts: Tensor | None = None,
                        log_scale: Tensor | None = None) -> Tensor:
        """Loss at every masked position [M] (``counts`` [B, V] and ``log_scale`` [B] =
        log(library size / target_sum) for the ``nb`` objective)."""
        mask = mask.bool()
        return objectives.masked_position_loss(self.cfg.objective, self.forward(values, mask), values, mask,
                                               counts=counts, log_scale=log_scale)

    def loss(self, values: Tensor, mask: Tensor, *, counts: Tensor | None = None,
             log_scale: Tensor | None = None) -> Tensor:
        if self.cfg.objective == "mse":  # the study's objective, on its shortest path
            mask = mask.bool()
            pred = self.forward(values, mask)
            return F.mse_loss(pred, values[mask].to(pred.dtype))
        return self.position_losses(values, mask, counts=counts, log_scale=log_scale).mean()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- weight exchange with the study-style reference (cellscale.model.reference) ---------
    def load_reference_state(self, ref_state: dict[str, Tensor] | nn.Module) -> None:
        """Copy the weights of a study-style reference model (or its state dict) into self."""
        if isinstance(ref_state, nn.Module):
            ref_state = ref_state.state_dict()
        self.load_state_dict(reference_to_fast_state_dict(ref_state), strict=True)


# -- state-dict mapping ----------------------------------------------------------------
# reference names (cellscale.model.reference.ReferenceCellTransformer, stock TransformerEncoder)
_LAYER_MAP = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "self_attn.in_proj_weight": "qkv.weight",
    "self_attn.in_proj_bias": "qkv.bias",
    "self_attn.out_proj.weight": "out.weight",
    "self_attn.out_proj.bias": "out.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "linear1.weight": "ff1.weight",
    "linear1.bias": "ff1.bias",
    "linear2.weight": "ff2.weight",
    "linear2.bias": "ff2.bias",
}
_TOP_MAP = {
    "gene_embed.weight": "gene_embed.weight",
    "value_proj.weight": "value_proj.weight",
    "value_proj.bias": "value_proj.bias",
    "mask_embed": "mask_embed",
    "head.weight": "head.weight",
    "head.bias": "head.bias",
}


def reference_to_fast_state_dict(ref: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map a reference (stock-encoder) state dict onto CellTransformer names, 1:1."""
    out: dict[str, Tensor] = {}
    for k, v in ref.items():
        if k in _TOP_MAP:
            out[_TOP_MAP[k]] = v
            continue
        parts = k.split(".")
        if parts[0] == "encoder" and parts[1] == "layers":
            rest = ".".join(parts[3:])
            out[f"layers.{parts[2]}.{_LAYER_MAP[rest]}"] = v
            continue
        raise KeyError(f"unexpected reference parameter {k!r}")
    return out


def fast_to_reference_state_dict(fast: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`reference_to_fast_state_dict`."""
    inv_top = {v: k for k, v in _TOP_MAP.items()}
    inv_layer = {v: k for k, v in _LAYER_MAP.items()}
    out: dict[str, Tensor] = {}
    for k, v in fast.items():
        if k in inv_top:
            out[inv_top[k]] = v
            continue
        parts = k.split(".")
        if parts[0] == "layers":
            out[f"encoder.layers.{parts[1]}.{inv_layer['.'.join(parts[2:])]}"] = v
            continue
        raise KeyError(f"unexpected parameter {k!r}")
    return out


# -- closed-form counting --------------------------------------------------------------
def _layer_params(d: int, f: int) -> int:
    return (2 * d) + (3 * d * d + 3 * d) + (d * d + d) + (2 * d) + (f * d * d + f * d) + (f * d * d + d)


def count_params(cfg: ModelConfig) -> int:
    """Total trainable parameters, gene-identity table included (= ``sum(p.numel())``)."""
    V, d, f = cfg.n_genes, cfg.d_model, cfg.ffn_ratio
    k = objectives.head_outputs(cfg.objective)
    return V * d + 2 * d + d + cfg.n_layers * _layer_params(d, f) + k * (d + 1)


def non_embedding_params(cfg: ModelConfig) -> int:
    """Total parameters minus the ``V * d`` gene-identity embedding table.

    The value projection, the mask vector, the encoder and the head are counted (they do
    not grow with V); only the per-gene lookup table is excluded, as the token embedding is
    excluded in language-model scaling work (Kaplan et al. 2020).
    """
    return count_params(cfg) - cfg.n_genes * cfg.d_model


def flops_per_cell(cfg: ModelConfig, *, mask_prob: float = 0.15) -> dict[str, float]:
    """Floating-point operations to process one cell of V genes.

    Convention: 1 multiply-accumulate = 2 FLOPs. Counted: every Linear over all V tokens
    (value projection ``2*V*d``; per layer QKV ``6*V*d^2``, output ``2*V*d^2``, FFN
    ``4*f*V*d^2``), attention scores ``Q K^T`` and the weighted sum ``A V`` (together
    ``4*V^2*d`` per layer, all heads), and the head on the expected masked positions only
    (``2*k*d*mask_prob*V``, ``k`` head outputs). Not counted: biases, LayerNorm, GELU, softmax, dropout, the
    embedding lookup/adds (O(V*d) elementwise work). Training = 3 x forward (the backward
    pass costs two forward passes: gradients w.r.t. inputs and w.r.t. weights).

    Returns ``{"forward": float, "train": float}``.
    """
    V, d, f, L = cfg.n_genes, cfg.d_model, cfg.ffn_ratio, cfg.n_layers
    per_layer = 2 * V * (3 * d * d + d * d + 2 * f * d * d) + 4 * V * V * d
    k = objectives.head_outputs(cfg.objective)
    fwd = 2.0 * V * d + L * per_layer + 2.0 * k * d * mask_prob * V
    return {"forward": float(fwd), "train": float(3.0 * fwd)}


def model_summary(cfg: ModelConfig, *, mask_prob: float = 0.15) -> dict[str, Any]:
    """Parameters and FLOPs of one config, for result files and tables."""
    fl = flops_per_cell(cfg, mask_prob=mask_prob)
    return {
        "params": count_params(cfg),
        "non_embedding_params": non_embedding_params(cfg),
        "flops_per_cell_forward": fl["forward"],
        "flops_per_cell_train": fl["train"],
    }
