"""Weights files and resumable training checkpoints, all written atomically.

Weights are safetensors with string metadata (`demist.runs.save_weights`: the resolved config travels with every
file). A checkpoint is one folder `checkpoints/step-<N>/` holding each module's weights and `training_state.pt`
(optimizer and scheduler states, step, seed); it is assembled under a temporary name and renamed into place, so a
run killed at any moment leaves either the previous checkpoint or the new one, never half of one. The random state
needs no saving: the loop reseeds before every loss evaluation from (seed, step, shard, phase).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from demist.errors import DemistError
from demist.runs import load_weights, save_weights

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
TRAINING_STATE = "training_state.pt"
_STEP_DIR = re.compile(r"step-(\d+)")


def module_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's state dict, unwrapped from DDP/compile wrappers."""
    inner = getattr(module, "module", module)
    inner = getattr(inner, "_orig_mod", inner)
    return inner.state_dict()


def checkpoint_step(path: Path) -> int | None:
    """The step number of a checkpoint folder name, or None for other names."""
    match = _STEP_DIR.fullmatch(path.name)
    return int(match.group(1)) if match else None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run (temporary folders of a killed writer are ignored)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return None
    steps = [(checkpoint_step(p), p) for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    complete = [(s, p) for s, p in steps if (p / TRAINING_STATE).is_file()]
    return max(complete)[1] if complete else None


def save_checkpoint(run_dir: str | Path, step: int, modules: Mapping[str, nn.Module], training_state: dict[str, Any],
                    metadata: Mapping[str, str], keep: int = 1) -> Path:
    """Write `checkpoints/step-<step>/` atomically and delete all but the newest `keep` checkpoints."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=folder))
    try:
        for name, module in modules.items():
            save_weights(tmp / f"{name}.safetensors", module_state(module), {**metadata, "component": name})
        torch.save({**training_state, "step": step}, tmp / TRAINING_STATE)
        if final.exists():  # the same step written again (a resumed run that had finished): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    older = sorted((p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None), key=checkpoint_step)
    for stale in older[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    for leftover in folder.glob(".step-*"):  # temporary folders of a writer that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    logger.debug("checkpoint written: %s", final)
    return final


def load_checkpoint(path: str | Path, modules: Mapping[str, nn.Module]) -> dict[str, Any]:
    """Load each module's weights from a checkpoint folder (strict) and return its training state."""
    path = Path(path)
    for name, module in modules.items():
        state, _ = load_weights(path / f"{name}.safetensors")
        inner = getattr(module, "module", module)
        try:
            inner.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise DemistError(f"{path / name}.safetensors: does not fit the model ({str(exc).splitlines()[0]}); "
                              "expected a checkpoint of the same architecture") from None
    try:
        return torch.load(path / TRAINING_STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise DemistError(f"{path / TRAINING_STATE}: not readable ({exc}); expected a demist training state") from None
