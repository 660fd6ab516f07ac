"""The Python API: `demist.Demist.load(run).synthesize(t1w_img, flair_img)`."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib

from demist.data.nifti import check_image, check_mask
from demist.inference.base import Synthesizer
from demist.inference.pipeline import SynthesisResult, synthesize_images
from demist.methods import load_synthesizer


class Demist:
    """`Demist.load(run).synthesize(t1w_img, flair_img)` → `SynthesisResult` (nibabel images).

    `run` is any run directory that can synthesize (DEMIST, an ablation, FT-LDM or a baseline).
    """

    def __init__(self, synthesizer: Synthesizer) -> None:
        self.synthesizer = synthesizer

    @classmethod
    def load(cls, run_dir: str | Path, sampler: str | None = None, steps: int | None = None,
             device: str = "auto") -> "Demist":
        return cls(load_synthesizer(run_dir, sampler=sampler, steps=steps, device=device))

    def synthesize(self, t1w: nib.Nifti1Image, flair: nib.Nifti1Image, mask: nib.Nifti1Image | None = None,
                   samples: int = 1, seed: int = 0, progress: bool = False) -> SynthesisResult:
        """PSR on the T1w's grid, in PSR units; with `samples` > 1 also the voxelwise SD across samples.

        The images are checked as files are (3D, a valid affine, finite voxels, a non-empty mask)."""
        t1w, flair = check_image(t1w, "t1w"), check_image(flair, "flair")
        mask = check_mask(mask, "mask") if mask is not None else None
        return synthesize_images(self.synthesizer, t1w, flair, mask, samples=samples, seed=seed, progress=progress)
