"""Do a finished demo's models hold on a cohort they never saw?

A fresh synthetic cohort of another seed (no subject in common with the demo's cohort, nor with the prior's) is
generated on the demo's grid; the demo's DEMIST (one sample), its ridge and the two reference rows (ae-ceiling:
D_PSR(E_PSR(y)); aligned-condition: D_PSR(z_c)) synthesize every session through the batch path, and
`demist evaluate` scores them. Nothing is retrained: this is the demo's generalisation, not a new split.

    python benchmarks/other_cohort.py --demo demo --out /tmp/other [--cohort-seed 77] [--cohort-subjects 8]
    python benchmarks/other_cohort.py --demo demo --out /tmp/other --also subpixel=/tmp/recipe/runs/subpixel-hint

`--also NAME=RUN` scores another DEMIST run (e.g. a `benchmarks/stage2_recipe.py` variant) beside the demo's.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from demist.data.phantom.cohort import generate_cohort
from demist.evaluation.evaluate import evaluate_predictions
from demist.inference.base import REFERENCES
from demist.inference.batch import synthesize_manifest
from demist.inference.references import synthesize_references
from demist.methods import load_synthesizer
from demist.prior import PRIOR_SEED
from finished_demo import add_demo_arguments, finished_demo, lesion_auc

ROWS = ("demist", "ridge", *REFERENCES)  # the rows every run scores; --also adds others


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_demo_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="Folder for the cohort, predictions and evaluation.")
    parser.add_argument("--cohort-seed", type=int, default=77, help="Seed of the new cohort (not the demo's).")
    parser.add_argument("--cohort-subjects", type=int, default=8)
    parser.add_argument("--also", action="append", default=[], metavar="NAME=RUN",
                        help="Another DEMIST run to score beside the demo's (repeatable).")
    args = parser.parse_args()
    if args.cohort_seed in (args.seed, PRIOR_SEED):
        parser.error(f"--cohort-seed {args.cohort_seed}: the demo's or the prior's cohort; expected another seed")
    demo = finished_demo(args)
    also = dict(item.split("=", 1) for item in args.also if "=" in item)
    if len(also) != len(args.also) or any(not name or name in ROWS for name in also):
        parser.error(f"--also {args.also}: expected NAME=RUN, NAME not one of {', '.join(ROWS)}")
    print("load average (1, 5, 15 min) at start: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()), flush=True)
    wall, cpu = time.perf_counter(), time.process_time()

    demist = load_synthesizer(demo.run("demist"), device="cpu")
    manifest = generate_cohort(args.out / "cohort", args.cohort_subjects, demist.config.data.spacing,
                               args.cohort_seed, progress=False)
    runs = {"demist": None, **also, "ridge": demo.run("ridge")}  # None: the demo's DEMIST, already loaded
    rows = {name: args.out / "predictions" / name for name in (*runs, *REFERENCES)}
    for name, run in runs.items():
        synthesizer = demist if run is None else load_synthesizer(run, device="cpu")
        print(f"{name}: {synthesize_manifest(synthesizer, manifest, rows[name], progress=False)}", flush=True)
    references = synthesize_references(demist, manifest, {k: rows[k] for k in REFERENCES})
    for name, summary in references.items():
        print(f"{name}: {summary}", flush=True)
    result = evaluate_predictions(manifest, rows, args.out / "evaluation", psr_range=demist.config.data.psr_range,
                                  bootstrap=1000, progress=False)

    counts = result["counts"]
    print(f"\nCohort seed {args.cohort_seed}: {counts['subjects']} subjects, {counts['sessions']['demist']} sessions, "
          f"{counts['lesions']} lesions of {counts['lesion_subjects']} patients; the demo's models {args.demo}")
    print("| row | PSNR | PSNR, level removed | SSIM | per-lesion AUC |\n|---|---:|---:|---:|---:|")
    for name in rows:
        metrics = result["metrics"][name]
        print(f"| {name} | {metrics['psnr']['mean']:.2f} | {metrics['psnr_centred']['mean']:.2f} | "
              f"{metrics['ssim']['mean']:.4f} | {lesion_auc(result, name):.3f} |")
    print(f"{(time.perf_counter() - wall) / 60:.1f} min wall, {(time.process_time() - cpu) / 60:.1f} CPU-min; "
          "load average (1, 5, 15 min) at end: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
