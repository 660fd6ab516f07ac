"""Latent training patches: sessions encoded once, whole, and latent/image crops that cover the same voxels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from demist.config import load_config
from demist.errors import DemistError
from demist.models.autoencoder import build_autoencoder, encode_volume
from demist.training.latent_patches import LatentPatchSampler, encode_sessions
from helpers import brain_session

CFG = load_config("tiny", overrides={"autoencoder": {"channels": [4, 8], "norm_num_groups": 4,
                                                     "patch_size": [8, 8, 8]}})
FACTOR = 2


@pytest.fixture(scope="module")
def encoded():
    torch.manual_seed(0)
    psr, cond = build_autoencoder(CFG.autoencoder, 1).eval(), build_autoencoder(CFG.autoencoder, 2).eval()
    sessions = [brain_session("a/1", (19, 18, 16), seed=1), brain_session("b/1", (24, 20, 18), seed=2)]
    latents = encode_sessions(sessions, {"z_y": (psr, "target"), "z_c": (cond, "cond")}, 2.0,
                              CFG.autoencoder.patch_size, FACTOR, (8, 8, 8), keep=("target", "cond"))
    return sessions, latents, psr


def test_sessions_are_encoded_whole_as_inference_encodes_them(encoded) -> None:
    sessions, latents, psr = encoded
    first = latents[0]
    # (19, 18, 16) is zero-padded at the far end to whole latent voxels: (20, 18, 16) → latent (10, 9, 8)
    assert first.images["target"].shape == (1, 20, 18, 16) and first.latents["z_c"].shape == (8, 10, 9, 8)
    np.testing.assert_array_equal(first.images["target"][0, :19], sessions[0].psr)
    assert not first.images["target"][0, 19:].any()
    expected = encode_volume(psr, torch.from_numpy(first.images["target"])[None], CFG.autoencoder.patch_size)[0] * 2.0
    torch.testing.assert_close(torch.from_numpy(first.latents["z_y"]), expected)


def test_latent_and_image_patches_cover_the_same_voxels(encoded) -> None:
    _, latents, _ = encoded
    sampler = LatentPatchSampler(latents, (8, 8, 8), FACTOR, batch_size=3, seed=5)
    batch = sampler.batch(4, 1)
    assert batch["z_y"].shape == (3, 8, 4, 4, 4) and batch["z_c"].shape == (3, 8, 4, 4, 4)
    assert batch["target"].shape == batch["brain"].shape == (3, 1, 8, 8, 8) and "cond" not in batch
    for i in range(3):  # find each latent crop in its session; the image crop must sit at factor × its corner
        for session in latents:
            z = session.latents["z_y"]
            for corner in np.ndindex(*(np.asarray(z.shape[1:]) - 3)):
                window = tuple(slice(c, c + 4) for c in corner)
                if np.array_equal(z[(slice(None), *window)], batch["z_y"][i].numpy()):
                    image = tuple(slice(c * FACTOR, (c + 4) * FACTOR) for c in corner)
                    np.testing.assert_array_equal(session.images["target"][(slice(None), *image)],
                                                  batch["target"][i].numpy())
                    break
            else:
                continue
            break
        else:
            pytest.fail(f"latent patch {i} is no crop of any session")


def test_latent_patches_are_a_pure_function_of_seed_step_and_shard(encoded) -> None:
    _, latents, _ = encoded
    sampler = LatentPatchSampler(latents, (8, 8, 8), FACTOR, batch_size=2, seed=5, image_keys=("cond",))
    first, again = sampler.batch(7, 1), LatentPatchSampler(latents, (8, 8, 8), FACTOR, 2, 5, ("cond",)).batch(7, 1)
    assert first.keys() == {"z_y", "z_c", "cond"} and all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["z_y"], sampler.batch(7, 0)["z_y"])
    evaluation = sampler.evaluation_batches(2)
    assert len(evaluation) == 2 and not any(torch.equal(evaluation[0]["z_y"], sampler.batch(s)["z_y"])
                                            for s in range(20))


def test_latent_patch_sampler_checks_its_inputs(encoded) -> None:
    _, latents, _ = encoded
    with pytest.raises(DemistError, match="multiples of the autoencoder's downsampling factor 2"):
        LatentPatchSampler(latents, (8, 7, 8), FACTOR, 1, 0)
    with pytest.raises(DemistError, match="batch_size 0"):
        LatentPatchSampler(latents, (8, 8, 8), FACTOR, 0, 0)
    with pytest.raises(DemistError, match="no sessions"):
        LatentPatchSampler([], (8, 8, 8), FACTOR, 1, 0)


def test_a_volume_smaller_than_the_patch_is_padded_at_the_far_end(encoded) -> None:
    _, _, psr = encoded
    small = brain_session("c/1", shape=(6, 7, 5))
    small.brain[:] = False
    small.brain[1:5, 1:6, 1:4] = True
    (session,) = encode_sessions([small], {"z_y": (psr, "target")}, 1.0, CFG.autoencoder.patch_size, FACTOR, (8, 8, 8),
                                 keep=("target",))
    assert session.images["target"].shape == (1, 8, 8, 8) and session.latents["z_y"].shape == (8, 4, 4, 4)
    np.testing.assert_array_equal(session.images["target"][0, :6, :7, :5], small.psr)
    batch = LatentPatchSampler([session], (8, 8, 8), FACTOR, 1, 0).batch(0)
    np.testing.assert_array_equal(batch["z_y"][0].numpy(), session.latents["z_y"])


def test_only_the_brain_mask_and_the_kept_images_stay_in_memory(encoded) -> None:
    sessions, _, psr = encoded
    (lean,) = encode_sessions(sessions[:1], {"z_y": (psr, "target")}, 1.0, CFG.autoencoder.patch_size, FACTOR,
                              (8, 8, 8))
    assert set(lean.images) == {"brain"} and set(lean.latents) == {"z_y"}
    assert set(LatentPatchSampler([lean], (8, 8, 8), FACTOR, 1, 0, image_keys=()).batch(0)) == {"z_y"}
