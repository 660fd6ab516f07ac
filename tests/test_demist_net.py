"""DemistNet: the frozen backbone plus three zero-initialised conditioning streams (tiny config, CPU)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from monai.networks.blocks import CrossAttentionBlock
from monai.networks.nets import ControlNet

from demist.config import load_config
from demist.errors import DemistError
from demist.models.backbone import attention_block_names, build_unet
from demist.models.crossattn import CrossAttentionWrapper
from demist.models.demist_net import DemistNet
from demist.models.lora import lora_layers

CFG = load_config("tiny")
SHAPE = (2, 8, 8, 8, 8)  # latent (B, C, X, Y, Z): multiples of 4 for the two UNet downsamplings


def random_backbone(seed: int = 0, use_flash_attention: bool = False) -> torch.nn.Module:
    """A tiny backbone with random weights everywhere, including its (normally zero) output conv."""
    torch.manual_seed(seed)
    unet = build_unet(CFG.unet, 8, use_flash_attention=use_flash_attention)
    torch.nn.init.normal_(unet.out[2].conv.weight, std=0.05)
    return unet


def make_net(backbone=None, **flags) -> DemistNet:
    """A DemistNet whose ControlNet sees z_c only unless `controlnet_hint` says otherwise (tests of the image hint
    pass it explicitly)."""
    demist = dataclasses.replace(CFG.demist, **{"controlnet_hint": "latent", **flags})
    return DemistNet(copy.deepcopy(backbone or random_backbone()), demist, CFG.unet, 8)


def wake_zero_inits(net: DemistNet, seed: int = 1) -> None:
    """Give every zero-initialised path (cross-attention output, ControlNet gates, LoRA B) non-zero weights."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in net.named_parameters():
            zero_init = ("cross_attention.out_proj" in name or "controlnet_" in name or ".lora_B." in name
                         or "image_hint.conv_out" in name)
            if zero_init:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def inputs(seed: int = 2):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(SHAPE, generator=generator), torch.tensor([10, 700]),
            torch.randn(SHAPE, generator=generator))


def test_untrained_net_predicts_exactly_what_the_backbone_predicts():
    backbone = random_backbone()
    net = make_net(backbone)
    x_t, t, z_c = inputs()
    with torch.no_grad():
        reference = backbone(x_t, t)
        assert reference.abs().mean() > 0.01  # a non-trivial output to compare against
        assert torch.equal(net(x_t, t, z_c), reference)
        wake_zero_inits(net)
        assert not torch.allclose(net(x_t, t, z_c), reference, atol=1e-3)  # the streams do reach the output


def test_backbone_gets_no_gradient_and_stays_bit_identical_while_streams_learn():
    net = make_net()
    wake_zero_inits(net)
    frozen = {k: v.clone() for k, v in net.state_dict().items() if k not in net.trainable_state_dict()}
    trained_before = {k: v.clone() for k, v in net.trainable_state_dict().items()}
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-3)
    x_t, t, z_c = inputs()
    for _ in range(3):
        optimizer.zero_grad()
        net(x_t, t, z_c).square().mean().backward()
        assert all(p.grad is None for p in net.parameters() if not p.requires_grad)
        optimizer.step()

    for key, value in net.state_dict().items():
        if key in frozen:
            assert torch.equal(value, frozen[key]), key
    changed = {k for k, v in net.trainable_state_dict().items() if not torch.equal(v, trained_before[k])}
    for mark in ("token_encoder.", ".cross_attention.", "controlnet.", ".lora_A.", ".lora_B."):
        assert any(mark in k for k in changed), mark


def test_lora_merge_gives_the_unmerged_output():
    net = make_net()
    wake_zero_inits(net)
    x_t, t, z_c = inputs()
    q_weight = net.backbone.get_submodule("middle_block.attention.block.attn.to_q.base_layer").weight
    original = q_weight.detach().clone()
    with torch.no_grad():
        unmerged = net(x_t, t, z_c)
        net.merge_lora()
        assert net.lora_merged and not torch.equal(q_weight, original)
        torch.testing.assert_close(net(x_t, t, z_c), unmerged, rtol=1e-4, atol=1e-5)
        net.unmerge_lora()
        assert not net.lora_merged
        torch.testing.assert_close(q_weight, original, rtol=0, atol=1e-6)
        torch.testing.assert_close(net(x_t, t, z_c), unmerged, rtol=1e-5, atol=1e-6)


