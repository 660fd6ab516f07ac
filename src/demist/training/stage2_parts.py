"""The pieces of Stage 2 around `DemistNet`: the trainable view the loop checkpoints, and the ablation names. (The
frozen backbone's source, and rebuilding a finished run for inference, are in `models.from_runs`.)
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from demist.config_sections import STREAM_SWITCHES
from demist.models.demist_net import STREAMS, DemistNet


def method_name(streams: Mapping[str, bool]) -> str:
    """"demist" with every stream on; otherwise "demist-no-<flag>" for each stream that is off."""
    return "demist" + "".join(f"-no-{STREAM_SWITCHES[s]}" for s in STREAMS if not streams[s])


class TrainableStreams(nn.Module):
    """DemistNet as the training loop sees it: the same forward, but `state_dict` / `load_state_dict` hold only the
    trained parts, so checkpoints never copy the frozen backbone (it stays in its own file)."""

    def __init__(self, net: DemistNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z_c: torch.Tensor,
                image: torch.Tensor | None = None) -> torch.Tensor:
        """`image`: the T1w + FLAIR patch under the latent patch, for a net whose ControlNet also sees the image."""
        return self.net(x_t, t, z_c, self.net.embed_image(image) if self.net.uses_image else None)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return self.net.trainable_state_dict()

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True,
                        assign: bool = False):  # type: ignore[override]
        self.net.load_trainable_state_dict(state_dict, source="training checkpoint")
        return torch.nn.modules.module._IncompatibleKeys([], [])
