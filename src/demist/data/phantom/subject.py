"""Everything drawn once per subject: group, age, disease burden, sessions, head shape, tissue and lesion history.

Each subject draws from its own random streams, seeded by (cohort seed, subject index, purpose), so subject k is
the same whatever the cohort's size, and has the same anatomy, tissue, lesions and head poses at any voxel size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from demist.data.phantom.deformation import (FIELD_LATTICE_MM, elastic_field, lattice_shape, random_head_shape,
                                             smooth_random_field)
from demist.data.phantom.lesions import Lesion, lesion_history
from demist.data.phantom.templates import TemplateAnatomy
from demist.data.phantom.tissue import TissueParameters, draw_tissue_parameters

STREAM_PLAN, STREAM_FIELDS, STREAM_SESSION = 0, 1, 100
#: Every third subject is a healthy control: MS:HC = 2:1 in any prefix of the cohort.
CONTROL_EVERY = 3
SESSION_COUNT_PROBABILITIES = (0.5, 0.35, 0.15)  # 1, 2 or 3 sessions: ~1.65 scans per subject
#: Median and log-spread of the disease burden (expected number of baseline lesions).
BURDEN_MEDIAN, BURDEN_LOG_SD = 20.0, 0.9
#: Smoothness (mm) of the hidden PSR field and of the R1 field unrelated to myelin.
HIDDEN_FIELD_MM, R1_FIELD_MM = 10.0, 12.0


def stream(seed: int, subject_index: int, purpose: int) -> np.random.Generator:
    """An independent random generator for one purpose of one subject."""
    return np.random.default_rng([seed, subject_index, purpose])


def phantom_subject_id(index: int) -> str:
    """The ID of the cohort's `index`-th subject (0-based): sub-001, sub-002, …"""
    return f"sub-{index + 1:03d}"


@dataclass(frozen=True)
class SubjectPlan:
    seed: int
    index: int  # 0-based position in the cohort
    group: str  # "MS" or "HC"
    age: float  # years at the first session
    burden: float  # expected baseline lesion count (0 for controls)
    intervals_years: tuple[float, ...]  # between consecutive sessions
    flair_slice_mm: float  # 1 (3D FLAIR) or 3 (2D FLAIR) for this subject's protocol
    head_shape: np.ndarray  # (3, 3) scale and shear of the head
    elastic_mm: float  # RMS of the elastic anatomical variation
    tissue: TissueParameters
    lesions: tuple[tuple[Lesion, ...], ...]  # per session

    @property
    def subject_id(self) -> str:
        return phantom_subject_id(self.index)

    @property
    def n_sessions(self) -> int:
        return len(self.intervals_years) + 1

    def age_at(self, session: int) -> float:
        return self.age + float(sum(self.intervals_years[:session]))

    def atrophy_at(self, session: int) -> float:
        """0..1: grows with age past 25 and, in MS, with the disease burden and time."""
        age = self.age_at(session)
        index = 0.6 * np.clip((age - 25.0) / 40.0, 0.0, 1.0)
        if self.group == "MS":
            index += 0.4 * (1 - np.exp(-self.burden / 15.0)) + 0.02 * (age - self.age)
        return float(np.clip(index, 0.0, 1.0))


def plan_subject(seed: int, index: int, anatomy: TemplateAnatomy) -> SubjectPlan:
    rng = stream(seed, index, STREAM_PLAN)
    ms = index % CONTROL_EVERY != CONTROL_EVERY - 1
    age = float(np.clip(rng.normal(42.0, 10.0) if ms else rng.normal(38.0, 11.0), 20.0, 65.0))
    burden = float(BURDEN_MEDIAN * np.exp(rng.normal(0.0, BURDEN_LOG_SD))) if ms else 0.0
    n_sessions = 1 + int(rng.choice(3, p=SESSION_COUNT_PROBABILITIES))
    intervals = tuple(float(rng.uniform(0.5, 2.0)) for _ in range(n_sessions - 1))
    flair_slice_mm = 3.0 if rng.uniform() < 0.5 else 1.0
    head_shape = random_head_shape(rng)
    elastic_mm = float(rng.uniform(1.0, 3.0))
    tissue = draw_tissue_parameters(rng, ms, age, burden)
    lesions = lesion_history(rng, anatomy, burden, list(intervals)) if ms else [[] for _ in range(n_sessions)]
    return SubjectPlan(
        seed=seed, index=index, group="MS" if ms else "HC", age=round(age, 1), burden=burden,
        intervals_years=intervals, flair_slice_mm=flair_slice_mm, head_shape=head_shape, elastic_mm=elastic_mm,
        tissue=tissue, lesions=tuple(tuple(s) for s in lesions),
    )


@dataclass(frozen=True)
class SubjectFields:
    """The subject's smooth random fields: elastic warp (3, ...) on the displacement lattice; hidden PSR and R1
    fields (1, ...) on the coarser field lattice."""

    elastic: np.ndarray
    hidden: np.ndarray  # (1, ...)
    r1: np.ndarray  # (1, ...)


def subject_fields(plan: SubjectPlan, anatomy: TemplateAnatomy) -> SubjectFields:
    rng = stream(plan.seed, plan.index, STREAM_FIELDS)
    shape = lattice_shape(anatomy, FIELD_LATTICE_MM)
    return SubjectFields(
        elastic=elastic_field(rng, anatomy, plan.elastic_mm),
        hidden=smooth_random_field(rng, shape, HIDDEN_FIELD_MM / FIELD_LATTICE_MM),
        r1=smooth_random_field(rng, shape, R1_FIELD_MM / FIELD_LATTICE_MM),
    )
