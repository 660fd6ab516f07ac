"""One imaging session of one subject: from the subject's plan to the volumes and masks on the scanner grid.

Only voxels that touch the brain (the support) are computed; everything else stays zero, as in a skull-stripped
scan. Volume-wide steps (FLAIR slice profile, PSR blur and shift) run on the full grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from demist.data.phantom.acquisition import (AcquisitionParameters, bias_field, draw_acquisition, psr_resolution,
                                             rician, thick_slices)
from demist.data.phantom.deformation import (FIELD_LATTICE_MM, OutputGrid, Pose, Warp, output_grid, random_pose,
                                             sample_lattice, subject_warp)
from demist.data.phantom.raster import LesionMaps, rasterise
from demist.data.phantom.signal import flair_signal, mprage_signal
from demist.data.phantom.subject import STREAM_SESSION, SubjectFields, SubjectPlan, stream
from demist.data.phantom.templates import TemplateAnatomy, tissue_fractions_at
from demist.data.phantom.tissue import CleanImages, VoxelAnatomy, compose

#: Ventricle wall displacement (mm) and share of sulcal GM turned to CSF at full atrophy.
VENTRICLE_EXPANSION_MM, SULCAL_WIDENING = 3.5, 0.35
#: Support search: a coarse grid of this spacing (mm) first, then every voxel near a coarse hit.
COARSE_MM = 4.0
LABELS = {0: "background", 1: "CSF", 2: "cortical GM", 3: "deep GM", 4: "WM", 5: "lesion"}


@dataclass
class SessionVolumes:
    affine: np.ndarray
    images: dict[str, np.ndarray]  # t1w, flair, psr (float32)
    masks: dict[str, np.ndarray]  # brain_mask, lesion_mask, wm_mask, tissue_labels (uint8)
    lesion_maps: LesionMaps
    atrophy: float
    acquisition: AcquisitionParameters
    support: np.ndarray  # flat indices of computed voxels
    grid: OutputGrid
    pose: Pose
    warp: Warp


def _grid_points(grid: OutputGrid, flat: np.ndarray) -> np.ndarray:
    return grid.world(np.stack(np.unravel_index(flat, grid.shape)).astype(np.float64))


def _support(grid: OutputGrid, pose: Pose, warp: Warp, brain: np.ndarray,
             origin: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Grid voxels with any brain: hits on a coarse grid, dilated, then checked voxel by voxel.

    Returns their flat indices, subject-space and template-space points (3, n) and brain fractions.
    """
    step = max(1, int(round(COARSE_MM / grid.spacing)))
    coarse_shape = tuple(-(-s // step) for s in grid.shape)
    coarse = np.stack(np.unravel_index(np.arange(np.prod(coarse_shape)), coarse_shape)) * step
    q = warp.template_points(pose.to_subject(grid.world(coarse.astype(np.float64))))
    hit = ndi.map_coordinates(brain, q - origin[:, None], order=1, prefilter=False) > 0
    hit = ndi.binary_dilation(hit.reshape(coarse_shape), iterations=2)
    dense = hit.repeat(step, 0).repeat(step, 1).repeat(step, 2)[: grid.shape[0], : grid.shape[1], : grid.shape[2]]
    flat = np.flatnonzero(dense)
    p = pose.to_subject(_grid_points(grid, flat))
    q = warp.template_points(p)
    fraction = ndi.map_coordinates(brain, q - origin[:, None], order=1, prefilter=False)
    inside = fraction > 1e-3
    return flat[inside], p[:, inside], q[:, inside], fraction[inside]


def _scatter(values: np.ndarray, flat: np.ndarray, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    volume = np.zeros(int(np.prod(shape)), dtype)
    volume[flat] = values
    return volume.reshape(shape)


def _sample(volume: np.ndarray, q_index: np.ndarray) -> np.ndarray:
    return ndi.map_coordinates(volume, q_index, order=1, prefilter=False)


def _voxel_anatomy(anatomy: TemplateAnatomy, fields: SubjectFields, spacing: float, p: np.ndarray,
                   q: np.ndarray, atrophy: float) -> VoxelAnatomy:
    """Fractions and smooth maps at support points (q: template mm, p: subject mm)."""
    q_index = (q - anatomy.origin[:, None]).astype(np.float32)
    gm, wm, csf = (_sample(m, q_index) for m in tissue_fractions_at(spacing)[1:])
    sulcal = SULCAL_WIDENING * atrophy * gm * np.clip(2.0 * _sample(anatomy.outer_csf_near, q_index), 0.0, 1.0)
    smooth = sample_lattice(np.concatenate([fields.hidden, fields.r1]), anatomy.origin, FIELD_LATTICE_MM, p)
    return VoxelAnatomy(
        csf=csf + sulcal, gm=gm - sulcal, wm=wm, deep_gm=_sample(anatomy.deep_gm, q_index),
        wm_depth=_sample(anatomy.wm_depth, q_index),
        ventricle_distance=ndi.map_coordinates(anatomy.ventricle_distance, q_index, order=1, prefilter=False,
                                               mode="nearest"),
        hidden_field=smooth[0], r1_field=smooth[1],
    )


def _labels(voxels: VoxelAnatomy, lesion: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Dominant tissue per voxel inside the brain (codes in LABELS); the lesion mask overrides WM."""
    stack = np.stack([voxels.csf, voxels.gm * (1 - voxels.deep_gm), voxels.gm * voxels.deep_gm, voxels.wm])
    labels = np.where(lesion, 5, stack.argmax(axis=0) + 1)
    return np.where(brain >= 0.5, labels, 0).astype(np.uint8)


def _acquire(rng: np.random.Generator, plan: SubjectPlan, acquisition: AcquisitionParameters, clean: CleanImages,
             grid: OutputGrid, support: np.ndarray) -> dict[str, np.ndarray]:
    """Scanner and fit effects on the clean support values: bias, FLAIR slices, Rician noise, PSR blur, shift, noise."""
    t = plan.tissue
    world = _grid_points(grid, support)
    wm_t1 = 1000.0 / (t.wm_r1_free + t.myelin_r1 * t.wm_psr)  # reference WM sets the noise level and the gain
    wm_t1w = float(mprage_signal(t.wm_pd, wm_t1, t.mprage))
    wm_flair = float(flair_signal(t.wm_pd, wm_t1, t.wm_t2, t.flair))
    t1w = clean.t1w * bias_field(rng, grid, world, acquisition.t1w_bias)
    flair = clean.flair * bias_field(rng, grid, world, acquisition.flair_bias)
    psr = clean.psr * bias_field(rng, grid, world, acquisition.psr_bias)
    flair = thick_slices(_scatter(flair, support, grid.shape), grid.spacing, acquisition.flair_slice_mm)
    t1w = rician(rng, t1w, wm_t1w / acquisition.t1w_snr) * (acquisition.t1w_gain / wm_t1w)
    flair = rician(rng, flair.ravel()[support], wm_flair / acquisition.flair_snr) * (acquisition.flair_gain / wm_flair)
    psr = psr_resolution(_scatter(psr, support, grid.shape), grid.spacing, acquisition.psr_blur_mm,
                         acquisition.psr_shift_mm).ravel()[support]
    psr = psr + acquisition.psr_noise * rng.standard_normal(psr.shape, dtype=np.float32)
    return {name: _scatter(v, support, grid.shape) for name, v in (("t1w", t1w), ("flair", flair), ("psr", psr))}


def render_session(plan: SubjectPlan, fields: SubjectFields, session: int, spacing: float,
                   anatomy: TemplateAnatomy) -> SessionVolumes:
    """Volumes and masks of session `session` (0-based) of the subject planned in `plan`."""
    rng = stream(plan.seed, plan.index, STREAM_SESSION + session)
    grid = output_grid(spacing, anatomy.centre)
    pose = random_pose(rng, plan.head_shape, anatomy.centre)
    atrophy = plan.atrophy_at(session)
    warp = subject_warp(anatomy, fields.elastic, VENTRICLE_EXPANSION_MM * atrophy)
    acquisition = draw_acquisition(rng, plan.flair_slice_mm)

    support, p, q, brain = _support(grid, pose, warp, tissue_fractions_at(spacing)[0], anatomy.origin)
    voxels = _voxel_anatomy(anatomy, fields, spacing, p, q, atrophy)
    lookup = np.full(grid.shape, -1, np.int64)
    lookup.reshape(-1)[support] = np.arange(support.size)
    lesions = rasterise(list(plan.lesions[session]), q, grid, pose, warp, lookup)
    clean = compose(plan.tissue, voxels, lesions)
    images = _acquire(rng, plan, acquisition, clean, grid, support)

    lesion = clean.fractions["lesion"] >= 0.5
    masks = {
        "brain_mask": _scatter(brain >= 0.5, support, grid.shape, np.uint8),
        "lesion_mask": _scatter(lesion, support, grid.shape, np.uint8),
        "wm_mask": _scatter(voxels.wm >= 0.5, support, grid.shape, np.uint8),
        "tissue_labels": _scatter(_labels(voxels, lesion, brain), support, grid.shape, np.uint8),
    }
    return SessionVolumes(affine=grid.affine, images=images, masks=masks, lesion_maps=lesions, atrophy=atrophy,
                          acquisition=acquisition, support=support, grid=grid, pose=pose, warp=warp)
