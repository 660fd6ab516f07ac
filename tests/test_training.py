"""The training loop: checkpoints, exact resume after SIGKILL, 2-process gloo, GAN phases, EMA, patches."""

from __future__ import annotations

import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import brain_session
from demist.config_sections import TrainConfig
from demist.data.patches import PatchSampler
from demist.errors import DemistError
from demist.runs import load_weights
from demist.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from demist.training.ema import ParameterEMA
from demist.training.loop import Phase, Stage, train

PYTHON = sys.executable
REPO = Path(__file__).resolve().parents[1]

# A toy stage in its own script, so runs can be killed and launched with accelerate. Its loss draws from the
# global RNG (noise on the input), so an exact resume also needs the loop's per-step reseeding.
TOY_SCRIPT = textwrap.dedent('''
    import argparse, os, signal, torch
    from demist.config_sections import TrainConfig
    from demist.runs import save_weights
    from demist.training.loop import Phase, Stage, seed_everything, train, warmup_cosine

    parser = argparse.ArgumentParser()
    parser.add_argument("--out"); parser.add_argument("--steps", type=int)
    parser.add_argument("--crash-at", type=int, default=-1)
    parser.add_argument("--accumulation", type=int, default=1); parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seed_everything(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv3d(4, 1, 1))
    weight = torch.arange(2.0).view(1, 2, 1, 1, 1)

    def batch(step, shard):
        g = torch.Generator().manual_seed(1000 * step + shard)
        x = torch.rand(2, 2, 6, 6, 6, generator=g)
        return {"x": x, "y": (x * weight).sum(1, keepdim=True)}

    def loss(m, b, step, ctx):
        if step == args.crash_at:
            os.kill(os.getpid(), signal.SIGKILL)
        pred = m["net"](b["x"] + 0.05 * torch.randn_like(b["x"]))
        return {"loss": ((pred - b["y"]) ** 2).mean()}

    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    stage = Stage("toy", {"net": net}, [Phase("net", opt, loss, warmup_cosine(opt, args.steps))], batch, args.steps)
    cfg = TrainConfig(seed=0, mixed_precision="no", gradient_accumulation=args.accumulation, checkpoint_every=2,
                      log_every=1)
    result = train(stage, args.out, cfg, device="cpu", resume=args.resume, weights_metadata={"config": "toy"})
    rank = int(os.environ.get("RANK", "0"))
    save_weights(os.path.join(args.out, f"final-rank{rank}.safetensors"), net.state_dict(),
                 {"processes": str(result.processes)})
''')


@pytest.fixture(scope="module")
def toy_script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("toy") / "toy_train.py"
    path.write_text(TOY_SCRIPT)
    return path


def run_toy(script: Path, out: Path, *args: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    command = (launcher or [PYTHON]) + [str(script), "--out", str(out), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def run_toy_here(script: Path, out: Path, *args: str) -> None:
    """The toy script in this process (saves an interpreter start), on one thread like the subprocesses."""
    threads, argv = torch.get_num_threads(), sys.argv
    try:
        sys.argv = [str(script), "--out", str(out), *args]
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)


def final_weights(out: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return load_weights(out / f"final-rank{rank}.safetensors")[0]


def toy_stage(steps: int = 4, phases: list[Phase] | None = None) -> Stage:
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loss = lambda m, b, step, ctx: {"loss": ((m["net"](b["x"]) - 1.0) ** 2).mean()}  # noqa: E731
    batch = lambda step, shard: {"x": torch.full((2, 3), float(step + 1))}  # noqa: E731
    return Stage("toy", {"net": net}, phases or [Phase("net", opt, loss)], batch, steps)


TRAIN_CFG = TrainConfig(seed=0, mixed_precision="no", gradient_accumulation=1, checkpoint_every=2, log_every=1)


def test_checkpoint_save_then_load_is_bit_exact(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 3, 3), torch.nn.GroupNorm(1, 3))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.rand(1, 1, 5, 5, 5)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path, 7, {"net": net}, {"optimizers": {"net": opt.state_dict()}}, {"config": "x"})
    torch.manual_seed(1)
    other = torch.nn.Sequential(torch.nn.Conv3d(1, 3, 3), torch.nn.GroupNorm(1, 3))
    state = load_checkpoint(latest_checkpoint(tmp_path), {"net": other})
    assert state["step"] == 7
    for key, value in net.state_dict().items():
        assert torch.equal(other.state_dict()[key], value)
    saved = state["optimizers"]["net"]["state"]
    for index, moments in opt.state_dict()["state"].items():
        assert torch.equal(saved[index]["exp_avg"], moments["exp_avg"])
    save_checkpoint(tmp_path, 9, {"net": net}, {"optimizers": {}}, {"config": "x"})
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000009"]  # older one removed