def test_lora_merge_leaves_the_added_identity_output_projection_unmerged():
    # merged, its diagonal 1 + Δ would lose Δ's small part under bf16 autocast
    net = make_net(lora_output_projection=True)
    wake_zero_inits(net)
    out_proj = net.backbone.get_submodule("middle_block.attention.block.attn.out_proj")
    to_q = net.backbone.get_submodule("middle_block.attention.block.attn.to_q")
    identity = out_proj.get_base_layer().weight.detach().clone()
    assert torch.equal(identity, torch.eye(*identity.shape))
    net.merge_lora()
    assert to_q.merged and not out_proj.merged and net.lora_merged
    assert torch.equal(out_proj.get_base_layer().weight, identity)
    x = torch.randn(5, identity.shape[1])
    torch.testing.assert_close(out_proj(x), x + out_proj.lora_B["default"](out_proj.lora_A["default"](x))
                               * out_proj.scaling["default"])


@pytest.mark.parametrize("output_projection", [True, False])
def test_lora_targets_are_exactly_the_self_attention_projections(output_projection):
    net = make_net(crossattn=False, controlnet=False, lora_output_projection=output_projection)
    blocks = attention_block_names(build_unet(CFG.unet, 8))
    assert len(blocks) == 7  # levels 2-3 down (1 each), middle, levels 2-3 up (2 each)
    projections = ("to_q", "to_k", "to_v", "out_proj") if output_projection else ("to_q", "to_k", "to_v")
    expected = sorted(f"{b}.attn.{p}" for b in blocks for p in projections)
    assert sorted(lora_layers(net.backbone)) == expected == sorted(net.lora_targets)
    linear_total = sum(isinstance(m, torch.nn.Linear) for m in build_unet(CFG.unet, 8).modules())
    assert linear_total > len(expected)  # time-embedding MLP and time_emb_proj layers exist and got none
    assert not any("time_emb" in name for name in lora_layers(net.backbone))
    lora_a = net.backbone.get_submodule("down_blocks.1.attentions.0.attn.to_v").lora_A["default"]
    assert lora_a.weight.shape == (CFG.demist.lora_rank, 64)


def test_new_modules_get_no_lora_and_the_controlnet_no_cross_attention():
    net = make_net()
    assert len(net.lora_targets) == 28  # q, k, v and W_O of 7 blocks
    assert all(".block.attn." in name for name in lora_layers(net.backbone))  # none in the cross-attention
    assert not lora_layers(net.controlnet)
    assert not any(isinstance(m, (CrossAttentionWrapper, CrossAttentionBlock)) for m in net.controlnet.modules())
    assert len(net.crossattn_blocks) == 7


@pytest.mark.parametrize("off", ["crossattn", "controlnet", "lora"])
def test_each_ablation_flag_removes_exactly_its_stream(off):
    backbone = random_backbone()
    net = make_net(backbone, **{off: False})
    wrappers = [m for m in net.modules() if isinstance(m, CrossAttentionWrapper)]
    keys = net.state_dict().keys()
    present = {
        "crossattn": net.token_encoder is not None and len(wrappers) == 7 and any("cross_" in k for k in keys),
        "controlnet": isinstance(net.controlnet, ControlNet) and any(k.startswith("controlnet.") for k in keys),
        "lora": len(lora_layers(net)) == 28 and any(".lora_" in k for k in keys),
    }
    absent = {
        "crossattn": net.token_encoder is None and not wrappers
        and not any("cross_" in k or "token" in k for k in keys),
        "controlnet": net.controlnet is None and not any(k.startswith("controlnet.") for k in keys),
        "lora": not lora_layers(net) and not any(".lora_" in k or "base_layer" in k for k in keys),
    }
    for flag in present:
        assert (absent if flag == off else present)[flag], flag
    counts = net.parameter_counts()
    stream = {"crossattn": "semantic", "controlnet": "spatial", "lora": "adaptive"}
    for flag, name in stream.items():
        assert (counts[name]["trainable"] == 0) == (flag == off), name
    x_t, t, z_c = inputs()
    with torch.no_grad():
        assert torch.equal(net(x_t, t, z_c), backbone(x_t, t))


