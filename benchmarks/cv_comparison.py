"""The paper's Table 1 on the synthetic cohort: every method, 3 subject-grouped folds, one command.

Generates a 2 mm phantom cohort (or reuses it), writes the shared config below to OUT/config.toml and runs
`demist cv` with it, every trained method at the same CPU budget per fold (--cpu-minutes; each method's steps follow
from its measured cost per step): per fold, Stage 1 (with the embedded prior: the alignment of E_cond) and the
backbone are made once and shared by DEMIST, its ablations and FT-LDM; KL-GAN, VQ-VAE, cWDM, ridge and the
constant predictor train on their own. Every method is synthesized on the fold's held-out subjects through
`demist synthesize`'s path and scored by `demist evaluate`. It is resumable: rerun the same command and finished
steps are skipped, an interrupted one continues from its last checkpoint.
Prints the table (mean ± SD over folds, paired t-tests) and the minutes each step took.

    python benchmarks/cv_comparison.py --out /tmp/demist_cv            # see docs/cv_comparison.md for the time
    python benchmarks/cv_comparison.py --out /tmp/cv_smoke --subjects 6 --max-steps 2 --methods ridge,demist
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from demist.config import load_config
from demist.data.phantom import generate_cohort
from demist.inference.base import MEAN_SAMPLES
from demist.methods import parse_methods
from demist.workflows.cv import run_cv

METHODS = "ridge,klgan,vqvae,ftldm,cwdm,demist,demist-no-controlnet,demist-no-lora,demist-no-crossattn"

# Shared by every method: the tiny preset with DEMIST's recipe; Stage 1 is the alignment of E_cond on the embedded
# prior's autoencoders (the preset's steps, as in the demo) and the backbone is the prior's (--prior none trains both
# per fold with the preset's budgets instead).
BASE = """base = "tiny"
"""

# The same training budget for every trained method: --cpu-minutes per fold, turned into steps with the CPU-seconds
# per step that benchmarks/training_cost.py measured on this kind of machine (2 cores, no AVX-512, load ≈ 2; the
# tiny preset's batch sizes): DEMIST's ablations train with DEMIST's steps (at most its cost per step). The
# closed-form ridge and constant fits take seconds.
BUDGET_CPU_MIN = 8.0
SECONDS_PER_STEP = {"demist": ("demist", 0.96), "ftldm": ("demist", 1.52), "klgan": ("baselines", 4.41),
                    "vqvae": ("baselines", 1.88), "cwdm": ("baselines", 5.41)}
KLGAN_ADV_FRACTION = 0.75  # KL-GAN's adversarial term starts at this fraction of its steps (tiny: 1000 of 1500)


def method_configs(base: Path, minutes: float, methods: str) -> dict:
    """Each iterative method's config: the shared one with its step count for `minutes` CPU-minutes."""
    wanted = set(methods.split(","))
    configs = {}
    for name, (section, seconds) in SECONDS_PER_STEP.items():
        if name in wanted or (name == "demist" and any(m.startswith("demist-") for m in wanted)):
            steps = round(minutes * 60 / seconds)
            keys = {"steps": steps}
            if name == "klgan":
                keys["klgan_adv_start"] = round(KLGAN_ADV_FRACTION * steps)
            configs[name] = load_config(base, overrides={section: keys})
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/demist_cv"))
    parser.add_argument("--subjects", type=int, default=9, help="phantom subjects (sessions: about 1.4 per subject)")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--max-steps", type=int, default=None, help="cap every training stage (smoke runs)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prior", default="embedded", help="embedded, none or a prior directory (see demist cv)")
    parser.add_argument("--cpu-minutes", type=float, default=BUDGET_CPU_MIN,
                        help="training budget of each method per fold, in CPU-minutes")
    parser.add_argument("--mean-samples", type=int, default=MEAN_SAMPLES,
                        help="DEMIST's demist-meanK row averages this many samples (0 or 1: no such row)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")

    cohort = args.out / "cohort"
    if not (cohort / "manifest.csv").exists():
        generate_cohort(cohort, args.subjects, spacing=2.0, seed=args.seed)
    config_file = args.out / "config.toml"
    if not config_file.exists():
        config_file.write_text(BASE)
    configs = method_configs(config_file, args.cpu_minutes, args.methods)
    for name, config in configs.items():
        section = SECONDS_PER_STEP[name][0]
        print(f"{name}: {getattr(config, section).steps} steps ({args.cpu_minutes:g} CPU-minutes per fold)")
    table = run_cv(cohort / "manifest.csv", args.out / "cv", parse_methods(args.methods), load_config(config_file),
                   folds=args.folds, seed=args.seed, max_steps=args.max_steps, device=args.device, prior=args.prior,
                   method_configs=configs, mean_samples=args.mean_samples)

    print(f"\ncommand: python benchmarks/cv_comparison.py --out {args.out} --subjects {args.subjects} "
          f"--folds {args.folds} --methods {args.methods} --prior {args.prior} --cpu-minutes {args.cpu_minutes:g} "
          f"--mean-samples {args.mean_samples}"
          + (f" --max-steps {args.max_steps}" if args.max_steps else ""))
    print(f"config: {config_file}\n")
    print(table.read_text())
    print("minutes per step (summed over folds):")
    totals: dict[str, float] = {}
    for file in sorted((args.out / "cv").glob("fold-*/timings.json")):
        for step, minutes in json.loads(file.read_text()).items():
            totals[step] = totals.get(step, 0.0) + minutes
    for step, minutes in totals.items():
        print(f"  {step:<36} {minutes:6.1f}")
    print(f"  {'total':<36} {sum(totals.values()):6.1f}")


if __name__ == "__main__":
    main()
