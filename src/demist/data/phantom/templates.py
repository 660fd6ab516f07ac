"""The anatomy every synthetic subject starts from: nilearn's MNI ICBM152 2009a symmetric templates (1 mm).

nilearn ships T1, GM and WM probability maps but no CSF map. CSF is the residual ``brain - GM - WM`` only where the
residual is dark on the template T1 (sulci, cisterns, ventricles); where it is bright (lower brainstem) it is
tissue and joins WM. Ventricles are the large CSF components that do not reach the brain's outer surface.

Everything here is derived once per process (a few seconds) and cached; volumes are cropped to the brain.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

logger = logging.getLogger(__name__)

#: Template T1 intensities (nilearn's [0, 1] scale) of pure WM and GM, used to tell dark residual (CSF) from tissue.
TEMPLATE_T1_WM, TEMPLATE_T1_GM = 0.87, 0.65
#: Smallest enclosed CSF component (mm³) counted as a ventricle.
MIN_VENTRICLE_MM3 = 1000
#: Deep grey matter (basal ganglia, thalami) lies in this MNI box (mm), away from the brain's outer surface.
DEEP_GM_BOX_MM = ((-32.0, 32.0), (-40.0, 30.0), (-12.0, 24.0))
#: Lesions are placed above this MNI z (mm): supratentorial white matter.
SUPRATENTORIAL_Z_MM = -15.0
CROP_MARGIN_VOXELS = 6
#: Exponent that sharpens the population-average tissue probabilities towards one subject's crisper boundaries.
SHARPENING = 2.0


@dataclass(frozen=True)
class LesionSites:
    """Candidate lesion centres (template mm) with a unit direction each (long or short axis of the ovoid)."""

    periventricular: np.ndarray  # (n, 3) centres within 8 mm of a ventricle
    periventricular_normals: np.ndarray  # (n, 3) perpendicular to the ventricle wall
    deep: np.ndarray  # (n, 3) deep WM centres
    juxtacortical: np.ndarray  # (n, 3) WM centres 1-3 mm below the cortex
    juxtacortical_normals: np.ndarray  # (n, 3) pointing towards the cortex


@dataclass(frozen=True)
class TemplateAnatomy:
    """Template-space maps (1 mm, cropped to the brain), all float32 unless stated.

    Fractions gm + wm + csf equal `brain` (the skull-stripped template's support). Index (i, j, k) of every map sits
    at MNI mm ``origin + (i, j, k)``.
    """

    origin: np.ndarray  # (3,) MNI mm of voxel (0, 0, 0)
    brain: np.ndarray  # 1 inside the skull-stripped template
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    ventricles: np.ndarray  # bool, lateral ventricles
    ventricle_distance: np.ndarray  # mm to the nearest ventricle voxel
    ventricle_pull: np.ndarray  # (3, ...) unit-peak field pointing into the ventricles (drives their enlargement)
    deep_gm: np.ndarray  # 0..1, how much of the GM here is deep (basal ganglia, thalami) rather than cortex
    wm_depth: np.ndarray  # 0..1, smoothed WM density: large tracts high, thin gyral WM low
    outer_csf_near: np.ndarray  # smoothed extra-ventricular CSF (sulci widen where it is high)
    centre: np.ndarray  # (3,) MNI mm of the brain's bounding-box centre, x = 0 on the symmetric midline
    sites: LesionSites

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.brain.shape)  # type: ignore[return-value]


def _load_mni152() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=1)
    gm = datasets.load_mni152_gm_template(resolution=1)
    wm = datasets.load_mni152_wm_template(resolution=1)
    arrays = [np.asarray(img.get_fdata(dtype=np.float32)) for img in (t1, gm, wm)]
    return arrays[0], arrays[1], arrays[2], np.asarray(t1.affine)


def _split_residual(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray, brain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSF and extra WM from the residual 1 - GM - WM, by the residual's own template T1 intensity."""
    residual = np.clip(1.0 - gm - wm, 0.0, 1.0) * brain
    own_t1 = (t1 - TEMPLATE_T1_WM * wm - TEMPLATE_T1_GM * gm) / np.maximum(residual, 1e-3)
    own_t1 = np.where(residual > 0.05, own_t1, 0.0)  # tiny residuals: partial volume at sulci, call them CSF
    csf_weight = np.clip((0.65 - own_t1) / 0.25, 0.0, 1.0)
    csf = residual * csf_weight
    return csf.astype(np.float32), (residual - csf).astype(np.float32)


def _sharpen(fractions: tuple[np.ndarray, ...], brain: np.ndarray) -> tuple[np.ndarray, ...]:
    """f_i^γ / Σ_j f_j^γ inside the brain: an average of 152 brains blurs every boundary; one brain does not."""
    powered = [np.clip(f, 0.0, 1.0) ** SHARPENING for f in fractions]
    total = np.maximum(sum(powered), 1e-6)
    return tuple((p / total * brain).astype(np.float32) for p in powered)


def _ventricles(csf: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Large CSF components that do not touch the outside of the brain (the lateral ventricles)."""
    labels, _ = ndi.label(csf > 0.5)
    outside = ndi.binary_dilation(brain < 0.5)
    touching = np.unique(labels[outside & (labels > 0)])
    sizes = np.bincount(labels.ravel())
    keep = sizes >= MIN_VENTRICLE_MM3
    keep[0] = False
    keep[touching] = False
    return keep[labels]


def _box_weight(origin: np.ndarray, shape: tuple[int, ...], box: tuple[tuple[float, float], ...],
                soft_mm: float) -> np.ndarray:
    """Separable smooth indicator of an axis-aligned box (mm), soft over `soft_mm` at each face."""
    weight = np.ones(shape, np.float32)
    for axis, (lo, hi) in enumerate(box):
        mm = origin[axis] + np.arange(shape[axis], dtype=np.float32)
        w1 = np.clip((mm - lo) / soft_mm + 0.5, 0, 1) * np.clip((hi - mm) / soft_mm + 0.5, 0, 1)
        view = [1, 1, 1]
        view[axis] = shape[axis]
        weight = weight * w1.reshape(view)
    return weight


def _unit_gradient(field: np.ndarray) -> np.ndarray:
    grad = np.stack(np.gradient(field)).astype(np.float32)
    norm = np.sqrt((grad**2).sum(axis=0))
    return grad / np.maximum(norm, 1e-6)


def _lesion_sites(origin: np.ndarray, gm: np.ndarray, wm: np.ndarray, deep_gm: np.ndarray,
                  vent_dist: np.ndarray) -> LesionSites:
    """Voxel centres where each lesion type may sit, plus the orientation the type needs."""
    z_mm = origin[2] + np.arange(wm.shape[2], dtype=np.float32)
    supratentorial = np.broadcast_to(z_mm > SUPRATENTORIAL_Z_MM, wm.shape)
    cortex = (gm > 0.5) & (deep_gm < 0.5)
    cortex_dist = ndi.distance_transform_edt(~cortex).astype(np.float32)
    periventricular = supratentorial & (wm > 0.8) & (vent_dist >= 1.5) & (vent_dist <= 7.0)
    deep = supratentorial & (wm > 0.9) & (vent_dist > 10.0) & (cortex_dist >= 5.0)
    juxta = supratentorial & (wm > 0.6) & (vent_dist > 10.0) & (cortex_dist >= 1.0) & (cortex_dist <= 3.0)
    away_from_ventricles = _unit_gradient(ndi.gaussian_filter(vent_dist, 1.5))
    towards_cortex = -_unit_gradient(ndi.gaussian_filter(cortex_dist, 1.5))

    def centres(mask: np.ndarray) -> np.ndarray:
        return (np.argwhere(mask) + origin).astype(np.float32)

    def directions(mask: np.ndarray, field: np.ndarray) -> np.ndarray:
        return field[:, mask].T.astype(np.float32)

    return LesionSites(
        periventricular=centres(periventricular),
        periventricular_normals=directions(periventricular, away_from_ventricles),
        deep=centres(deep),
        juxtacortical=centres(juxta),
        juxtacortical_normals=directions(juxta, towards_cortex),
    )


@functools.lru_cache(maxsize=1)
def load_template_anatomy() -> TemplateAnatomy:
    """Load the MNI152 templates and derive every map the generator needs (cached for the process)."""
    logger.info("preparing the MNI152 template anatomy (once per process)")
    t1, gm, wm, affine = _load_mni152()
    brain = (t1 > 0).astype(np.float32)
    csf, tissue_residual = _split_residual(t1, gm, wm, brain)
    wm = wm + tissue_residual  # bright residual (lower brainstem) behaves like WM
    gm, wm, csf = _sharpen((gm, wm, csf), brain)

    lo = np.maximum(np.argwhere(brain > 0).min(axis=0) - CROP_MARGIN_VOXELS, 0)
    hi = np.minimum(np.argwhere(brain > 0).max(axis=0) + CROP_MARGIN_VOXELS + 1, brain.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    brain, gm, wm, csf = (np.ascontiguousarray(a[crop], dtype=np.float32) for a in (brain, gm, wm, csf))
    origin = (affine[:3, 3] + lo).astype(np.float64)

    ventricles = _ventricles(csf, brain)
    vent_dist = ndi.distance_transform_edt(~ventricles).astype(np.float32)
    pull = np.stack(np.gradient(ndi.gaussian_filter(ventricles.astype(np.float32), 4.0))).astype(np.float32)
    pull /= np.sqrt((pull**2).sum(axis=0)).max()

    outside_brain_dist = ndi.distance_transform_edt(brain > 0.5).astype(np.float32)
    deep_gm = _box_weight(origin, brain.shape, DEEP_GM_BOX_MM, soft_mm=6.0)
    deep_gm *= np.clip((outside_brain_dist - 12.0) / 6.0, 0.0, 1.0)
    wm_depth = ndi.gaussian_filter(wm, 3.0)
    outer_csf_near = ndi.gaussian_filter(csf * ~ventricles, 1.5)
    sites = _lesion_sites(origin, gm, wm, deep_gm, vent_dist)

    idx = np.argwhere(brain > 0)
    centre = origin + (idx.min(axis=0) + idx.max(axis=0)) / 2.0
    centre[0] = 0.0  # the 2009a symmetric template is mirror-symmetric about x = 0
    logger.info("template: %s voxels, ventricles %.1f mL, lesion sites pv/deep/jc = %d/%d/%d", brain.shape,
                ventricles.sum() / 1000, len(sites.periventricular), len(sites.deep), len(sites.juxtacortical))
    return TemplateAnatomy(
        origin=origin, brain=brain, gm=gm, wm=wm.astype(np.float32), csf=csf, ventricles=ventricles,
        ventricle_distance=vent_dist, ventricle_pull=pull, deep_gm=deep_gm.astype(np.float32),
        wm_depth=wm_depth.astype(np.float32), outer_csf_near=outer_csf_near.astype(np.float32),
        centre=centre, sites=sites,
    )


@functools.lru_cache(maxsize=4)
def tissue_fractions_at(spacing: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(brain, gm, wm, csf) prefiltered for sampling at `spacing` mm: a Gaussian standing in for the larger
    voxel's box average (variance (s² - 1)/12 mm² on top of the template's own 1 mm voxel), so that partial volume
    rather than aliasing decides the fractions of a coarse voxel."""
    anatomy = load_template_anatomy()
    sigma = np.sqrt(max(spacing**2 - 1.0, 0.0) / 12.0)
    maps = (anatomy.brain, anatomy.gm, anatomy.wm, anatomy.csf)
    if sigma < 0.05:
        return maps
    return tuple(ndi.gaussian_filter(m, sigma).astype(np.float32) for m in maps)  # type: ignore[return-value]
