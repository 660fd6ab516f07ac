"""From a trained run and a T1w + FLAIR pair to a PSR map on the T1w's native grid.

The functions here are shared by all methods (`demist.methods.load_synthesizer` loads one from its run): check and
prepare the inputs, predict on the model grid, go back to the native grid in PSR units, zero outside the brain, and
write files atomically.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from demist.data.nifti import load_image, load_mask, save_image
from demist.data.preprocess import PreparedSession, prepare_images, psr_to_native
from demist.errors import DemistError
from demist.inference.base import Synthesizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SynthesisResult:
    """PSR (mean over samples) and its voxelwise SD across samples (None for one sample or a deterministic method),
    both on the T1w's native grid, in PSR units."""

    psr: nib.Nifti1Image
    std: nib.Nifti1Image | None


def synthesize_images(
    synthesizer: Synthesizer,
    t1w: nib.Nifti1Image,
    flair: nib.Nifti1Image,
    mask: nib.Nifti1Image | None = None,
    samples: int = 1,
    seed: int = 0,
    progress: bool = False,
    names: dict[str, str] | None = None,
) -> SynthesisResult:
    """Synthesize PSR for one loaded T1w + FLAIR pair (see `SynthesisResult`)."""
    if samples < 1:
        raise DemistError(f"--samples {samples}: expected 1 or more")
    session = prepare_images(t1w, flair, synthesizer.config.data, brain=mask, key="input", names=names)
    mean, std = synthesizer.predict(session, samples=samples, seed=seed, progress=progress)
    if not np.all(np.isfinite(mean)):  # e.g. an overflow under reduced precision: never write such a map
        bad = int(mean.size - np.count_nonzero(np.isfinite(mean)))
        raise DemistError(f"{synthesizer.method}: produced {bad} NaN or infinite voxels; expected a finite map "
                          "(try --precision fp32)")
    psr_range = synthesizer.config.data.psr_range
    psr = native_map(mean, session, psr_range)
    std_img = native_map(std, session, psr_range) if std is not None and samples > 1 else None
    return SynthesisResult(psr=psr, std=std_img)


def native_map(values: np.ndarray, session: PreparedSession, psr_range: float) -> nib.Nifti1Image:
    """A model-grid map (PSR / psr_range) in PSR units on the T1w's native grid, zero outside the session's brain
    there."""
    if session.native_brain is None:
        raise RuntimeError(f"session {session.key}: prepared without its native brain")  # a bug, not user input
    img = psr_to_native(values, session.grid, psr_range, session.brain)
    data = img.get_fdata(dtype=np.float32) * session.native_brain
    return nib.Nifti1Image(data.astype(np.float32), img.affine, img.header)


def std_path_for(out: Path) -> Path:
    """`<name>_std.nii.gz` beside `<name>.nii.gz`."""
    name = out.name
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")]
    return out.with_name(f"{stem}_std{name[len(stem):]}")


def check_output_path(out: Path, overwrite: bool, inputs: tuple[Path | None, ...] = ()) -> None:
    """Refuse an output that is not a NIfTI name, that exists without --overwrite, or that is one of `inputs`, before
    any work is done."""
    if not out.name.endswith((".nii", ".nii.gz")):
        raise DemistError(f"output {out}: not a NIfTI file name; expected a name ending in .nii.gz or .nii")
    for path in (out, std_path_for(out)):
        if path.is_dir():
            raise DemistError(f"output {path}: is a directory; expected a file name")
        if path.exists() and not overwrite:
            raise DemistError(f"output {path}: already exists; pass --overwrite to replace it")
    if out.parent.exists() and not out.parent.is_dir():
        raise DemistError(f"output {out}: its folder {out.parent} is not a directory")
    if out.parent.is_dir() and not os.access(out.parent, os.W_OK):
        raise DemistError(f"output {out}: its folder {out.parent} is not writable")
    for given in inputs:
        if given is not None and Path(given).resolve() in {out.resolve(), std_path_for(out).resolve()}:
            raise DemistError(f"output {out}: is one of the inputs ({given}); expected a new file name")


def synthesize_files(
    synthesizer: Synthesizer,
    t1w: Path,
    flair: Path,
    out: Path,
    mask: Path | None = None,
    samples: int = 1,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Read the inputs, synthesize and write `out` (and `<out>_std` for several samples); returns what was written.

    Outputs are written only after everything succeeded, each atomically.
    """
    check_output_path(out, overwrite, inputs=(t1w, flair, mask))
    result = synthesize_images(
        synthesizer,
        load_image(t1w, "T1w"),
        load_image(flair, "FLAIR"),
        load_mask(mask, "brain mask") if mask is not None else None,
        samples=samples,
        seed=seed,
        progress=progress,
        names={"t1w": f"T1w image {t1w}", "flair": f"FLAIR image {flair}", "brain_mask": f"brain mask {mask}"},
    )
    if result.std is None:
        std_path_for(out).unlink(missing_ok=True)  # an earlier run's SD (overwritten) would not describe this map
        written = []
    else:
        written = [save_image(result.std, std_path_for(out))]
    return [save_image(result.psr, out), *written]  # the map last: a batch counts a session done when it exists
