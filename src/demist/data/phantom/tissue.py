"""Tissue properties (PSR, T1, T2, PD) per compartment and voxel, and their partial-volume mix into images.

Four compartments share each voxel: CSF, GM (cortical and deep, blended), normal-appearing WM and lesion. Myelin
sets PSR and part of R1 = 1/T1 (as it does in real tissue), so T1w sees some of the myelin, FLAIR mostly sees
water. What the images cannot see: the hidden smooth PSR field, half of the NAWM drops near lesions and
ventricles, 30 % of a lesion's PSR loss in R1 (the rest is confounded by edema and destruction), and an
independent R1 field (iron, water) that blurs the myelin read-out.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from demist.data.phantom.raster import LesionMaps
from demist.data.phantom.signal import FlairProtocol, MprageProtocol, flair_signal, mprage_signal

#: Share of the NAWM drops (near lesions, near ventricles) that also lowers R1, and share of a lesion's PSR loss
#: that does (myelin debris and lipid-laden macrophages keep some of the lost myelin's R1).
VISIBLE_NAWM_DROP, VISIBLE_LESION_MYELIN_LOSS = 0.5, 0.7
#: Periventricular NAWM loss decays over this distance (mm) from the ventricle wall.
PERIVENTRICULAR_DECAY_MM = 5.0
#: Lesion water and matrix: R1 drop (s⁻¹), T2 rise (ms) and PD rise per unit of edema and of destruction, and the
#: T2 rise per unit of demyelination (myelin water lost to the free pool). Myelin's own R1 share comes on top.
EDEMA_R1, DESTRUCTION_R1 = 0.35, 0.5
EDEMA_T2, DESTRUCTION_T2, DEMYELINATION_T2 = 150.0, 200.0, 30.0
EDEMA_PD, DESTRUCTION_PD = 0.12, 0.15
#: Mean WM depth over the template's WM: tract contrast is relative to it.
WM_DEPTH_REFERENCE = 0.66
#: The cores of the largest tracts (corpus callosum, corticospinal tract) carry up to this much more myelin.
TRACT_CORE_DEPTH, TRACT_CORE_GAIN = 0.85, 0.15


@dataclass(frozen=True)
class TissueParameters:
    """One subject's tissue: PSR levels, R1 = R1_free + myelin_r1 · PSR, T2 (ms), PD, and MS damage."""

    wm_psr: float
    cortex_psr: float
    deep_gm_psr: float
    tract_contrast: float  # PSR ∝ 1 + tract_contrast · (wm_depth − reference): large tracts more myelinated
    diffuse_loss: float  # MS: NAWM-wide fractional PSR loss
    periventricular_loss: float  # MS: extra fractional loss at the ventricle wall
    cortical_loss: float  # MS: GM demyelination the images do not show
    hidden_amplitude: float  # RMS fractional amplitude of the hidden smooth PSR field
    myelin_r1: float  # s⁻¹ per unit PSR
    wm_r1_free: float
    cortex_r1_free: float
    deep_r1_free: float
    r1_field_amplitude: float  # s⁻¹, RMS of the R1 field unrelated to myelin
    csf_t1: float
    wm_t2: float
    cortex_t2: float
    deep_t2: float
    csf_t2: float
    wm_pd: float
    cortex_pd: float
    deep_pd: float
    mprage: MprageProtocol
    flair: FlairProtocol

    def as_dict(self) -> dict:
        return {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else round(float(v), 6))
                for k, v in ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))}


