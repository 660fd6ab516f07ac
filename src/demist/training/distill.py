"""`demist train distill`: a few-step student of a trained DEMIST run (trajectory distillation).

The student is a DemistNet like its teacher: the same frozen backbone and a copy of the teacher's streams, of which
it trains the same parts. For a batch of condition patches z_c and noise x_T, the teacher samples with the sampler
and steps it was trained with ([sampling], e.g. DPM-Solver++-10) and its latent is recorded at the student's DDIM
timesteps t_0 > … > t_{N−1} (`distill.student_steps` = N; they must be among the teacher's). Each sample then takes
one student step from a random t_i on the teacher's trajectory, and the loss is the squared distance between where
that DDIM step lands and where the teacher was at t_{i+1} (after the last step: the teacher's x0). This is
progressive distillation (Salimans & Ho, 2022) in one round, with the teacher's own solver as the target over each
interval, so the student copies the sampler that synthesis would otherwise run.

The run is a DEMIST run (stage "demist", the teacher's method) whose config samples with DDIM and N steps, so
`demist synthesize --model STUDENT` uses it as it is; its parents are the teacher's Stage-1 run and backbone and the
teacher itself.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable, Sequence

import torch

from demist.config import Config
from demist.diffusion.samplers import SAMPLERS, timesteps_for
from demist.diffusion.schedule import NoiseSchedule
from demist.errors import DemistError
from demist.models.demist_net import DemistNet
from demist.models.from_runs import DEMIST_STAGE, build_inference_networks, unchanged_parent
from demist.runs import RunInfo, read_run
from demist.training.latent_stage import prepare_latent_stage, write_latent_run
from demist.training.loop import Phase, Stage, seed_everything, train, warmup_cosine
from demist.training.run_output import barrier, data_fingerprint, training_record, weights_metadata
from demist.training.stage2 import stage2_parameter_groups
from demist.training.stage2_parts import TrainableStreams

logger = logging.getLogger(__name__)

STUDENT_SAMPLER = "ddim"  # deterministic and one network call per step: what a few-step student is trained for


def student_timesteps(cfg: Config, schedule: NoiseSchedule) -> tuple[list[int], list[int]]:
    """(the student's DDIM timesteps, the teacher's sampler timesteps); the first must be among the second."""
    teacher = timesteps_for(cfg.sampling.sampler, schedule, cfg.sampling.steps)
    student = timesteps_for(STUDENT_SAMPLER, schedule, cfg.distill.student_steps)
    if not set(student) <= set(teacher):
        fits = [n for n in range(1, len(teacher) + 1)
                if set(timesteps_for(STUDENT_SAMPLER, schedule, n)) <= set(teacher)]
        raise DemistError(f"--student-steps (config key distill.student_steps) {cfg.distill.student_steps}: its "
                          f"DDIM steps visit {student}, not all among the teacher's "
                          f"{cfg.sampling.sampler}-{cfg.sampling.steps} timesteps {teacher}; expected one of {fits}")
    return student, teacher


def teacher_trajectory(teacher: Callable, x_T: torch.Tensor, schedule: NoiseSchedule, cfg: Config,
                       keep: Sequence[int]) -> dict[int, torch.Tensor]:
    """The teacher's latent at each timestep of `keep` on its way from x_T, and its x0 under the key −1."""
    seen: dict[int, torch.Tensor] = {}

    def record(t: int, x: torch.Tensor) -> None:
        if t in keep:
            seen[t] = x

    seen[-1] = SAMPLERS[cfg.sampling.sampler](teacher, x_T, schedule, cfg.sampling.steps, record=record)
    return seen