def test_loop_logs_checkpoints_and_refuses_to_overwrite(tmp_path: Path) -> None:
    result = train(toy_stage(), tmp_path, TRAIN_CFG, device="cpu")
    assert result.is_main_process and result.processes == 1 and result.steps == 4
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["net"] < records[0]["net"] and "lr/net" in records[0] and records[0]["samples_per_s"] > 0
    assert latest_checkpoint(tmp_path).name == "step-00000004"
    with pytest.raises(DemistError, match="--resume"):
        train(toy_stage(), tmp_path, TRAIN_CFG, device="cpu")
    with pytest.raises(DemistError, match="different total_steps"):
        train(toy_stage(steps=6), tmp_path, TRAIN_CFG, device="cpu", resume=True)


def test_a_resume_on_other_sessions_or_parents_is_refused(tmp_path: Path) -> None:
    from demist.training.run_output import data_fingerprint

    class Session:
        def __init__(self, key: str) -> None:
            self.key = key

    sessions = [Session("s1/a"), Session("s2/a")]
    assert data_fingerprint(sessions) == data_fingerprint(list(reversed(sessions)))  # the order does not matter
    failing = toy_stage()
    loss = failing.phases[0].loss

    def interrupted(m, b, step, ctx):
        if step == 3:
            raise RuntimeError("interrupted")
        return loss(m, b, step, ctx)

    failing.phases[0].loss = interrupted
    with pytest.raises(RuntimeError, match="interrupted"):
        train(failing, tmp_path, TRAIN_CFG, device="cpu",
              weights_metadata={"config": "c", "data": data_fingerprint(sessions)})
    with pytest.raises(DemistError, match="different sessions or parent runs"):
        train(toy_stage(), tmp_path, TRAIN_CFG, device="cpu", resume=True,
              weights_metadata={"config": "c", "data": data_fingerprint(sessions[:1])})
    result = train(toy_stage(), tmp_path, TRAIN_CFG, device="cpu", resume=True,
                   weights_metadata={"config": "c", "data": data_fingerprint(sessions)})
    assert result.steps == 4


def test_gan_phase_gradients_do_not_leak_into_the_other_optimizer(tmp_path: Path) -> None:
    """The generator's loss goes through the discriminator; the discriminator must move by its own loss only."""
    torch.manual_seed(0)
    generator, critic = torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)
    g_opt, d_opt = torch.optim.SGD(generator.parameters(), lr=0.1), torch.optim.SGD(critic.parameters(), lr=1.0)
    critic_before = {k: v.clone() for k, v in critic.state_dict().items()}

    def g_loss(m, b, step, ctx):
        fake = m["generator"](b["x"])
        ctx["fake"] = fake.detach()
        return {"loss": -m["critic"](fake).mean()}

    def d_loss(m, b, step, ctx):  # no gradient at all for the critic
        return {"loss": 0.0 * m["critic"](ctx["fake"]).sum()}

    stage = Stage("gan", {"generator": generator, "critic": critic},
                  [Phase("generator", g_opt, g_loss), Phase("critic", d_opt, d_loss)],
                  lambda step, shard: {"x": torch.ones(2, 3)}, steps=2, grad_clip=None)
    train(stage, tmp_path, TRAIN_CFG, device="cpu")
    for key, value in critic.state_dict().items():
        assert torch.equal(value, critic_before[key])
    assert not torch.equal(generator.weight, torch.nn.Linear(3, 3).weight)


def ema_toy_stage(tmp_path: Path, ema_decay: float, seen: list[torch.Tensor] | None = None,
                  fail_at: int = -1) -> Stage:
    """The toy linear stage; its loss records the weight each step starts from, and can fail at one step."""
    stage = toy_stage(steps=6)

    def loss(m, b, step, ctx):
        if step == fail_at:
            raise RuntimeError("interrupted")
        if seen is not None:
            seen.append(m["net"].weight.detach().clone())
        return {"loss": ((m["net"](b["x"]) - 1.0) ** 2).mean()}

    stage.phases[0].loss, stage.ema_decay = loss, ema_decay
    return stage


def test_the_run_keeps_the_moving_average_and_resumes_it_exactly(tmp_path: Path) -> None:
    seen: list[torch.Tensor] = []
    plain = ema_toy_stage(tmp_path, 0.0, seen)
    train(plain, tmp_path / "plain", TRAIN_CFG, device="cpu")
    trajectory = seen + [plain.modules["net"].weight.detach()]  # the weight before each step, and the last one
    average = trajectory[0].clone()
    for k in range(6):  # the documented warm-up: decay min(0.9, (1 + k) / (10 + k)) after step k
        average = average.lerp(trajectory[k + 1], 1.0 - min(0.9, (1.0 + k) / (10.0 + k)))
    averaged = ema_toy_stage(tmp_path, 0.9)
    train(averaged, tmp_path / "ema", TRAIN_CFG, device="cpu")
    torch.testing.assert_close(averaged.modules["net"].weight, average)
    assert not torch.allclose(average, trajectory[-1])  # the average is not simply the last weight

    with pytest.raises(RuntimeError, match="interrupted"):
        train(ema_toy_stage(tmp_path, 0.9, fail_at=3), tmp_path / "resumed", TRAIN_CFG, device="cpu")
    assert latest_checkpoint(tmp_path / "resumed").name == "step-00000002"
    resumed = ema_toy_stage(tmp_path, 0.9)
    train(resumed, tmp_path / "resumed", TRAIN_CFG, device="cpu", resume=True)
    for key, value in averaged.modules["net"].state_dict().items():
        assert torch.equal(resumed.modules["net"].state_dict()[key], value), key
    with pytest.raises(DemistError, match="no parameter averages"):
        train(ema_toy_stage(tmp_path, 0.9), tmp_path / "plain", TRAIN_CFG, device="cpu", resume=True)