def draw_tissue_parameters(rng: np.random.Generator, ms: bool, age: float, burden: float) -> TissueParameters:
    """Tissue values around the 3T literature (see docs): healthy WM PSR 0.114 ± 0.012, cortex 0.075 ± 0.007."""
    ageing = max(age - 40.0, 0.0) * 0.001  # slow myelin loss after 40
    wm_psr = rng.normal(0.118, 0.010) * (1 - ageing)
    cortex_psr = (0.078 + 0.4 * (wm_psr - 0.118) + rng.normal(0, 0.006)) * (1 - ageing)
    damage = 1 - np.exp(-burden / 15.0) if ms else 0.0
    myelin_r1 = 5.0
    wm_r1 = rng.normal(1.0 / 850.0e-3, 0.04)  # T1 ~ 850 ms
    cortex_r1 = rng.normal(1.0 / 1400.0e-3, 0.03)
    deep_r1 = rng.normal(1.0 / 1150.0e-3, 0.03)
    deep_gm_psr = rng.uniform(0.08, 0.095)
    return TissueParameters(
        wm_psr=float(wm_psr), cortex_psr=float(cortex_psr), deep_gm_psr=float(deep_gm_psr),
        tract_contrast=float(rng.uniform(0.3, 0.5)),
        diffuse_loss=float(rng.uniform(0.2, 1.0) * 0.05 * damage),
        periventricular_loss=float(rng.uniform(0.3, 1.0) * 0.08 * damage),
        cortical_loss=float(rng.uniform(0.0, 0.04) * damage),
        hidden_amplitude=float(rng.uniform(0.03, 0.05)),
        myelin_r1=myelin_r1,
        wm_r1_free=float(wm_r1 - myelin_r1 * wm_psr),
        cortex_r1_free=float(cortex_r1 - myelin_r1 * cortex_psr),
        deep_r1_free=float(deep_r1 - myelin_r1 * deep_gm_psr),
        r1_field_amplitude=float(rng.uniform(0.015, 0.03)),
        csf_t1=float(rng.uniform(4000, 4500)), wm_t2=float(rng.uniform(70, 80)),
        cortex_t2=float(rng.uniform(90, 110)), deep_t2=float(rng.uniform(80, 90)),
        csf_t2=float(rng.uniform(1500, 2000)), wm_pd=float(rng.normal(0.70, 0.01)),
        cortex_pd=float(rng.normal(0.82, 0.01)), deep_pd=float(rng.normal(0.78, 0.01)),
        mprage=MprageProtocol(inversion_efficiency=float(rng.uniform(0.93, 0.98))),
        flair=FlairProtocol(inversion_efficiency=float(rng.uniform(0.90, 0.97))),
    )


@dataclass
class VoxelAnatomy:
    """Per support point: tissue fractions after atrophy and the smooth maps tissue properties depend on."""

    csf: np.ndarray
    gm: np.ndarray
    wm: np.ndarray  # NAWM + lesion
    deep_gm: np.ndarray  # 0..1 share of the GM that is deep
    wm_depth: np.ndarray
    ventricle_distance: np.ndarray  # mm
    hidden_field: np.ndarray  # unit RMS, not seen by T1w or FLAIR
    r1_field: np.ndarray  # unit RMS, seen by T1w only


@dataclass
class CleanImages:
    """Noise-free signals (relative units), PSR and compartment fractions per support point."""

    t1w: np.ndarray
    flair: np.ndarray
    psr: np.ndarray
    fractions: dict[str, np.ndarray]


