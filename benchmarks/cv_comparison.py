"""The paper's Table 1 on the synthetic cohort: every method, 3 subject-grouped folds, one command.

Generates a 2 mm phantom cohort (or reuses it), writes the budget config below to OUT/config.toml and runs
`demist cv` with it: per fold, Stage 1 and the backbone are trained once and shared by DEMIST, its ablations and
FT-LDM; KL-GAN, VQ-VAE, cWDM, ridge and the constant predictor train on their own. Every method is synthesized on
the fold's held-out subjects through `demist synthesize`'s path and scored by `demist evaluate`. It is resumable:
rerun the same command and finished steps are skipped, an interrupted one continues from its last checkpoint.
Prints the table (mean ± SD over folds, paired t-tests) and the minutes each step took.

    python benchmarks/cv_comparison.py --out /tmp/demist_cv            # about 90 min on 2 CPU cores
    python benchmarks/cv_comparison.py --out /tmp/cv_smoke --subjects 6 --max-steps 2 --methods ridge,demist
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from demist.config import load_config
from demist.methods import parse_methods
from demist.workflows.cv import run_cv
from demist.data.phantom import generate_cohort

METHODS = "ridge,klgan,vqvae,ftldm,cwdm,demist,demist-no-controlnet,demist-no-lora,demist-no-crossattn"

# A few CPU-minutes per method and fold. Stage 1 keeps most of its tiny budget (the latent everything else lives in);
# the diffusion stages and the baselines get short, equal-footing budgets.
BUDGET = """base = "tiny"

[stage1]
steps = 2000
cond_steps = 600
adv_start = 1800

[align]
steps = 200

[backbone]
steps = 400

[demist]
steps = 100

[baselines]
steps = 200
batch_size = 1
klgan_adv_start = 150

[sampling]
steps = 10
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/demist_cv"))
    parser.add_argument("--subjects", type=int, default=9, help="phantom subjects (sessions: about 1.4 per subject)")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--max-steps", type=int, default=None, help="cap every training stage (smoke runs)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")

    cohort = args.out / "cohort"
    if not (cohort / "manifest.csv").exists():
        generate_cohort(cohort, args.subjects, spacing=2.0, seed=args.seed)
    config_file = args.out / "config.toml"
    if not config_file.exists():
        config_file.write_text(BUDGET)
    table = run_cv(cohort / "manifest.csv", args.out / "cv", parse_methods(args.methods), load_config(config_file),
                   folds=args.folds, seed=args.seed, max_steps=args.max_steps, device=args.device)

    print(f"\ncommand: python benchmarks/cv_comparison.py --out {args.out} --subjects {args.subjects} "
          f"--folds {args.folds} --methods {args.methods}" + (f" --max-steps {args.max_steps}" if args.max_steps else ""))
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
