"""Fused GroupNorm + activation ("Speed Is All You Need", arXiv 2304.11267, sec. 3.1).

One program per (batch, group): it reads the group once to get mean and variance (per-block mean and
M2 combined with Chan's parallel update, which is stable where sum/sum-of-squares is not), then a
second sweep normalizes, applies the per-channel affine and the activation, and writes the result.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import check_launch, sigmoid

ACTIVATIONS = {None: 0, "silu": 1}


@triton.jit
def _group_norm_act_kernel(x_ptr, w_ptr, b_ptr, y_ptr, C, S, G, eps,
                           HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                           BLOCK: tl.constexpr):
    # x, y: (B, C, S) contiguous; one (batch, group) is cpg * S consecutive elements
    pid = tl.program_id(0)
    bidx = pid // G
    g = pid % G
    cpg = C // G
    n = cpg * S
    base = bidx * C * S + g * cpg * S
    lanes = tl.arange(0, BLOCK)

    # 1. statistics in one read: combine each block's (mean, M2) into the running ones
    mean = tl.zeros([], tl.float32)
    m2 = tl.zeros([], tl.float32)
    count = tl.zeros([], tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + lanes
        mask = offs < n
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        nb = tl.minimum(n - start, BLOCK).to(tl.float32)
        bmean = tl.sum(x, axis=0) / nb
        dev = tl.where(mask, x - bmean, 0.0)
        bm2 = tl.sum(dev * dev, axis=0)
        delta = bmean - mean
        total = count + nb
        mean += delta * (nb / total)
        m2 += bm2 + delta * delta * (count * nb / total)
        count = total
    rstd = 1.0 / tl.sqrt_rn(m2 / count + eps)

    # 2. normalize, per-channel affine, activation
    for start in range(0, n, BLOCK):
        offs = start + lanes
        mask = offs < n
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        y = (x - mean) * rstd
        channel = g * cpg + offs // S
        if HAS_W:
            y = y * tl.load(w_ptr + channel, mask=mask, other=1.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(b_ptr + channel, mask=mask, other=0.0).to(tl.float32)
        if ACT == 1:
            y = y * sigmoid(y)
        tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def group_norm_act_triton(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
                          bias: torch.Tensor | None, eps: float, act: str | None = "silu",
                          *, block: int | None = None) -> torch.Tensor:
    """GroupNorm over x (B, C, *spatial) then `act`; same shape and dtype as x.

    Shapes are checked by `mobilediffusion.ops.group_norm_act`; `block` (a power of two) overrides
    the elements per program step (tests force several blocks and ragged tails with it).
    """
    check_launch(_group_norm_act_kernel, "group_norm_act", x, weight, bias)
    B, C = x.shape[:2]
    S = math.prod(x.shape[2:])  # spatial size, 1 for (B, C)
    n = (C // num_groups) * S
    if block is None:
        block = min(4096, max(128, triton.next_power_of_2(n)))
    xc = x.contiguous()  # (B, C, S) in memory
    y = torch.empty_like(xc)
    if y.numel() == 0:
        return y
    _group_norm_act_kernel[(B * num_groups,)](
        xc, xc if weight is None else weight.contiguous(), xc if bias is None else bias.contiguous(), y,
        C, S, num_groups, float(eps),
        HAS_W=weight is not None, HAS_B=bias is not None, ACT=ACTIVATIONS[act], BLOCK=block)
    return y
