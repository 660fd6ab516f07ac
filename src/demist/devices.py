"""Where demist computes: the `--device` choice, bf16 support, and the mixed precision a training stage runs in.

Every training stage and every synthesizer resolves devices and precision here, so `--device` means one thing
everywhere.
"""

from __future__ import annotations

import contextlib
import os

import torch

from demist.errors import DemistError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA without one is the user's mistake. Under `accelerate launch` or
    `torchrun`, each process takes the GPU of its local rank."""
    if device not in DEVICES:
        raise DemistError(f"--device {device}: unknown; expected auto, cpu or cuda")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DemistError("--device cuda: no CUDA device is available; expected --device cpu or auto")
    if device == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device(device)


def has_native_bf16(device: torch.device) -> bool:
    """bf16 arithmetic in hardware: CUDA with bf16, or a CPU with AVX-512 BF16 / AMX (elsewhere bf16 is emulated and
    slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def bf16_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast where the hardware has bf16; otherwise fp32."""
    if not has_native_bf16(device):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def resolve_mixed_precision(requested: str, device: torch.device) -> str:
    """The accelerate precision for a config value: 'auto' picks bf16 where the hardware has it (fp16 on CUDA
    without bf16)."""
    if requested == "auto":
        if has_native_bf16(device):
            return "bf16"
        return "fp16" if device.type == "cuda" else "no"
    if requested == "fp16" and device.type != "cuda":
        raise DemistError("mixed precision fp16 (config key train.mixed_precision or stage1.mixed_precision) needs a "
                          "CUDA device; expected bf16, no or auto on CPU")
    if requested not in ("no", "bf16", "fp16"):
        raise DemistError(f"mixed precision {requested!r}: expected auto, no, bf16 or fp16")
    return requested