def test_parameter_counts_split_frozen_backbone_from_trainable_streams():
    backbone = random_backbone()
    net = make_net(backbone)
    counts = net.parameter_counts()
    # frozen: the backbone's own weights, plus the identity W_O layers that carry LoRA (C×C + C per block)
    identity = sum(c * c + c for c in (m.block.norm.num_channels for m in net.modules()
                                       if isinstance(m, CrossAttentionWrapper)))
    assert counts["backbone"] == {"trainable": 0, "frozen": sum(p.numel() for p in backbone.parameters()) + identity}
    spatial = [net.controlnet] + ([net.output_head] if net.output_head is not None else [])
    assert counts["spatial"]["trainable"] == sum(p.numel() for m in spatial for p in m.parameters())
    # per attention block with C channels: rank-r factors A (r×C) and B (C×r) for each of q, k, v and W_O
    rank = CFG.demist.lora_rank
    lora = sum(4 * 2 * rank * m.block.norm.num_channels for m in net.modules() if isinstance(m, CrossAttentionWrapper))
    assert counts["adaptive"] == {"trainable": lora, "frozen": 0}
    assert counts["total"]["trainable"] == sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert counts["total"]["frozen"] == sum(p.numel() for p in net.parameters() if not p.requires_grad)
    assert sum(c["trainable"] + c["frozen"] for n, c in counts.items() if n != "total") == sum(
        p.numel() for p in net.parameters())


def test_controlnet_starts_from_the_backbone_with_zero_gates():
    backbone = random_backbone()
    net = make_net(backbone, controlnet_gate_init="zero")
    reference = backbone.state_dict()
    copied = {k: v for k, v in net.controlnet.state_dict().items() if not k.startswith("controlnet_")}
    assert copied and all(torch.equal(v, reference[k]) for k, v in copied.items())
    gates = {k: v for k, v in net.controlnet.state_dict().items() if k.startswith("controlnet_")}
    assert gates and all(not v.any() for v in gates.values())
    assert net.controlnet.controlnet_cond_embedding.conv.kernel_size == (1, 1, 1)


def test_trainable_state_dict_holds_only_the_new_parts_and_round_trips():
    backbone = random_backbone()
    net = make_net(backbone)
    wake_zero_inits(net)
    state = net.trainable_state_dict()
    backbone_keys = set(backbone.state_dict())
    assert not any(k.startswith("backbone.") and k[len("backbone."):] in backbone_keys for k in state)
    assert sum(v.numel() for v in state.values()) == net.parameter_counts()["total"]["trainable"]

    fresh = make_net(backbone)
    fresh.load_trainable_state_dict(state)
    x_t, t, z_c = inputs()
    with torch.no_grad():
        assert torch.equal(fresh(x_t, t, z_c), net(x_t, t, z_c))

    key = next(k for k in state if ".lora_B." in k)
    with pytest.raises(DemistError, match=f"missing key {key}"):
        fresh.load_trainable_state_dict({k: v for k, v in state.items() if k != key}, source="stage2.safetensors")
    with pytest.raises(DemistError, match=r"unexpected key controlnet\..*controlnet=False"):
        make_net(backbone, controlnet=False).load_trainable_state_dict(state)
    with pytest.raises(DemistError, match=f"{key} has shape"):
        fresh.load_trainable_state_dict({**state, key: torch.zeros(1, 1)})


