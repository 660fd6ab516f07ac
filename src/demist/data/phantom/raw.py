"""Raw sessions, as a scanner gives them, made from clean phantom sessions so that every preprocessing step can be
scored against a known answer.

Per clean session (skull-stripped T1w and FLAIR on one grid) the raw session has:
- a head around the brain: subarachnoid CSF, the skull's two tables around its marrow, muscle and scalp fat (a layered
  model whose thickness varies smoothly over the head), in both contrasts, with noise in the air around it;
- a smooth multiplicative bias field of its own in each contrast (on top of the clean session's);
- the FLAIR moved by a known rigid transform (3–6°, 3–6 mm) and sampled onto its own grid with thick slices.

The T1w keeps the clean session's grid and affine, so the clean brain mask, PSR and lesion mask stay valid for it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi
from scipy.spatial.transform import Rotation

from demist.atomic import atomic_write
from demist.data.nifti import scanner_image, voxel_size

#: Layers outward from the brain's edge: (outer edge in mm, T1w, FLAIR), intensities relative to white matter.
HEAD_LAYERS = (
    (2.5, 0.20, 0.12),   # subarachnoid CSF (dark in both: FLAIR nulls free water)
    (4.5, 0.06, 0.04),   # inner table of the skull
    (7.5, 0.85, 0.55),   # diploë (fatty marrow)
    (9.0, 0.06, 0.04),   # outer table
    (12.0, 0.55, 0.50),  # muscle and galea
    (16.0, 1.35, 0.85),  # subcutaneous fat and skin
)
LAYER_EDGE_MM = 1.0  # width of the partial-volume ramp between layers
THICKNESS_JITTER_MM = 1.5  # smooth variation of the distance at which each layer starts
BIAS_PEAK = 0.2  # the raw bias field spans 1 ± this over the head
ROTATION_DEG = (3.0, 6.0)
TRANSLATION_MM = (3.0, 6.0)
SNR_T1W, SNR_FLAIR = 30.0, 18.0  # noise of the air and the head, relative to white matter


@dataclass
class RawSession:
    t1w: nib.Nifti1Image
    flair: nib.Nifti1Image
    flair_to_t1w: np.ndarray  # 4×4, world (RAS mm) of the raw FLAIR → world of the T1w
    rotation_deg: float
    translation_mm: float


def flair_slice_factor(spacing: float) -> int:
    """Thick FLAIR slices: 3 mm at 1 mm voxels, 4 mm at 2 mm."""
    return 3 if spacing < 1.5 else 2


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], cells: int = 5) -> np.ndarray:
    """A smooth random field over the whole grid, in [-1, 1] (cubic zoom of a few random lattice values)."""
    coarse = rng.standard_normal((cells, cells, cells))
    field = ndi.zoom(coarse, [s / cells for s in shape], order=3, mode="nearest")[tuple(slice(0, s) for s in shape)]
    field -= field.mean()
    return (field / np.abs(field).max()).astype(np.float32)


def _head(distance_mm: np.ndarray, column: int) -> np.ndarray:
    """Intensity (relative to WM) of the layered head at each distance from the brain's edge (0 inside)."""
    points, values = [0.0], [HEAD_LAYERS[0][column]]
    for (edge, *levels), following in zip(HEAD_LAYERS, [*HEAD_LAYERS[1:], (None, 0.0, 0.0)]):
        points += [edge - LAYER_EDGE_MM / 2, edge + LAYER_EDGE_MM / 2]
        values += [levels[column - 1], following[column]]
    return np.interp(distance_mm, points, values).astype(np.float32)


def _rician(rng: np.random.Generator, signal: np.ndarray, sigma: float) -> np.ndarray:
    real = signal + rng.normal(0.0, sigma, signal.shape)
    return np.sqrt(real ** 2 + rng.normal(0.0, sigma, signal.shape) ** 2).astype(np.float32)


def random_rigid(rng: np.random.Generator, centre_mm: np.ndarray) -> tuple[np.ndarray, float, float]:
    """A rigid 4×4 (a rotation about `centre_mm` and a shift), with its rotation angle (°) and shift length (mm)."""
    axis = rng.standard_normal(3)
    angle = rng.uniform(*ROTATION_DEG)
    rotation = Rotation.from_rotvec(np.deg2rad(angle) * axis / np.linalg.norm(axis)).as_matrix()
    direction = rng.standard_normal(3)
    shift = rng.uniform(*TRANSLATION_MM) * direction / np.linalg.norm(direction)
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = centre_mm - rotation @ centre_mm + shift
    return matrix, float(angle), float(np.linalg.norm(shift))


def _resample_thick(volume: np.ndarray, affine: np.ndarray, out_affine: np.ndarray, out_shape: tuple[int, ...],
                    flair_to_t1w: np.ndarray, factor: int) -> np.ndarray:
    """`volume` (on `affine`) seen through `flair_to_t1w` on a grid of thick slices: each output slice is the mean
    of `factor` thin slices across its thickness."""
    thin_shape = (*out_shape[:2], out_shape[2] * factor)
    thin_affine = out_affine @ np.diag([1.0, 1.0, 1.0 / factor, 1.0])
    thin_affine[:3, 3] = out_affine[:3, 3] - out_affine[:3, 2] * (factor - 1) / (2 * factor)
    to_source = np.linalg.inv(affine) @ flair_to_t1w @ thin_affine
    thin = ndi.affine_transform(volume, to_source[:3, :3], to_source[:3, 3], output_shape=thin_shape, order=1,
                                mode="constant", cval=0.0)
    return thin.reshape(*out_shape[:2], out_shape[2], factor).mean(axis=3).astype(np.float32)


