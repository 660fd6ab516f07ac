"""FT-LDM: the backbone fine-tuned with the condition latent concatenated, on the Stage-2 test cohort."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from helpers import LATENT_CFG, ellipsoid_session, latent_toml_config
from demist.cli.methods import train_command
from demist.methods import parse_methods
from demist.inference.pipeline import synthesize_images
from demist.methods import load_synthesizer
from demist.models.backbone import build_unet
from demist.models.ftldm_net import ConcatConditionedUNet
from demist.runs import read_run
from demist.training.ftldm import train_ftldm


def test_a_fresh_ftldm_is_exactly_the_backbone_whatever_the_condition():
    torch.manual_seed(0)
    unet = build_unet(LATENT_CFG.unet, LATENT_CFG.autoencoder.latent_channels).eval()
    net = ConcatConditionedUNet.from_backbone(unet, LATENT_CFG.unet, LATENT_CFG.autoencoder.latent_channels).eval()
    x_t, t = torch.randn(2, LATENT_CFG.autoencoder.latent_channels, 8, 8, 8), torch.tensor([10, 700])
    with torch.no_grad():
        expected = unet(x_t, t)
        for scale in (0.0, 1.0, 50.0):
            torch.testing.assert_close(net(x_t, t, scale * torch.randn_like(x_t)), expected, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def ftldm_run(latent_cohort):
    return train_ftldm(latent_cohort["manifest"], latent_cohort["stage1"].path, latent_cohort["backbone"].path,
                       LATENT_CFG, latent_cohort["root"] / "ftldm", device="cpu")


def test_ftldm_fine_tunes_the_whole_unet_and_records_its_parents(latent_cohort, ftldm_run):
    run = ftldm_run
    assert (run.method, run.stage, run.prediction_type) == ("ftldm", "ftldm", "sample")
    assert run.parents["backbone"]["sha256"] == latent_cohort["backbone"].run_json_sha256
    assert run.parents["stage1"]["sha256"] == latent_cohort["stage1"].run_json_sha256
    assert run.training["steps"] == LATENT_CFG.demist.steps
    tuned, backbone = run.weights("unet"), latent_cohort["backbone"].weights("unet")
    latent = LATENT_CFG.autoencoder.latent_channels
    assert tuned["conv_in.conv.weight"].shape[1] == 2 * latent
    assert tuned["conv_in.conv.weight"][:, latent:].abs().sum() > 0  # the condition half has learned
    changed = [k for k in backbone if k != "conv_in.conv.weight" and not torch.equal(tuned[k], backbone[k])]
    assert len(changed) > len(backbone) // 2  # the whole UNet trains, not a few streams


def test_ftldm_synthesizes_on_the_t1w_grid_through_the_common_interface(ftldm_run):
    synthesizer = load_synthesizer(ftldm_run.path, steps=2, device="cpu")
    assert synthesizer.method == "ftldm"
    images = ellipsoid_session(shape=(28, 30, 26), seed=7)
    result = synthesize_images(synthesizer, images["t1w"], images["flair"], images["brain_mask"])
    psr = result.psr.get_fdata()
    assert psr.shape == images["t1w"].shape and np.isfinite(psr).all()
    np.testing.assert_allclose(result.psr.affine, images["t1w"].affine)
    again = synthesize_images(synthesizer, images["t1w"], images["flair"], images["brain_mask"])
    np.testing.assert_array_equal(again.psr.get_fdata(), psr)  # deterministic for a seed


def test_ftldm_trains_from_the_command_line_and_is_a_cv_method(latent_cohort, tmp_path):
    app = typer.Typer()
    app.command("ftldm")(train_command("ftldm"))
    app.command("unused")(lambda: None)  # two commands: typer keeps the subcommand name
    args = ["ftldm", "--manifest", str(latent_cohort["manifest"]), "--stage1", str(latent_cohort["stage1"].path),
            "--backbone", str(latent_cohort["backbone"].path),
            "--config", str(latent_toml_config(tmp_path / "small.toml")),
            "--max-steps", "1", "--device", "cpu", "--out", str(tmp_path / "ft")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "ftldm:" in result.output and read_run(tmp_path / "ft").training["steps"] == 1
    assert [m.name for m in parse_methods("ftldm,demist")] == ["ftldm", "demist", "constant"]
