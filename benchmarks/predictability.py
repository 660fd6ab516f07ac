"""How much of PSR do T1w and FLAIR determine on this cohort? A nonlinear voxelwise model beside the ridge floor, every
row also scored with each session's level removed, and whether that level can be read from the images at all.

On a finished demo's split (fast: no network is trained):

1. **Gradient boosting** (scikit-learn's `HistGradientBoostingRegressor`) on the ridge's own voxel features, fitted
   on the same training sessions: what a nonlinear map of the same local information reaches. It is a yardstick
   for the deep models here, not a demist method.
2. **Every row of the demo** (DEMIST, its mean of K, ridge, the two reference rows) and the boosting, scored by
   `demist evaluate` (PSNR, SSIM, per-lesion AUC, and `psnr_centred`: the PSNR with each session's mean error inside
   the brain removed), with those mean errors (PSR units). The phantom gives each subject a PSR level that
   percentile-scaled images show only in part, so on 3 held-out sessions the raw PSNR ranks rows largely by how
   they guessed that level (docs/alignment.md).
3. With `--unet-steps N`: **a plain image-space regression network** (MONAI's `BasicUNet`, 1.4 M parameters, 64³
   patches, brain-masked MSE, one-cycle learning rate): what a deep regressor reaches at that CPU budget (1600 steps:
   about 20 minutes on 2 cores with bf16). Also a yardstick, not a demist method.
4. **Is the level predictable?** Over every session of the cohort: the ridge's mean residual inside the brain
   against the session's global image statistics (percentiles 5/50/95 of the scaled T1w and FLAIR inside the
   brain), a ridge regression fitted leaving one subject out. If the residual's spread does not fall, no method
   that sees these images can be expected to guess the level.

    python benchmarks/predictability.py --demo demo --out /tmp/predictability [--unet-steps 1600]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import BasicUNet
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.linear_model import RidgeCV

from demist.baselines.features import feature_matrix
from demist.baselines.ridge import RidgeSynthesizer, sample_rows
from demist.data.manifest import load_manifest
from demist.data.nifti import save_image
from demist.data.patches import PatchSampler, session_tensors
from demist.data.preprocess import PreparedSession, prepare_session, psr_to_native
from demist.devices import bf16_autocast
from demist.evaluation.evaluate import evaluate_predictions
from demist.data.manifest import PREDICTION_NAME
from finished_demo import add_demo_arguments, finished_demo, lesion_auc

#: The demo's rows, in the report's order; rows the demo did not write are skipped.
DEMO_ROWS = ("demist", "demist-mean3", "ridge", "aligned-condition", "ae-ceiling")
#: Voxels drawn per training session for the boosting (the ridge's default draws 200,000 in all).
VOXELS_PER_SESSION = 30_000
#: The regression network's patch (voxels), widths and peak learning rate.
UNET_PATCH, UNET_FEATURES, UNET_LR = 64, (16, 16, 32, 64, 128, 16), 2e-3


def boosted(train: list[PreparedSession], ridge: RidgeSynthesizer, seed: int) -> HistGradientBoostingRegressor:
    """Gradient boosting on the ridge's features of `VOXELS_PER_SESSION` random brain voxels of each session."""
    x, y, _ = sample_rows(train, VOXELS_PER_SESSION, ridge.spec, np.random.default_rng(seed))
    model = HistGradientBoostingRegressor(max_iter=500, learning_rate=0.05, max_leaf_nodes=63, random_state=seed)
    return model.fit(x, y)


def predict_volume(model: HistGradientBoostingRegressor, session: PreparedSession, ridge: RidgeSynthesizer
                   ) -> np.ndarray:
    """The model on every brain voxel of `session` (model grid, PSR / psr_range), zero outside."""
    index = np.flatnonzero(session.brain)
    out = np.zeros(session.brain.size, dtype=np.float32)
    out[index] = model.predict(feature_matrix(session, ridge.spec, index))
    return out.reshape(session.brain.shape)


def regression_unet(train: list[PreparedSession], steps: int, seed: int) -> BasicUNet:
    """A BasicUNet from (T1w, FLAIR) to PSR / psr_range, trained `steps` steps on pairs of random brain patches."""
    torch.manual_seed(seed)
    sampler = PatchSampler(train, (UNET_PATCH,) * 3, batch_size=2, seed=seed)
    net = BasicUNet(spatial_dims=3, in_channels=2, out_channels=1, features=UNET_FEATURES)
    optimizer = torch.optim.AdamW(net.parameters(), lr=UNET_LR, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=UNET_LR, total_steps=steps, pct_start=0.05)
    for step in range(steps):
        batch = sampler.batch(step)
        with bf16_autocast(torch.device("cpu")):
            prediction = net(batch["cond"]).float()
        loss = ((prediction - batch["target"]) ** 2 * batch["brain"]).sum() / batch["brain"].sum().clamp(min=1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"regression UNet step {step + 1}/{steps}: loss {loss.item():.5f}", flush=True)
    return net.eval()


