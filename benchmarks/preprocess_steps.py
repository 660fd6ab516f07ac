"""`demist preprocess` on raw phantom sessions: seconds and peak memory of each step, brain-mask Dice, registration
residuals, and (with --model) the PSR synthesized from the raw input against the PSR from the clean input.

For each spacing it generates a small synthetic cohort with `demist phantom --raw`'s generator, preprocesses every raw
session step by step (N4 of the T1w, deepbet, N4 of the FLAIR, ANTs rigid registration, resampling onto the T1w
grid), and scores the steps against the clean session and the true transform. Peak memory is the process's resident
high-water mark during the step (reset before each step through /proc/self/clear_refs). With --model RUN, the
model synthesizes PSR from the clean session and from the preprocessed raw one (same seed), both scored against the
true PSR inside the clean brain mask.

    python benchmarks/preprocess_steps.py --out /tmp/prep --spacings 1,2 --subjects 2 [--model demo/runs/demist]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.spatial.transform import Rotation

from demist.data.manifest import load_manifest
from demist.data.phantom import add_raw_sessions, generate_cohort
from demist.data.phantom.raw import read_transform
from demist.evaluation.metrics import image_metrics
from demist.preprocessing.session import SessionFiles
from demist.preprocessing.steps import bias_correct, extract_brain, register_rigid, resample_onto

GIB = 1024 ** 3


def peak_reset() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM, the resident high-water mark


def peak_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / GIB
    return float("nan")


def timed(table: dict, step: str, fn, *args):
    peak_reset()
    start = time.perf_counter()
    out = fn(*args)
    table[step] = (time.perf_counter() - start, peak_gib())
    return out


def preprocess_and_score(raw, clean, folder: Path) -> dict:
    steps: dict[str, tuple[float, float]] = {}
    t1w, flair = nib.load(raw.t1w), nib.load(raw.flair)
    t1w_n4 = timed(steps, "N4 T1w", bias_correct, t1w)
    brain = timed(steps, "brain mask", extract_brain, t1w_n4)
    flair_n4 = timed(steps, "N4 FLAIR", bias_correct, flair)
    t1w_to_flair = timed(steps, "rigid registration", register_rigid, t1w_n4, flair_n4, brain)
    flair_on_t1w = timed(steps, "resample FLAIR", resample_onto, flair_n4, t1w_n4, t1w_to_flair)

    truth_mask = np.asarray(nib.load(clean.brain_mask).dataobj) > 0
    dice = 2 * (brain & truth_mask).sum() / (brain.sum() + truth_mask.sum())
    truth = read_transform(Path(raw.t1w).parent / "transform.json")
    estimate = np.linalg.inv(t1w_to_flair)
    points = nib.load(clean.brain_mask).affine @ np.c_[np.argwhere(truth_mask), np.ones(truth_mask.sum())].T
    displacement = np.linalg.norm((estimate @ points - truth @ points)[:3], axis=0)
    rotation = np.degrees(Rotation.from_matrix(estimate[:3, :3] @ truth[:3, :3].T).magnitude())

    files = SessionFiles.in_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(t1w_n4, files.t1w)
    nib.save(flair_on_t1w, files.flair)
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), t1w.affine), files.brain_mask)
    files.transform.write_text(json.dumps({"flair_to_t1w_ras": estimate.tolist()}))
    return {"steps": steps, "dice": float(dice), "rotation_deg": float(rotation),
            "displacement_mm": (float(displacement.mean()), float(displacement.max())), "files": files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--spacings", default="1,2", help="Voxel sizes (mm) of the raw cohorts.")
    parser.add_argument("--subjects", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--model", type=Path, default=None, help="A trained run: also compare PSR from raw and clean.")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs; load average at start {os.getloadavg()[0]:.2f}", flush=True)
    synthesizer = None
    if args.model is not None:
        from demist.methods import load_synthesizer

        synthesizer = load_synthesizer(args.model, device="cpu")
    for spacing in [float(s) for s in args.spacings.split(",") if s]:
        root = args.out / f"{spacing:g}mm"
        if not (root / "raw_manifest.csv").exists():
            generate_cohort(root, args.subjects, spacing=spacing, seed=args.seed, progress=False)
            add_raw_sessions(root, seed=args.seed, progress=False)
        cleans = {r.key: r for r in load_manifest(root / "manifest.csv")}
        print(f"\n## {spacing:g} mm ({len(cleans)} sessions)\n", flush=True)
        print("| session | " + " | ".join(f"{s} s / GiB" for s in
                                         ("N4 T1w", "brain mask", "N4 FLAIR", "rigid registration", "resample FLAIR"))
              + " | Dice | rotation error ° | displacement mean / max mm | PSNR clean → raw (dB) |")
        print("|---" * 10 + "|")
        for raw in load_manifest(root / "raw_manifest.csv"):
            clean = cleans[raw.key]
            result = preprocess_and_score(raw, clean, root / "preprocessed" / raw.subject / raw.session)
            psnr = ""
            if synthesizer is not None:
                psnr = compare_psr(synthesizer, clean, raw, result["files"], root / "psr" / raw.subject / raw.session)
            cells = " | ".join(f"{s:.1f} / {g:.2f}" for s, g in result["steps"].values())
            mean, worst = result["displacement_mm"]
            print(f"| {raw.key} | {cells} | {result['dice']:.3f} | {result['rotation_deg']:.3f} | "
                  f"{mean:.2f} / {worst:.2f} | {psnr} |", flush=True)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


def compare_psr(synthesizer, clean, raw, files: SessionFiles, folder: Path) -> str:
    """PSNR (PSR / psr_range, inside the clean brain mask) of the PSR from the clean and from the raw session."""
    from demist.inference.pipeline import synthesize_files

    folder.mkdir(parents=True, exist_ok=True)
    outputs = {"clean": folder / "from_clean.nii.gz", "raw": folder / "from_raw.nii.gz"}
    inputs = {"clean": (clean.t1w, clean.flair, clean.brain_mask), "raw": (files.t1w, files.flair, files.brain_mask)}
    for name, out in outputs.items():
        if not out.exists():
            t1w, flair, mask = inputs[name]
            synthesize_files(synthesizer, t1w, flair, out, mask=mask, seed=0, progress=False)
    psr_range = synthesizer.config.data.psr_range
    truth = np.asarray(nib.load(clean.psr).dataobj) / psr_range
    brain = np.asarray(nib.load(clean.brain_mask).dataobj) > 0
    scores = {name: image_metrics(np.asarray(nib.load(out).dataobj) / psr_range, truth, brain)["psnr"]
              for name, out in outputs.items()}
    return f"{scores['clean']:.2f} → {scores['raw']:.2f} ({scores['raw'] - scores['clean']:+.2f})"


if __name__ == "__main__":
    main()
