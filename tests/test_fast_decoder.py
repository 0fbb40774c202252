"""The decoders' fast path (channels_last, packed convolutions, fast_decoder's rewrites) against the plain
NCHW modules on odd sizes, and the two-pass channels_last GroupNorm against fp64."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mobilediffusion import fast, fast_decoder, ops
from mobilediffusion.config import DecoderConfig
from mobilediffusion.decoder import ResBlock, TinyBlock, build_decoder
from mobilediffusion.ops import norm
from mobilediffusion.presets import TINY_LITE_DECODER

needs_packing = pytest.mark.skipif(not fast.packed_weights_available(), reason="this torch build has no oneDNN")
needs_bf16 = pytest.mark.skipif(fast.unsupported_precision("bf16") is not None, reason="no bf16 on this CPU")

KL = DecoderConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8)
KL_ODD = DecoderConfig(block_out_channels=(8, 16, 16), layers_per_block=2, post_quant_conv=False, norm_num_groups=4,
                       scaling_factor=1.5, shift_factor=0.1)
TINY = DecoderConfig(kind="tiny", tiny_channels=(16,) * 4, tiny_blocks=(1, 2, 1, 1))
CONFIGS = {"kl": KL, "kl_odd": KL_ODD, "lite": TINY_LITE_DECODER, "taesd": TINY}


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@torch.no_grad()
def randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        r = torch.randn(p.shape, generator=g)
        p.copy_(0.1 * r if name.endswith("bias") else 1 + 0.1 * r if p.ndim == 1 else r / p[0].numel() ** 0.5)
    return module.eval()


@needs_packing
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 6, 5, 7), (2, 6, 9, 4)])
def test_upsample_conv_is_conv_of_the_upsampled_map(shape, bias):
    conv = randomize(nn.Conv2d(6, 10, 3, padding=1, bias=bias))
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    fast.pack_weights(conv)
    with torch.no_grad():
        want = F.conv2d(F.interpolate(x.double(), scale_factor=2, mode="nearest"), conv.weight.double(),
                        None if conv.bias is None else conv.bias.double(), padding=1)
        got = fast_decoder.upsample_conv(conv, x, fast_decoder._Derived())
    assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(got, want) <= 1e-6


@needs_packing
@pytest.mark.parametrize("name", list(CONFIGS))
def test_decoder_fast_path_equals_nchw(name):
    cfg = CONFIGS[name]
    plain = randomize(build_decoder(cfg))
    lat = torch.randn(2, cfg.latent_channels, 5, 7, generator=torch.Generator().manual_seed(1)) * cfg.scaling_factor
    ours = fast.optimize(copy.deepcopy(plain))
    swapped = [m for m in ours.modules() if type(m) in (fast_decoder.FastResBlock, fast_decoder.FastTinyBlock,
                                                         fast_decoder.FusedSequential)]
    assert swapped and any(type(m) is fast.PackedConv2d for m in ours.modules())
    with torch.no_grad():
        want = plain(lat)
        got = ours(lat)
        assert got.shape == want.shape == (2, 3, 5 * cfg.upscale, 7 * cfg.upscale)
        assert ((want > 0) & (want < 1)).float().mean() > 0.3  # not lost to the clamp
        assert rel_err(got, want) <= 1e-5
        assert rel_err(copy.deepcopy(ours)(lat), want) <= 1e-5  # copies plan their own children
    assert list(ours.state_dict()) == list(plain.state_dict())
    # with autograd recording every module runs its plain forward (and gradients flow)
    lat.requires_grad_(True)
    ours(lat).sum().backward()
    assert lat.grad is not None
    # and fuse is undone to the plain classes
    assert fast_decoder.unfuse(ours) == len(swapped)
    assert not any(type(m) in (fast_decoder.FastResBlock, fast_decoder.FastTinyBlock, fast_decoder.FusedSequential)
                   for m in ours.modules())
    assert any(type(m) in (ResBlock, TinyBlock) for m in ours.modules())


@needs_packing
@needs_bf16
@pytest.mark.parametrize("name", ["kl", "lite", "taesd"])
def test_decoder_fast_path_bf16(name):
    cfg = CONFIGS[name]
    plain = randomize(build_decoder(cfg))
    lat = torch.randn(1, cfg.latent_channels, 6, 5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = fast.optimize(copy.deepcopy(plain), dtype="bf16")(lat)
        assert got.dtype == torch.bfloat16
        assert rel_err(got, plain(lat)) <= 2e-2


@pytest.mark.parametrize("shape,groups", [((1, 8, 131, 137), 4), ((2, 12, 129, 130), 3), ((1, 6, 7, 9), 2)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("act", ["silu", None])
def test_two_pass_channels_last_group_norm(shape, groups, affine, act):
    g = torch.Generator().manual_seed(3)
    C = shape[1]
    x64 = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 5 * torch.randn(1, C, 1, 1, generator=g,
                                                                                      dtype=torch.float64)
    w, b = (torch.randn(C, generator=g) * 0.3 + 1, torch.randn(C, generator=g)) if affine else (None, None)
    want = F.group_norm(x64, groups, None if w is None else w.double(), None if b is None else b.double(), 1e-6)
    want = F.silu(want) if act else want
    x = x64.float().contiguous(memory_format=torch.channels_last)
    got = norm._channels_last_two_pass(x, groups, w, b, 1e-6, act)
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(got, want) <= 1e-6
    # the op takes that path for large channels_last fp32 maps only
    assert norm._cl_sums_drift(x) == (shape[2] * shape[3] > norm.EXACT_CL_PIXELS)
    assert rel_err(ops.group_norm_act(x, groups, w, b, 1e-6, act), want) <= 1e-6
