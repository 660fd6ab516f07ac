"""Backbone pretraining and Stage 2 on two hand-made sessions, with very small networks and 16³ patches (CPU)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from helpers import (LATENT_CFG, Interrupted, ellipsoid_session, interrupt_latent_batches, latent_toml_config,
                     random_stage1_run)
from demist.cli.backbone import backbone_command
from demist.cli.methods import train_command
from demist.errors import DemistError
from demist.models.backbone import build_unet
from demist.models.demist_net import STREAMS
from demist.models.from_runs import build_inference_networks, load_backbone_run
from demist.runs import read_run, sha256_file
from demist.training import stage2
from demist.training.backbone import train_backbone
from demist.training.checkpoint import latest_checkpoint
from demist.training.stage2 import train_demist


def trained_inputs(latent_cohort) -> tuple:
    """The manifest, Stage-1 run and backbone run a Stage-2 training takes."""
    return latent_cohort["manifest"], latent_cohort["stage1"].path, latent_cohort["backbone"].path


def test_backbone_trains_and_writes_a_loadable_run(latent_cohort):
    run = latent_cohort["backbone"]
    assert (run.method, run.stage, run.prediction_type) == ("demist", "backbone", "sample")
    assert run.parents["stage1"]["sha256"] == latent_cohort["stage1"].run_json_sha256
    assert run.latent_scale_factor == 2.0
    assert run.training["steps"] == 2 and run.training["sessions"] == ["s1/a", "s2/a"]
    curve = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == [1, 2] and all(r["denoise"] > 0 for r in curve)
    _, unet = load_backbone_run(run.path)
    saved = run.weights("unet")
    assert all(torch.equal(v, saved[k]) for k, v in unet.state_dict().items())
    assert unet.out[2].conv.weight.abs().sum() > 0  # the zero-initialised output conv has trained
    assert run.metrics["eval_denoising_mse_after"]["mean"] < run.metrics["eval_denoising_mse_before"]["mean"]



def test_unknown_training_subjects_are_refused(latent_cohort, tmp_path):
    with pytest.raises(DemistError, match="subjects s9: not in manifest"):
        train_backbone(latent_cohort["manifest"], latent_cohort["stage1"].path, LATENT_CFG, tmp_path / "bb",
                       subjects=["s9"])


class RecordingNet(stage2.DemistNet):
    """DemistNet that keeps a copy of its frozen tensors as they were when built."""

    last = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.frozen_at_start = {k: v.clone() for k, v in self.state_dict().items() if k in self._frozen_keys}
        RecordingNet.last = self


@pytest.fixture(scope="module")
def demist_run(latent_cohort):
    patch = pytest.MonkeyPatch()
    patch.setattr(stage2, "DemistNet", RecordingNet)
    file = latent_cohort["backbone"].path / "unet.safetensors"
    before = (sha256_file(file), file.stat().st_mtime_ns)
    try:
        run = train_demist(*trained_inputs(latent_cohort), LATENT_CFG, latent_cohort["root"] / "demist", device="cpu")
    finally:
        patch.undo()
    return run, RecordingNet.last, before


def test_stage2_trains_only_the_streams_and_leaves_the_backbone_untouched(latent_cohort, demist_run):
    run, net, (sha_before, mtime_before) = demist_run
    for key, value in net.state_dict().items():
        if key in net._frozen_keys:
            assert torch.equal(value, net.frozen_at_start[key]), key
    assert not any(p.requires_grad for p in net.stream_parameters()["backbone"])
    file = latent_cohort["backbone"].path / "unet.safetensors"
    assert (sha256_file(file), file.stat().st_mtime_ns) == (sha_before, mtime_before)

    saved = run.weights("streams")
    assert set(saved) == set(net.trainable_state_dict()) and not set(saved) & net._frozen_keys
    assert any(k.startswith("controlnet.") for k in saved) and any(".lora_A." in k for k in saved)
    assert any(".cross_attention." in k for k in saved) and any(k.startswith("token_encoder.") for k in saved)
    # the optimizer knows only the trained tensors
    state = torch.load(latest_checkpoint(run.path) / "training_state.pt", weights_only=True)
    groups = state["optimizers"]["streams"]["param_groups"]
    assert sum(len(g["params"]) for g in groups) == len([p for p in net.parameters() if p.requires_grad])
    # the zero-initialised tensors train at their own learning rate (after the same schedule factor)
    assert [g["name"] for g in groups] == ["streams", "zero-initialised"]
    assert len(groups[1]["params"]) == len(net.zero_initialised_parameters())
    assert groups[1]["lr"] == pytest.approx(groups[0]["lr"] * LATENT_CFG.demist.zero_init_lr_scale)
    assert any(k.startswith("image_hint.") for k in saved)  # this config's ControlNet also sees the image
    # the zero-initialised gates have moved: the streams trained
    assert any(v.abs().sum() > 0 for k, v in saved.items() if ".lora_B." in k)


def test_stage2_run_records_method_parents_counts_and_loss_terms(latent_cohort, demist_run):
    run, net, _ = demist_run
    assert (run.method, run.stage, run.prediction_type) == ("demist", "demist", "sample")
    assert set(run.components) == {"streams"}
    assert run.parents["stage1"]["sha256"] == latent_cohort["stage1"].run_json_sha256
    assert run.parents["backbone"]["sha256"] == latent_cohort["backbone"].run_json_sha256
    counts = run.training["parameters"]
    assert counts == net.parameter_counts()
    assert counts["backbone"]["trainable"] == 0 and all(counts[s]["trainable"] > 0 for s in STREAMS)
    curve = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == [1, 2, 3]
    assert ["edge" in r for r in curve] == [True, False, True]  # edge_every = 2: steps 0 and 2
    assert all("align" not in r for r in curve)  # E_cond frozen by default


def test_inference_networks_rebuild_the_trained_net(demist_run):
    run, net, _ = demist_run
    nets = build_inference_networks(read_run(run.path))
    assert nets.prediction_type == "sample" and nets.latent_scale_factor == 2.0
    generator = torch.Generator().manual_seed(0)
    x_t, z_c = torch.randn(1, 8, 4, 4, 4, generator=generator), torch.randn(1, 8, 4, 4, 4, generator=generator)
    t = torch.tensor([300])
    image = torch.randn(1, 2, 16, 16, 16, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(nets.net(x_t, t, z_c, nets.net.embed_image(image)),
                                   net.eval()(x_t, t, z_c, net.embed_image(image)), rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in nets.net.parameters())


def test_start_strength_samples_from_the_noised_condition_latent(demist_run, monkeypatch):
    """SDEdit: with strength s the sampler starts at round(s·(T−1)) from z_c noised there, with the seed's noise."""
    from demist.data.preprocess import prepare_images
    from demist.inference import demist_synthesizer as module
    from demist.inference.pipeline import synthesize_images
    from demist.methods import load_synthesizer

    seen = {}

    def fake_sampler(model, x_T, schedule, steps, generator=None, progress=False, start=None):
        seen.update(x_T=x_T.clone(), steps=steps, start=start)
        return x_T

    images = ellipsoid_session(shape=(28, 30, 26), seed=7)
    synthesizer = load_synthesizer(demist_run[0].path, device="cpu", start_strength=0.3)
    assert (synthesizer.start, synthesizer.steps) == (300, LATENT_CFG.sampling.steps)
    monkeypatch.setitem(module.SAMPLERS, synthesizer.sampler, fake_sampler)
    synthesize_images(synthesizer, images["t1w"], images["flair"], images["brain_mask"], seed=0)
    assert seen["start"] == 300
    prepared = prepare_images(images["t1w"], images["flair"], synthesizer.config.data, brain=images["brain_mask"],
                              key="input")  # as synthesize_images prepares them
    z_c = synthesizer.encode_condition(torch.from_numpy(prepared.condition)[None])
    noise = torch.randn(z_c.shape, generator=torch.Generator().manual_seed(0))
    expected = synthesizer.schedule.add_noise(z_c, noise, torch.tensor([300]))
    torch.testing.assert_close(seen["x_T"], expected)
    with pytest.raises(DemistError, match="--start-strength: got 1.5"):
        load_synthesizer(demist_run[0].path, device="cpu", start_strength=1.5)
    with pytest.raises(DemistError, match="expected an integer from 1 to 2"):
        load_synthesizer(demist_run[0].path, device="cpu", start_strength=0.001, steps=5)


