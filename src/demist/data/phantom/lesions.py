"""MS lesions: where they sit, what each one does to the tissue, and how they change between sessions.

A lesion is an ovoid in template mm with its own demyelination, edema and tissue-destruction levels (each drawn
independently, worse in the core than at the rim) and its own drop of PSR in the surrounding normal-appearing WM.
Periventricular lesions point away from the ventricle wall (Dawson's fingers), juxtacortical ones are flattened
against the cortex. Overlapping lesions merge into confluent ones when they are drawn on the grid (`raster.py`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from demist.data.phantom.templates import TemplateAnatomy

KIND_PROBABILITIES = {"periventricular": 0.55, "deep": 0.30, "juxtacortical": 0.15}
BLACK_HOLE_PROBABILITY = 0.35
SHADOW_PLAQUE_PROBABILITY = 0.10
#: Core levels drawn uniformly (and independently) within these ranges, per lesion class.
LEVEL_RANGES = {
    "black_hole": {"demyelination": (0.55, 0.85), "destruction": (0.5, 1.0), "edema": (0.0, 0.5)},
    "shadow_plaque": {"demyelination": (0.0, 0.12), "destruction": (0.0, 0.15), "edema": (0.2, 0.5)},
    "t2_lesion": {"demyelination": (0.35, 0.7), "destruction": (0.0, 0.35), "edema": (0.1, 0.7)},
}
RADIUS_RANGE_MM = (1.2, 7.0)
#: Destruction above this makes a lesion a T1 black hole; below these levels a lesion is a shadow plaque.
BLACK_HOLE_DESTRUCTION = 0.5
SHADOW_DEMYELINATION, SHADOW_DESTRUCTION = 0.15, 0.2
#: New lesions per year per unit of disease burden (burden = expected baseline lesion count).
NEW_LESION_RATE = 0.06
MAX_LESIONS = 120


@dataclass(frozen=True)
class Lesion:
    """One lesion at one session. Levels are 0..1 at the core; `rim` is the rim's level relative to the core."""

    id: int
    kind: str
    centre: np.ndarray  # template mm
    axes: np.ndarray  # (3, 3) rows: orthonormal axes (template)
    radii: np.ndarray  # (3,) mm along `axes`
    demyelination: float  # fraction of the local myelin (PSR) lost
    edema: float  # extra free water (longer T1 and T2, more PD)
    destruction: float  # matrix and axon loss (long T1: black holes)
    rim: float
    nawm_drop: float  # fractional PSR drop of the adjacent NAWM at the lesion's edge, decaying exp(-d / 3 mm)
    first_session: int  # 0-based session index at which the lesion first appears

    @property
    def black_hole(self) -> bool:
        return self.destruction >= BLACK_HOLE_DESTRUCTION

    @property
    def shadow_plaque(self) -> bool:
        return self.demyelination < SHADOW_DEMYELINATION and self.destruction < SHADOW_DESTRUCTION