def test_the_moving_average_leaves_frozen_parameters_alone() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    net[0].requires_grad_(False)  # a frozen part, like Stage 2's backbone
    frozen = {k: v.clone() for k, v in net[0].state_dict().items()}
    start = net[1].weight.detach().clone()
    ema = ParameterEMA({"net": net}, 0.5)
    assert set(ema.shadow) == {"net.1.weight", "net.1.bias"}
    with torch.no_grad():
        net[1].weight.add_(1.0)
    ema.update(step=100)  # decay 0.5: the average moves half-way
    ema.copy_to_parameters()
    for key, value in net[0].state_dict().items():
        assert torch.equal(value, frozen[key]), key
    torch.testing.assert_close(net[1].weight.detach(), start + 0.5)
    with pytest.raises(DemistError, match="do not match"):
        ema.load_state_dict({"net.1.weight": net[1].weight.detach()})


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path: Path, toy_script: Path) -> None:
    run_toy_here(toy_script, tmp_path / "ref", "--steps", "6")
    killed = run_toy(toy_script, tmp_path / "run", "--steps", "6", "--crash-at", "5")
    assert killed.returncode == -signal.SIGKILL
    assert latest_checkpoint(tmp_path / "run").name == "step-00000004"
    resumed = run_toy(toy_script, tmp_path / "run", "--steps", "6", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, got = final_weights(tmp_path / "ref"), final_weights(tmp_path / "run")
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the killed run's step-5 line was not kept twice


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_through_accelerate_equal_one_process_accumulating(tmp_path: Path,
                                                                              toy_script: Path) -> None:
    # `--multi_gpu` makes accelerate start the processes with torchrun; on this CPU-only machine the loop's
    # Accelerator(cpu=True) then joins them in a gloo process group (accelerate's `--cpu` alone starts one process).
    launcher = [PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
                "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    ddp = run_toy(toy_script, tmp_path / "ddp", "--steps", "3", launcher=launcher)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    run_toy_here(toy_script, tmp_path / "single", "--steps", "3", "--accumulation", "2")
    rank0, rank1, expected = final_weights(tmp_path / "ddp", 0), final_weights(tmp_path / "ddp", 1), \
        final_weights(tmp_path / "single")
    assert load_weights(tmp_path / "ddp" / "final-rank0.safetensors")[1]["processes"] == "2"
    for key in expected:
        assert torch.equal(rank0[key], rank1[key]), key  # DDP kept the replicas identical
        torch.testing.assert_close(rank0[key], expected[key], rtol=1e-5, atol=1e-6)  # same global batch
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 3  # written once, by rank 0


def test_patches_are_a_pure_function_of_seed_step_and_shard() -> None:
    sessions = [brain_session("a/1", seed=1), brain_session("b/1", (24, 20, 18), seed=2)]
    sampler = PatchSampler(sessions, (8, 8, 8), batch_size=3, seed=5)
    first, again = sampler.batch(4, 1), PatchSampler(sessions, (8, 8, 8), 3, seed=5).batch(4, 1)
    assert first["cond"].shape == (3, 2, 8, 8, 8) and first["target"].shape == first["brain"].shape == (3, 1, 8, 8, 8)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["cond"], sampler.batch(4, 0)["cond"])
    assert not torch.equal(first["cond"], sampler.batch(5, 1)["cond"])
    centres = [sampler.batch(step)["brain"][:, 0, 4, 4, 4] for step in range(20)]
    assert float(torch.cat(centres).mean()) == 1.0  # every patch is centred on a brain voxel


def test_patch_sampler_pads_small_volumes_and_checks_inputs() -> None:
    small = brain_session("a/1", shape=(16, 16, 16))
    assert PatchSampler([small], (24, 8, 8), 1, 0).batch(0)["cond"].shape == (1, 2, 24, 8, 8)
    no_psr = brain_session("a/2")
    no_psr.psr = None
    with pytest.raises(DemistError, match="a/2: has no PSR map"):
        PatchSampler([no_psr], (8, 8, 8), 1, 0)
    assert "target" not in PatchSampler([no_psr], (8, 8, 8), 1, 0, need_target=False).batch(0)

