"""CPU-seconds per training step of each iterative method, so that a comparison can give every method the same CPU
budget (benchmarks/cv_comparison.py takes its step counts from these figures).

Each method trains three times on the same subjects, in a throwaway folder: a warm-up run (imports, caches), then
--short and --long steps; the difference of the process CPU time (and of the wall time) of the last two over the
difference of steps is the cost of a step, set-up and the final checkpoint cancelling out.
DEMIST and FT-LDM need a Stage-1 run and a backbone (a demo's, or a prior's). Run it alone: the load average is
printed with every row.

    python benchmarks/training_cost.py --manifest demo/cohort/manifest.csv --stage1 demo/runs/stage1/stage1 \
        --backbone src/demist/priors/tiny/backbone --subjects 6
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from demist.config import load_config
from demist.data.manifest import load_manifest, subjects_of
from demist.methods import METHODS, TrainJob

ITERATIVE = "demist,ftldm,klgan,vqvae,cwdm"


def timed_training(method, job: TrainJob) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one training run, from scratch."""
    cpu, wall = time.process_time(), time.perf_counter()
    method.train(job)
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--stage1", type=Path, required=True)
    parser.add_argument("--backbone", type=Path, required=True)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--methods", default=ITERATIVE)
    parser.add_argument("--subjects", type=int, default=6, help="train on the first N subjects of the manifest")
    parser.add_argument("--short", type=int, default=10)
    parser.add_argument("--long", type=int, default=40)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    config = load_config(args.config)
    subjects = subjects_of(load_manifest(args.manifest))[:args.subjects]
    print(f"{torch.get_num_threads()} torch threads; steps {args.long} − {args.short}; config {args.config}")
    print("| method | batch | CPU-s / step | wall-s / step | load average |\n|---|---:|---:|---:|---|")
    for name in args.methods.split(","):
        method = METHODS[name]
        runs = []
        for steps in (args.short, args.short, args.long):  # the first one warms up
            out = Path(tempfile.mkdtemp(prefix=f"cost-{name}-"))
            try:
                runs.append(timed_training(method, TrainJob(args.manifest, config, out / "run", stage1=args.stage1,
                                                            backbone=args.backbone, subjects=subjects,
                                                            max_steps=steps, device="cpu")))
            finally:
                shutil.rmtree(out, ignore_errors=True)
        span = args.long - args.short
        cpu, wall = ((b - a) / span for a, b in zip(*runs[1:]))
        batch = config.demist.batch_size if name in ("demist", "ftldm") else config.baselines.batch_size
        load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"| {name} | {batch} | {cpu:.2f} | {wall:.2f} | {load} |", flush=True)


if __name__ == "__main__":
    main()
