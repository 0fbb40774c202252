"""The separable conv block of the MobileDiffusion UNet (arXiv 2311.16567, sec. 3.2): a depthwise KxK
convolution (one filter per channel, 'same' padding) followed by a pointwise 1x1 convolution."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .backend import Backend, as_backend, triton_kernels


def separable_conv(x: torch.Tensor, depthwise_weight: torch.Tensor, depthwise_bias: torch.Tensor | None,
                   pointwise_weight: torch.Tensor, pointwise_bias: torch.Tensor | None = None, *,
                   backend: Backend | str = Backend.REFERENCE) -> torch.Tensor:
    """x (B, C, H, W) -> (B, Cout, H, W), stride 1.

    depthwise_weight (C, 1, K, K) with K odd (padding K // 2), depthwise_bias (C,) or None,
    pointwise_weight (Cout, C, 1, 1) or (Cout, C), pointwise_bias (Cout,) or None: the weights of
    `nn.Conv2d(C, C, K, padding=K // 2, groups=C)` and `nn.Conv2d(C, Cout, 1)`. Half inputs are
    computed in fp32 by the reference.
    """
    _check(x, depthwise_weight, depthwise_bias, pointwise_weight, pointwise_bias)
    backend = as_backend(backend)
    if backend is Backend.TRITON:
        kernels = triton_kernels("depthwise_conv")
        return kernels.separable_conv_triton(x, depthwise_weight, depthwise_bias, pointwise_weight, pointwise_bias)
    if backend is Backend.EXPORT:  # builtins: DEPTHWISE_CONV_2D then CONV_2D
        return _convs(x, depthwise_weight, depthwise_bias, pointwise_weight, pointwise_bias)
    return _reference(x, depthwise_weight, depthwise_bias, pointwise_weight, pointwise_bias)


def _check(x, dw, db, pw, pb):
    if x.dim() != 4:
        raise ConfigError(f"separable_conv: x must be (B, C, H, W), got shape {tuple(x.shape)}")
    C = x.shape[1]
    K = dw.shape[-1]
    if dw.dim() != 4 or tuple(dw.shape) != (C, 1, K, K) or K % 2 == 0:
        raise ConfigError(f"separable_conv: depthwise_weight must be (C, 1, K, K) = ({C}, 1, K, K) with K odd "
                          f"(same padding K // 2), got {tuple(dw.shape)} for x {tuple(x.shape)}")
    if db is not None and tuple(db.shape) != (C,):
        raise ConfigError(f"separable_conv: depthwise_bias must be ({C},), got {tuple(db.shape)}")
    if pw.dim() not in (2, 4) or pw.shape[1] != C or tuple(pw.shape[2:]) not in ((), (1, 1)):
        raise ConfigError(f"separable_conv: pointwise_weight must be (Cout, {C}, 1, 1) or (Cout, {C}), "
                          f"got {tuple(pw.shape)}")
    if pb is not None and tuple(pb.shape) != (pw.shape[0],):
        raise ConfigError(f"separable_conv: pointwise_bias must be ({pw.shape[0]},), got {tuple(pb.shape)}")


def _convs(x, dw, db, pw, pb):
    """The two convolutions in x's dtype."""
    K = dw.shape[-1]
    y = F.conv2d(x, dw, db, padding=K // 2, groups=x.shape[1])  # (B, C, H, W)
    return F.conv2d(y, pw.reshape(pw.shape[0], -1, 1, 1), pb)  # (B, Cout, H, W)


def _reference(x, dw, db, pw, pb):
    """Plain torch convolutions, in fp32 for half inputs."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        return _convs(x, dw.to(x.dtype), None if db is None else db.to(x.dtype), pw.to(x.dtype),
                      None if pb is None else pb.to(x.dtype))
    f = [None if t is None else t.float() for t in (x, dw, db, pw, pb)]
    return _convs(*f).to(x.dtype)
