"""GELU and GEGLU kernels ("Speed Is All You Need", arXiv 2304.11267, sec. 3.3), exact and tanh forms.

The tanh form uses 0.5 * (1 + tanh(u)) = sigmoid(2u), so it needs no tanh and never cancels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_launch, sigmoid

APPROXIMATIONS = {"none": 0, "tanh": 1}
BLOCK = 1024


@triton.jit
def _gelu_f32(x, TANH: tl.constexpr):
    if TANH:
        # 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3)
        u2 = 1.5957691216057308 * (x + 0.044715 * x * x * x)  # 2 sqrt(2/pi) = 1.5957...
        return x * sigmoid(u2)
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _gelu_kernel(x_ptr, y_ptr, n, TANH: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, _gelu_f32(x, TANH).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_kernel(x_ptr, y_ptr, n, d, TANH: tl.constexpr, BLOCK: tl.constexpr):
    # x: (rows, 2d) contiguous, hidden = x[:, :d], gate = x[:, d:]; y: (rows, d)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    row = offs // d
    col = offs % d
    hidden = tl.load(x_ptr + row * 2 * d + col, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(x_ptr + row * 2 * d + d + col, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (hidden * _gelu_f32(gate, TANH)).to(y_ptr.dtype.element_ty), mask=mask)


def gelu_triton(x: torch.Tensor, approximate: str = "none", *, block: int = BLOCK) -> torch.Tensor:
    """GELU of x (any shape); same shape and dtype."""
    check_launch(_gelu_kernel, "gelu", x)
    xc = x.contiguous()
    y = torch.empty_like(xc)
    n = xc.numel()
    if n == 0:
        return y
    _gelu_kernel[(triton.cdiv(n, block),)](xc, y, n, TANH=APPROXIMATIONS[approximate] == 1, BLOCK=block)
    return y


def geglu_triton(x: torch.Tensor, approximate: str = "none", *, block: int = BLOCK) -> torch.Tensor:
    """x (..., 2d) -> hidden * gelu(gate) (..., d), hidden, gate = x.chunk(2, -1)."""
    check_launch(_geglu_kernel, "geglu", x)
    xc = x.contiguous()
    d = xc.shape[-1] // 2
    y = xc.new_empty(*xc.shape[:-1], d)
    n = y.numel()
    if n == 0:
        return y
    _geglu_kernel[(triton.cdiv(n, block),)](xc, y, n, d, TANH=APPROXIMATIONS[approximate] == 1, BLOCK=block)
    return y

