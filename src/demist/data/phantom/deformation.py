"""Where each output voxel looks in the template: scanner grid, head pose, elastic anatomy and atrophy.

Three spaces: *template* (MNI mm, where the maps live), *subject* (the template warped by the subject's own
anatomy: a smooth elastic field plus ventricle enlargement) and *world* (scanner mm of the output affine: the
subject rotated, scaled, sheared and shifted about the brain's centre). Output voxels are pulled back:
world -> subject by the inverse pose, subject -> template by ``q = p + u(p)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial.transform import Rotation

from demist.data.phantom.templates import TemplateAnatomy

#: Scanner field of view (mm), centred on the brain; holds the largest posed brain with a margin on every side.
FIELD_OF_VIEW_MM = (192.0, 240.0, 208.0)
#: Output shapes are rounded up to a multiple of this many voxels (the models' downsampling divisor).
SHAPE_MULTIPLE = 16
#: Displacement fields live on a lattice of this spacing (mm) over the template; smooth random fields are drawn
#: on a coarser one (they vary over 10 mm or more, and smoothing noise there is 16 times cheaper).
LATTICE_MM, FIELD_LATTICE_MM = 2.0, 4.0
MAX_ROTATION_DEG = 8.0
MAX_SCALE = 0.06
MAX_SHEAR = 0.03
MAX_SHIFT_MM = 4.0


@dataclass(frozen=True)
class OutputGrid:
    """The voxel grid of every output volume: RAS axes, isotropic `spacing`, centred on the template brain."""

    shape: tuple[int, int, int]
    spacing: float
    affine: np.ndarray

    def world(self, index: np.ndarray) -> np.ndarray:
        """World mm of voxel indices, (3, n) -> (3, n)."""
        return self.affine[:3, :3] @ index + self.affine[:3, 3:4]

    def index(self, world: np.ndarray) -> np.ndarray:
        """Fractional voxel indices of world points, (3, n) -> (3, n)."""
        return (world - self.affine[:3, 3:4]) / self.spacing


def output_grid(spacing: float, centre: np.ndarray) -> OutputGrid:
    """The scanner grid for `spacing` mm voxels around `centre` (world mm)."""
    shape = tuple(int(np.ceil(fov / spacing / SHAPE_MULTIPLE) * SHAPE_MULTIPLE) for fov in FIELD_OF_VIEW_MM)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = np.round(centre - spacing * (np.array(shape) - 1) / 2.0, 3)
    return OutputGrid(shape=shape, spacing=float(spacing), affine=affine)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Pose:
    """world = centre + matrix @ (p - centre) + shift, for subject-space points p (mm)."""

    matrix: np.ndarray
    shift: np.ndarray
    centre: np.ndarray

    def to_world(self, p: np.ndarray) -> np.ndarray:
        return self.centre[:, None] + self.matrix @ (p - self.centre[:, None]) + self.shift[:, None]

    def to_subject(self, w: np.ndarray) -> np.ndarray:
        return self.centre[:, None] + np.linalg.inv(self.matrix) @ (w - (self.centre + self.shift)[:, None])


def random_head_shape(rng: np.random.Generator) -> np.ndarray:
    """A subject's head size and shape: global scale ±6 %, a little per-axis scale, shear ±0.03 (3x3)."""
    scale = rng.uniform(1 - MAX_SCALE, 1 + MAX_SCALE) * rng.uniform(0.98, 1.02, 3)
    shear = np.eye(3)
    shear[np.triu_indices(3, 1)] = rng.uniform(-MAX_SHEAR, MAX_SHEAR, 3)
    return shear @ np.diag(scale)


def random_pose(rng: np.random.Generator, head_shape: np.ndarray, centre: np.ndarray) -> Pose:
    """The head's position in the scanner for one session: rotation ±8° per axis and shift ±4 mm."""
    rotation = Rotation.from_euler("xyz", rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, 3), degrees=True)
    return Pose(matrix=rotation.as_matrix() @ head_shape, shift=rng.uniform(-MAX_SHIFT_MM, MAX_SHIFT_MM, 3),
                centre=np.asarray(centre, float))


