"""An exponential moving average of a stage's trainable parameters (`Stage.ema_decay`), saved with checkpoints.

Hand-written because torch's `AveragedModel` copies whole modules, and a Stage-2 module holds the frozen backbone:
only the parameters that train are averaged here. The decay warms up as min(decay, (1 + k) / (10 + k)) at step k,
so that a short run is not dominated by the (partly zero) initial weights.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from demist.errors import DemistError


class ParameterEMA:
    """Shadow copies of every trainable parameter of `modules`, keyed "<module>.<parameter>"."""

    def __init__(self, modules: Mapping[str, nn.Module], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise DemistError(f"EMA decay {decay}: expected a number in (0, 1)")
        self.decay = float(decay)
        self.params = {f"{name}.{key}": p for name, module in modules.items()
                       for key, p in module.named_parameters() if p.requires_grad}
        self.shadow = {key: p.detach().clone() for key, p in self.params.items()}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the averages towards the current parameters after optimisation step `step` (0-based)."""
        weight = 1.0 - self.decay_at(step)
        for key, p in self.params.items():
            self.shadow[key].lerp_(p.detach().to(self.shadow[key].dtype), weight)

    @torch.no_grad()
    def copy_to_parameters(self) -> None:
        """Replace the parameters by their averages (at the end of training: the weights a run keeps)."""
        for key, p in self.params.items():
            p.copy_(self.shadow[key])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {key: value.detach().cpu().clone() for key, value in self.shadow.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow):
            raise DemistError("checkpoint: its parameter averages do not match this run's trainable parameters; "
                              "expected a checkpoint of the same stage and config")
        for key, value in state.items():
            self.shadow[key].copy_(value)