def test_copies_and_bad_inputs():
    net = make_net()
    wake_zero_inits(net)
    twin = copy.deepcopy(net)  # e.g. an EMA copy: its cross-attention reads its own tokens
    x_t, t, z_c = inputs()
    with torch.no_grad():
        assert torch.equal(twin(x_t, t, z_c), net(x_t, t, z_c))
        with pytest.raises(RuntimeError, match="without tokens"):
            net.backbone(x_t, t)
    with pytest.raises(DemistError, match="z_c: shape"):
        net(x_t, t, z_c[:, :, :4])
    with pytest.raises(DemistError, match="multiples of 4"):
        net(x_t[..., :6], t, z_c[..., :6])


def test_flash_attention_and_bf16_autocast():
    backbone = random_backbone()
    net = make_net(backbone)
    wake_zero_inits(net)
    flash_backbone = random_backbone(use_flash_attention=True)
    flash_backbone.load_state_dict(backbone.state_dict())
    flash = make_net(flash_backbone)
    flash.load_trainable_state_dict(net.trainable_state_dict())
    assert all(m.cross_attention.use_flash_attention for m in flash.modules() if isinstance(m, CrossAttentionWrapper))
    x_t, t, z_c = inputs()
    with torch.no_grad():
        reference = net(x_t, t, z_c)
        torch.testing.assert_close(flash(x_t, t, z_c), reference, rtol=1e-4, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = flash(x_t, t, z_c)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    error = (low.float() - reference).norm() / reference.norm()
    assert error < 0.05


def test_cross_attention_without_lora_trains_on_cpu():
    """Regression: MONAI's attention returns channels-last tensors and torch's CPU GroupNorm backward crashed on
    them when the input needed no gradient (cross-attention at the first attention level, LoRA off)."""
    import torch
    from torch import nn

    from demist.models.crossattn import CrossAttentionWrapper, TokenSlot

    class ChannelsLastBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.GroupNorm(16, 64)
            self.attn = type("A", (), {"num_heads": 2, "use_flash_attention": False})()

        def forward(self, x):
            return x.to(memory_format=torch.channels_last_3d)

    slot = TokenSlot()
    wrapper = CrossAttentionWrapper(ChannelsLastBlock(), token_dim=8, slot=slot)
    x = torch.randn(1, 64, 4, 4, 4)
    with slot.holding(torch.randn(1, 5, 8)):
        wrapper(x).square().mean().backward()
    assert wrapper.cross_norm.weight.grad is not None


GATE_AND_HINT = [(g, h) for g in ("zero", "default") for h in ("latent", "latent+image", "latent+subpixel")]


def image_for(x_t: torch.Tensor, seed: int = 3) -> torch.Tensor:
    """T1w + FLAIR at image resolution under the latent x_t (4× per axis for the tiny autoencoder)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((x_t.shape[0], 2, *(4 * s for s in x_t.shape[2:])), generator=generator)


@pytest.mark.parametrize("gate_init,hint", GATE_AND_HINT)
def test_network_equals_backbone_at_init_for_every_gate_init_and_hint(gate_init, hint):
    backbone = random_backbone()
    net = make_net(backbone, controlnet_gate_init=gate_init, controlnet_hint=hint)
    x_t, t, z_c = inputs()
    image_hint = net.embed_image(image_for(x_t)) if hint != "latent" else None
    assert net.uses_image == (hint != "latent")
    with torch.no_grad():
        reference = backbone(x_t, t)
        assert torch.equal(net(x_t, t, z_c, image_hint), reference)
        zero = net.zero_initialised_parameters()
        assert zero and all(not p.any() for p in zero)
        gate = net.controlnet.controlnet_cond_embedding.conv.weight
        assert (any(p is gate for p in zero), bool(gate.any())) == ((True, False) if gate_init == "zero"
                                                                    else (False, True))
        wake_zero_inits(net)
        assert not torch.allclose(net(x_t, t, z_c, image_hint), reference, atol=1e-3)


@pytest.mark.parametrize("hint", ["latent+image", "latent+subpixel"])
def test_image_hint_trains_and_is_checked(hint):
    net = make_net(controlnet_gate_init="default", controlnet_hint=hint)
    wake_zero_inits(net)
    x_t, t, z_c = inputs()
    image = image_for(x_t)
    hint = net.embed_image(image)
    assert hint.shape == (x_t.shape[0], CFG.unet.channels[0], *x_t.shape[2:])
    net(x_t, t, z_c, hint).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.image_hint.parameters())
    assert "spatial" in net.parameter_counts() and any(k.startswith("image_hint.") for k in net.trainable_state_dict())
    with pytest.raises(DemistError, match="image_hint: missing"):
        net(x_t, t, z_c)
    with pytest.raises(DemistError, match="image_hint: shape"):
        net(x_t, t, z_c, hint[..., :4])
    with pytest.raises(DemistError, match="image_hint: given"):
        make_net()(x_t, t, z_c, hint)


def test_subpixel_hint_reads_every_image_voxel_at_the_latent_voxel_above_it():
    net = make_net(controlnet_gate_init="default", controlnet_hint="latent+subpixel")
    image = image_for(inputs()[0])
    before = net.embed_image(image)
    for voxel in [(0, 0, 0), (3, 2, 1), (9, 14, 6)]:  # any voxel of a 4³ block, not only a strided grid's
        changed = image.clone()
        changed[(0, 1, *voxel)] += 1.0
        moved = (net.embed_image(changed) - before).abs().sum(dim=1)[0]
        latent = tuple(v // 4 for v in voxel)
        assert moved[latent] > 0
        where = moved.nonzero()  # two 3³ convs: a change within two latent voxels
        assert where.min(dim=0).values.ge(torch.tensor(latent) - 2).all()
        assert where.max(dim=0).values.le(torch.tensor(latent) + 2).all()


def test_hint_bf16_is_a_precision_of_the_same_embedding_with_fp32_output_and_weights():
    from demist.devices import has_native_bf16

    fp32 = make_net(controlnet_gate_init="default", controlnet_hint="latent+image", hint_bf16=False)
    wake_zero_inits(fp32)
    bf16 = copy.deepcopy(fp32)
    bf16.hint_bf16 = True
    image = image_for(inputs()[0])
    want, got = fp32.embed_image(image), bf16.embed_image(image)
    assert got.dtype == torch.float32 and all(p.dtype == torch.float32 for p in bf16.image_hint.parameters())
    if has_native_bf16(torch.device("cpu")):
        assert not torch.equal(got, want)  # it did run in bf16 ...
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.02 * want.abs().max().item())  # ... of the same net
    else:  # no native bf16: the autocast is skipped, as everywhere else in demist
        assert torch.equal(got, want)
    got.square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0
               for p in bf16.image_hint.parameters())


def test_identity_output_projection_is_frozen_and_not_saved():
    net = make_net(crossattn=False, controlnet=False)
    layer = net.backbone.get_submodule("middle_block.attention.attn.out_proj")
    assert torch.equal(layer.base_layer.weight, torch.eye(64)) and not layer.base_layer.weight.requires_grad
    assert not any("out_proj.base_layer" in k for k in net.trainable_state_dict())
    assert any("out_proj.lora_B" in k for k in net.trainable_state_dict())


@pytest.mark.parametrize("gate_init", ["zero", "default"])
def test_output_head_adds_nothing_at_init_then_carries_the_controlnet_to_the_output(gate_init):
    backbone = random_backbone()
    net = make_net(backbone, controlnet_gate_init=gate_init, controlnet_output_head=True)
    x_t, t, z_c = inputs()
    with torch.no_grad():
        assert torch.equal(net(x_t, t, z_c), backbone(x_t, t))
    # The head's own weights start non-zero: the ControlNet gate it reads gets gradient straight from the output.
    assert net.output_head.conv.weight.any()
    net(x_t, t, z_c).square().mean().backward()
    gates = [p for m in net.controlnet.controlnet_down_blocks for p in m.parameters()]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gates)
    assert any(k.startswith("output_head.") for k in net.trainable_state_dict())
    assert any(p is net.output_head.conv.weight for p in net.stream_parameters()["spatial"])
    without_controlnet = make_net(backbone, controlnet=False, controlnet_output_head=True)
    assert without_controlnet.output_head is None
