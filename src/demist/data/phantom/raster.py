"""Drawing lesions on the output grid: partial-volume occupancy, core-to-rim levels and the NAWM drop around them.

Each lesion is evaluated only in a box of voxels around it, in template coordinates, so it follows the subject's
warp. Where lesions overlap the union is taken and each level keeps its worst value: they merge into one
confluent lesion.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from demist.data.phantom.deformation import OutputGrid, Pose, Warp
from demist.data.phantom.lesions import Lesion

#: How far (mm) beyond a lesion's edge its drop of NAWM PSR is evaluated, and its decay length.
NAWM_DROP_REACH_MM, NAWM_DROP_DECAY_MM = 12.0, 3.0


@dataclass
class LesionMaps:
    """Per support point: lesion occupancy (0..1) and the levels of the lesion tissue there."""

    occupancy: np.ndarray
    demyelination: np.ndarray
    edema: np.ndarray
    destruction: np.ndarray
    nawm_drop: np.ndarray  # fractional PSR drop of the NAWM part of the voxel
    members: dict[int, np.ndarray] = field(default_factory=dict)  # lesion id -> points it fills at least half

    @classmethod
    def empty(cls, n: int) -> LesionMaps:
        return cls(*(np.zeros(n, np.float32) for _ in range(5)))


def lesion_in_world(lesion: Lesion, pose: Pose, warp: Warp) -> dict[str, list]:
    """Centre, axes and radii of a lesion in world mm (axes and radii through the pose's linear part)."""
    centre = pose.to_world(warp.subject_points(lesion.centre[:, None]))[:, 0]
    mapped = pose.matrix @ lesion.axes.T  # columns: axes scaled by the pose
    lengths = np.linalg.norm(mapped, axis=0)
    return {
        "centre_mm": [round(float(v), 3) for v in centre],
        "radii_mm": [round(float(v), 3) for v in lesion.radii * lengths],
        "axes": [[round(float(v), 5) for v in col] for col in (mapped / lengths).T],
    }


def _points_near(lesion: Lesion, reach_mm: float, grid: OutputGrid, pose: Pose, warp: Warp,
                 lookup: np.ndarray) -> np.ndarray:
    """Support-point indices in the grid box around a lesion (`lookup`: full grid -> support index or -1)."""
    centre = grid.index(pose.to_world(warp.subject_points(lesion.centre[:, None])))[:, 0]
    half = (lesion.radii.max() + reach_mm) * 1.2 / grid.spacing + 2
    lo = np.maximum(np.floor(centre - half).astype(int), 0)
    hi = np.minimum(np.ceil(centre + half).astype(int) + 1, grid.shape)
    if np.any(hi <= lo):
        return np.zeros(0, np.int64)
    box = lookup[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].ravel()
    return box[box >= 0]


def rasterise(lesions: list[Lesion], q: np.ndarray, grid: OutputGrid, pose: Pose, warp: Warp,
              lookup: np.ndarray) -> LesionMaps:
    """Lesion maps at support points whose template coordinates are `q` (3, n)."""
    maps = LesionMaps.empty(q.shape[1])
    voxel_mm = grid.spacing / np.cbrt(abs(np.linalg.det(pose.matrix)))  # a voxel's width in template mm
    for lesion in lesions:
        idx = _points_near(lesion, NAWM_DROP_REACH_MM, grid, pose, warp, lookup)
        if idx.size == 0:
            continue
        scaled = (lesion.axes @ (q[:, idx] - lesion.centre[:, None])) / lesion.radii[:, None]
        r = np.sqrt((scaled**2).sum(axis=0))
        # Distance to the ovoid's surface to first order: (r - 1) / |grad r|, exact on the surface.
        grad = np.sqrt(((scaled / lesion.radii[:, None]) ** 2).sum(axis=0)) / np.maximum(r, 1e-6)
        distance = (r - 1.0) / np.maximum(grad, 1e-6)
        occupancy = np.clip(0.5 - distance / voxel_mm, 0.0, 1.0)
        severity = np.where(occupancy > 0, lesion.rim + (1 - lesion.rim) * (1 - np.minimum(r, 1.0) ** 2), 0.0)
        drop = lesion.nawm_drop * np.exp(-np.maximum(distance, 0.0) / NAWM_DROP_DECAY_MM)
        maps.members[lesion.id] = idx[occupancy >= 0.5]
        for name, values in (("occupancy", occupancy), ("demyelination", lesion.demyelination * severity),
                             ("edema", lesion.edema * severity), ("destruction", lesion.destruction * severity),
                             ("nawm_drop", drop)):
            target = getattr(maps, name)
            target[idx] = np.maximum(target[idx], values)  # box indices are unique: no scatter conflicts
    return maps
