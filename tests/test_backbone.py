"""The frozen backbone: building the UNet, and loading checkpoints of both key layouts with a key-by-key check."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from safetensors.torch import save_file

from demist.config import load_config
from demist.errors import DemistError
from demist.models.backbone import (
    attention_block_names,
    build_unet,
    freeze,
    load_backbone_checkpoint,
    load_backbone_state_dict,
)

TINY = load_config("tiny").unet
PAPER = load_config("paper").unet


def to_old_layout(new_state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """A monai-generative (bundle) state dict, written by inverting what MONAI's load_old_state_dict maps.

    Old layout: q/k/v sat directly on the attention block, each block also had `proj_attn` (the output projection),
    and the upsamplers' conv was called `conv` rather than `postconv`.
    """
    generator = torch.Generator().manual_seed(seed)
    old = {}
    for key, value in new_state.items():
        key = re.sub(r"\.attn\.(to_[qkv])\.", r".\1.", key)
        old[key.replace(".upsampler.postconv.", ".upsampler.conv.")] = value
    blocks = sorted({k.split(".attn.to_q.")[0] for k in new_state if ".attn.to_q." in k})
    for block in blocks:
        channels = new_state[f"{block}.attn.to_q.weight"].shape[0]
        old[f"{block}.proj_attn.weight"] = torch.randn(channels, channels, generator=generator)
        old[f"{block}.proj_attn.bias"] = torch.randn(channels, generator=generator)
    return old


def random_unet(cfg=TINY, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A UNet with random weights everywhere, including its (normally zero-initialised) output conv."""
    torch.manual_seed(seed)
    unet = build_unet(cfg, 8, **kwargs)
    torch.nn.init.normal_(unet.out[2].conv.weight, std=0.05)
    return unet


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_paper_architecture_matches_the_bundle_unet():
    with torch.device("meta"):  # shapes only, no memory
        unet = build_unet(PAPER, 8)
    assert sum(p.numel() for p in unet.parameters()) == 189_325_576  # the bundle's 189.3 M parameters
    assert len(attention_block_names(unet)) == 11  # levels 2-3 down (2 each), middle, levels 2-3 up (3 each)
    assert unet.in_channels == unet.out_channels == 8


def test_old_layout_paper_checkpoint_loads_key_by_key():
    source = random_unet(PAPER, seed=1)
    old = to_old_layout(source.state_dict())
    proj_attn = sorted(k for k in old if ".proj_attn." in k)
    assert len(proj_attn) == 22

    target = build_unet(PAPER, 8)
    report = load_backbone_state_dict(target, dict(old), source="bundle.pt")
    assert report.key_format == "old"
    assert report.unused == tuple(proj_attn)
    assert report.loaded == len(source.state_dict())
    assert_same_weights(source, target)
    assert len(old) == report.loaded + 22  # the caller's dict is left intact


def test_old_and_new_layout_files_load(tmp_path):
    source = random_unet()
    torch.save(to_old_layout(source.state_dict()), tmp_path / "old.pt")
    torch.save({"state_dict": source.state_dict()}, tmp_path / "wrapped.pt")
    save_file(source.state_dict(), str(tmp_path / "new.safetensors"))
    x, t = torch.randn(1, 8, 8, 8, 8), torch.tensor([100])
    with torch.no_grad():
        expected = source(x, t)
    for name, layout in [("old.pt", "old"), ("wrapped.pt", "new"), ("new.safetensors", "new")]:
        unet, report = load_backbone_checkpoint(tmp_path / name, TINY)
        assert report.key_format == layout
        assert len(report.unused) == (14 if layout == "old" else 0)  # 7 attention blocks × weight, bias
        assert_same_weights(source, unet)
        with torch.no_grad():
            assert torch.equal(unet(x, t), expected)


@pytest.mark.parametrize("layout", ["old", "new"])
def test_mismatched_checkpoint_names_the_key(layout):
    state = random_unet().state_dict()
    if layout == "old":
        state = to_old_layout(state)
    target = build_unet(TINY, 8)

    missing = dict(state)
    del missing["conv_in.conv.weight"]
    with pytest.raises(DemistError, match=r"missing key\(s\) conv_in\.conv\.weight"):
        load_backbone_state_dict(target, missing)

    renamed = dict(state)
    renamed["time_embed.0.weights"] = renamed.pop("time_embed.0.weight")
    with pytest.raises(DemistError, match=r"time_embed\.0\.weight"):
        load_backbone_state_dict(target, renamed)

    extra = {**state, "middle_block.extra.weight": torch.zeros(1)}
    with pytest.raises(DemistError, match=r"unexpected key\(s\) middle_block\.extra\.weight"):
        load_backbone_state_dict(target, extra)

    wrong_shape = {**state, "conv_in.conv.weight": torch.zeros(32, 4, 3, 3, 3)}
    with pytest.raises(DemistError, match=r"conv_in\.conv\.weight has shape \(32, 4, 3, 3, 3\)"):
        load_backbone_state_dict(target, wrong_shape)


def test_other_architecture_is_refused(tmp_path):
    other = build_unet(dataclasses.replace(TINY, channels=(32, 64, 128)), 8)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(DemistError, match=r"other\.pt: unexpected key\(s\) down_blocks\.2\.resnets\.0\.skip_conn"):
        load_backbone_checkpoint(tmp_path / "other.pt", TINY)


def test_unreadable_checkpoints_are_user_errors(tmp_path):
    with pytest.raises(DemistError, match="not found"):
        load_backbone_checkpoint(tmp_path / "absent.pt", TINY)
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(DemistError, match="junk.pt: not readable"):
        load_backbone_checkpoint(tmp_path / "junk.pt", TINY)
    torch.save({"step": 3}, tmp_path / "nodict.pt")
    with pytest.raises(DemistError, match="not a state dict of tensors"):
        load_backbone_checkpoint(tmp_path / "nodict.pt", TINY)


def test_flash_attention_gives_the_same_output():
    plain = random_unet()
    flash = build_unet(TINY, 8, use_flash_attention=True)
    flash.load_state_dict(plain.state_dict())
    attention = [m for m in flash.modules() if hasattr(m, "use_flash_attention")]
    assert attention and all(m.use_flash_attention for m in attention)
    x, t = torch.randn(2, 8, 8, 8, 8), torch.tensor([3, 900])
    with torch.no_grad():
        torch.testing.assert_close(flash(x, t), plain(x, t), rtol=1e-4, atol=1e-5)


def test_freeze_switches_off_every_gradient():
    unet = freeze(random_unet())
    assert not unet.training
    assert not any(p.requires_grad for p in unet.parameters())
