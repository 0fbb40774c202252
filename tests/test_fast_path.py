"""The CPU fast path (mobilediffusion.fast) against the plain modules: packed linears, channels_last,
bf16, torch.compile; the ops backend choice of the models; state dicts untouched."""
import copy
import dataclasses
import logging

import pytest
import torch
from torch import nn

from mobilediffusion import fast
from mobilediffusion.config import DecoderConfig
from mobilediffusion.decoder import build_decoder
from mobilediffusion.errors import ConfigError
from mobilediffusion.layers import OpsLayer
from mobilediffusion.ops import Backend, cpu_kernel
from mobilediffusion.presets import PRESETS, TINY_LITE_DECODER
from mobilediffusion.unet import UNet

needs_packing = pytest.mark.skipif(not fast.packed_weights_available(), reason="this torch build has no oneDNN")
needs_bf16 = pytest.mark.skipif(fast.unsupported_precision("bf16") is not None, reason="no bf16 on this CPU")

# the MobileDiffusion layout (cross-only and full attention, separable convs) and an SD-like one
SMALL_MD = dataclasses.replace(PRESETS["tiny"].unet, block_out_channels=(32, 32, 64, 64), num_attention_heads=(1, 1, 2, 2))
SMALL_SD = dataclasses.replace(PRESETS["sd15"].unet, block_out_channels=(32, 64, 64, 64), num_attention_heads=(2, 2, 4, 4),
                               norm_num_groups=8, cross_attention_dim=48)
SMALL_KL = DecoderConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8)


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@torch.no_grad()
def randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(1, p[0].numel()) ** 0.5) + (1.0 if p.ndim == 1 else 0))
    return module.eval()


def unet_inputs(cfg, size, batch=2):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, cfg.in_channels, *size, generator=g), torch.tensor([999, 31])[:batch],
            torch.randn(batch, 7, cfg.cross_attention_dim, generator=g))


