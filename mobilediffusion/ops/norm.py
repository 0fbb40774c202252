"""GroupNorm + activation, the fused norm of "Speed Is All You Need" (arXiv 2304.11267, sec. 3.1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .cpu_kernel import group_norm_act as cpu_group_norm_act, group_norm_unsupported
from .backend import Backend, as_backend, composite_builder, log_once, triton_kernels

ACTIVATIONS = ("silu", None)


def group_norm_act(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, eps: float = 1e-5, act: str | None = "silu",
                   *, backend: Backend | str = Backend.REFERENCE, inplace: bool = False) -> torch.Tensor:
    """GroupNorm over x (B, C, *spatial) with per-channel affine, then `act` ("silu" or None).

    Equal to `F.silu(F.group_norm(x, num_groups, weight, bias, eps))` (or without the silu);
    returns x's shape and dtype. Half inputs get fp32 statistics and math (bf16 through torch's bf16
    kernels, which compute in fp32 inside and round each output). `inplace`: the result may be
    written into x (only where the caller does not use x again); the CPU kernel does so.

    Backend.CPU: 4-D channels_last fp32/bf16 maps go through the AVX-512 kernel (`cpu_kernel`: per-channel
    sums in double, one pass to normalize, SiLU in fp32, one rounding); other inputs take the reference,
    logged once per reason.
    """
    _check(x, num_groups, weight, bias, act)
    backend = as_backend(backend)
    if backend is Backend.CPU:
        why = group_norm_unsupported(x)
        if why is None:
            return cpu_group_norm_act(x, num_groups, weight, bias, eps, act == "silu", inplace=inplace)
        log_once(f"cpu group-norm kernel: {why}; the reference path takes these inputs")
    if backend is Backend.TRITON:
        return triton_kernels("group_norm").group_norm_act_triton(x, num_groups, weight, bias, eps, act)
    if backend is Backend.EXPORT:
        return _export(x, num_groups, weight, bias, eps, act)
    return _reference(x, num_groups, weight, bias, eps, act)


def _check(x, num_groups, weight, bias, act):
    if act not in ACTIVATIONS:
        raise ConfigError(f"group_norm_act: act must be one of {ACTIVATIONS}, got {act!r}")
    if x.dim() < 2:
        raise ConfigError(f"group_norm_act: x must be (B, C, *spatial), got shape {tuple(x.shape)}")
    C = x.shape[1]
    if num_groups < 1 or C % num_groups:
        raise ConfigError(f"group_norm_act: {C} channels (x shape {tuple(x.shape)}) do not split into "
                          f"{num_groups} groups; channels must be a multiple of num_groups")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (C,):
            raise ConfigError(f"group_norm_act: {name} must have shape ({C},) for x {tuple(x.shape)}, "
                              f"got {tuple(p.shape)}")


def _reference(x, num_groups, weight, bias, eps, act):
    """torch's group_norm then SiLU in place. fp16 inputs are normalized in fp32; bf16 inputs go through
    torch's bf16 kernels, which keep fp32 statistics and math inside and round each output once (no
    fp32 copies of the map: they cost more than the norm on CPU). torch's channels_last CPU kernel
    keeps the layout but sums each channel over H*W in one pass, which drifts on large maps (~5e-7
    relative on a 320 x 64 x 64 map, 1.6e-6 at 256 x 256, ~1.7e-5 at 512 x 512); fp32 channels_last
    maps above EXACT_CL_PIXELS take the two-pass path instead (bf16 outputs round far above that)."""
    if _cl_sums_drift(x):
        return _channels_last_two_pass(x, num_groups, weight, bias, eps, act)
    xf = x.float() if x.dtype == torch.float16 else x
    w = None if weight is None else weight.to(xf.dtype)
    b = None if bias is None else bias.to(xf.dtype)
    y = F.group_norm(xf, num_groups, w, b, eps)
    if act == "silu":
        y = F.silu(y, inplace=True)  # y is a fresh tensor
    return y.to(x.dtype)


# fp32 channels_last maps with more pixels than this are normalized by _channels_last_two_pass (see _reference)
EXACT_CL_PIXELS = 128 * 128


def _cl_sums_drift(x) -> bool:
    return (x.dtype == torch.float32 and x.dim() == 4 and x.shape[2] * x.shape[3] > EXACT_CL_PIXELS
            and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())


def _channels_last_two_pass(x, num_groups, weight, bias, eps, act):
    """GroupNorm (+ SiLU) of an fp32 channels_last x, as accurate as torch's NCHW kernel and in its layout:
    per-channel means by torch's cascaded sums, then the centered per-channel second moments, combined
    per group exactly (var_g = mean over the group's channels of var_c + (mean_c - mean_g)^2, in fp64)."""
    B, C = x.shape[:2]
    G = num_groups
    mean_c = x.mean((2, 3), keepdim=True)  # (B, C, 1, 1)
    d = x - mean_c  # (B, C, H, W) channels_last, centered per channel
    out = torch.mul(d, d)
    var_c = out.mean((2, 3))  # (B, C)
    m, v = mean_c.view(B, G, C // G).double(), var_c.view(B, G, C // G).double()  # (B, G, C/G)
    mean_g = m.mean(-1, keepdim=True)
    a = torch.rsqrt((v + (m - mean_g).square()).mean(-1, keepdim=True) + eps).expand(B, G, C // G)
    if weight is not None:
        a = a * weight.double().view(1, G, C // G)
    shift = (m - mean_g) * a  # (x - mean_g) * a = d * a + shift
    if bias is not None:
        shift = shift + bias.double().view(1, G, C // G)
    torch.addcmul(shift.float().view(B, C, 1, 1), d, a.float().view(B, C, 1, 1), out=out)
    return F.silu(out, inplace=True) if act == "silu" else out


def _formula(x, num_groups, weight, bias, eps, act):
    """The same written out, two-pass statistics in fp32 (at least): the export composite's body."""
    B, C = x.shape[:2]
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    g = xf.reshape(B, num_groups, -1)  # (B, G, C/G * spatial)
    mean = g.mean(dim=-1, keepdim=True)
    var = (g - mean).square().mean(dim=-1, keepdim=True)
    y = ((g - mean) * torch.rsqrt(var + eps)).reshape(xf.shape)  # (B, C, *spatial)
    affine_shape = (1, C) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.to(y.dtype).reshape(affine_shape)
    if bias is not None:
        y = y + bias.to(y.dtype).reshape(affine_shape)
    if act == "silu":
        y = F.silu(y)
    return y.to(x.dtype)


def _export(x, num_groups, weight, bias, eps, act):
    """The norm as an `odml.group_norm` composite on NHWC (the layout the LiteRT GPU delegate fuses);
    the activation stays outside as builtins (LOGISTIC, MUL) that the delegate merges into it."""
    builder = composite_builder()(
        name="odml.group_norm",
        attr={"num_groups": num_groups, "epsilon": float(eps), "reduction_axes": [3], "channel_axis": 3})
    B, C = x.shape[:2]
    x4 = x.reshape(B, C, -1, 1) if x.dim() != 4 else x  # (B, C, H, W)
    weight = x.new_ones(C) if weight is None else weight  # the composite takes both affine inputs
    bias = x.new_zeros(C) if bias is None else bias
    nhwc, weight, bias = builder.mark_inputs(x4.permute(0, 2, 3, 1), weight, bias)  # (B, H, W, C)
    y = _formula(nhwc.permute(0, 3, 1, 2), num_groups, weight, bias, eps, None)  # (B, C, H, W)
    y = builder.mark_outputs(y.permute(0, 2, 3, 1))  # (B, H, W, C)
    y = y.permute(0, 3, 1, 2).reshape(x.shape)  # (B, C, *spatial)
    return F.silu(y) if act == "silu" else y
