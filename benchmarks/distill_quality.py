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

from demist.inference.batch import synthesize_manifest
from demist.methods import load_synthesizer
from demist.runs import read_run
from demist.training.distill import train_distill
from finished_demo import add_demo_arguments, finished_demo, print_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_demo_arguments(parser)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--student-steps", type=int, default=4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    demo = finished_demo(args)
    manifest, teacher = demo.manifest, demo.run("demist")
    print(f"load average at start: {os.getloadavg()}")
    wall, cpu = time.perf_counter(), time.process_time()
    finished = (args.out / "student" / "run.json").is_file()  # a rerun scores the student it trained before
    student = (read_run(args.out / "student", "demist") if finished else
               train_distill(teacher, args.out / "student", student_steps=args.student_steps, device="cpu",
                             resume=(args.out / "student").is_dir()))
    print(f"distillation: {(time.perf_counter() - wall) / 60:.1f} min wall, {(time.process_time() - cpu) / 60:.1f} "
          f"CPU-min (this process); sample MSE to the teacher {student.metrics}")
    _, keys = demo.split()
    rows, seconds = {}, {}
    for name, run, options in (("student", student.path, {}), ("teacher", teacher, {}),
                               (f"teacher-ddim{args.student_steps}", teacher,
                                {"sampler": "ddim", "steps": args.student_steps})):
        synthesizer = load_synthesizer(run, device="cpu", **options)
        start = time.perf_counter()
        synthesize_manifest(synthesizer, manifest, args.out / "predictions" / name, samples=1, sessions=keys)
        seconds[name] = (time.perf_counter() - start) / len(keys)
        rows[name] = args.out / "predictions" / name
    print_scores(demo, rows, args.out / "evaluation", student.config.data.psr_range, keys, seconds, "s / session",
                 first_column="sampler")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
