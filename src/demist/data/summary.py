"""A plain-text summary of a cohort: structure and tissue PSR means, to check data at a glance."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from demist.data.manifest import load_manifest, subjects_of
from demist.data.nifti import load_image
from demist.data.space import load_on_grid


def cohort_summary(manifest: str | Path) -> str:
    """Subjects, sessions and groups, then PSR means of white matter and lesions (when the files exist)."""
    records = load_manifest(manifest)
    subjects = subjects_of(records)
    groups = Counter(next(r.group for r in records if r.subject == s) for s in subjects)
    lines = [
        f"cohort {manifest}: {len(subjects)} subjects ({', '.join(f'{g} {n}' for g, n in sorted(groups.items()))}), "
        f"{len(records)} sessions",
        f"{'session':<20}{'group':<7}{'lesions (mL)':>13}{'NAWM PSR':>10}{'lesion PSR':>12}",
    ]
    for r in records:
        if r.psr is None or r.wm_mask is None or r.lesion_mask is None:
            lines.append(f"{r.key:<20}{r.group:<7}{'(no PSR or masks)':>35}")
            continue
        psr_img = load_image(r.psr, f"psr of {r.key}")
        psr = np.asarray(psr_img.dataobj)
        lesion = load_on_grid(r.lesion_mask, psr_img, f"lesion_mask of {r.key}", is_mask=True, onto="the PSR map")
        wm = load_on_grid(r.wm_mask, psr_img, f"wm_mask of {r.key}", is_mask=True, onto="the PSR map")
        voxel_ml = abs(np.linalg.det(psr_img.affine[:3, :3])) / 1000.0
        nawm = psr[wm & ~lesion].mean() if (wm & ~lesion).any() else float("nan")
        les = f"{psr[lesion].mean():.4f}" if lesion.any() else "-"
        lines.append(f"{r.key:<20}{r.group:<7}{lesion.sum() * voxel_ml:>13.2f}{nawm:>10.4f}{les:>12}")
    return "\n".join(lines)
