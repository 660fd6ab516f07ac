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

from demist.inference.batch import synthesize_manifest
from demist.methods import load_synthesizer
from finished_demo import add_demo_arguments, finished_demo, print_scores

WHOLE = (100_000,) * 3  # a tile larger than any latent: `tiling.tiled` runs the UNet once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_demo_arguments(parser)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--no-untiled", action="store_true", help="skip the untiled row")
    args = parser.parse_args()
    demo = finished_demo(args)
    manifest, model = demo.manifest, demo.run("demist")
    print(f"load average at start: {os.getloadavg()}")
    _, keys = demo.split()
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
    print(f"{len(keys)} held-out sessions of {args.demo}; one sample each, seed 0")
    print_scores(demo, rows, args.out / "evaluation", synthesizer.config.data.psr_range, keys, cpu,
                 "CPU-s / session", first_column="path")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
