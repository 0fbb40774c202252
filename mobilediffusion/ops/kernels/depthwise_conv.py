"""Depthwise KxK convolution (stride 1, 'same' zero padding), the first half of the separable conv
block of the MobileDiffusion UNet (arXiv 2311.16567, sec. 3.2); the 1x1 pointwise half is a matmul.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import check_launch


@triton.jit
def _depthwise_conv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, C, H, W,
                           HAS_BIAS: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr):
    # x, y: (B*C, H*W) contiguous planes; w: (C, K*K); one program per (plane, pixel block)
    plane = tl.program_id(0)
    c = plane % C
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < H * W
    h = offs // W
    w = offs % W
    acc = tl.zeros([BLOCK], tl.float32)
    for kh in tl.static_range(K):
        for kw in tl.static_range(K):
            hh = h + (kh - K // 2)
            ww = w + (kw - K // 2)
            inside = mask & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            xv = tl.load(x_ptr + plane * H * W + hh * W + ww, mask=inside, other=0.0).to(tl.float32)
            acc += xv * tl.load(w_ptr + c * K * K + kh * K + kw).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c).to(tl.float32)
    tl.store(y_ptr + plane * H * W + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def depthwise_conv_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          *, block: int = 256) -> torch.Tensor:
    """x (B, C, H, W), weight (C, 1, K, K) with K odd, bias (C,) -> (B, C, H, W), padding K // 2."""
    check_launch(_depthwise_conv_kernel, "separable_conv(depthwise)", x, weight, bias)
    B, C, H, W = x.shape
    K = weight.shape[-1]
    xc = x.contiguous()
    y = torch.empty_like(xc)
    if y.numel() == 0:
        return y
    w = weight.reshape(C, K * K).contiguous()
    grid = (B * C, triton.cdiv(H * W, block))
    _depthwise_conv_kernel[grid](xc, w, xc if bias is None else bias.contiguous(), y, C, H, W,
                                 HAS_BIAS=bias is not None, K=K, BLOCK=block)
    return y


def separable_conv_triton(x: torch.Tensor, depthwise_weight: torch.Tensor, depthwise_bias: torch.Tensor | None,
                          pointwise_weight: torch.Tensor, pointwise_bias: torch.Tensor | None,
                          *, block: int = 256) -> torch.Tensor:
    """Depthwise KxK (Triton) then pointwise 1x1 (a matmul via conv2d); (B, C, H, W) -> (B, Cout, H, W).

    pointwise_weight is (Cout, C) or (Cout, C, 1, 1); the 1x1 runs in x's dtype (fp32 accumulation
    on GPU).
    """
    y = depthwise_conv_triton(x, depthwise_weight, depthwise_bias, block=block)
    c_out = pointwise_weight.shape[0]
    return F.conv2d(y, pointwise_weight.reshape(c_out, -1, 1, 1).to(y.dtype),
                    None if pointwise_bias is None else pointwise_bias.to(y.dtype))
