"""demist: T1w + FLAIR -> PSR myelin maps by decoupled multi-stream latent diffusion."""

from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):
    """`demist.Demist` without importing torch at `import demist`."""
    if name == "Demist":
        from demist.inference.pipeline import Demist

        return Demist
    raise AttributeError(f"module 'demist' has no attribute {name!r}")
