"""Does `demist synthesize`'s default lose quality against the slow reference path, on a demo's held-out sessions?

Synthesizes the demo's held-out sessions with the demo's DEMIST three ways, one sample each from the same seed, and
scores them with `demist evaluate`:

- default: what `demist synthesize` does (the model's sampler and steps; bf16 where the hardware has it);
- reference: fp32 (`--precision fp32`), DDIM-50, the UNet at its training tile;
- untiled: the default, with the UNet on the whole latent at once (what a GPU with the memory could do) — a check
  of why the UNet keeps its training tile (docs/inference.md).

Prints PSNR, SSIM, per-lesion AUC and CPU-seconds per session, with the load average. Run it alone.

    python benchmarks/inference_reference.py --demo demo --out /tmp/reference
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

from demist.data.manifest import load_manifest, select_subjects
from demist.evaluation.evaluate import evaluate_predictions
from demist.inference.batch import synthesize_manifest
from demist.methods import load_synthesizer
from demist.workflows.demo import split_subjects

WHOLE = (100_000,) * 3  # a tile larger than any latent: `tiling.tiled` runs the UNet once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, required=True, help="a `demist demo` output folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--held-out", type=int, default=3, help="as the demo was run")
    parser.add_argument("--seed", type=int, default=0, help="as the demo was run")
    parser.add_argument("--no-untiled", action="store_true", help="skip the untiled row")
    args = parser.parse_args()
    manifest, model = args.demo / "cohort" / "manifest.csv", args.demo / "runs" / "demist"
    print(f"load average at start: {os.getloadavg()}")
    _, held_out = split_subjects(manifest, args.held_out, args.seed)
    keys = [r.key for r in select_subjects(load_manifest(manifest), held_out)]
    variants = {"default": {}, "reference (fp32, ddim-50)": {"precision": "fp32", "sampler": "ddim", "steps": 50}}
    if not args.no_untiled:
        variants["untiled UNet (default sampler)"] = {"untiled": True}
    rows, cpu = {}, {}
    for name, options in variants.items():
        untiled = options.pop("untiled", False)
        synthesizer = load_synthesizer(model, device="cpu", **options)
        if untiled:
            sampling = dataclasses.replace(synthesizer.config.sampling, tile_size=WHOLE)
            synthesizer.config = synthesizer.config.replace(sampling=sampling)
        start = time.process_time()
        rows[name] = args.out / "predictions" / name.split(" ")[0]
        synthesize_manifest(synthesizer, manifest, rows[name], samples=1, seed=0, sessions=keys)
        cpu[name] = (time.process_time() - start) / len(keys)
    result = evaluate_predictions(manifest, rows, args.out / "evaluation", psr_range=synthesizer.config.data.psr_range,
                                  sessions=keys, bootstrap=100, progress=False)
    print(f"{len(keys)} held-out sessions of {args.demo}; one sample each, seed 0")
    print("| path | PSNR | SSIM | per-lesion AUC | CPU-s / session |\n|---|---:|---:|---:|---:|")
    for name in rows:
        metrics, auc = result["metrics"][name], result["lesion_contrast"]["auc"][name]["combined"]["auc"]
        print(f"| {name} | {metrics['psnr']['mean']:.2f} | {metrics['ssim']['mean']:.4f} | {auc:.3f} | "
              f"{cpu[name]:.0f} |")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
