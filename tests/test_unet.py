"""UNet parts diffusers has no equivalent for (MobileDiffusion layout), checked against
independent references, plus config validation and config conversion errors."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mobilediffusion.config import UNetConfig
from mobilediffusion.errors import ConfigError
from mobilediffusion.presets import PRESETS
from mobilediffusion.unet import UNet
from mobilediffusion.unet_blocks import Attention, FeedForward, SeparableConv, TransformerBlock, timestep_embedding
from mobilediffusion.weights.unet_keys import unet_config_from_diffusers, unet_config_to_diffusers


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


# --------------------------------------------------------------------------- blocks
@pytest.mark.parametrize("dim,heads,tokens", [(16, 2, 12), (32, 4, 30)])
def test_cross_block_is_a_full_block_without_self_attention(dim, heads, tokens):
    kw = dict(ff_mult=6, ff_activation="swish", shared_kv=False, upcast=False)
    full = _randomize(TransformerBlock(dim, heads, 24, "full", **kw))
    cross = TransformerBlock(dim, heads, 24, "cross", **kw)
    assert not hasattr(cross, "attn1") and not hasattr(cross, "norm1")
    cross.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith(("attn1", "norm1"))})
    with torch.no_grad():  # self-attention that adds nothing
        full.attn1.to_out.weight.zero_()
        full.attn1.to_out.bias.zero_()
    x, ctx = torch.randn(2, tokens, dim), torch.randn(2, 7, 24)
    assert _rel(cross(x, ctx), full(x, ctx)) <= 1e-6


def test_shared_kv_is_separate_projections_with_equal_weights():
    shared = _randomize(Attention(32, 4, 24, shared_kv=True))
    separate = Attention(32, 4, 24)
    state = shared.state_dict()
    kv = state.pop("to_kv.weight")
    separate.load_state_dict({**state, "to_k.weight": kv, "to_v.weight": kv})
    x, ctx = torch.randn(2, 10, 32), torch.randn(2, 7, 24)
    assert torch.equal(shared(x, ctx), separate(x, ctx))
    assert sum(p.numel() for p in shared.parameters()) == sum(p.numel() for p in separate.parameters()) - 32 * 24


@pytest.mark.parametrize("cin,cout,size", [(8, 16, (6, 6)), (12, 4, (5, 9))])
def test_separable_conv_is_its_dense_composition(cin, cout, size):
    sep = _randomize(SeparableConv(cin, cout))
    dw, pw = sep.depthwise, sep.pointwise
    weight = pw.weight[:, :, 0, 0][:, :, None, None] * dw.weight[:, 0][None]  # (cout, cin, 3, 3)
    bias = pw.weight[:, :, 0, 0] @ dw.bias + pw.bias
    x = torch.randn(2, cin, *size)
    assert _rel(sep(x), F.conv2d(x, weight, bias, padding=1)) <= 1e-5


@pytest.mark.parametrize("activation,act", [("swish", F.silu), ("gelu", F.gelu)])
def test_plain_feedforward(activation, act):
    ff = _randomize(FeedForward(16, 6, activation))
    assert ff.fc1.out_features == 96
    x = torch.randn(3, 5, 16)
    want = act(x @ ff.fc1.weight.T + ff.fc1.bias) @ ff.fc2.weight.T + ff.fc2.bias
    assert _rel(ff(x), want) <= 1e-6


@pytest.mark.parametrize("flip,shift", [(True, 0), (False, 1)])
def test_timestep_embedding_matches_diffusers(flip, shift):
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    t = torch.tensor([0, 1, 250.5, 999])
    want = embeddings.get_timestep_embedding(t, 64, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    assert torch.equal(timestep_embedding(t, 64, flip_sin_to_cos=flip, freq_shift=shift), want)


def test_upcast_attention_runs_half_inputs_in_float32():
    attn = _randomize(Attention(32, 4, upcast=True))
    x = torch.randn(1, 20, 32)
    ref = attn(x)
    half = attn.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16
    assert _rel(half.float(), ref) < 3e-2


# --------------------------------------------------------------------------- the MobileDiffusion layout
def test_tiny_preset_structure():
    cfg = PRESETS["tiny"].unet
    keys = UNet(cfg, device="meta").state_dict().keys()
    # "cross" levels (32x32 and the outer 16x16) have no self-attention, the inner 16x16 and mid do
    assert not any(k.startswith(("down.1.", "down.2.", "up.1.", "up.2.")) and ".attn1." in k for k in keys)
    assert any(k.startswith("down.3.") and ".attn1." in k for k in keys)
    assert any(k.startswith("mid.attn.blocks.1.attn1.") for k in keys)  # mid depth 2
    assert not any(k.startswith(("down.0.", "up.3.")) and ".attn" in k for k in keys)  # no attention at 64x64
    # cross-attention shares one key/value projection; self-attention keeps its own
    assert any(".attn2.to_kv." in k for k in keys) and not any(".attn2.to_k." in k for k in keys)
    assert any(".attn1.to_k." in k for k in keys)
    assert any(k.startswith("down.2.") and ".depthwise." in k for k in keys)
    assert not any(k.startswith(("down.0.", "down.1.")) and ".depthwise." in k for k in keys)
    # the outer/inner 16x16 levels share a resolution: no resample between them
    assert "down.2.downsample.weight" not in keys and "down.1.downsample.weight" in keys
    assert not any(k.startswith("up.0.upsample") for k in keys) and any(k.startswith("up.1.upsample") for k in keys)


@pytest.mark.parametrize("size", [(8, 8), (12, 4)])
def test_tiny_preset_forward(size):
    cfg = dataclasses.replace(PRESETS["tiny"].unet, block_out_channels=(32, 32, 64, 64), num_attention_heads=(1, 1, 2, 2))
    unet = _randomize(UNet(cfg)).eval()
    x, ctx = torch.randn(2, 8, *size), torch.randn(2, 5, 64)
    with torch.no_grad():
        out = unet(x, torch.tensor([999, 400]), ctx)
        assert out.shape == x.shape and torch.isfinite(out).all()
        # the context is used
        assert not torch.allclose(out, unet(x, torch.tensor([999, 400]), ctx + 1))
        assert unet.to(torch.bfloat16)(x.bfloat16(), 999, ctx.bfloat16()).dtype == torch.bfloat16


def test_size_multiple_counts_downsamples_only():
    assert PRESETS["tiny"].unet.size_multiple == 4  # four levels, two downsamples
    assert PRESETS["sd15"].unet.size_multiple == 8
    unet = UNet(dataclasses.replace(PRESETS["tiny"].unet, block_out_channels=(32, 32, 32, 32)))
    with pytest.raises(ConfigError, match=r"multiple of 4.*multiples of 32 pixels"):
        unet(torch.randn(1, 8, 8, 10), 1, torch.randn(1, 5, 64))


# --------------------------------------------------------------------------- config validation
@pytest.mark.parametrize("change,match", [
    (dict(layers_per_block=(2, 2)), "one entry per level"),
    (dict(attention=("full", "full", "self", "none")), "attention kind"),
    (dict(downsample=(True, True, True, True)), "innermost level cannot downsample"),
    (dict(num_attention_heads=(8, 8, 7, 8)), "not divisible"),
    (dict(norm_num_groups=48), "norm_num_groups"),
    (dict(transformer_depth=(1, 0, 1, 1)), "integers >= 1"),
    (dict(ff_activation="relu"), "ff_activation"),
    (dict(prediction_type="flow"), "prediction_type"),
    (dict(separable=(True,)), "one entry per level"),
])
def test_bad_configs_are_config_errors(change, match):
    with pytest.raises(ConfigError, match=match):
        UNetConfig(**change)


@pytest.mark.parametrize("change,match", [
    (dict(class_embed_type="timestep"), "class_embed_type"),
    (dict(addition_embed_type="text_time"), "addition_embed_type"),
    (dict(time_cond_proj_dim=256), "time_cond_proj_dim"),
    (dict(only_cross_attention=[True, False, False, False]), "only_cross_attention"),
    (dict(down_block_types=["SimpleCrossAttnDownBlock2D"] + ["DownBlock2D"] * 3), "SimpleCrossAttnDownBlock2D"),
    (dict(mid_block_type="UNetMidBlock2DSimpleCrossAttn"), "mid_block_type"),
    (dict(transformer_layers_per_block=[[1, 1], [1, 1], [1, 1], [1, 1]]), "nested"),
    (dict(cross_attention_dim=[768, 768, 1024, 1024]), "cross_attention_dim"),
])
def test_unsupported_diffusers_options_are_named(change, match):
    d = dict(unet_config_to_diffusers(UNetConfig()), **change)
    with pytest.raises(ConfigError, match=match):
        unet_config_from_diffusers(d)


def test_diffusers_config_defaults_and_quirks():
    # a minimal old-style config: everything else is diffusers' default (SD1.5 with 1280-d context)
    cfg = unet_config_from_diffusers({"cross_attention_dim": 768, "attention_head_dim": 8})
    assert cfg == UNetConfig()
    cfg = unet_config_from_diffusers({"attention_head_dim": [5, 10, 20, 20], "num_attention_heads": None,
                                      "cross_attention_dim": 1024, "use_linear_projection": True})
    assert cfg.num_attention_heads == (5, 10, 20, 20)


def test_mobilediffusion_features_are_not_diffusers_expressible():
    with pytest.raises(ConfigError) as e:
        unet_config_to_diffusers(PRESETS["mobilediffusion-512"].unet)
    for feature in ('"cross"', "separable", "swish", "shared key/value", "downsample pattern", "mid depth"):
        assert feature in str(e.value)
