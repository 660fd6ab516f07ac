"""A demo's DEMIST distilled into a few-step student, scored against its teacher on the demo's held-out sessions.

Trains (or resumes) `demist train distill` on the demo's DEMIST run, then synthesizes the held-out sessions with the
student, with the teacher's own sampler and with the teacher at the student's DDIM steps (no distillation), one
sample each with the same seed, and scores them with `demist evaluate`. Prints PSNR, SSIM, per-lesion AUC and seconds
per session, with the training's CPU-minutes and the load average. Run it alone.

    python benchmarks/distill_quality.py --demo demo --out /tmp/distill --student-steps 4
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from demist.data.manifest import load_manifest, select_subjects
from demist.evaluation.evaluate import evaluate_predictions
from demist.inference.batch import synthesize_manifest
from demist.methods import load_synthesizer
from demist.training.distill import train_distill
from demist.workflows.demo import split_subjects


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, required=True, help="a `demist demo` output folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--student-steps", type=int, default=4)
    parser.add_argument("--held-out", type=int, default=3, help="as the demo was run")
    parser.add_argument("--seed", type=int, default=0, help="as the demo was run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    manifest, teacher = args.demo / "cohort" / "manifest.csv", args.demo / "runs" / "demist"
    print(f"load average at start: {os.getloadavg()}")
    wall, cpu = time.perf_counter(), time.process_time()
    student = train_distill(teacher, args.out / "student", student_steps=args.student_steps, device="cpu",
                            resume=True)
    print(f"distillation: {(time.perf_counter() - wall) / 60:.1f} min wall, {(time.process_time() - cpu) / 60:.1f} "
          f"CPU-min (this process); sample MSE to the teacher {student.metrics}")
    _, held_out = split_subjects(manifest, args.held_out, args.seed)
    keys = [r.key for r in select_subjects(load_manifest(manifest), held_out)]
    rows, seconds = {}, {}
    for name, run, options in (("student", student.path, {}), ("teacher", teacher, {}),
                               (f"teacher-ddim{args.student_steps}", teacher,
                                {"sampler": "ddim", "steps": args.student_steps})):
        synthesizer = load_synthesizer(run, device="cpu", **options)
        start = time.perf_counter()
        synthesize_manifest(synthesizer, manifest, args.out / "predictions" / name, samples=1, sessions=keys)
        seconds[name] = (time.perf_counter() - start) / len(keys)
        rows[name] = args.out / "predictions" / name
    result = evaluate_predictions(manifest, rows, args.out / "evaluation", psr_range=student.config.data.psr_range,
                                  sessions=keys, bootstrap=100, progress=False)
    print("| sampler | PSNR | SSIM | per-lesion AUC | s / session |\n|---|---:|---:|---:|---:|")
    for name in rows:
        metrics, auc = result["metrics"][name], result["lesion_contrast"]["auc"][name]["combined"]["auc"]
        print(f"| {name} | {metrics['psnr']['mean']:.2f} | {metrics['ssim']['mean']:.4f} | {auc:.3f} | "
              f"{seconds[name]:.1f} |")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
