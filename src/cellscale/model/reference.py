"""The seed study's model in its plain formulation, for tests and side-by-side benchmarks.

Built from the stock ``nn.TransformerEncoder(nn.TransformerEncoderLayer(norm_first=True,
activation="gelu", batch_first=True))``, the head applied to EVERY token, the loss the MSE
over masked positions (``pred[mask]`` vs ``values[mask]``). Weights are the PyTorch defaults
of those modules (as in the study); the mask vector is N(0, 0.02).

:func:`copy_to_fast` / :func:`copy_from_fast` move weights between this model and
:class:`cellscale.model.CellTransformer` (the state dicts map 1:1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cellscale.config import ModelConfig
from cellscale.model import CellTransformer, fast_to_reference_state_dict, reference_to_fast_state_dict

__all__ = ["ReferenceCellTransformer", "copy_to_fast", "copy_from_fast"]


class ReferenceCellTransformer(nn.Module):
    """Study-style model: stock pre-LN encoder, head on every token."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        V, d = cfg.n_genes, cfg.d_model
        self.gene_embed = nn.Embedding(V, d)
        self.value_proj = nn.Linear(1, d)
        self.mask_embed = nn.Parameter(torch.randn(d) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model=d,
            nhead=cfg.n_heads,
            dim_feedforward=cfg.ffn_ratio * d,
            dropout=cfg.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=cfg.n_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 1)
        self.register_buffer("gene_ids", torch.arange(V), persistent=False)

    def forward_all(self, values: Tensor, mask: Tensor) -> Tensor:
        """Predictions at every position, [B, V]."""
        gene = self.gene_embed(self.gene_ids).unsqueeze(0)  # [1, V, d]
        val = self.value_proj(values.unsqueeze(-1))  # [B, V, d]
        val = torch.where(mask.unsqueeze(-1), self.mask_embed, val)  # mask vector replaces it
        x = self.encoder(gene + val)
        return self.head(x).squeeze(-1)

    def forward(self, values: Tensor, mask: Tensor) -> Tensor:
        """Predictions at the masked positions, in ``mask.nonzero()`` order."""
        mask = mask.bool()
        return self.forward_all(values, mask)[mask]

    def loss(self, values: Tensor, mask: Tensor) -> Tensor:
        mask = mask.bool()
        pred = self.forward_all(values, mask)
        return F.mse_loss(pred[mask], values[mask])

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def copy_to_fast(ref: ReferenceCellTransformer, fast: CellTransformer | None = None) -> CellTransformer:
    """Load ``ref``'s weights into ``fast`` (a new CellTransformer if None) and return it."""
    if fast is None:
        fast = CellTransformer(ref.cfg)
    fast.load_state_dict(reference_to_fast_state_dict(ref.state_dict()), strict=True)
    return fast


def copy_from_fast(fast: CellTransformer, ref: ReferenceCellTransformer | None = None) -> ReferenceCellTransformer:
    """Load ``fast``'s weights into ``ref`` (a new reference model if None) and return it."""
    if ref is None:
        ref = ReferenceCellTransformer(fast.cfg)
    ref.load_state_dict(fast_to_reference_state_dict(fast.state_dict()), strict=True)
    return ref
