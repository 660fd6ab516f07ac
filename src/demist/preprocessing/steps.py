"""The three preprocessing steps, each a call into a maintained library, on nibabel images.

- `bias_correct`: N4 (ANTsPy) inside a head mask;
- `extract_brain`: deepbet's network (weights inside its wheel);
- `register_rigid` + `resample_onto`: ANTsPy rigid registration (Mattes mutual information, the metric for two
  contrasts), applied by scipy so that the output grid is exactly the T1w's.

ANTs works in LPS world coordinates and NIfTI in RAS; `to_ants` and `transform_from_ants` convert at the border, so
everything demist stores is RAS.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from demist.data.nifti import voxel_size
from demist.errors import DemistError
from demist.preprocessing.tools import require

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS ↔ LPS, its own inverse


def to_ants(img: nib.Nifti1Image, data: np.ndarray | None = None):  # -> ants.ANTsImage
    """A NIfTI image (or `data` on its grid) as an ANTs image in LPS world coordinates."""
    ants = require("ants")
    affine = img.affine
    spacing = voxel_size(affine)
    lps = _LPS @ affine
    values = np.asarray(img.dataobj if data is None else data, dtype=np.float32)
    return ants.from_numpy(values, origin=tuple(float(v) for v in lps[:3, 3]),
                           spacing=tuple(float(v) for v in spacing), direction=lps[:3, :3] / spacing)


#: N4's fitting levels (iterations per level). Each level doubles the B-spline mesh: ANTsPy's default of four ends
#: at ~25 mm control spacing on a head, flexible enough to take real low-frequency tissue contrast for bias (it cost
#: 2.5-3 dB of PSR on raw phantom sessions); two end at ~100 mm, as smooth as a 3T receive field
#: (docs/preprocessing.md).
N4_ITERATIONS = (50, 50)


def bias_correct(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """N4 bias-field correction, fitted inside ANTs' head mask; the same grid, header and affine."""
    ants = require("ants")
    image = to_ants(img)
    corrected = ants.n4_bias_field_correction(image, mask=ants.get_mask(image), shrink_factor=4,
                                              convergence={"iters": list(N4_ITERATIONS), "tol": 1e-7})
    return _like(img, corrected.numpy().astype(np.float32))


def extract_brain(t1w: nib.Nifti1Image, device: str = "cpu") -> np.ndarray:
    """deepbet's brain mask of a (bias-corrected, whole-head) T1w, on the T1w's grid (bool)."""
    require("deepbet")
    from deepbet.bet import BrainExtraction

    image = nib.Nifti1Image(np.asarray(t1w.dataobj, dtype=np.float32), t1w.affine, t1w.header)
    try:
        _, mask, _ = BrainExtraction(no_gpu=not str(device).startswith("cuda")).run(image)
    except (AssertionError, ValueError) as exc:  # deepbet asserts on an empty bounding box, numpy on no component
        raise DemistError(f"brain extraction found no brain ({exc or type(exc).__name__}); expected a head T1w") \
            from None
    return np.asarray(mask.dataobj) > 0


def register_rigid(fixed: nib.Nifti1Image, moving: nib.Nifti1Image, fixed_mask: np.ndarray,
                   itk_out: Path | None = None) -> np.ndarray:
    """The rigid 4×4 (RAS mm) taking a world point of `fixed` to the world point of the same anatomy in `moving`,
    fitted by Mattes mutual information inside `fixed_mask` (dilated by 4 voxels to keep the brain's edge). With
    `itk_out`, ANTs' own transform file is kept there too (for antsApplyTransforms)."""
    ants = require("ants")
    mask = ndi.binary_dilation(fixed_mask, iterations=4).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="demist-reg-") as work:
        result = ants.registration(fixed=to_ants(fixed), moving=to_ants(moving), type_of_transform="Rigid",
                                   mask=to_ants(fixed, mask), outprefix=str(Path(work) / "rigid_"))
        path = result["fwdtransforms"][0]
        if itk_out is not None:
            Path(itk_out).write_bytes(Path(path).read_bytes())
        transform = ants.read_transform(path)
        return transform_from_ants(np.asarray(transform.parameters), np.asarray(transform.fixed_parameters))


def transform_from_ants(parameters: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """An ITK affine (3×3 matrix row-major + translation, about `centre`; LPS) as a 4×4 in RAS."""
    matrix = np.asarray(parameters[:9], dtype=float).reshape(3, 3)
    translation = np.asarray(parameters[9:12], dtype=float)
    centre = np.asarray(centre[:3], dtype=float)
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = translation + centre - matrix @ centre
    return _LPS @ lps @ _LPS


def resample_onto(moving: nib.Nifti1Image, fixed: nib.Nifti1Image, fixed_to_moving: np.ndarray,
                  order: int = 3) -> nib.Nifti1Image:
    """`moving` on `fixed`'s grid and affine, through the world transform `fixed_to_moving` (cubic by default;
    negative overshoot is clipped: intensities are magnitudes)."""
    voxel_map = np.linalg.inv(moving.affine) @ fixed_to_moving @ fixed.affine
    data = ndi.affine_transform(np.asarray(moving.dataobj, dtype=np.float32), voxel_map[:3, :3], voxel_map[:3, 3],
                                output_shape=fixed.shape[:3], order=order, mode="constant", cval=0.0)
    return _like(fixed, np.clip(data, 0.0, None).astype(np.float32))


def _like(reference: nib.Nifti1Image, data: np.ndarray) -> nib.Nifti1Image:
    header = reference.header.copy()
    header.set_data_dtype(data.dtype)
    img = nib.Nifti1Image(data, reference.affine, header)
    img.set_sform(reference.affine, code=int(reference.header["sform_code"]) or 1)
    img.set_qform(reference.affine, code=int(reference.header["qform_code"]) or 1)
    return img
