"""The Stage-1 autoencoders: architecture, bundle weights in the old key layout, the 2-channel adaptation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from demist.config import load_config
from demist.errors import DemistError
from demist.models.autoencoder import (COND_CHANNELS, PSR_CHANNELS, autoencoder_from_state, build_autoencoder,
                                       decode_volume, downsampling_factor, encode_volume, load_bundle_autoencoder,
                                       reconstruct)


def monai_old_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """monai-generative key names, by inverting MONAI's `load_old_state_dict` for an autoencoder without attention.

    MONAI maps the old upsampling convolution `….conv.…` to `….postconv.…` and copies every other key unchanged.
    """
    return {k.replace(".postconv.", ".conv."): v.clone() for k, v in state.items()}


@pytest.fixture(scope="module")
def paper_cfg():
    return load_config("paper").autoencoder


def seeded(cfg, channels: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_autoencoder(cfg, channels).eval()


def test_tiny_autoencoder_downsamples_four_times_to_eight_channels() -> None:
    cfg = load_config("tiny").autoencoder
    model = seeded(cfg, PSR_CHANNELS, 0)
    assert downsampling_factor(cfg) == 4
    x = torch.rand(2, 1, 16, 12, 8)
    recon, mu, sigma = model(x)
    assert recon.shape == x.shape and mu.shape == sigma.shape == (2, 8, 4, 3, 2)
    assert not any("attn" in name for name, _ in model.named_modules())


def test_whole_volumes_go_window_by_window() -> None:
    model = seeded(load_config("tiny").autoencoder, COND_CHANNELS, 0)
    x = torch.rand(1, 2, 16, 16, 16)
    with torch.no_grad():  # a volume of exactly one window is one plain encode / decode
        torch.testing.assert_close(encode_volume(model, x, (16, 16, 16)), model.encode(x)[0])
        z = model.encode(x)[0]
        torch.testing.assert_close(decode_volume(model, z, (16, 16, 16)), model.decode(z))
    big = torch.rand(1, 2, 24, 32, 20)
    assert encode_volume(model, big, (16, 16, 16)).shape == (1, 8, 6, 8, 5)
    assert reconstruct(model, torch.rand(1, 2, 10, 13, 7), (8, 8, 8)).shape == (1, 2, 10, 13, 7)
    with pytest.raises(ValueError, match="multiples of 4"):
        encode_volume(model, torch.rand(1, 2, 10, 12, 8), (8, 8, 8))


def test_old_layout_bundle_file_loads_to_the_same_outputs(tmp_path: Path, paper_cfg, capsys) -> None:
    reference = seeded(paper_cfg, PSR_CHANNELS, 0)
    old = monai_old_layout(reference.state_dict())
    assert set(old) != set(reference.state_dict())  # really the old layout: upsampling convs renamed
    torch.save(old, tmp_path / "autoencoder.pt")
    # MONAI's own mapping accepts the inverted keys (a copy: it pops what it uses).
    direct = seeded(paper_cfg, PSR_CHANNELS, 1)
    direct.load_old_state_dict(dict(old))
    capsys.readouterr()

    model = seeded(paper_cfg, PSR_CHANNELS, 1)
    load_bundle_autoencoder(model, tmp_path / "autoencoder.pt")
    assert capsys.readouterr().out == ""  # MONAI's prints go to the logger, not stdout
    x = torch.rand(1, 1, 8, 8, 8)
    with torch.no_grad():
        expected = reference.decode(reference.encode(x)[0])
        assert torch.equal(model.decode(model.encode(x)[0]), expected)
        assert torch.equal(direct.decode(direct.encode(x)[0]), expected)
    assert len(old) == len(reference.state_dict())  # the file's dict was not consumed


def test_new_layout_file_also_loads(tmp_path: Path) -> None:
    cfg = load_config("tiny").autoencoder
    reference = seeded(cfg, PSR_CHANNELS, 0)
    torch.save({"state_dict": reference.state_dict()}, tmp_path / "ae.pt")
    model = seeded(cfg, PSR_CHANNELS, 3)
    load_bundle_autoencoder(model, tmp_path / "ae.pt")
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


def test_condition_autoencoder_from_a_one_channel_bundle(tmp_path: Path, paper_cfg) -> None:
    """T1w = FLAIR gives the pretrained activations; each output channel is the pretrained reconstruction."""
    reference = seeded(paper_cfg, PSR_CHANNELS, 0)
    torch.save(monai_old_layout(reference.state_dict()), tmp_path / "autoencoder.pt")
    cond = seeded(paper_cfg, COND_CHANNELS, 1)
    load_bundle_autoencoder(cond, tmp_path / "autoencoder.pt")
    x = torch.rand(1, 1, 8, 8, 8)
    with torch.no_grad():
        mu_ref = reference.encode(x)[0]
        mu_cond = cond.encode(x.repeat(1, 2, 1, 1, 1))[0]
        torch.testing.assert_close(mu_cond, mu_ref, rtol=1e-5, atol=1e-5)
        recon = cond.decode(mu_ref)
        expected = reference.decode(mu_ref)
    assert recon.shape == (1, 2, 8, 8, 8)
    torch.testing.assert_close(recon[:, :1], expected)
    torch.testing.assert_close(recon[:, 1:], expected)


def test_bundle_of_another_architecture_is_refused_in_one_line(tmp_path: Path, paper_cfg) -> None:
    tiny = seeded(load_config("tiny").autoencoder, PSR_CHANNELS, 0)
    torch.save(monai_old_layout(tiny.state_dict()), tmp_path / "tiny.pt")
    with pytest.raises(DemistError, match="tiny.pt") as info:
        load_bundle_autoencoder(seeded(paper_cfg, PSR_CHANNELS, 0), tmp_path / "tiny.pt")
    assert "\n" not in str(info.value)


def test_unreadable_or_missing_bundle_files_are_refused(tmp_path: Path) -> None:
    model = seeded(load_config("tiny").autoencoder, PSR_CHANNELS, 0)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DemistError, match="not readable"):
        load_bundle_autoencoder(model, tmp_path / "junk.pt")
    torch.save({"weights": [1, 2, 3]}, tmp_path / "list.pt")
    with pytest.raises(DemistError, match="not a state dict"):
        load_bundle_autoencoder(model, tmp_path / "list.pt")
    with pytest.raises(DemistError, match="not found"):
        load_bundle_autoencoder(model, tmp_path / "missing.pt")


def test_autoencoder_from_state_infers_the_channels() -> None:
    cfg = load_config("tiny").autoencoder
    cond = seeded(cfg, COND_CHANNELS, 0)
    rebuilt = autoencoder_from_state(cfg, cond.state_dict())
    assert rebuilt.encoder.blocks[0].conv.in_channels == COND_CHANNELS


def test_channel_norm_keeps_the_keys_and_makes_outputs_independent_of_far_content() -> None:
    import dataclasses

    group_cfg = load_config("tiny").autoencoder
    channel_cfg = dataclasses.replace(group_cfg, norm="channel")
    group, channel = seeded(group_cfg, PSR_CHANNELS, 0), seeded(channel_cfg, PSR_CHANNELS, 0)
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in channel.modules())
    assert set(channel.state_dict()) == set(group.state_dict())  # same keys: runs and bundles load either way
    channel.load_state_dict(group.state_dict(), strict=True)

    # Change the far end of a long volume: with GroupNorm the statistics move every latent voxel; with the channel
    # norm the near end, outside the changed voxels' receptive field, stays exactly as it was.
    x = torch.rand(1, 1, 16, 16, 160)
    far = x.clone()
    far[..., 96:] = 3.0
    with torch.no_grad():
        near = lambda model, image: model.encode(image)[0][..., :4]  # noqa: E731  image voxels 0-15
        torch.testing.assert_close(near(channel, far), near(channel, x), rtol=0, atol=1e-6)
        assert (near(group, far) - near(group, x)).abs().max() > 1e-3


def test_unknown_autoencoder_norm_is_refused() -> None:
    import dataclasses

    with pytest.raises(DemistError, match="autoencoder.norm.*group, channel"):
        dataclasses.replace(load_config("tiny").autoencoder, norm="batch")
