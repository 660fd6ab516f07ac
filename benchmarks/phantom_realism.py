"""How realistic, and how hard, is the synthetic cohort?

Generates a cohort, then prints (1) tissue means by class — PSR, and T1w/FLAIR relative to the session's NAWM —
to compare with the 3T literature, and (2) subject-grouped k-fold cross-validation of two voxelwise baselines
(ridge, histogram gradient boosting) predicting PSR from T1w and FLAIR (each scaled by its 0-99.5th percentiles
within the brain) plus Gaussian-smoothed copies: R² over the brain and inside lesions, PSNR and SSIM of PSR/0.25
(data range 1) inside the brain. A cohort far easier or harder than the reference difficulty is a generator bug.

    python benchmarks/phantom_realism.py --subjects 20 --spacing 2 --seed 0 --out /tmp/cohort
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage.metrics import structural_similarity
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.linear_model import Ridge
from sklearn.model_selection import GroupKFold

from demist.data.manifest import load_manifest
from demist.data.nifti import load_image
from demist.data.phantom import generate_cohort

PSR_RANGE = 0.25
SMOOTHING_MM = (2.0, 4.0)
LABEL_CSF, LABEL_CORTEX, LABEL_DEEP_GM, LABEL_WM = 1, 2, 3, 4


@dataclass
class Session:
    subject: str
    group: str
    spacing: float
    psr: np.ndarray
    t1w: np.ndarray
    flair: np.ndarray
    brain: np.ndarray
    lesion: np.ndarray
    labels: np.ndarray
    psr_noise: float
    affine: np.ndarray
    plane: dict

    def features(self) -> np.ndarray:
        """(n_brain_voxels, 6): scaled T1w, FLAIR and their smoothed copies, inside the brain."""
        channels = []
        for image in (self.t1w, self.flair):
            low, high = np.percentile(image[self.brain], [0.0, 99.5])
            scaled = np.where(self.brain, (image - low) / (high - low), 0.0).astype(np.float32)
            channels += [scaled] + [ndi.gaussian_filter(scaled, mm / self.spacing) for mm in SMOOTHING_MM]
        return np.stack([c[self.brain] for c in channels], axis=1)


def load_sessions(manifest: Path) -> list[Session]:
    import json

    sessions = []
    for record in load_manifest(manifest):
        images = {name: load_image(getattr(record, name), name) for name in
                  ("t1w", "flair", "psr", "brain_mask", "lesion_mask")}
        data = {name: np.asarray(image.dataobj) for name, image in images.items()}
        labels = np.asarray(load_image(record.t1w.parent / "tissue_labels.nii.gz", "labels").dataobj)
        meta = json.loads(record.meta.read_text())
        sessions.append(Session(
            subject=record.subject, group=record.group, spacing=meta["spacing"], psr=data["psr"],
            t1w=data["t1w"], flair=data["flair"], brain=data["brain_mask"] > 0, lesion=data["lesion_mask"] > 0,
            labels=labels, psr_noise=meta["acquisition"]["psr_noise"], affine=images["psr"].affine,
            plane=meta["midsagittal_plane"]))
    return sessions


def mirrored(mask: np.ndarray, affine: np.ndarray, plane: dict) -> np.ndarray:
    """`mask` reflected across the mid-sagittal plane (world mm), on the same grid (nearest voxel)."""
    index = np.argwhere(mask).T.astype(float)
    world = affine[:3, :3] @ index + affine[:3, 3:4]
    point, normal = np.asarray(plane["point"])[:, None], np.asarray(plane["normal"])[:, None]
    world -= 2 * normal * (normal * (world - point)).sum(axis=0)
    target = np.rint(np.linalg.solve(affine[:3, :3], world - affine[:3, 3:4])).astype(int)
    inside = np.all((target >= 0) & (target < np.array(mask.shape)[:, None]), axis=0)
    out = np.zeros_like(mask)
    out[tuple(target[:, inside])] = True
    return out


def tissue_classes(s: Session) -> dict[str, np.ndarray]:
    """Voxel classes of a session. dNAWM is the contralateral mirror of pNAWM (as the evaluation pairs them),
    kept where it is NAWM more than 10 mm from any lesion, so both sit at matching anatomical locations."""
    nawm = (s.labels == LABEL_WM) & ~s.lesion
    classes = {"WM (HC)": nawm if s.group == "HC" else None, "NAWM (MS)": nawm if s.group == "MS" else None,
               "cortical GM": s.labels == LABEL_CORTEX, "deep GM": s.labels == LABEL_DEEP_GM,
               "CSF": s.labels == LABEL_CSF, "lesion": s.lesion if s.lesion.any() else None}
    if s.group == "MS" and s.lesion.any():
        distance = ndi.distance_transform_edt(~s.lesion, sampling=s.spacing)
        proximal = nawm & (distance <= 5.0)
        distal = mirrored(proximal, s.affine, s.plane) & nawm & (distance > 10.0)
        classes["pNAWM (<=5 mm)"] = proximal & mirrored(distal, s.affine, s.plane)  # only voxels with a partner
        classes["dNAWM (mirror)"] = distal
    return {k: v for k, v in classes.items() if v is not None and v.any()}


def tissue_table(sessions: list[Session]) -> str:
    """Mean over sessions of each class's mean PSR, and T1w / FLAIR relative to the session's NAWM."""
    rows: dict[str, list[tuple[float, float, float]]] = {}
    for s in sessions:
        wm = (s.labels == LABEL_WM) & ~s.lesion
        for name, mask in tissue_classes(s).items():
            rows.setdefault(name, []).append((s.psr[mask].mean(), s.t1w[mask].mean() / s.t1w[wm].mean(),
                                              s.flair[mask].mean() / s.flair[wm].mean()))
    lines = [f"{'class':<16} {'sessions':>8} {'PSR':>7} {'± sd':>6} {'T1w/WM':>7} {'FLAIR/WM':>9}"]
    for name, values in rows.items():
        v = np.array(values)
        lines.append(f"{name:<16} {len(v):>8d} {v[:, 0].mean():>7.4f} {v[:, 0].std():>6.4f} "
                     f"{v[:, 1].mean():>7.3f} {v[:, 2].mean():>9.3f}")
    return "\n".join(lines)


def scores(s: Session, predicted: np.ndarray) -> tuple[float, float]:
    """PSNR and SSIM of PSR/0.25 (data range 1) inside the brain; zero outside in both volumes."""
    truth = np.where(s.brain, s.psr / PSR_RANGE, 0.0)
    guess = np.zeros_like(truth)
    guess[s.brain] = predicted / PSR_RANGE
    mse = np.mean((truth[s.brain] - guess[s.brain]) ** 2)
    _, ssim_map = structural_similarity(truth, guess, data_range=1.0, full=True)
    return float(10 * np.log10(1.0 / mse)), float(ssim_map[s.brain].mean())


def r2(truth: np.ndarray, predicted: np.ndarray) -> float:
    return float(1 - np.sum((truth - predicted) ** 2) / np.sum((truth - truth.mean()) ** 2))


def cross_validate(sessions: list[Session], folds: int, fit_voxels: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    features = [s.features() for s in sessions]
    targets = [s.psr[s.brain] for s in sessions]
    in_lesion = [s.lesion[s.brain] for s in sessions]
    groups = np.array([s.subject for s in sessions])
    models = {"ridge": lambda: Ridge(alpha=1e-3),
              "gradient boosting": lambda: HistGradientBoostingRegressor(max_iter=200, random_state=seed)}
    results = {name: {"psnr": [], "ssim": [], "truth": [], "pred": [], "lesion": []} for name in models}
    for train, test in GroupKFold(n_splits=folds).split(np.zeros(len(sessions)), groups=groups):
        x = np.concatenate([features[i] for i in train])
        y = np.concatenate([targets[i] for i in train])
        pick = rng.choice(len(y), size=min(fit_voxels, len(y)), replace=False)
        for name, make in models.items():
            model = make().fit(x[pick], y[pick])
            for i in test:
                predicted = model.predict(features[i])
                psnr, ssim = scores(sessions[i], predicted)
                res = results[name]
                res["psnr"].append(psnr), res["ssim"].append(ssim)
                res["truth"].append(targets[i]), res["pred"].append(predicted), res["lesion"].append(in_lesion[i])
    lines = [f"{'model':<18} {'PSNR dB':>8} {'SSIM':>6} {'R2 brain':>9} {'R2 lesion':>10}"]
    for name, res in results.items():
        truth, pred, lesion = (np.concatenate(res[k]) for k in ("truth", "pred", "lesion"))
        lesion_r2 = r2(truth[lesion], pred[lesion]) if lesion.any() else float("nan")
        lines.append(f"{name:<18} {np.mean(res['psnr']):>8.2f} {np.mean(res['ssim']):>6.3f} "
                     f"{r2(truth, pred):>9.3f} {lesion_r2:>10.3f}")
    cap = np.mean([-20 * np.log10(s.psr_noise / PSR_RANGE) for s in sessions])
    lines.append(f"{'noise cap':<18} {cap:>8.2f}   (PSNR of the true PSR map against its own fit noise)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=20)
    parser.add_argument("--spacing", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="cohort folder (default: a temporary one)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--fit-voxels", type=int, default=200_000, help="training voxels per fold")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "cohort"
        wall, cpu = time.perf_counter(), time.process_time()
        manifest = generate_cohort(out, args.subjects, spacing=args.spacing, seed=args.seed, progress=True)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        sessions = load_sessions(manifest)
        n_ms = sum(s.group == "MS" for s in {s.subject: s for s in sessions}.values())
        print(f"cohort: {args.subjects} subjects ({n_ms} MS, {args.subjects - n_ms} HC), {len(sessions)} sessions, "
              f"{args.spacing:g} mm, seed {args.seed}; generated in {wall:.0f} s ({cpu:.0f} s of CPU)\n")
        print("Tissue means by class (mean over sessions; T1w and FLAIR relative to the session's NAWM)")
        print(tissue_table(sessions))
        print(f"\nSubject-grouped {args.folds}-fold CV, features: T1w, FLAIR + Gaussian copies (sigma "
              f"{', '.join(f'{mm:g}' for mm in SMOOTHING_MM)} mm); {args.fit_voxels} training voxels per fold")
        print(cross_validate(sessions, args.folds, args.fit_voxels, args.seed))


if __name__ == "__main__":
    main()
