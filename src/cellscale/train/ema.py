"""An exponential moving average of a run's weights (``train.ema_decay``), which is what it
evaluates, checkpoints as its best, and judges its plateau on.

Why: at a constant peak rate the weights move around a noisy floor, and the validation loss then
jumps by up to 10% between evaluations (docs/ablations.md). The plateau criterion reads that
noise as progress or as a plateau by chance, and a cooldown then buys up to 10% more. An average
over the last ~1/(1 - decay) steps sits near where a cooldown would take the weights, without
stopping the run. Its curve is smooth, so it falls as long as training still helps, and it is
flat once training no longer helps (Polyak averaging; on averaging against cooldowns, see
Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations").

The decay warms up (``cellscale.rules.schedule.warm_decay``, beside the words the methods paragraph uses
for it), so that the first steps are not held back by the random initial weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from cellscale.rules.schedule import warm_decay

PREFIX = "__ema."  # the checkpoint's extra tensors (names start with "__")


class WeightAverage:
    """The average of ``model``'s parameters, updated after each optimiser step."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.params = [p for p in model.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, updates: int) -> None:
        """After optimiser step number ``updates`` (1-based)."""
        weight = 1.0 - warm_decay(self.decay, updates)
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], weight)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the averaged weights within the block, and its own afterwards."""
        with torch.no_grad():
            own = [p.detach().clone() for p in self.params]
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, o in zip(self.params, own):
                    p.copy_(o)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{PREFIX}{i}__": s for i, s in enumerate(self.shadow)}

    @torch.no_grad()
    def load(self, extras: dict[str, torch.Tensor]) -> None:
        """Restore from a checkpoint's extra tensors; KeyError when one is missing."""
        for i, s in enumerate(self.shadow):
            s.copy_(extras[f"{PREFIX}{i}__"])