def smooth_random_field(rng: np.random.Generator, shape: tuple[int, ...], sigma_cells: float,
                        components: int = 1) -> np.ndarray:
    """Gaussian-smoothed white noise on a lattice, rescaled to unit RMS per component: (components, *shape)."""
    noise = rng.standard_normal((components, *shape)).astype(np.float32)
    field = np.stack([ndi.gaussian_filter(c, sigma_cells, mode="wrap") for c in noise])
    return field / np.sqrt((field**2).mean(axis=tuple(range(1, field.ndim)), keepdims=True))


def sample_lattice(values: np.ndarray, origin: np.ndarray, cell_mm: float, points: np.ndarray) -> np.ndarray:
    """Trilinear samples of a lattice (c, *shape) whose cell (0,0,0) sits at `origin` mm, at points (3, n) mm."""
    index = (points - np.asarray(origin, float)[:, None]) / cell_mm
    return np.stack([ndi.map_coordinates(c, index, order=1, mode="nearest", prefilter=False) for c in values])


def lattice_shape(anatomy: TemplateAnatomy, cell_mm: float = LATTICE_MM) -> tuple[int, int, int]:
    """Shape of a lattice with `cell_mm` cells from the template's origin over its whole extent."""
    return tuple(int(np.ceil(s / cell_mm)) + 1 for s in anatomy.shape)  # type: ignore[return-value]


def elastic_field(rng: np.random.Generator, anatomy: TemplateAnatomy, amplitude_mm: float,
                  smoothness_mm: float = 12.0) -> np.ndarray:
    """A subject's smooth anatomical variation: displacement lattice (3, ...) with RMS magnitude `amplitude_mm`."""
    coarse_shape = lattice_shape(anatomy, FIELD_LATTICE_MM)
    coarse = smooth_random_field(rng, coarse_shape, smoothness_mm / FIELD_LATTICE_MM, components=3)
    # Linear upsampling by the cell ratio: coarse cell i lands exactly on fine cell i * ratio.
    ratio = int(FIELD_LATTICE_MM / LATTICE_MM)
    zoom = [(ratio * (n - 1) + 1) / n for n in coarse_shape]
    fine = tuple(slice(0, n) for n in lattice_shape(anatomy))
    field = np.stack([ndi.zoom(c, zoom, order=1)[fine] for c in coarse])
    return (field * amplitude_mm / np.sqrt(3.0)).astype(np.float32)


@dataclass(frozen=True)
class Warp:
    """Subject -> template displacement u (mm) on the template lattice: q = p + u(p)."""

    displacement: np.ndarray  # (3, *lattice)
    origin: np.ndarray

    def template_points(self, p: np.ndarray) -> np.ndarray:
        return p + sample_lattice(self.displacement, self.origin, LATTICE_MM, p)

    def subject_points(self, q: np.ndarray, iterations: int = 6) -> np.ndarray:
        """Inverse of `template_points` by fixed-point iteration (the field is smooth and small)."""
        p = q.copy()
        for _ in range(iterations):
            p = q - sample_lattice(self.displacement, self.origin, LATTICE_MM, p)
        return p


def subject_warp(anatomy: TemplateAnatomy, elastic: np.ndarray, ventricle_expansion_mm: float) -> Warp:
    """The elastic field plus ventricle enlargement: pulling samples towards the ventricles widens them."""
    step = int(LATTICE_MM)  # the template's voxels are 1 mm
    pull = anatomy.ventricle_pull[:, ::step, ::step, ::step]
    displacement = elastic.copy()
    sl = tuple(slice(0, n) for n in pull.shape[1:])
    displacement[(slice(None), *sl)] += ventricle_expansion_mm * pull
    return Warp(displacement=displacement, origin=anatomy.origin)


def midsagittal_plane(anatomy: TemplateAnatomy, warp: Warp, pose: Pose) -> dict[str, list[float]]:
    """The template's mirror plane (x = 0) carried into world mm: a point near the brain's centre and a unit normal.

    The pose is affine, so the plane's normal maps by the inverse transpose of its matrix; the warp is smooth and
    small, so its effect is carried by the point alone.
    """
    point = pose.to_world(warp.subject_points(anatomy.centre[:, None]))[:, 0]
    normal = np.linalg.inv(pose.matrix).T @ np.array([1.0, 0.0, 0.0])
    normal /= np.linalg.norm(normal)
    return {"point": [round(float(v), 4) for v in point], "normal": [round(float(v), 6) for v in normal]}
