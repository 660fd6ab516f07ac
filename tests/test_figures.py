"""The image figures: qualitative panel, error map and training-loss curves."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from demist.errors import DemistError
from demist.evaluation.figures import plot_error_map, plot_loss_curves, plot_qualitative


@pytest.fixture
def volumes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A smooth target in [0, 1], a noisy prediction and an ellipsoidal 'brain' mask away from the edges."""
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, 28)] * 3, indexing="ij")
    target = (0.5 + 0.3 * np.sin(3 * x) * np.cos(2 * y) + 0.1 * z).astype(np.float32)
    pred = np.clip(target + rng.normal(0, 0.05, target.shape), 0, 1).astype(np.float32)
    mask = (x / 0.7) ** 2 + (y / 0.6) ** 2 + (z / 0.5) ** 2 <= 1
    return pred, target, mask


def _png_ok(path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_image_figures_write_png_and_refuse_bad_inputs(tmp_path, volumes):
    pred, target, mask = volumes
    psr = target * 0.25
    preds = {"ridge": pred * 0.25, "DEMIST": psr}
    lesion = np.zeros(target.shape, dtype=bool)
    lesion[12:17, 12:16, 13:16] = True
    out = plot_qualitative(target, 1 - target, psr, preds, (14, 14, 14), tmp_path / "q.png", zoom_half_width=6,
                           lesion_mask=lesion)
    assert _png_ok(out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no lesion in view: no outline, and no warning (matplotlib's empty contour)
        assert _png_ok(plot_qualitative(target, 1 - target, psr, preds, (3, 3, 3), tmp_path / "q2.png",
                                        lesion_mask=lesion))
    assert _png_ok(plot_error_map(psr, {"ridge": pred * 0.25}, tmp_path / "e.png", mask=mask))
    log = tmp_path / "metrics.jsonl"
    records = [json.dumps({"step": s, "loss": 1 / (s + 1)}) for s in range(20)]
    # an evaluation record without "loss", then a last line cut short by an interrupted run
    log.write_text("\n".join([*records, '{"step": 20, "val_psnr": 3}', '{"step": 2']))
    assert _png_ok(plot_loss_curves({"stage1": log}, tmp_path / "loss.png", smooth=3))
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(DemistError):
        plot_qualitative(target, target, psr, {}, (99, 0, 0), tmp_path / "bad.png")
    with pytest.raises(DemistError):
        plot_qualitative(target, target, psr, {}, (14, 14, 14), tmp_path / "bad.png", lesion_mask=lesion[:-1])
    with pytest.raises(DemistError):
        plot_loss_curves({"missing": tmp_path / "nope.jsonl"}, tmp_path / "bad.png")


def test_axial_panel_is_the_slice_at_z_with_anterior_up_and_right_to_the_right():
    """Every panel of the figures is `_axial(volume, z)`: the slice at that z, rows along y (anterior up with
    origin="lower"), columns along x (the patient's right on the right of the image in RAS)."""
    from demist.evaluation.figures import _axial

    volume = np.zeros((6, 8, 4), dtype=np.float32)
    volume[5, 7, 2] = 1.0  # the most right, most anterior voxel of slice z = 2
    volume[5, 7, 3] = 2.0  # the same voxel one slice up
    image = _axial(volume, 2)
    assert image.shape == (8, 6)  # rows: y, columns: x
    assert image[7, 5] == 1.0 and image.sum() == 1.0
