"""Does each departure from the paper's Stage-2 recipe pay? DEMIST variants on a finished demo's Stage 1 and backbone.

Every variant is the demo's config (`--config`, default the `tiny` preset) with some [demist] keys set back to the
paper's value (or another setting); each trains for the same steps on the demo's training subjects (same Stage 1,
frozen backbone and seed), synthesizes the demo's held-out sessions through `demist synthesize`'s path, and is scored
by `demist evaluate` (PSNR, SSIM, MSE inside the brain; per-lesion lesion-vs-NAWM AUC) beside the reference rows: the
ridge floor, the autoencoder's ceiling D_PSR(E_PSR(y)) and the aligned condition decoded, D_PSR(z_c).
Finished runs are reused when rerun.

    python benchmarks/stage2_recipe.py --demo demo --out /tmp/recipe                   # every variant
    python benchmarks/stage2_recipe.py --demo demo --out /tmp/recipe --variants recipe,paper-init --steps 300
    python benchmarks/stage2_recipe.py --demo demo-2x --config docs/configs/tiny-2x-hint.toml --out /tmp/recipe-2x \
        --variants recipe,input-perturbation
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from pathlib import Path

from demist.config import load_config
from demist.evaluation.evaluate import evaluate_predictions
from demist.inference.batch import synthesize_manifest
from demist.methods import load_synthesizer
from demist.inference.base import REFERENCES
from demist.inference.references import synthesize_references
from demist.training.stage2 import train_demist
from finished_demo import add_demo_arguments, chosen, finished_demo, lesion_auc

#: [demist] keys of each variant, on top of the demo's config (which is "recipe").
VARIANTS = {
    "recipe": {},
    "image-hint": {"controlnet_hint": "latent+image"},
    "subpixel-hint": {"controlnet_hint": "latent+subpixel"},
    "no-output-head": {"controlnet_output_head": False},
    "paper-init": {"controlnet_gate_init": "zero", "zero_init_lr_scale": 1.0},
    "no-lora-wo": {"lora_output_projection": False},
    "edge-term": {"edge_weight": 0.1},
    "ema": {"ema_decay": 0.995},
    "noisy-timesteps": {"timestep_power": 0.5},
    "ema+noisy-timesteps": {"ema_decay": 0.995, "timestep_power": 0.5},
    "input-perturbation": {"input_perturbation": 0.1},
    "finetune-cond": {"finetune_cond_encoder": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_demo_arguments(parser)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=None, help="Stage-2 steps per variant (default: the config's).")
    parser.add_argument("--config", default="tiny", help="The demo's config: tiny or a TOML file (as given to it).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    names = chosen(parser, "--variants", args.variants, VARIANTS)

    base = load_config(args.config)
    demo = finished_demo(args)
    manifest, stage1, backbone = demo.manifest, demo.stage1, demo.backbone()
    train_subjects, test_keys = demo.split()
    predictions = {"ridge": args.demo / "predictions" / "ridge"}
    cpu_minutes: dict[str, float] = {}
    demo_demist = args.demo / "runs" / "demist"
    for name in names:
        cfg = base.replace(demist=dataclasses.replace(base.demist, **VARIANTS[name]))
        run = args.out / "runs" / name
        if name == "recipe" and args.steps is None and (demo_demist / "run.json").exists():
            run = demo_demist  # the demo's own DEMIST is the recipe at the preset's steps
            print(f"recipe: the demo's run {run}")
        elif not (run / "run.json").exists():
            start, cpu = time.perf_counter(), time.process_time()
            train_demist(manifest, stage1, backbone, cfg, run, max_steps=args.steps, device="cpu", resume=True,
                         subjects=train_subjects)
            cpu_minutes[name] = (time.process_time() - cpu) / 60
            print(f"{name}: trained in {(time.perf_counter() - start) / 60:.1f} min wall, {cpu_minutes[name]:.1f} "
                  f"CPU-min; load average {os.getloadavg()[0]:.2f}", flush=True)
        synthesizer = load_synthesizer(run, device="cpu")
        synthesize_manifest(synthesizer, manifest, args.out / "predictions" / name, sessions=test_keys,
                            progress=False)
        predictions[name] = args.out / "predictions" / name
        if name == names[0]:  # the reference rows depend on Stage 1 only
            references = {r: args.out / "predictions" / r for r in REFERENCES}
            synthesize_references(synthesizer, manifest, references, sessions=test_keys)
            predictions.update(references)

    results = evaluate_predictions(manifest, predictions, args.out / "evaluation", psr_range=base.data.psr_range,
                                   ring_mm=base.evaluation.ring_mm, bootstrap=200, sessions=test_keys,
                                   progress=False)
    print(f"\n{len(test_keys)} held-out sessions; inside the brain, PSR/{base.data.psr_range} (data range 1); "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'row':18s} {'PSNR dB':>8s} {'SSIM':>7s} {'MSE':>9s} {'lesion AUC':>10s} {'train CPU-min':>13s}")
    for row, values in results["metrics"].items():
        auc = lesion_auc(results, row)
        print(f"{row:18s} {values['psnr']['mean']:8.2f} {values['ssim']['mean']:7.3f} {values['mse']['mean']:9.5f} "
              f"{auc:10.3f} {cpu_minutes.get(row, float('nan')):13.1f}")


if __name__ == "__main__":
    main()
