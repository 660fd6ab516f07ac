"""Where does DEMIST lose the structure of its condition? Its one-step x0 prediction at each timestep, against z_c.

For each held-out session of a finished demo: z_y = E_PSR(true PSR) and z_c = E_cond(T1w, FLAIR) (whole volume,
through the synthesizer's own windows and tiles); x_t = z_y noised to timestep t with fixed noise; x̂0 = DEMIST's
prediction from (x_t, t, z_c). Printed per timestep: the latent MSE of x̂0 against z_y, and the PSNR of D_PSR(x̂0)
inside the brain, raw and with the session's mean error removed (the per-session offset every method shares,
docs/alignment.md); beside them the same for z_c (the aligned condition) and z_y (the autoencoder's ceiling).

At t = T−1, x_t is nearly pure noise, so x̂0 is what the streams make of z_c alone: a trained DEMIST should be at
least as close to z_y there as z_c itself. About 10 min for 3 sessions on 2 cores.

    python benchmarks/x0_by_timestep.py --demo demo [--run demo/runs/demist] [--timesteps 999,700,300,100]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from demist.data.manifest import load_manifest
from demist.data.preprocess import prepare_session
from demist.methods import load_synthesizer
from finished_demo import add_demo_arguments, finished_demo, psnr_pair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_demo_arguments(parser)
    parser.add_argument("--run", type=Path, default=None, help="A DEMIST run (default: the demo's).")
    parser.add_argument("--timesteps", default="999,900,700,500,300,100")
    args = parser.parse_args()
    demo = finished_demo(args)
    timesteps = [int(t) for t in args.timesteps.split(",") if t]
    synthesizer = load_synthesizer(args.run or demo.run("demist"), device="cpu")
    _, test_keys = demo.split()
    records = [r for r in load_manifest(demo.manifest) if r.key in set(test_keys)]
    start, cpu = time.perf_counter(), time.process_time()
    rows: dict[str, list[tuple[float, float, float]]] = {}
    with torch.no_grad():
        for record in records:
            session = prepare_session(record, synthesizer.config.data, need_target=True)
            condition = torch.from_numpy(session.condition)[None]
            z_c = synthesizer.encode_condition(condition)
            z_y = synthesizer.encode_target(torch.from_numpy(session.psr)[None, None])
            model = synthesizer.denoiser(z_c, synthesizer.image_hint(condition))
            brain = session.brain > 0

            def score(name: str, z: torch.Tensor) -> None:
                decoded = synthesizer.decode(z)[0, 0].numpy()
                rows.setdefault(name, []).append((float(((z - z_y) ** 2).mean()),
                                                  *psnr_pair(decoded, session.psr, brain)))

            score("z_c (aligned condition)", z_c)
            score("z_y (autoencoder ceiling)", z_y)
            generator = torch.Generator().manual_seed(1)
            for t in timesteps:
                noise = torch.randn(z_y.shape, generator=generator)
                t_batch = torch.full((1,), t)
                score(f"x0 from t={t}", model(synthesizer.schedule.add_noise(z_y, noise, t_batch), t_batch))
            print(f"{record.key} done", flush=True)
    print(f"\n{len(records)} held-out sessions; {(time.perf_counter() - start) / 60:.1f} min wall, "
          f"{(time.process_time() - cpu) / 60:.1f} CPU-min, load average {os.getloadavg()[0]:.2f}\n")
    print("| source | latent MSE | PSNR | PSNR, offset removed |\n|---|---:|---:|---:|")
    for name, values in rows.items():
        mse, raw, offset_removed = np.mean(values, axis=0)
        print(f"| {name} | {mse:.4f} | {raw:.2f} | {offset_removed:.2f} |")


if __name__ == "__main__":
    main()
