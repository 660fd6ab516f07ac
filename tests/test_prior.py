"""Priors: exported runs that verify, a Stage 1 aligned on a cohort inside the prior's latent, the prior's backbone
accepted for it and refused for any other latent, and bad priors refused with a clear message."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from helpers import two_subject_manifest
from demist.config import load_config
from demist.data.manifest import load_manifest
from demist.workflows.demo import DemoPlan, run_demo
from demist.errors import DemistError
from demist.models.autoencoder import build_autoencoder
from demist.models.from_runs import build_inference_networks
from demist.prior import PRIOR_SEED, align_to_prior, check_cohort_apart, export_prior, resolve_prior
from demist.runs import read_run, sha256_file, write_run
from demist.training.backbone import train_backbone
from demist.training.stage2 import train_demist

CFG = load_config("tiny", overrides={
    "data": {"patch_size": [16, 16, 16]},
    "autoencoder": {"channels": [8, 8, 8], "norm_num_groups": 4, "patch_size": [16, 16, 16]},
    "unet": {"channels": [16, 32, 32], "num_head_channels": [0, 16, 16], "norm_num_groups": 8},
    "train": {"checkpoint_every": 2, "log_every": 1},
    "align": {"steps": 2, "batch_size": 1},
    "backbone": {"steps": 2, "batch_size": 1},
    "demist": {"steps": 2, "batch_size": 1, "token_grid": [2, 2, 2], "token_dim": 12, "lora_rank": 2,
               "hint_channels": [4, 8, 8]},
    "sampling": {"tile_size": [4, 4, 4]},
})


def autoencoder_runs(folder: Path, seed: int) -> dict[str, object]:
    """Untrained PSR and condition autoencoder runs and the Stage-1 run built from them (scale factor 2)."""
    torch.manual_seed(seed)
    psr, cond = build_autoencoder(CFG.autoencoder, 1), build_autoencoder(CFG.autoencoder, 2)
    runs = {"psr_ae": write_run(folder / "psr_ae", method="demist", stage="autoencoder-psr", config=CFG,
                                components={"autoencoder": psr.state_dict()}),
            "cond_ae": write_run(folder / "cond_ae", method="demist", stage="autoencoder-cond", config=CFG,
                                 components={"autoencoder": cond.state_dict()})}
    runs["stage1"] = write_run(folder / "stage1", method="demist", stage="stage1", config=CFG,
                               components={"psr_autoencoder": psr.state_dict(), "cond_autoencoder": cond.state_dict()},
                               parents=runs, latent_scale_factor=2.0)
    return runs


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("prior")
    manifest = two_subject_manifest(root)
    runs = autoencoder_runs(root / "pretraining", seed=0)
    backbone = train_backbone(manifest, runs["stage1"].path, CFG, root / "pretraining" / "backbone", device="cpu")
    sources = {"psr_ae": runs["psr_ae"].path, "cond_ae": runs["cond_ae"].path, "backbone": backbone.path}
    prior = export_prior(sources, root / "prior", CFG, {"cohort": {"seed": 7}})
    return {"prior": prior, "sources": sources, "manifest": manifest}


def test_an_exported_prior_holds_the_runs_byte_for_byte_without_checkpoints(built):
    prior = built["prior"]
    assert prior.scale_factor == 2.0 and prior.cohort_seed == 7
    for name, source in built["sources"].items():
        assert sha256_file(prior.path / name / "run.json") == sha256_file(source / "run.json")
        assert not (prior.path / name / "checkpoints").exists()
    assert (built["sources"]["backbone"] / "checkpoints").exists()  # the source had them
    assert resolve_prior(str(prior.path), CFG) == prior
    assert resolve_prior("none", CFG) is None


def test_stage1_on_a_prior_keeps_its_latent_and_its_backbone_drives_stage2(built, tmp_path):
    prior = built["prior"]
    stage1 = align_to_prior(load_manifest(built["manifest"]), prior, CFG, tmp_path / "stage1", device="cpu")
    assert stage1.latent_scale_factor == prior.scale_factor  # kept, not re-measured on the cohort
    psr = read_run(prior.psr_ae).weights("autoencoder")
    assert all(torch.equal(v, psr[k]) for k, v in stage1.weights("psr_autoencoder").items())
    cond = read_run(prior.cond_ae).weights("autoencoder")
    assert any(not torch.equal(v, cond[k]) for k, v in stage1.weights("cond_autoencoder").items())  # E_cond aligned
    run = train_demist(built["manifest"], stage1.path, prior.backbone, CFG, tmp_path / "demist", device="cpu")
    assert run.parents["backbone"]["path"] == str(prior.backbone.resolve())
    assert run.latent_scale_factor == prior.scale_factor
    networks = build_inference_networks(run)
    assert networks.latent_scale_factor == prior.scale_factor


def test_a_prior_serves_a_cohort_scaled_otherwise_and_the_alignment_uses_the_cohorts_scaling(built, tmp_path):
    prior = built["prior"]
    scaled = CFG.replace(data=dataclasses.replace(CFG.data, percentile_low=2.0, percentile_margin_mm=6.0))
    assert resolve_prior(str(prior.path), scaled) == prior
    stage1 = align_to_prior(load_manifest(built["manifest"]), prior, scaled, tmp_path / "stage1", device="cpu")
    assert stage1.config.data == scaled.data and read_run(prior.cond_ae).config.data != scaled.data


def test_the_backbone_of_a_prior_is_refused_in_another_latent(built, tmp_path):
    prior = built["prior"]
    other = autoencoder_runs(tmp_path / "other", seed=1)  # another PSR autoencoder
    with pytest.raises(DemistError, match="latent of another PSR autoencoder"):
        train_demist(built["manifest"], other["stage1"].path, prior.backbone, CFG, tmp_path / "d1", device="cpu")
    stage1 = read_run(prior.psr_ae)  # the prior's PSR autoencoder, but another latent scale
    rescaled = write_run(tmp_path / "rescaled", method="demist", stage="stage1", config=CFG,
                         components={"psr_autoencoder": stage1.weights("autoencoder"),
                                     "cond_autoencoder": read_run(prior.cond_ae).weights("autoencoder")},
                         latent_scale_factor=3.0)
    with pytest.raises(DemistError, match="latent of another PSR autoencoder"):
        train_demist(built["manifest"], rescaled.path, prior.backbone, CFG, tmp_path / "d2", device="cpu")


@pytest.mark.parametrize("case, message", [
    ("missing", "not a directory"),
    ("swapped-psr", "not trained in the latent of its psr_ae"),
    ("other-unet", r"config section \[unet\] differs"),
    ("other-psr-range", r"config section \[data\] differs"),
    ("embedded-paper", "no prior shipped for the 'paper' preset"),
])
def test_bad_priors_are_refused_with_what_was_expected(built, tmp_path, case, message):
    prior, cfg, spec = built["prior"], CFG, str(tmp_path / "prior")
    if case == "swapped-psr":
        shutil.copytree(prior.path, tmp_path / "prior")
        shutil.rmtree(tmp_path / "prior" / "psr_ae")
        shutil.copytree(autoencoder_runs(tmp_path / "other", seed=1)["psr_ae"].path, tmp_path / "prior" / "psr_ae")
    elif case == "other-unet":
        spec, cfg = str(prior.path), CFG.replace(unet=dataclasses.replace(CFG.unet, num_res_blocks=2))
    elif case == "other-psr-range":  # the PSR side of [data] must match; only the T1w/FLAIR scaling may differ
        spec, cfg = str(prior.path), CFG.replace(data=dataclasses.replace(CFG.data, psr_range=0.3))
    elif case == "embedded-paper":
        spec, cfg = "embedded", load_config("paper")
    with pytest.raises(DemistError, match=message):
        resolve_prior(spec, cfg)


def test_the_embedded_prior_verifies_against_the_tiny_preset():
    prior = resolve_prior("embedded", load_config("tiny"))
    assert prior is not None and prior.scale_factor > 0 and prior.cohort_seed == PRIOR_SEED
    backbone = read_run(prior.backbone, "backbone")
    assert backbone.config.backbone.steps == load_config("tiny").backbone.steps


def test_runs_written_by_the_previous_release_still_load(tmp_path) -> None:
    """A backbone run.json written by demist 0.1.0, before [demist] ema_decay, timestep_power and
    controlnet_output_head and [autoencoder] norm existed (tests/data, verbatim but for its weights, which a stand-in
    file replaces): it loads with the behaviour those runs had for the missing keys."""
    payload = json.loads((Path(__file__).parent / "data" / "backbone_run_before_later_keys.json").read_text())
    stored = payload["config"]
    assert "ema_decay" not in stored["demist"] and "timestep_power" not in stored["demist"]  # the older format
    assert "controlnet_output_head" not in stored["demist"] and "norm" not in stored["autoencoder"]
    run_dir = tmp_path / "backbone"
    run_dir.mkdir()
    (run_dir / "unet.safetensors").write_bytes(b"stand-in weights")
    payload["components"]["unet"]["sha256"] = sha256_file(run_dir / "unet.safetensors")
    (run_dir / "run.json").write_text(json.dumps(payload))
    run = read_run(run_dir, "backbone")
    assert run.config.demist.ema_decay == 0.0 and run.config.demist.timestep_power == 1.0
    assert run.config.demist.controlnet_output_head is False  # what runs did before the key, not tiny's default
    assert run.config.autoencoder.norm == "group"  # MONAI's GroupNorm, the only norm before the key


def test_a_cohort_the_prior_was_trained_on_is_refused(built, tmp_path):
    plan = DemoPlan(out=tmp_path / "demo", subjects=3, held_out=1, seed=PRIOR_SEED, max_steps=1)
    with pytest.raises(DemistError, match=f"--seed {PRIOR_SEED}: the prior .* was pretrained on the cohort of this"):
        run_demo(plan, device="cpu")  # the embedded prior records its cohort's seed
    assert not (tmp_path / "demo").exists()
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    (cohort / "cohort.json").write_text(json.dumps({"generator": "demist.data.phantom", "seed": 7}))
    with pytest.raises(DemistError, match="a synthetic cohort of seed 7, the seed of the cohort the prior"):
        check_cohort_apart(cohort / "manifest.csv", built["prior"])
    (cohort / "cohort.json").write_text(json.dumps({"generator": "demist.data.phantom", "seed": 8}))
    check_cohort_apart(cohort / "manifest.csv", built["prior"])  # another seed: fine


def test_stage1_refuses_a_prior_and_a_bundle_together(small_manifest, tmp_path, monkeypatch, capsys):
    from demist import cli

    (tmp_path / "autoencoder.pt").write_bytes(b"")
    monkeypatch.setattr(sys, "argv", ["demist", "train", "stage1", "--manifest", str(small_manifest), "--out",
                                      str(tmp_path / "o"), "--prior", "embedded", "--init-bundle",
                                      str(tmp_path / "autoencoder.pt")])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    assert "--init-bundle and --prior embedded" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_train_prior_pretrains_and_exports_a_prior_that_verifies(tmp_path):
    from demist.prior import train_prior

    cfg = load_config("tiny", overrides={"data": {"patch_size": [32, 32, 32]}, "backbone": {"batch_size": 1},
                                         "stage1": {"adv_start": 1}, "align": {"batch_size": 1}})
    prior = train_prior(tmp_path / "p", cfg, subjects=2, seed=5, max_steps=1, device="cpu")
    assert prior.path == tmp_path / "p" / "prior" and prior.scale_factor > 0 and prior.cohort_seed == 5
    stage1 = read_run(tmp_path / "p" / "runs" / "stage1" / "stage1", "stage1")
    assert prior.scale_factor == stage1.latent_scale_factor  # the scale the backbone was trained in
    assert read_run(prior.backbone).training["steps"] == 1
    again = train_prior(tmp_path / "p", cfg, subjects=2, seed=5, max_steps=1, device="cpu")  # finished: nothing reruns
    assert again == prior