def distillation_loss(student_prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                      target: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """Squared distance between where the student's DDIM step from (x_t, t) lands and the teacher's latent there;
    `t_next` < 0 marks a last step, which lands on x̂0."""
    x0_hat, eps_hat = schedule.predict_x0_eps(student_prediction, x_t, t)
    landed = schedule.add_noise(x0_hat, eps_hat, t_next.clamp(min=0))
    landed = torch.where((t_next < 0).reshape(-1, *[1] * (x_t.ndim - 1)), x0_hat, landed)
    return ((landed - target.float()) ** 2).mean()


def student_config(teacher: RunInfo, student_steps: int | None, max_steps: int | None) -> Config:
    """The teacher's config with the distillation overrides (the student's [sampling] is set when its run is
    written)."""
    cfg = teacher.config
    if cfg.sampling.start_strength != 1.0:
        raise DemistError(f"--teacher {teacher.path}: samples from a noised z_c (sampling.start_strength "
                          f"{cfg.sampling.start_strength}); expected a teacher that samples from pure noise (1.0)")
    if cfg.sampling.anchor_sigma != 0.0:
        raise DemistError(f"--teacher {teacher.path}: anchors its samples (sampling.anchor_sigma "
                          f"{cfg.sampling.anchor_sigma}); expected a teacher with the plain sampler (0)")
    distill = dataclasses.replace(cfg.distill, **({"student_steps": student_steps} if student_steps else {}),
                                  **({"steps": max_steps} if max_steps is not None else {}))
    return cfg.replace(distill=distill)


@torch.no_grad()
def sample_agreement(student: Callable, teacher: Callable, z_c: torch.Tensor, schedule: NoiseSchedule,
                     cfg: Config, seed: int = 0, student_hint: torch.Tensor | None = None,
                     teacher_hint: torch.Tensor | None = None) -> float:
    """Latent MSE between the student's N-step DDIM samples and the teacher's own samples, from the same noise;
    the hints are each net's `embed_image` of the patches, for nets whose ControlNet also sees the image."""
    generator = torch.Generator().manual_seed(seed)
    x_T = torch.randn(z_c.shape, generator=generator).to(z_c.device)
    ours = SAMPLERS[STUDENT_SAMPLER](lambda x, t: student(x, t, z_c, student_hint), x_T, schedule,
                                     cfg.distill.student_steps)
    theirs = SAMPLERS[cfg.sampling.sampler](lambda x, t: teacher(x, t, z_c, teacher_hint), x_T, schedule,
                                            cfg.sampling.steps)
    return float(((ours - theirs) ** 2).mean())


def train_distill(teacher: str | Path, out: str | Path, manifest: str | Path | None = None,
                  student_steps: int | None = None, max_steps: int | None = None, device: str = "auto",
                  resume: bool = False, tensorboard: bool = False) -> RunInfo | None:
    """Distil the DEMIST run `teacher` into a `distill.student_steps`-step student run in `out`, on the teacher's
    training subjects of `manifest` (default: the manifest the teacher was trained on)."""
    out = Path(out)
    run = read_run(teacher, DEMIST_STAGE, what="--teacher")
    if "cond_autoencoder" in run.components:
        raise DemistError(f"--teacher {run.path}: fine-tuned its condition encoder (demist.finetune_cond_encoder); "
                          "expected a teacher whose z_c is the Stage-1 encoder's")
    cfg = student_config(run, student_steps, max_steps)
    manifest = manifest or run.training.get("manifest")
    if not manifest or not Path(manifest).is_file():
        raise DemistError(f"--manifest: the teacher's training manifest {manifest!r} is not a file; expected the "
                          "manifest to distil on (pass --manifest)")
    student_timesteps(cfg, NoiseSchedule.from_config(cfg.diffusion))  # a bad --student-steps fails before any work
    stage1_run, backbone_run = unchanged_parent(run, "stage1"), unchanged_parent(run, "backbone")
    image_keys = ("cond",) if cfg.demist.uses_image_hint else ()
    data = prepare_latent_stage(manifest, stage1_run, cfg, out, resume, run.training.get("subjects"), device,
                                backbone=backbone_run, batch_size=cfg.distill.batch_size, encode_condition=True,
                                image_keys=image_keys)
    schedule = data.schedule
    student_t, _ = student_timesteps(cfg, schedule)
    landing_t = student_t[1:] + [-1]  # where each student step lands (−1: x0)

    teacher_net = build_inference_networks(run).net  # frozen, its own copy of the backbone
    seed_everything(cfg.train.seed)
    net = DemistNet(data.frozen.unet, cfg.demist, cfg.unet, cfg.autoencoder.latent_channels)
    net.load_trainable_state_dict(run.weights("streams"), source=f"{run.path}/streams.safetensors")
    streams = TrainableStreams(net)

    def loss(m, batch, step, ctx):
        z_c = batch["z_c"].float()
        teacher_net.to(z_c.device)
        hint = teacher_net.embed_image(batch["cond"]) if teacher_net.uses_image else None
        x_T = torch.randn_like(z_c)
        with torch.no_grad():
            path = teacher_trajectory(lambda x, t: teacher_net(x, t, z_c, hint), x_T, schedule, cfg, student_t)
        points = torch.stack([path[s] for s in student_t + [-1]])  # (N + 1, B, …): t_0 … t_{N−1}, then x0
        pick = torch.randint(0, len(student_t), (z_c.shape[0],), device=z_c.device)
        rows = torch.arange(z_c.shape[0], device=z_c.device)
        x_t, target = points[pick, rows], points[pick + 1, rows]
        t = torch.tensor(student_t, device=z_c.device)[pick]
        t_next = torch.tensor(landing_t, device=z_c.device)[pick]
        prediction = m["streams"](x_t, t, z_c, batch.get("cond"))
        term = distillation_loss(prediction, x_t, t, t_next, target, schedule)
        return {"loss": term, "trajectory": term}

    d = cfg.distill
    optimizer = torch.optim.AdamW(stage2_parameter_groups(net, [streams], d.learning_rate, 1.0))
    stage = Stage(name="distill", modules={"streams": streams},
                  phases=[Phase("student", optimizer, loss, warmup_cosine(optimizer, d.steps))],
                  batch=data.sampler.batch, steps=d.steps)
    eval_batches = data.sampler.evaluation_batches()
    z_eval = torch.cat([b["z_c"] for b in eval_batches])
    image_eval = torch.cat([b["cond"] for b in eval_batches]) if net.uses_image else None
    before = _agreement(net, teacher_net, z_eval, image_eval, schedule, cfg)
    logger.info("distill: student %s-%d from the teacher's %s-%d, timesteps %s; %d steps of batch %d",
                STUDENT_SAMPLER, d.student_steps, cfg.sampling.sampler, cfg.sampling.steps, student_t, d.steps,
                d.batch_size)
    result = train(stage, out, cfg.train, device=device, resume=resume, tensorboard=tensorboard,
                   weights_metadata=weights_metadata(cfg, DEMIST_STAGE, data_fingerprint(data.sessions, run)))
    written = None
    if result.is_main_process:
        after = _agreement(net, teacher_net, z_eval, image_eval, schedule, cfg)
        logger.info("distill: latent MSE of the student's %d-step samples to the teacher's, %.4g at the start "
                    "(the teacher's streams), %.4g after", d.student_steps, before, after)
        student = cfg.replace(sampling=dataclasses.replace(cfg.sampling, sampler=STUDENT_SAMPLER,
                                                           steps=d.student_steps))
        training = training_record(result, data.sessions, manifest, run.training.get("subjects"),
                                   teacher_sampler=f"{cfg.sampling.sampler}-{cfg.sampling.steps}",
                                   student_timesteps=student_t)
        written = write_latent_run(out, data, method=run.method, stage=DEMIST_STAGE,
                                   components={"streams": net.trainable_state_dict()}, training=training,
                                   metrics={"sample_mse_to_teacher_before": before,
                                            "sample_mse_to_teacher_after": after},
                                   config=student, parents={"teacher": run})
    barrier()
    return written


def _agreement(net: DemistNet, teacher_net: DemistNet, z_c: torch.Tensor, image: torch.Tensor | None,
               schedule: NoiseSchedule, cfg: Config) -> float:
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device  # after training, wherever the loop put it (a GPU)
    teacher_net.to(device)
    try:
        with torch.no_grad():
            hints = ((None, None) if image is None else
                     (net.embed_image(image.to(device)), teacher_net.embed_image(image.to(device))))
        return sample_agreement(net, teacher_net, z_c.to(device), schedule, cfg, student_hint=hints[0],
                                teacher_hint=hints[1])
    finally:
        net.train(was_training)
