"""demist: T1w + FLAIR -> PSR myelin maps by decoupled multi-stream latent diffusion."""

from __future__ import annotations

__version__ = "0.1.0"