# --------------------------------------------------------------------------- packed linear
@needs_packing
@pytest.mark.parametrize("shape", [(5, 24), (2, 9, 24), (3, 1, 4, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_equals_linear(shape, bias):
    lin = randomize(nn.Linear(24, 40, bias=bias))
    packed = copy.deepcopy(lin)
    assert fast.pack_weights(packed) == 1 and type(packed) is fast.PackedLinear
    x = torch.randn(shape)
    with torch.no_grad():
        assert rel_err(packed(x), lin(x)) <= 1e-6
        assert rel_err(packed(x.transpose(0, -2).contiguous().transpose(0, -2)), lin(x)) <= 1e-6  # strided input
        if fast.unsupported_precision("bf16") is None:
            assert rel_err(copy.deepcopy(packed).bfloat16()(x.bfloat16()), lin(x)) <= 1e-2
    assert packed.state_dict().keys() == lin.state_dict().keys()


@needs_packing
@pytest.mark.parametrize("conv", [dict(k=3, padding=1), dict(k=3, padding=1, stride=2), dict(k=1, padding=0),
                                  dict(k=3, padding=1, bias=False)], ids=["3x3", "stride2", "1x1", "nobias"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "nhwc"])
def test_packed_conv_equals_conv(conv, cl):
    conv = dict(conv)
    plain = randomize(nn.Conv2d(12, 20, conv.pop("k"), **conv))
    packed = copy.deepcopy(plain)
    assert fast.pack_weights(packed) == 1 and type(packed) is fast.PackedConv2d
    for shape in [(1, 12, 8, 8), (2, 12, 6, 10)]:
        x = torch.randn(shape)
        x = x.contiguous(memory_format=torch.channels_last) if cl else x
        with torch.no_grad():
            assert rel_err(packed(x), plain(x)) <= 1e-6
    assert packed.state_dict().keys() == plain.state_dict().keys()


@needs_packing
def test_packed_linear_bf16_packs_only_long_products():
    """bf16 linears pack where the weight serves >= BF16_MIN_ROWS rows (SD's 64x64 and 32x32 tokens) and stay
    plain below (16x16 bottlenecks, time embeddings), where packing would cost more memory than it gains."""
    if fast.unsupported_precision("bf16") is not None:
        pytest.skip("this CPU has no bf16")
    lin = randomize(nn.Linear(24, 40)).bfloat16()
    packed = copy.deepcopy(lin)
    fast.pack_weights(packed)
    rows = fast.PackedLinear.BF16_MIN_ROWS
    with torch.inference_mode():
        short = torch.randn(2, rows // 2 - 1, 24, dtype=torch.bfloat16)
        long = torch.randn(2, rows // 2, 24, dtype=torch.bfloat16)
        assert torch.equal(packed(short), lin(short)) and packed._packed is None  # plain: the same op
        got = packed(long)
        assert packed._packed is not None and packed._pack_key[3] == long.shape
        assert rel_err(got.float(), nn.functional.linear(long.float(), lin.weight.float(), lin.bias.float())) <= 1e-2


@needs_packing
def test_packed_linear_follows_new_weights_and_autograd():
    lin = fast.PackedLinear(8, 4)
    x = torch.randn(3, 8)
    with torch.no_grad():
        first = lin(x)
        lin.load_state_dict({"weight": torch.randn(4, 8), "bias": torch.randn(4)})  # in place: repacked
        assert rel_err(lin(x), x @ lin.weight.T + lin.bias) <= 1e-6
        assert not torch.allclose(lin(x), first)
    lin(x).sum().backward()  # with autograd on it is a plain linear, so gradients flow
    assert lin.weight.grad is not None
    assert fast.unpack_weights(lin) == 1 and type(lin) is nn.Linear


# --------------------------------------------------------------------------- whole models
@pytest.mark.parametrize("cfg", [SMALL_MD, SMALL_SD], ids=["md", "sd"])
@pytest.mark.parametrize("size", [(8, 8), (16, 8)])
def test_unet_fast_path_fp32(cfg, size):
    plain = randomize(UNet(cfg))
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    x, t, ctx = unet_inputs(cfg, size)
    with torch.no_grad():
        want = plain(x, t, ctx)
        for cl in (False, True):
            ours = fast.optimize(copy.deepcopy(plain), channels_last=cl)
            got = ours(x, t, ctx)
            assert got.shape == want.shape
            assert rel_err(got, want) <= 1e-5, f"channels_last={cl}"
    # the same parameters under the same names
    assert list(ours.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in ours.state_dict().items())
    if fast.packed_weights_available():
        assert any(type(m) is fast.PackedLinear for m in ours.modules())
        assert type(ours.conv_in) is fast.PackedConv2d
        # packed convolutions take the weights as loaded (no copy) and still make channels_last maps
        assert ours.conv_in.weight.is_contiguous()
        maps = []
        ours.conv_in.register_forward_hook(lambda m, args, out: maps.append(out))
        with torch.inference_mode():
            ours(x, t, ctx)
        assert maps[0].is_contiguous(memory_format=torch.channels_last)
    else:  # unpacked, the maps follow the weights' layout
        assert ours.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


# bf16 keeps 8 mantissa bits: one rounding is <= 0.4%, and random-weight UNets amplify it through their
# depth. The SD layout stays within 1e-2 of fp32; the MobileDiffusion layout (swish x6 feed-forwards,
# deeper bottleneck) reaches ~1.3e-2 with the plain module in bf16 too, so it gets 2e-2.
@needs_bf16
@pytest.mark.parametrize("cfg,tol", [(SMALL_MD, 2e-2), (SMALL_SD, 1e-2)], ids=["md", "sd"])
def test_unet_fast_path_bf16(cfg, tol):
    plain = randomize(UNet(cfg))
    x, t, ctx = unet_inputs(cfg, (8, 8))
    ours = fast.optimize(copy.deepcopy(plain), dtype="bf16")
    with torch.no_grad():
        got = ours(x.bfloat16(), t, ctx.bfloat16())
        assert got.dtype == torch.bfloat16
        assert rel_err(got, plain(x, t, ctx)) <= tol
        assert rel_err(got, copy.deepcopy(plain).bfloat16()(x.bfloat16(), t, ctx.bfloat16())) <= tol


@pytest.mark.parametrize("cfg", [SMALL_KL, TINY_LITE_DECODER, DecoderConfig(kind="tiny", tiny_channels=(16,) * 4,
                                                                            tiny_blocks=(1, 1, 1, 1))],
                         ids=["kl", "lite", "taesd"])
def test_decoder_fast_path(cfg):
    plain = randomize(build_decoder(cfg))
    lat = torch.randn(1, cfg.latent_channels, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = plain(lat)
        ours = fast.optimize(copy.deepcopy(plain))
        got = ours(lat)
        assert rel_err(got, want) <= 1e-5
        # decoders run channels_last on packed convolutions too (tests/test_fast_decoder.py: the rewrites)
        assert any(type(m) is fast.PackedConv2d for m in ours.modules()) == fast.packed_weights_available()
        if fast.unsupported_precision("bf16") is None:
            assert rel_err(fast.optimize(copy.deepcopy(plain), dtype="bf16")(lat).float(), want) <= 1e-2


@pytest.mark.slow
def test_compile_with_freezing_is_scoped_and_equal():
    import torch._inductor.config as inductor_config

    cfg = dataclasses.replace(SMALL_MD, block_out_channels=(16, 16, 32, 32), mid_transformer_depth=1, norm_num_groups=8)
    plain = randomize(UNet(cfg))
    x, t, ctx = unet_inputs(cfg, (8, 8), batch=1)
    compiled = fast.optimize(copy.deepcopy(plain), compile=True)
    with torch.no_grad():
        got = compiled(x, t, ctx)
        assert rel_err(got, plain(x, t, ctx)) <= 1e-5
    assert inductor_config.freezing is False  # set for that compilation only
    assert list(compiled.state_dict()) == list(plain.state_dict())  # compiled in place: same names


# --------------------------------------------------------------------------- options and ops backend
def test_precision_names_and_unavailable_precision():
    assert fast.resolve_dtype("bf16") is torch.bfloat16 and fast.resolve_dtype(torch.float32) is torch.float32
    with pytest.raises(ConfigError, match="unknown precision 'fp8'"):
        fast.resolve_dtype("fp8")
    missing = [p for p in ("bf16", "fp16") if fast.unsupported_precision(p) is not None]
    if not missing:
        pytest.skip("this machine runs every precision")
    with pytest.raises(ConfigError, match=rf"precision {missing[-1]} is not available on cpu: .*; use fp32"):
        fast.check_precision(missing[-1])


def test_models_choose_their_ops_backend_once(caplog):
    cpu_default = Backend.CPU if cpu_kernel.unavailable() is None else Backend.REFERENCE  # builds the kernel
    with caplog.at_level(logging.INFO, logger="mobilediffusion.ops"):
        unet = UNet(SMALL_MD, backend="triton")  # no CUDA here: the CPU's default, one warning line
    assert unet.ops_backend is cpu_default
    assert len([r for r in caplog.records if "triton requested" in r.getMessage()]) == 1
    layers = [m for m in unet.modules() if isinstance(m, OpsLayer)]
    assert layers and all(m.backend is cpu_default for m in layers)
    assert build_decoder(SMALL_KL).ops_backend is cpu_default
    with pytest.raises(ConfigError, match="unknown ops backend"):
        UNet(SMALL_MD, backend="cuda-graphs")
