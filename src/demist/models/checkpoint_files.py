"""Reading a state dict that a user points at: a MONAI bundle `.pt` file or a `.safetensors` file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from demist.errors import DemistError


def read_state_dict(path: str | Path, what: str,
                    wrappers: Sequence[str] = ("state_dict", "model")) -> dict[str, torch.Tensor]:
    """A state dict of tensors from `path` (torch.save with tensors only, or safetensors).

    `what` names the file in errors ("backbone checkpoint"); `wrappers` are container keys to look inside.
    """
    path = Path(path)
    if not path.is_file():
        raise DemistError(f"{path}: {what} not found; expected a .pt or .safetensors file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure means the same thing to the user
        raise DemistError(f"{path}: not readable as a {what} ({type(exc).__name__}: {exc}); "
                          "expected a torch.save state dict or a safetensors file") from None
    for wrapper in wrappers:
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DemistError(f"{path}: {what} is not a state dict of tensors; expected a saved state_dict")
    return dict(state)