def make_raw_session(t1w: nib.Nifti1Image, flair: nib.Nifti1Image, brain: np.ndarray, wm: np.ndarray,
                     rng: np.random.Generator) -> RawSession:
    """A raw session from a clean one (T1w and FLAIR on the same grid, brain and white-matter masks)."""
    affine = t1w.affine
    spacing = voxel_size(affine)
    shape = t1w.shape
    brain = brain > 0
    distance = ndi.distance_transform_edt(~brain, sampling=spacing).astype(np.float32)
    distance += THICKNESS_JITTER_MM * _smooth_field(rng, shape) * (distance > 0)
    inside = ndi.gaussian_filter(brain.astype(np.float32), 0.5)  # partial volume at the brain's edge
    outside = 1.0 - inside

    def with_head(clean: np.ndarray, column: int, snr: float) -> np.ndarray:
        reference = float(np.median(clean[wm > 0]))
        head = _rician(rng, _head(distance, column) * reference, reference / snr)
        bias = np.exp(np.log1p(BIAS_PEAK) * _smooth_field(rng, shape))
        return ((inside * clean + outside * head) * bias).astype(np.float32)

    raw_t1w = with_head(np.asarray(t1w.dataobj, np.float32), 1, SNR_T1W)
    flair_on_t1w = with_head(np.asarray(flair.dataobj, np.float32), 2, SNR_FLAIR)

    centre = (affine @ np.append(np.argwhere(brain).mean(axis=0), 1.0))[:3]
    flair_to_t1w, angle, shift = random_rigid(rng, centre)
    factor = flair_slice_factor(float(spacing.min()))
    out_affine = affine @ np.diag([1.0, 1.0, factor, 1.0])
    out_affine[:3, 3] = affine[:3, 3] + affine[:3, 2] * (factor - 1) / 2  # the thick slices cover the same field
    out_shape = (shape[0], shape[1], int(np.ceil(shape[2] / factor)))
    raw_flair = _resample_thick(flair_on_t1w, affine, out_affine, out_shape, flair_to_t1w, factor)
    return RawSession(scanner_image(raw_t1w, affine), scanner_image(raw_flair, out_affine), flair_to_t1w, angle,
                      shift)


def transform_record(raw: RawSession) -> dict:
    """What `transform.json` holds: the true FLAIR → T1w transform that registration has to recover."""
    return {"flair_to_t1w_ras": [[round(float(v), 6) for v in row] for row in raw.flair_to_t1w],
            "rotation_deg": round(raw.rotation_deg, 4), "translation_mm": round(raw.translation_mm, 4),
            "convention": "world (RAS mm) point of the raw FLAIR -> world point of the same anatomy in the T1w"}


def read_transform(path: str | Path) -> np.ndarray:
    """The 4×4 FLAIR → T1w transform of a raw phantom session's `transform.json`."""
    return np.array(json.loads(Path(path).read_text())["flair_to_t1w_ras"], dtype=float)


RAW_FOLDER = "raw"  # inside each clean session's folder
RAW_MANIFEST = "raw_manifest.csv"


def add_raw_sessions(cohort_dir: Path, seed: int, progress: bool = True) -> Path:
    """For each session of a generated cohort, write `raw/{t1w,flair}.nii.gz` and `raw/transform.json` beside it,
    and `raw_manifest.csv`: the raw images with the clean session's PSR and masks (valid on the raw T1w's grid)."""
    from tqdm.auto import tqdm

    from demist.data.manifest import MANIFEST_NAME, load_manifest, write_manifest
    from demist.data.nifti import save_image

    cohort_dir = Path(cohort_dir).resolve()
    records = load_manifest(cohort_dir / MANIFEST_NAME, require=("t1w", "flair", "brain_mask", "wm_mask"))
    rows = []
    for number, record in enumerate(tqdm(records, desc="raw sessions", unit="session", disable=not progress)):
        rng = np.random.default_rng([seed, number, 0x5A])  # independent of the clean cohort's own draws
        raw = make_raw_session(nib.load(record.t1w), nib.load(record.flair),
                               np.asarray(nib.load(record.brain_mask).dataobj) > 0,
                               np.asarray(nib.load(record.wm_mask).dataobj) > 0, rng)
        folder = Path(record.t1w).parent / RAW_FOLDER
        folder.mkdir(exist_ok=True)
        save_image(raw.t1w, folder / "t1w.nii.gz")
        save_image(raw.flair, folder / "flair.nii.gz")
        atomic_write(folder / "transform.json", json.dumps(transform_record(raw), indent=1) + "\n")
        relative = lambda p: str(Path(p).relative_to(cohort_dir)) if p else ""  # noqa: E731
        rows.append({"subject": record.subject, "session": record.session, "group": record.group,
                     "t1w": relative(folder / "t1w.nii.gz"), "flair": relative(folder / "flair.nii.gz"),
                     "psr": relative(record.psr), "brain_mask": relative(record.brain_mask),
                     "lesion_mask": relative(record.lesion_mask), "wm_mask": relative(record.wm_mask),
                     "meta": relative(record.meta)})
    return write_manifest(cohort_dir / RAW_MANIFEST, rows)