def test_anchor_sigma_anchors_the_synthesizer_denoiser_and_refuses_a_negative_width(demist_run):
    from demist.methods import load_synthesizer

    plain = load_synthesizer(demist_run[0].path, device="cpu")
    anchored = load_synthesizer(demist_run[0].path, device="cpu", anchor_sigma=1.5)
    assert (plain.anchor_sigma, anchored.anchor_sigma) == (0.0, 1.5)  # the run's config says 0: the paper's sampler
    generator = torch.Generator().manual_seed(0)
    z_c, x_a, x_b = (torch.randn(1, 8, 8, 8, 8, generator=generator) for _ in range(3))
    first, later = torch.tensor([999]), torch.tensor([400])
    hint = plain.image_hint(torch.randn(1, 2, 32, 32, 32, generator=generator))
    model_plain, model_anchored = plain.denoiser(z_c, hint), anchored.denoiser(z_c, hint)
    with torch.no_grad():
        torch.testing.assert_close(model_anchored(x_a, first), model_plain(x_a, first), rtol=0, atol=1e-5)
        assert not torch.allclose(model_anchored(x_b, later), model_plain(x_b, later), atol=1e-4)
    with pytest.raises(DemistError, match="--anchor-sigma: got -1"):
        load_synthesizer(demist_run[0].path, device="cpu", anchor_sigma=-1.0)


