"""Tiled inference is exact where it must be: blending never changes what a pointwise model computes."""

from __future__ import annotations

import torch

from demist.inference.tiling import tiled
from demist.models.autoencoder import aligned_overlap, encode_volume


def linear_field(shape=(1, 2, 24, 28, 20)) -> torch.Tensor:
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape[2:]], indexing="ij")
    field = 0.3 * grids[0] - 0.2 * grids[1] + 0.05 * grids[2] + 1.0
    return torch.stack([field, 2 * field])[None].expand(shape).clone()


def test_one_tile_covering_the_volume_equals_untiled():
    x = torch.randn(1, 2, 16, 16, 16, dtype=torch.float64)
    conv = torch.nn.Conv3d(2, 3, 3, padding=1).double()
    assert torch.equal(tiled(conv, x, (32, 32, 32), 0.25), conv(x))


def test_pointwise_linear_model_keeps_a_linear_field_exact_across_tile_borders():
    x = linear_field()
    model = lambda t: 3.0 * t[:, :1] - 0.5 * t[:, 1:] + 0.25  # noqa: E731 - pointwise and linear
    out = tiled(model, x, (8, 8, 8), 0.25)
    torch.testing.assert_close(out, model(x), rtol=0, atol=1e-10)


def test_constant_stays_constant_with_resolution_change():
    """A 4× upsampling stand-in (like the decoder) over a constant latent gives a constant image, seamlessly."""
    z = torch.full((1, 1, 12, 16, 8), 0.7, dtype=torch.float64)
    up = lambda t: torch.nn.functional.interpolate(t, scale_factor=4, mode="nearest")  # noqa: E731
    out = tiled(up, z, (8, 8, 8), 0.25)
    assert out.shape == (1, 1, 48, 64, 32)
    torch.testing.assert_close(out, torch.full_like(out, 0.7), rtol=0, atol=1e-12)


def test_keyword_arguments_reach_every_tile():
    x = torch.zeros(1, 1, 16, 16, 16)
    seen = []

    def model(t, scale):
        seen.append(scale)
        return t + scale

    out = tiled(model, x, (8, 8, 8), 0.25, scale=2.0)
    assert len(seen) > 1 and set(seen) == {2.0}
    torch.testing.assert_close(out, torch.full_like(x, 2.0))


def test_a_downsampling_model_lands_on_its_output_grid_at_any_overlap():
    """4× block averaging (like an encoder, local to its 4³ block) tiled at an overlap whose stride (11) is not a
    multiple of 4 equals the untiled result once tiles start on multiples of 4; MONAI's own stride puts tiles off it."""
    x = torch.randn(1, 1, 40, 44, 36, dtype=torch.float64)
    pool = lambda t: torch.nn.functional.avg_pool3d(t, 4)  # noqa: E731
    torch.testing.assert_close(tiled(pool, x, (16, 16, 16), 0.3, downsample=4), pool(x), rtol=0, atol=1e-12)
    assert not torch.allclose(tiled(pool, x, (16, 16, 16), 0.3), pool(x), atol=1e-3)


def test_aligned_overlap_rounds_the_stride_down_to_a_multiple():
    # MONAI's stride is int(edge * (1 - overlap)): 16 * 0.7 = 11.2 -> 11, rounded down to 8; 64 * 0.7 -> 44 stays
    edges = (16, 64, 12)
    strides = [int(edge * (1 - o)) for edge, o in zip(edges, aligned_overlap(edges, 0.3, 4))]
    assert strides == [8, 44, 8] and all(1 - stride / edge >= 0.3 for stride, edge in zip(strides, edges))
    assert aligned_overlap((8,), 0.0, 4) == [0.0]  # a stride of the whole tile: no overlap


def test_an_autoencoder_window_of_an_odd_number_of_latent_voxels_still_encodes_on_the_latent_grid():
    """A 36³ window (9 latent voxels) at overlap 0.5 steps 18 image voxels, off a 4× encoder's grid unless aligned."""
    from types import SimpleNamespace

    from monai.networks.nets.autoencoderkl import AEKLDownsample

    class PoolEncoder(torch.nn.Module):  # a 4× encoder that is local to its 4³ block
        encoder = SimpleNamespace(blocks=[AEKLDownsample(3, 1), AEKLDownsample(3, 1)])

        def encode(self, x):
            return torch.nn.functional.avg_pool3d(x, 4), None

    x = torch.randn(1, 1, 72, 76, 64, dtype=torch.float64)
    torch.testing.assert_close(encode_volume(PoolEncoder(), x, (36, 36, 36)), torch.nn.functional.avg_pool3d(x, 4),
                               rtol=0, atol=1e-12)
