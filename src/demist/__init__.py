"""demist: T1w + FLAIR -> PSR myelin maps by decoupled multi-stream latent diffusion."""

from __future__ import annotations

from demist.version import __version__  # noqa: F401


def __getattr__(name: str):
    """`demist.Demist` without importing torch at `import demist`."""
    if name == "Demist":
        from demist.api import Demist

        return Demist
    raise AttributeError(f"module 'demist' has no attribute {name!r}")