def test_ablation_flag_and_subjects_are_recorded(latent_cohort, tmp_path):
    run = train_demist(*trained_inputs(latent_cohort), LATENT_CFG, tmp_path / "abl",
                       max_steps=1, device="cpu", streams_off=["controlnet"], subjects=["s2"])
    assert run.method == "demist-no-controlnet"
    assert run.config.demist.controlnet is False and run.config.demist.steps == 1
    assert not any(k.startswith("controlnet.") for k in run.weights("streams"))
    assert run.training["parameters"]["spatial"]["trainable"] == 0
    assert run.training["sessions"] == ["s2/a"] and run.training["subjects"] == ["s2"]


def test_finetuning_the_condition_encoder_adds_the_alignment_term(latent_cohort, tmp_path):
    cfg = LATENT_CFG.replace(demist=dataclasses.replace(LATENT_CFG.demist, finetune_cond_encoder=True))
    run = train_demist(*trained_inputs(latent_cohort), cfg, tmp_path / "ft",
                       max_steps=1, device="cpu", streams_off=["controlnet"])
    curve = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert curve[0]["align"] > 0
    tuned, original = run.weights("cond_autoencoder"), latent_cohort["stage1"].weights("cond_autoencoder")
    changed = {k for k in tuned if not torch.equal(tuned[k], original[k])}
    assert changed and all(k.startswith(("encoder.", "quant_conv_mu.")) for k in changed)
    assert read_run(run.path).components.keys() == {"streams", "cond_autoencoder"}


def test_all_streams_off_is_refused(latent_cohort, tmp_path):
    with pytest.raises(DemistError, match="all streams are off"):
        train_demist(*trained_inputs(latent_cohort), LATENT_CFG, tmp_path / "x",
                     streams_off=["crossattn", "controlnet", "lora"])


def bundle_file(folder: Path) -> Path:
    torch.manual_seed(3)
    path = folder / "diffusion_model.pt"
    torch.save(build_unet(LATENT_CFG.unet, 8).state_dict(), path)
    return path


def test_bundle_backbone_refused_with_a_stage1_not_initialised_from_the_bundle(latent_cohort, tmp_path):
    with pytest.raises(DemistError, match="was not initialised from the bundle autoencoder"):
        train_demist(latent_cohort["manifest"], latent_cohort["stage1"].path, bundle_file(tmp_path), LATENT_CFG,
                     tmp_path / "x", device="cpu")


def test_bundle_backbone_trains_with_epsilon_and_records_the_file(latent_cohort, tmp_path):
    stage1 = random_stage1_run(tmp_path / "bundled", init_bundle="/models/autoencoder.pt", seed=1)  # another PSR latent
    bundle = bundle_file(tmp_path)
    run = train_demist(latent_cohort["manifest"], stage1.path, bundle, LATENT_CFG, tmp_path / "run", max_steps=1,
                       device="cpu", streams_off=["crossattn"])
    assert run.prediction_type == "epsilon" and run.config.diffusion.prediction_type == "epsilon"
    assert "backbone" not in run.parents
    assert run.training["backbone_bundle"]["sha256"] == sha256_file(bundle)
    assert build_inference_networks(run).prediction_type == "epsilon"
    with pytest.raises(DemistError, match="was pretrained in the latent of another PSR autoencoder"):
        train_demist(latent_cohort["manifest"], stage1.path, latent_cohort["backbone"].path, LATENT_CFG, tmp_path / "y",
                     device="cpu")


