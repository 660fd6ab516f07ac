"""The tiles and windows inference runs in under a memory budget: the UNet and GroupNorm autoencoders at their
training tile, channel-norm autoencoders in one piece when it fits, and a budget too small refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from demist.config import load_config
from demist.errors import DemistError
from demist.inference.memory import BASE_BYTES, GIB, autoencoder_window, call_bytes, resident_bytes, unet_tile

TINY = load_config("tiny")  # UNet tile 16³ latent voxels; autoencoder patch 32³ image voxels, 4× downsampling
CHANNEL = TINY.replace(autoencoder=dataclasses.replace(TINY.autoencoder, norm="channel"))
RESIDENT = 0.5 * GIB


def test_the_unet_runs_at_its_training_tile_cut_to_the_volume_whatever_the_budget():
    assert unet_tile(TINY, (24, 28, 24), 4.0, RESIDENT) == (16, 16, 16)
    assert unet_tile(TINY, (24, 28, 24), 1000.0, RESIDENT) == (16, 16, 16)  # a big budget does not untile it
    assert unet_tile(TINY, (12, 28, 8), 4.0, RESIDENT) == (12, 16, 8)


def test_groupnorm_autoencoders_run_in_their_training_window():
    assert TINY.autoencoder.patch_size == (32, 32, 32)
    assert autoencoder_window(TINY, "encode", (96, 112, 96), 1000.0, RESIDENT) == (32, 32, 32)
    assert autoencoder_window(TINY, "decode", (24, 28, 24), 1000.0, RESIDENT) == (8, 8, 8)
    assert autoencoder_window(TINY, "encode", (16, 112, 96), 4.0, RESIDENT) == (16, 32, 32)


def test_a_channel_norm_autoencoder_runs_in_one_piece_when_it_fits_and_in_smaller_windows_when_not():
    whole = (96, 112, 96)
    assert autoencoder_window(CHANNEL, "encode", whole, 4.0, RESIDENT) == whole
    assert autoencoder_window(CHANNEL, "decode", (24, 28, 24), 4.0, RESIDENT) == (24, 28, 24)
    budget = (RESIDENT + call_bytes(CHANNEL, "encode", (48, 48, 48)) * 1.1) / GIB  # fits 48³, not the whole
    window = autoencoder_window(CHANNEL, "encode", whole, budget, RESIDENT)
    assert window != whole and all(w % 4 == 0 and w >= 32 for w in window)
    assert call_bytes(CHANNEL, "encode", window) + RESIDENT <= budget * GIB


@pytest.mark.parametrize("part, spatial", [("step", (24, 28, 24)), ("encode", (96, 112, 96)),
                                           ("decode", (24, 28, 24))])
def test_a_budget_below_one_training_tile_is_refused_with_what_it_needs(part, spatial):
    check = unet_tile if part == "step" else lambda c, s, g, r: autoencoder_window(c, part, s, g, r)
    with pytest.raises(DemistError, match=r"--max-memory 0.5: one .* needs about \d+\.\d GiB"):
        check(TINY, spatial, 0.5, RESIDENT)  # the budget holds the networks, no call


def test_a_channel_norm_autoencoder_refuses_a_budget_below_its_smallest_window():
    with pytest.raises(DemistError, match=r"--max-memory 0.5: one .* needs about \d+\.\d GiB"):
        autoencoder_window(CHANNEL, "encode", (96, 112, 96), 0.5, RESIDENT)


def test_resident_memory_counts_parameters_and_buffers():
    # Linear: 110 float parameters; BatchNorm: 8 float parameters, 8 float buffers and an int64 step counter
    layer, norm = torch.nn.Linear(10, 10), torch.nn.BatchNorm1d(4)
    assert resident_bytes([layer]) == BASE_BYTES + 110 * 4
    assert resident_bytes([layer, norm]) == BASE_BYTES + (110 + 8 + 8) * 4 + 8  # num_batches_tracked is int64


def test_the_estimate_grows_with_the_input_and_counts_attention_only_without_sdpa():
    assert call_bytes(TINY, "step", (32, 32, 32)) == pytest.approx(8 * call_bytes(TINY, "step", (16, 16, 16)))
    assert call_bytes(TINY, "step", (16, 16, 16), plain_attention=True) > call_bytes(TINY, "step", (16, 16, 16))
    assert call_bytes(TINY, "decode", (16, 16, 16)) == call_bytes(TINY, "encode", (64, 64, 64))