def _frame(direction: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Orthonormal rows whose last row is `direction`, spun randomly about it."""
    n = direction / np.linalg.norm(direction)
    helper = np.eye(3)[np.argmin(np.abs(n))]
    u = np.cross(n, helper)
    u /= np.linalg.norm(u)
    v = np.cross(n, u)
    angle = rng.uniform(0, 2 * np.pi)
    u, v = np.cos(angle) * u + np.sin(angle) * v, -np.sin(angle) * u + np.cos(angle) * v
    return np.stack([u, v, n])


def _random_frame(rng: np.random.Generator) -> np.ndarray:
    return _frame(rng.standard_normal(3), rng)


def _radius(rng: np.random.Generator, median_mm: float) -> float:
    return float(np.clip(median_mm * np.exp(rng.normal(0.0, 0.45)), *RADIUS_RANGE_MM))


def _levels(rng: np.random.Generator, active: bool) -> dict[str, float]:
    """Independent demyelination, edema and destruction levels for a black hole, shadow plaque or T2 lesion."""
    u = rng.uniform()
    if u < BLACK_HOLE_PROBABILITY:
        ranges = LEVEL_RANGES["black_hole"]
    elif u < BLACK_HOLE_PROBABILITY + SHADOW_PLAQUE_PROBABILITY:
        ranges = LEVEL_RANGES["shadow_plaque"]
    else:
        ranges = LEVEL_RANGES["t2_lesion"]
    levels = {name: rng.uniform(*bounds) for name, bounds in ranges.items()}
    if active:  # a new lesion is swollen
        levels["edema"] = rng.uniform(0.6, 1.0)
    return {k: float(v) for k, v in levels.items()}


def draw_lesion(rng: np.random.Generator, anatomy: TemplateAnatomy, lesion_id: int, first_session: int,
                active: bool) -> Lesion:
    """One new lesion: type, place and shape from the template's candidate sites, then its own levels."""
    kind = str(rng.choice(list(KIND_PROBABILITIES), p=list(KIND_PROBABILITIES.values())))
    sites = anatomy.sites
    jitter = rng.uniform(-0.5, 0.5, 3)
    if kind == "periventricular":
        i = rng.integers(len(sites.periventricular))
        centre, axes = sites.periventricular[i] + jitter, _frame(sites.periventricular_normals[i], rng)
        short = _radius(rng, 2.5)  # a finger: long axis 2-3 times the others, out from the ventricle wall
        radii = np.array([short, short * rng.uniform(0.8, 1.0), short * rng.uniform(2.0, 3.0)])
    elif kind == "deep":
        i = rng.integers(len(sites.deep))
        centre, axes = sites.deep[i] + jitter, _random_frame(rng)
        radii = _radius(rng, 3.2) * rng.uniform(0.8, 1.25, 3)
    else:
        i = rng.integers(len(sites.juxtacortical))
        centre, axes = sites.juxtacortical[i] + jitter, _frame(sites.juxtacortical_normals[i], rng)
        r = _radius(rng, 2.4)
        radii = np.array([r, r * rng.uniform(0.8, 1.2), r * rng.uniform(0.5, 0.8)])
    return Lesion(
        id=lesion_id, kind=kind, centre=np.asarray(centre, float), axes=axes,
        radii=np.clip(radii, *RADIUS_RANGE_MM), rim=float(rng.uniform(0.5, 0.85)),
        nawm_drop=float(rng.uniform(0.02, 0.08)), first_session=first_session, **_levels(rng, active),
    )


def evolve(lesion: Lesion, rng: np.random.Generator, years: float) -> Lesion:
    """The same lesion `years` later: edema resolves (the lesion shrinks with it), some lesions remyelinate
    partly (towards shadow plaques), the others lose a little more myelin and matrix."""
    edema = lesion.edema * rng.uniform(0.3, 0.8) ** min(years, 2.0)
    shrink = 1.0 - 0.25 * (lesion.edema - edema)
    if rng.uniform() < 0.3:
        demyelination = lesion.demyelination * rng.uniform(0.4, 0.8)
    else:
        demyelination = min(0.9, lesion.demyelination * rng.uniform(1.0, 1.1))
    destruction = min(1.0, lesion.destruction + rng.uniform(0.0, 0.06) * years)
    return dataclasses.replace(
        lesion, edema=float(edema), demyelination=float(demyelination), destruction=float(destruction),
        radii=np.clip(lesion.radii * shrink, *RADIUS_RANGE_MM),
    )


def lesion_history(rng: np.random.Generator, anatomy: TemplateAnatomy, burden: float,
                   intervals_years: list[float]) -> list[list[Lesion]]:
    """The lesions present at each session: 1 + Poisson(burden) at baseline (10 % of them active), then each
    interval evolves the old ones and adds Poisson(NEW_LESION_RATE · burden · years) new, active ones."""
    count = min(1 + int(rng.poisson(burden)), MAX_LESIONS)
    lesions = [draw_lesion(rng, anatomy, i + 1, 0, active=rng.uniform() < 0.1) for i in range(count)]
    sessions = [lesions]
    for session, years in enumerate(intervals_years, start=1):
        lesions = [evolve(les, rng, years) for les in lesions]
        new = min(int(rng.poisson(NEW_LESION_RATE * burden * years)), MAX_LESIONS - len(lesions))
        next_id = max((les.id for les in lesions), default=0) + 1
        lesions += [draw_lesion(rng, anatomy, next_id + i, session, active=True) for i in range(new)]
        sessions.append(lesions)
    return sessions