def _psr_levels(p: TissueParameters, v: VoxelAnatomy, lesions: LesionMaps) -> dict[str, np.ndarray]:
    """PSR of each compartment (true and as R1 sees it), per point."""
    core = np.clip((v.wm_depth - TRACT_CORE_DEPTH) / (1 - TRACT_CORE_DEPTH), 0.0, 1.0)
    tract = 1 + p.tract_contrast * (v.wm_depth - WM_DEPTH_REFERENCE) + TRACT_CORE_GAIN * core
    periventricular = p.periventricular_loss * np.exp(-v.ventricle_distance / PERIVENTRICULAR_DECAY_MM)
    hidden = 1 + p.hidden_amplitude * v.hidden_field
    wm_base = p.wm_psr * tract * (1 - p.diffuse_loss)
    seen_drop = (1 - VISIBLE_NAWM_DROP * periventricular) * (1 - VISIBLE_NAWM_DROP * lesions.nawm_drop)
    nawm = wm_base * (1 - periventricular) * (1 - lesions.nawm_drop) * hidden
    lesion_base = wm_base * (1 - periventricular)
    remaining = (1 - lesions.demyelination) * (1 - 0.15 * lesions.edema) * (1 - 0.2 * lesions.destruction)
    remaining_seen = 1 - VISIBLE_LESION_MYELIN_LOSS * (1 - remaining)
    gm = ((1 - v.deep_gm) * p.cortex_psr * (1 - p.cortical_loss) + v.deep_gm * p.deep_gm_psr) * hidden
    gm_seen = (1 - v.deep_gm) * p.cortex_psr + v.deep_gm * p.deep_gm_psr
    return {"nawm": nawm, "nawm_seen": wm_base * seen_drop, "lesion": lesion_base * hidden * remaining,
            "lesion_seen": lesion_base * remaining_seen, "gm": gm, "gm_seen": gm_seen}


def _t1_ms(r1_per_s: np.ndarray) -> np.ndarray:
    return 1000.0 / np.maximum(r1_per_s, 0.25)  # floor: no tissue relaxes slower than CSF (T1 4 s)


def compose(p: TissueParameters, v: VoxelAnatomy, lesions: LesionMaps) -> CleanImages:
    """Relaxation per compartment, signals by the two sequences, then the partial-volume mix."""
    psr = _psr_levels(p, v, lesions)
    r1_extra = p.r1_field_amplitude * v.r1_field
    deep = v.deep_gm
    ed, de = lesions.edema, lesions.destruction
    gm_r1_free = (1 - deep) * p.cortex_r1_free + deep * p.deep_r1_free
    lesion_r1 = p.wm_r1_free + p.myelin_r1 * psr["lesion_seen"] + r1_extra - EDEMA_R1 * ed - DESTRUCTION_R1 * de
    relax = {  # compartment: (PD, T1 ms, T2 ms)
        "csf": (1.0, p.csf_t1, p.csf_t2),
        "gm": ((1 - deep) * p.cortex_pd + deep * p.deep_pd,
               _t1_ms(gm_r1_free + p.myelin_r1 * psr["gm_seen"] + r1_extra),
               (1 - deep) * p.cortex_t2 + deep * p.deep_t2),
        "nawm": (p.wm_pd, _t1_ms(p.wm_r1_free + p.myelin_r1 * psr["nawm_seen"] + r1_extra),
                 p.wm_t2 * (1 + 0.5 * p.diffuse_loss)),
        "lesion": (p.wm_pd + EDEMA_PD * ed + DESTRUCTION_PD * de, _t1_ms(lesion_r1),
                   p.wm_t2 + EDEMA_T2 * ed + DESTRUCTION_T2 * de + DEMYELINATION_T2 * lesions.demyelination),
    }
    fractions = {"csf": v.csf, "gm": v.gm, "nawm": v.wm * (1 - lesions.occupancy), "lesion": v.wm * lesions.occupancy}
    t1w = sum(fractions[c] * mprage_signal(pd, t1, p.mprage) for c, (pd, t1, _) in relax.items())
    flair = sum(fractions[c] * flair_signal(pd, t1, t2, p.flair) for c, (pd, t1, t2) in relax.items())
    water = {c: fractions[c] * relax[c][0] for c in fractions}  # PSR mixes weighted by free-water PD
    total_water = sum(water.values())
    psr_mix = (water["gm"] * psr["gm"] + water["nawm"] * psr["nawm"] + water["lesion"] * psr["lesion"])
    psr_mix = np.where(total_water > 1e-6, psr_mix / np.maximum(total_water, 1e-6), 0.0)
    return CleanImages(t1w=t1w.astype(np.float32), flair=flair.astype(np.float32),
                       psr=psr_mix.astype(np.float32), fractions=fractions)
