"""Reading and writing NIfTI volumes, with the checks a user's file deserves.

Every loader error names the file and what is wrong with it in one line. Every writer goes through a temporary
file in the destination folder and an atomic rename, so an interrupted run never leaves half a volume behind.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from demist.atomic import atomic_path
from demist.errors import DemistError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _describe(path: Path, what: str) -> str:
    return f"{what} image {path}"


def load_image(path: str | Path, what: str = "input") -> nib.Nifti1Image:
    """Load a 3D NIfTI image and check it is usable.

    Checks: the file exists and is readable, it is NIfTI (not truncated), it is 3D (a trailing singleton 4th
    dimension is squeezed), its affine is invertible and every voxel is finite. The data are loaded eagerly so
    truncation errors surface here, not later.
    """
    path = Path(path)
    label = _describe(path, what)
    if not path.exists():
        raise DemistError(f"{label}: file not found")
    if path.is_dir():
        raise DemistError(f"{label}: is a directory; expected a .nii or .nii.gz file")
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise DemistError(f"{label}: not a NIfTI file name; expected a .nii or .nii.gz file")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except PermissionError:
        raise DemistError(f"{label}: not readable (permission denied)") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DemistError(f"{label}: truncated or corrupt gzip stream ({exc})") from None
    except (nib.filebasedimages.ImageFileError, ValueError, OSError) as exc:
        raise DemistError(f"{label}: not a readable NIfTI file ({exc})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DemistError(f"{label}: is {type(img).__name__}; expected NIfTI-1 or NIfTI-2")
    return _checked(img, data, label)


def check_image(img: object, what: str) -> nib.Nifti1Image:
    """An image handed over in memory (the Python API), checked as `load_image` checks a file."""
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DemistError(f"{what} image: got {type(img).__name__}; expected a nibabel Nifti1Image, e.g. "
                          "nib.load(path)")
    return _checked(img, np.asanyarray(img.dataobj), f"{what} image")


def _checked(img: nib.Nifti1Image | nib.Nifti2Image, data: np.ndarray, label: str) -> nib.Nifti1Image:
    """The checks of a 3D volume: shape, affine, finite voxels; a trailing singleton 4th dimension is squeezed."""
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DemistError(f"{label}: has {data.ndim} dimensions {tuple(data.shape)}; expected a 3D volume")
    if min(data.shape) < 2:
        raise DemistError(f"{label}: shape {tuple(data.shape)} is not a volume; expected at least 2 voxels per axis")
    affine = img.affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-8:
        raise DemistError(f"{label}: its affine is singular or not finite; expected a valid voxel-to-world affine")
    if not (np.issubdtype(data.dtype, np.floating) or np.issubdtype(data.dtype, np.integer)
            or data.dtype == np.bool_):
        raise DemistError(f"{label}: voxels of type {data.dtype}; expected real intensities (an integer or float "
                          "type), e.g. the magnitude image, not a complex or RGB one")
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        raise DemistError(f"{label}: {bad} voxels are NaN or infinite; expected finite values")
    # Keep the header (qform/sform and their codes) but drop any scaling: `data` is already scaled.
    header = img.header.copy()
    header.set_data_shape(data.shape)
    header.set_data_dtype(data.dtype)
    header.set_slope_inter(None, None)
    return nib.Nifti1Image(np.asarray(data), affine, header)


def load_mask(path: str | Path, what: str = "mask") -> nib.Nifti1Image:
    """Load a binary mask (any voxel > 0.5 is inside) and refuse an empty one."""
    return _binary_mask(load_image(path, what), _describe(Path(path), what))


def check_mask(img: object, what: str) -> nib.Nifti1Image:
    """A mask handed over in memory (the Python API), checked and binarized as `load_mask` does a file."""
    return _binary_mask(check_image(img, what), f"{what} image")


def _binary_mask(img: nib.Nifti1Image, label: str) -> nib.Nifti1Image:
    data = np.asarray(img.dataobj) > 0.5
    if not data.any():
        raise DemistError(f"{label}: the mask is empty; expected at least one voxel > 0.5")
    header = img.header.copy()
    header.set_data_dtype(np.uint8)
    return nib.Nifti1Image(data.astype(np.uint8), img.affine, header)


def save_image(img: nib.Nifti1Image, path: str | Path, overwrite: bool = True) -> Path:
    """Write `img` to `path` atomically (temporary file + rename), byte-for-byte reproducible.

    Gzip output carries no timestamp, so the same image always gives the same bytes.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise DemistError(f"output {path}: already exists; pass --overwrite to replace it")
    raw = (img if isinstance(img, nib.Nifti1Image) else nib.Nifti1Image.from_image(img)).to_bytes()
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        if path.name.endswith(".gz"):
            with gzip.GzipFile(fileobj=fh, mode="wb", mtime=0, filename="", compresslevel=4) as gz:
                gz.write(raw)
        else:
            fh.write(raw)
    return path


def voxel_size(affine: np.ndarray) -> np.ndarray:
    """Voxel edge lengths in mm along each array axis of an image with this affine."""
    return np.asarray(nib.affines.voxel_sizes(np.asarray(affine)), dtype=np.float64)


def scanner_image(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """A NIfTI image whose sform and qform both say scanner coordinates (code 1), in millimetres."""
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm")
    return img
