"""Stage 1: the end-to-end run, the alignment's loss terms and bias-field augmentation, and the CLI's one-line
refusals of bad training input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from demist.config import load_config
from demist.data.manifest import load_manifest
from demist.errors import DemistError
from demist.runs import read_run


def test_stage1_end_to_end_writes_a_verified_stage1_run(small_manifest: Path, tmp_path: Path) -> None:
    from demist.training.stage1 import train_stage1

    cfg = load_config("tiny", overrides={
        "autoencoder": {"channels": [8, 8, 8], "norm_num_groups": 4, "patch_size": [16, 16, 16]},
        "stage1": {"batch_size": 1, "adv_start": 1, "disc_channels": 4}, "align": {"batch_size": 1}})
    run = train_stage1(load_manifest(small_manifest), cfg, tmp_path / "s1", max_steps=2, device="cpu")
    again = read_run(tmp_path / "s1" / "stage1", stages="stage1")
    assert set(again.components) == {"psr_autoencoder", "cond_autoencoder"} and again.latent_scale_factor > 0
    assert again.config.stage1.steps == again.config.align.steps == 2
    assert set(again.parents) == {"psr_ae", "cond_ae"} and run.metrics["align_mse_before"] > 0
    psr_run = read_run(tmp_path / "s1" / "psr_ae", stages="autoencoder-psr")
    assert all(torch.equal(psr_run.weights("autoencoder")[k], v) for k, v in again.weights("psr_autoencoder").items())
    records = [json.loads(x) for x in (tmp_path / "s1" / "psr_ae" / "metrics.jsonl").read_text().splitlines()]
    assert {"recon", "kl", "edge", "adv", "discriminator"} <= set(records[-1])  # the GAN switched on at step 1
    # align.recon_weight = 0 (tiny): only E_cond trains; the condition decoder is exactly the autoencoder run's
    before = read_run(tmp_path / "s1" / "cond_ae", stages="autoencoder-cond").weights("autoencoder")
    after = again.weights("cond_autoencoder")
    decoder = [k for k in after if k.startswith(("decoder.", "post_quant_conv."))]
    assert cfg.align.recon_weight == 0 and decoder
    assert all(torch.equal(after[k], before[k]) for k in decoder)
    assert any(not torch.equal(after[k], before[k]) for k in after if k.startswith("encoder."))


@pytest.mark.parametrize("args, message", [
    (["train", "autoencoder", "--manifest", "{tmp}/none.csv", "--modality", "psr", "--out", "{tmp}/o"],
     "none.csv: file not found"),
    (["train", "autoencoder", "--manifest", "{manifest}", "--modality", "t2", "--out", "{tmp}/o"],
     "--modality t2: unknown"),
    (["train", "stage1", "--manifest", "{manifest}", "--config", "{tmp}/none.toml", "--out", "{tmp}/o"],
     "none.toml: neither a preset"),
    (["train", "align", "--manifest", "{manifest}", "--psr-ae", "{tmp}", "--cond-ae", "{tmp}", "--out", "{tmp}/o"],
     "--psr-ae"),
    (["synthesize", "--model", "{tmp}", "--manifest", "{manifest}", "--out-dir", "{tmp}/p", "--overwrite"],
     "--overwrite/--mask: only for one scan"),
    (["synthesize", "--model", "{tmp}", "--t1w", "{tmp}/t1w.nii.gz"], "missing --flair, -o"),
    (["demo", "--subjects", "3", "--held-out", "3", "--out", "{tmp}/d"], "--held-out 3 with --subjects 3"),
    (["train", "ridge", "--manifest", "{manifest}", "--out", "{manifest}"], "is a file; expected a directory"),
    (["cv", "--manifest", "{manifest}", "--out", "{manifest}"], "is a file; expected a folder"),
    (["train", "prior", "--out", "{manifest}"], "is a file; expected a folder"),
    (["demo", "--distill", "--student-steps", "3", "--out", "{tmp}/d"], "distill.student_steps) 3: its DDIM steps"),
    (["synthesize", "--model", "{tmp}", "--manifest", "{manifest}", "--out-dir", "{manifest}"],
     "--out-dir {manifest}: is a file; expected a folder"),
    (["preprocess", "--t1w", "{manifest}", "--flair", "{manifest}", "--out-dir", "{manifest}"],
     "--out-dir {manifest}: is a file; expected a folder"),
    # checked whatever --model holds, before it loads (a baseline would ignore them)
    (["synthesize", "--model", "{tmp}", "--manifest", "{manifest}", "--out-dir", "{tmp}/p", "--sampler", "foo"],
     "--sampler foo: unknown"),
    (["synthesize", "--model", "{tmp}", "--manifest", "{manifest}", "--out-dir", "{tmp}/p", "--start-strength", "5"],
     "--start-strength: got 5.0; expected a number in (0, 1]"),
    (["synthesize", "--model", "{tmp}", "--manifest", "{manifest}", "--out-dir", "{tmp}/p", "--precision", "fp8"],
     "--precision fp8: expected one of auto, fp32"),
    (["train", "autoencoder", "--manifest", "{manifest}", "--modality", "psr", "--out", "{tmp}/o", "--device", "gpu"],
     "--device gpu: unknown"),
    (["cv", "--manifest", "{manifest}", "--out", "{tmp}/cv", "--folds", "2", "--fold", "5"],
     "--fold 5: expected a fold from 0 to 1"),
    (["preprocess", "--t1w", "{manifest}", "--flair", "{manifest}", "--out-dir", "{tmp}/p", "--subject", "a/b"],
     "--subject 'a/b'; expected a name without '/'"),
])
def test_bad_user_input_is_one_line_with_exit_code_2(args, message, tmp_path: Path, small_manifest: Path,
                                                    monkeypatch, capsys) -> None:
    from demist import cli

    argv = [a.format(tmp=tmp_path, manifest=small_manifest) for a in args]
    message = message.format(manifest=small_manifest)
    monkeypatch.setattr(sys, "argv", ["demist", *argv])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("demist: error:") and message in lines[0], lines


@pytest.mark.parametrize("image_weight", [0.0, 2.0])
def test_alignment_image_term_reaches_only_the_condition_encoder(image_weight: float) -> None:
    from types import SimpleNamespace

    from demist.models.autoencoder import COND_CHANNELS, PSR_CHANNELS, build_autoencoder
    from demist.training.losses import alignment_loss, reconstruction_loss
    from demist.training.stage1 import alignment_stage

    cfg = load_config("tiny", overrides={"autoencoder": {"channels": [8, 8, 8], "norm_num_groups": 4},
                                         "align": {"image_weight": image_weight}})
    torch.manual_seed(0)
    psr_ae, cond_ae = (build_autoencoder(cfg.autoencoder, c) for c in (PSR_CHANNELS, COND_CHANNELS))
    batch = {"cond": torch.rand(1, 2, 16, 16, 16), "target": torch.rand(1, 1, 16, 16, 16),
             "brain": torch.ones(1, 1, 16, 16, 16)}
    stage = alignment_stage(cfg, psr_ae, cond_ae, SimpleNamespace(batch=lambda step: batch))
    modules = {"psr_autoencoder": psr_ae, "cond_autoencoder": cond_ae}
    terms = stage.phases[0].loss(modules, batch, 0, {})
    terms["loss"].backward()
    mu_c, mu_y = cond_ae.encode(batch["cond"])[0], psr_ae.encode(batch["target"])[0]
    expected = alignment_loss(mu_c, mu_y) + cfg.stage1.kl_weight * terms["kl"]
    if image_weight:  # the decoded-PSR term, through the frozen PSR decoder
        image = reconstruction_loss(psr_ae.decode(mu_c), batch["target"], batch["brain"])
        assert torch.allclose(terms["image"], image)
        expected = expected + image_weight * image
    else:
        assert "image" not in terms
    assert torch.allclose(terms["loss"], expected)
    assert all(p.grad is None for p in psr_ae.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cond_ae.encoder.parameters())


def test_random_bias_field_is_smooth_shared_by_the_channels_and_deterministic() -> None:
    from demist.data.augmentation import random_bias_field

    images = torch.rand(3, 2, 24, 24, 24) + 0.5
    out = random_bias_field(images, 0.05, seed=7)
    field = out / images
    assert torch.allclose(field[:, 0], field[:, 1])  # one coil: the same field on T1w and FLAIR
    assert not torch.allclose(field[0], field[1])  # a field of its own per sample
    assert torch.equal(out, random_bias_field(images, 0.05, seed=7)) and not torch.equal(
        out, random_bias_field(images, 0.05, seed=8))
    log_field = field[:, 0].log()
    assert 0.01 < log_field.std() < 0.2 and log_field.mean().abs() < 0.05  # a few % around 1, no global gain
    assert (log_field[:, 1:] - log_field[:, :-1]).abs().max() < 0.05  # smooth: < 5 % from one voxel to the next
    assert random_bias_field(images, 0.0, seed=7) is images


def test_alignment_with_a_bias_field_encodes_the_augmented_condition_against_the_true_target() -> None:
    from types import SimpleNamespace

    from demist.data.augmentation import random_bias_field
    from demist.models.autoencoder import COND_CHANNELS, PSR_CHANNELS, build_autoencoder
    from demist.training.losses import alignment_loss
    from demist.training.stage1 import alignment_stage

    cfg = load_config("tiny", overrides={"autoencoder": {"channels": [8, 8, 8], "norm_num_groups": 4},
                                         "align": {"bias_field": 0.05}})
    torch.manual_seed(0)
    psr_ae, cond_ae = (build_autoencoder(cfg.autoencoder, c) for c in (PSR_CHANNELS, COND_CHANNELS))
    batch = {"cond": torch.rand(1, 2, 16, 16, 16), "target": torch.rand(1, 1, 16, 16, 16),
             "brain": torch.ones(1, 1, 16, 16, 16)}
    stage = alignment_stage(cfg, psr_ae, cond_ae, SimpleNamespace(batch=lambda step: batch))
    torch.manual_seed(5)  # the training loop reseeds every RNG before each loss; the field comes from that state
    terms = stage.phases[0].loss({"psr_autoencoder": psr_ae, "cond_autoencoder": cond_ae}, batch, 3, {})
    mu_y = psr_ae.encode(batch["target"])[0]
    torch.manual_seed(5)
    augmented = random_bias_field(batch["cond"], 0.05)
    assert torch.allclose(terms["align"], alignment_loss(cond_ae.encode(augmented)[0], mu_y))
    assert not torch.allclose(terms["align"], alignment_loss(cond_ae.encode(batch["cond"])[0], mu_y))
    with pytest.raises(DemistError, match="align.bias_field"):
        load_config("tiny", overrides={"align": {"bias_field": -0.1}})