def test_interrupted_training_resumes_to_the_same_weights(latent_cohort, demist_run, tmp_path, monkeypatch):
    args = (*trained_inputs(latent_cohort), LATENT_CFG, tmp_path / "resumed")
    interrupt_latent_batches(monkeypatch, at_step=2)
    with pytest.raises(Interrupted):
        train_demist(*args, device="cpu")
    assert latest_checkpoint(tmp_path / "resumed").name == "step-00000002"
    monkeypatch.undo()
    with pytest.raises(DemistError, match="pass --resume"):
        train_demist(*args, device="cpu")
    resumed = train_demist(*args, device="cpu", resume=True)
    a, b = demist_run[0].weights("streams"), resumed.weights("streams")  # the uninterrupted run
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_commands_train_through_the_command_line(latent_cohort, tmp_path):
    app = typer.Typer()
    app.command("backbone")(backbone_command)
    app.command("demist")(train_command("demist"))
    config = latent_toml_config(tmp_path / "small.toml")
    common = ["--manifest", str(latent_cohort["manifest"]), "--stage1", str(latent_cohort["stage1"].path),
              "--config", str(config), "--max-steps", "1", "--device", "cpu"]
    result = CliRunner().invoke(app, ["backbone", *common, "--out", str(tmp_path / "bb")])
    assert result.exit_code == 0, result.output
    assert "backbone:" in result.output and read_run(tmp_path / "bb").stage == "backbone"
    result = CliRunner().invoke(app, ["demist", *common, "--backbone", str(latent_cohort["backbone"].path),
                                      "--no-crossattn", "--no-lora", "--out", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    run = read_run(tmp_path / "d")
    assert run.method == "demist-no-crossattn-no-lora" and run.config.preset == "tiny+small.toml"
    assert not any(".lora_" in k or "cross_attention" in k for k in run.weights("streams"))


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_zero_initialised_tensors_get_their_own_learning_rate(scale):
    from demist.models.demist_net import DemistNet

    torch.manual_seed(0)
    net = DemistNet(build_unet(LATENT_CFG.unet, 8), LATENT_CFG.demist, LATENT_CFG.unet, 8)
    groups = stage2.stage2_parameter_groups(net, [net], 1e-3, scale)
    by_name = {g["name"]: g for g in groups}
    zero = {id(p) for p in net.zero_initialised_parameters()}
    assert {id(p) for p in by_name["zero-initialised"]["params"]} == zero
    assert not zero & {id(p) for p in by_name["streams"]["params"]}
    assert by_name["zero-initialised"]["lr"] == pytest.approx(1e-3 * scale) and by_name["streams"]["lr"] == 1e-3
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == trainable
    # what starts at zero: every ControlNet output gate, each cross-attention output projection and every LoRA-B
    names = {n for n, p in net.named_parameters() if id(p) in zero}
    assert any(n.startswith("controlnet.controlnet_down_blocks") for n in names)
    assert any(".cross_attention.out_proj." in n for n in names) and any(".lora_B." in n for n in names)
    assert all(not p.any() for p in net.zero_initialised_parameters())


def test_an_unknown_stream_name_is_refused():
    with pytest.raises(DemistError, match="streams_off: unknown semantic"):
        stage2.stage2_config(LATENT_CFG, None, ["semantic"])  # streams are switched off by their switch names


def test_a_hint_that_downsamples_unlike_the_autoencoder_is_refused():
    bad = LATENT_CFG.replace(demist=dataclasses.replace(LATENT_CFG.demist, hint_channels=(4, 8)))
    with pytest.raises(DemistError, match="demist.hint_channels"):
        stage2.stage2_config(bad, None)


def test_a_sampling_tile_other_than_the_training_patch_is_refused():
    from demist.training.latent_diffusion import check_sampling_tile

    check_sampling_tile(LATENT_CFG)  # 16-voxel patches, 4× latent: tiles of 4
    bad = LATENT_CFG.replace(sampling=dataclasses.replace(LATENT_CFG.sampling, tile_size=(8, 8, 8)))
    with pytest.raises(DemistError, match=r"sampling.tile_size: got \[8, 8, 8\]; expected the Stage-2 latent patch "
                                          r"\[4, 4, 4\]"):
        check_sampling_tile(bad)


def seeded_noising(z0: torch.Tensor, schedule, **options) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 2's (x_t, t, target) draw from the global RNG seeded with 0, so that draws can be compared."""
    from demist.training.latent_diffusion import sample_noising

    torch.manual_seed(0)
    return sample_noising(z0, schedule, **options)


def test_timestep_power_draws_noisy_timesteps_more_often_and_one_keeps_the_uniform_draw():
    from demist.diffusion.schedule import NoiseSchedule

    schedule = NoiseSchedule.from_config(LATENT_CFG.diffusion)
    z0 = torch.zeros(20000, 1, 1, 1, 1)
    uniform = seeded_noising(z0, schedule)[1]
    paper = seeded_noising(z0, schedule, timestep_power=1.0)[1]
    biased = seeded_noising(z0, schedule, timestep_power=0.5)[1]
    total = schedule.num_train_timesteps
    assert torch.equal(paper, uniform)  # p = 1 is the paper's draw, unchanged
    assert int(biased.min()) >= 0 and int(biased.max()) <= total - 1
    # P(t < T/2) = (1/2)^(1/p): 0.25 for p = 0.5, against 0.5 for uniform timesteps
    assert abs(float((biased < total // 2).float().mean()) - 0.25) < 0.02
    assert abs(float((uniform < total // 2).float().mean()) - 0.5) < 0.02


def test_input_perturbation_moves_the_input_not_the_target_and_zero_keeps_the_paper_draw():
    from demist.diffusion.schedule import NoiseSchedule

    schedule = NoiseSchedule.from_config(LATENT_CFG.diffusion, "epsilon")  # ε target: the perturbation must not reach
    z0 = torch.randn(4, 2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    x_paper, t_paper, target_paper = seeded_noising(z0, schedule)
    x_zero = seeded_noising(z0, schedule, input_perturbation=0.0)[0]
    x_pert, t_pert, target_pert = seeded_noising(z0, schedule, input_perturbation=0.1)
    assert torch.equal(x_zero, x_paper)  # γ = 0 draws nothing extra: the paper's x_t, bit for bit
    assert torch.equal(t_pert, t_paper) and torch.equal(target_pert, target_paper)
    alpha_bar = schedule.alphas_cumprod[t_paper].view(-1, 1, 1, 1, 1)
    extra = (x_pert - x_paper) / (1 - alpha_bar).sqrt()  # γ·ξ, the part of x_t's noise the target does not know
    assert 0.07 < float(extra.std()) < 0.13
    with pytest.raises(DemistError, match="demist.input_perturbation"):
        dataclasses.replace(LATENT_CFG.demist, input_perturbation=-0.1)


def test_precision_and_memory_budget_reach_the_synthesizer_and_bad_values_are_refused(demist_run):
    from demist.methods import load_synthesizer

    reference = load_synthesizer(demist_run[0].path, device="cpu", precision="fp32", max_memory=2.5)
    assert (reference.use_bf16, reference.max_memory_gib) == (False, 2.5)
    assert load_synthesizer(demist_run[0].path, device="cpu").use_bf16
    # the fp32 reference computes the image hint in fp32 too, although the run trained it under bf16 (hint_bf16)
    image = torch.rand((1, 2, 32, 32, 32), generator=torch.Generator().manual_seed(0))
    assert reference.net.hint_bf16
    with torch.no_grad():
        hint = reference.image_hint(image)
        reference.net.hint_bf16 = False
        assert hint.abs().max() > 0 and torch.equal(hint, reference.image_hint(image))
    with pytest.raises(DemistError, match="--precision fp16: expected one of auto, fp32"):
        load_synthesizer(demist_run[0].path, device="cpu", precision="fp16")
    with pytest.raises(DemistError, match="--max-memory -1"):
        load_synthesizer(demist_run[0].path, device="cpu", max_memory=-1.0)
    with pytest.raises(DemistError, match="--max-memory 0.01: one .* sampling step"):
        load_synthesizer(demist_run[0].path, device="cpu", max_memory=0.01).denoiser(torch.zeros(1, 8, 8, 8, 8))


def test_channels_last_is_a_layout_not_another_model_and_runs_exactly_where_bf16_does(demist_run):
    import dataclasses

    from demist.devices import has_native_bf16
    from demist.methods import load_synthesizer

    path = demist_run[0].path
    assert load_synthesizer(path, device="cpu").channels_last == has_native_bf16(torch.device("cpu"))
    plain = load_synthesizer(path, device="cpu", precision="fp32")
    assert not plain.channels_last
    generator = torch.Generator().manual_seed(0)
    image = torch.rand((1, 2, 32, 32, 32), generator=generator)
    x_t = torch.randn((1, 8, 8, 8, 8), generator=generator)
    with torch.no_grad():
        def outputs(synth):
            z_c = synth.encode_condition(image)
            hint = synth.image_hint(image)
            return z_c, synth.denoiser(z_c, hint)(x_t, torch.tensor([500])), synth.decode(z_c)

        expected = outputs(plain)
        nhwc = dataclasses.replace(plain, channels_last=True)  # converts the (shared) networks' weights to NDHWC
        convs = [m.weight for n in (nhwc.net, nhwc.psr_autoencoder) for m in n.modules()
                 if isinstance(m, torch.nn.Conv3d) and m.kernel_size == (3, 3, 3)]
        assert convs and all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in convs)
        for got, want in zip(outputs(nhwc), expected):
            assert got.is_contiguous() or got.is_contiguous(memory_format=torch.channels_last_3d)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