def unet_volume(net: BasicUNet, session: PreparedSession) -> np.ndarray:
    """The network over the whole session in overlapping patches (MONAI's sliding window), zero outside the brain."""
    with torch.no_grad(), bf16_autocast(torch.device("cpu")):
        out = sliding_window_inference(session_tensors(session, need_target=False)["cond"], (UNET_PATCH,) * 3, 2,
                                       net, overlap=0.5, mode="gaussian")
    return out[0, 0].float().numpy() * session.brain


def level_table(sessions: list[PreparedSession], ridge: RidgeSynthesizer) -> None:
    """Leave-one-subject-out: can global image statistics predict each session's mean ridge residual?"""
    residual, stats, subjects = [], [], []
    for session in sessions:
        brain = session.brain
        prediction, _ = ridge.predict(session)
        residual.append(float((session.psr - prediction)[brain].mean()))
        stats.append([*np.percentile(session.t1w[brain], [5, 50, 95]),
                      *np.percentile(session.flair[brain], [5, 50, 95])])
        subjects.append(session.key.split("/")[0])
    y, x, subjects = np.asarray(residual), np.asarray(stats), np.asarray(subjects)
    guess = np.zeros_like(y)
    for subject in np.unique(subjects):
        out = subjects == subject
        guess[out] = RidgeCV(alphas=(1e-4, 1e-3, 1e-2, 1e-1, 1.0)).fit(x[~out], y[~out]).predict(x[out])
    print(f"\nLevel (mean ridge residual inside the brain, PSR / psr_range) over {len(y)} sessions of "
          f"{len(np.unique(subjects))} subjects: RMS {np.sqrt(np.mean(y ** 2)):.4f}; after the leave-one-subject-out "
          f"guess from T1w/FLAIR percentiles 5/50/95: RMS {np.sqrt(np.mean((y - guess) ** 2)):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_demo_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="Folder for the yardsticks' predictions and scores.")
    parser.add_argument("--unet-steps", type=int, default=0, help="Also train the regression UNet this long (0: no).")
    args = parser.parse_args()
    demo = finished_demo(args)
    start, cpu = time.perf_counter(), time.process_time()
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    ridge = RidgeSynthesizer.load(demo.run("ridge"))
    psr_range = ridge.config.data.psr_range
    train_subjects, test_keys = demo.split()
    records = load_manifest(demo.manifest)
    sessions = [prepare_session(r, ridge.config.data) for r in records]
    train = [s for s in sessions if s.key.split("/")[0] in train_subjects]
    test = [s for s in sessions if s.key in test_keys]

    boosting = boosted(train, ridge, args.seed)
    yardsticks = {"gbm": lambda session: predict_volume(boosting, session, ridge)}
    if args.unet_steps > 0:
        unet_cpu = time.process_time()
        net = regression_unet(train, args.unet_steps, args.seed)
        print(f"regression UNet: {(time.process_time() - unet_cpu) / 60:.1f} CPU-min of training, load average "
              f"{os.getloadavg()[0]:.2f}")
        yardsticks["regression-unet"] = lambda session: unet_volume(net, session)
    rows = {name: demo.predictions(name) for name in DEMO_ROWS if demo.predictions(name).is_dir()}
    for name, predict in yardsticks.items():
        rows[name] = args.out / "predictions" / name
        for session in test:
            save_image(psr_to_native(predict(session), session.grid, psr_range),
                       rows[name] / session.key / PREDICTION_NAME)
    result = evaluate_predictions(demo.manifest, rows, args.out / "evaluation", psr_range=psr_range,
                                  sessions=test_keys, bootstrap=100, progress=False)

    truth = {r.key: r for r in records if r.key in test_keys}
    print("| row | PSNR | SSIM | per-lesion AUC | PSNR, level removed | mean error per session (PSR) |\n"
          "|---|---:|---:|---:|---:|---|")
    for name, folder in rows.items():
        errors = []
        for key, record in truth.items():
            brain = np.asarray(nib.load(record.brain_mask).dataobj) > 0.5
            target = np.asarray(nib.load(record.psr).dataobj, dtype=np.float64)
            errors.append(float((np.asarray(nib.load(folder / key / PREDICTION_NAME).dataobj) - target)[brain].mean()))
        metrics, auc = result["metrics"][name], lesion_auc(result, name)
        print(f"| {name} | {metrics['psnr']['mean']:.2f} | {metrics['ssim']['mean']:.4f} | {auc:.3f} | "
              f"{metrics['psnr_centred']['mean']:.2f} | {', '.join(f'{e:+.4f}' for e in errors)} |")

    level_table(sessions, ridge)
    print(f"\n{(time.perf_counter() - start) / 60:.1f} min wall, {(time.process_time() - cpu) / 60:.1f} CPU-min, "
          f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
