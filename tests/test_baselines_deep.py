"""The deep baselines (KL-GAN, VQ-VAE, cWDM) and cWDM's Haar wavelet transform, with tiny networks on 32³ patches."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import ellipsoid_session, write_session
from demist.baselines.cwdm import CWDMSynthesizer, train_cwdm
from demist.baselines.klgan import KLGANSynthesizer, train_klgan
from demist.baselines.vqvae import VQVAESynthesizer, train_vqvae
from demist.baselines.wavelets import SUBBANDS, dwt3, idwt3
from demist.config import load_config
from demist.data.manifest import write_manifest
from demist.errors import DemistError
from demist.inference.pipeline import synthesize_images
from demist.methods import load_synthesizer
from demist.runs import read_run

CONFIG = load_config("tiny", overrides={
    "data": {"patch_size": [32, 32, 32]},
    "autoencoder": {"channels": [8, 16, 16], "latent_channels": 4, "norm_num_groups": 8},
    "train": {"log_every": 1},
    "stage1": {"disc_channels": 8},
    "baselines": {"batch_size": 1, "klgan_adv_start": 1, "vq_channels": [8, 16], "vq_num_embeddings": 16,
                  "vq_embedding_dim": 8, "cwdm_channels": [16, 32, 32], "cwdm_num_head_channels": 16,
                  "cwdm_norm_num_groups": 8},
    "sampling": {"steps": 2},
})
STEPS = 2
TRAINERS = {"klgan": (train_klgan, KLGANSynthesizer), "vqvae": (train_vqvae, VQVAESynthesizer),
            "cwdm": (train_cwdm, CWDMSynthesizer)}


# --- the Haar transform -----------------------------------------------------------------------------------------


def test_haar_round_trip_is_exact_and_orthonormal():
    x = torch.randn(2, 3, 8, 6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    bands = dwt3(x)
    assert bands.shape == (2, 3 * len(SUBBANDS), 4, 3, 2) and bands.dtype == torch.float64
    assert torch.allclose(idwt3(bands), x, rtol=0, atol=1e-12)
    assert float((bands**2).sum()) == pytest.approx(float((x**2).sum()), rel=1e-12)  # energy preserved


def test_haar_sub_bands_of_a_constant_and_of_an_impulse():
    constant = torch.full((1, 2, 4, 4, 4), 0.5, dtype=torch.float64)
    bands = dwt3(constant).reshape(1, 2, 8, 2, 2, 2)
    assert torch.allclose(bands[:, :, 0], torch.full_like(bands[:, :, 0], 0.5 * 2 * math.sqrt(2)))  # low-pass first
    assert bands[:, :, 1:].abs().max() < 1e-12  # no detail in a constant
    impulse = torch.zeros(1, 1, 2, 2, 2, dtype=torch.float64)
    impulse[0, 0, 1, 0, 1] = 1.0
    coefficients = dwt3(impulse).flatten()
    assert torch.allclose(coefficients.abs(), torch.full((8,), 1 / math.sqrt(8), dtype=torch.float64))
    with pytest.raises(ValueError, match="even"):
        dwt3(torch.zeros(1, 1, 3, 4, 4))


# --- training, saving, loading, synthesis -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cohort")
    rows = [{"subject": f"s{i}", "session": "a", "group": "MS",
             **write_session(root / f"s{i}", ellipsoid_session(seed=i))} for i in range(2)]
    return write_manifest(root / "manifest.csv", rows)


@pytest.fixture(scope="module", params=sorted(TRAINERS))
def trained(request, manifest, tmp_path_factory):
    method = request.param
    out = tmp_path_factory.mktemp(method) / "run"
    train_fn, cls = TRAINERS[method]
    model = train_fn(manifest, CONFIG, out, max_steps=STEPS, device="cpu")
    return method, cls, model, out


def test_training_writes_a_baseline_run(trained, manifest):
    method, cls, model, out = trained
    run = read_run(out)
    assert (run.method, run.stage) == (method, "baseline")
    assert run.config.baselines.steps == STEPS and run.training["steps"] == STEPS
    assert run.prediction_type == ("sample" if method == "cwdm" else None)
    assert math.isfinite(run.metrics["train_patch_psnr"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    if method == "klgan":  # the adversarial phase switched on at step 1
        assert "adv" in records[-1] and "discriminator" in records[-1]
    if method == "vqvae":
        assert "quantization" in records[-1]
    with pytest.raises(DemistError, match="already holds a finished run"):
        TRAINERS[method][0](manifest, CONFIG, out, max_steps=STEPS, device="cpu")


def test_saved_run_synthesizes_on_the_t1w_grid_like_the_trained_model(trained):
    method, cls, model, out = trained
    loaded = load_synthesizer(out, device="cpu")
    assert isinstance(loaded, cls) and loaded.method == method
    images = ellipsoid_session(seed=5)
    result = synthesize_images(loaded, images["t1w"], images["flair"], images["brain_mask"])
    psr = result.psr.get_fdata()
    assert psr.shape == images["t1w"].shape
    np.testing.assert_allclose(result.psr.affine, images["t1w"].affine)
    assert np.isfinite(psr).all() and np.all(psr[images["brain_mask"].get_fdata() == 0] == 0)
    assert np.abs(psr).max() > 0
    assert result.std is None
    trained_state, loaded_state = model.network.state_dict(), loaded.network.state_dict()
    assert trained_state.keys() == loaded_state.keys()  # the run holds the trained weights (EMA codebook included)
    assert all(torch.equal(trained_state[k].cpu(), loaded_state[k]) for k in trained_state)


@pytest.mark.parametrize("trained", ["cwdm"], indirect=True)
def test_cwdm_samples_give_a_mean_and_an_sd(trained):
    model = CWDMSynthesizer.load(trained[3], device="cpu", sampler="ddim", steps=1)
    assert (model.sampler, model.steps) == ("ddim", 1)
    images = ellipsoid_session(shape=(28, 30, 26), seed=6)
    first = synthesize_images(model, images["t1w"], images["flair"], images["brain_mask"], samples=2, seed=1)
    same = synthesize_images(model, images["t1w"], images["flair"], images["brain_mask"], samples=2, seed=1)
    other = synthesize_images(model, images["t1w"], images["flair"], images["brain_mask"], samples=2, seed=2)
    assert first.std is not None and first.std.shape == images["t1w"].shape
    std = first.std.get_fdata()
    assert std.min() >= 0 and std.max() > 0
    np.testing.assert_array_equal(first.psr.get_fdata(), same.psr.get_fdata())
    assert not np.array_equal(first.psr.get_fdata(), other.psr.get_fdata())


def test_patch_size_must_fit_the_network(manifest, tmp_path):
    bad = CONFIG.replace(data=dataclasses.replace(CONFIG.data, patch_size=(36, 36, 36)))
    with pytest.raises(DemistError, match="data.patch_size"):
        train_cwdm(manifest, bad, tmp_path / "run", max_steps=1, device="cpu")
