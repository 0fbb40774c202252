"""GELU and GEGLU (the feed-forward activations of the SD transformer blocks), exact and tanh forms, and the
decoders' final clamp to [0, 1]."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .backend import Backend, as_backend, triton_kernels

APPROXIMATIONS = ("none", "tanh")


def gelu(x: torch.Tensor, approximate: str = "none", *,
         backend: Backend | str = Backend.REFERENCE) -> torch.Tensor:
    """GELU of x (any shape): x * Phi(x) ("none", erf form) or its tanh approximation ("tanh").

    Equal to `F.gelu(x, approximate=...)`; returns x's shape and dtype, half inputs computed in fp32.
    """
    _check_approximate("gelu", approximate)
    backend = as_backend(backend)
    if backend is Backend.TRITON:
        return triton_kernels("gelu").gelu_triton(x, approximate)
    if backend is Backend.EXPORT:
        return F.gelu(x, approximate=approximate)  # the TFLite GELU builtin (approximate flag kept)
    return _gelu_reference(x, approximate)


def geglu(x: torch.Tensor, approximate: str = "none", *,
          backend: Backend | str = Backend.REFERENCE) -> torch.Tensor:
    """GEGLU (Shazeer 2020) after its projection: x (..., 2d) -> hidden * gelu(gate) (..., d),
    with hidden, gate = x.chunk(2, dim=-1), as in diffusers' GEGLU."""
    _check_approximate("geglu", approximate)
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ConfigError(f"geglu: the last dim of x holds hidden and gate halves and must be even, "
                          f"got shape {tuple(x.shape)}")
    backend = as_backend(backend)
    if backend is Backend.TRITON:
        return triton_kernels("gelu").geglu_triton(x, approximate)
    if backend is Backend.EXPORT:
        hidden, gate = x.chunk(2, dim=-1)  # builtins: SLICE / SPLIT, GELU, MUL
        return hidden * F.gelu(gate, approximate=approximate)
    hidden, gate = x.chunk(2, dim=-1)  # 2 x (..., d)
    if x.dtype == torch.bfloat16:  # torch's bf16 kernels compute in fp32 inside; no fp32 copies
        return F.gelu(gate, approximate=approximate).mul_(hidden)
    out = F.gelu(_upcast(gate), approximate=approximate)  # fp32 for fp16 inputs; a fresh tensor
    return out.mul_(hidden).to(x.dtype)  # hidden is promoted inside the multiply, not copied


def clamp_unit(x: torch.Tensor, *, backend: Backend | str = Backend.REFERENCE) -> torch.Tensor:
    """x clamped to [0, 1] (any shape, same dtype): the decoders' last op.

    The export path computes relu6(6 x) / 6 (equal within fp32 rounding): TFLite lowers a clamp to
    [0, 1] to RELU_0_TO_1, which the LiteRT GPU delegate does not take (the last op of the decoder
    would run on the CPU), while RELU6 fuses into the multiply before it.
    """
    if as_backend(backend) is Backend.EXPORT:
        return F.relu6(x * 6.0) / 6.0
    return x.clamp(0, 1)


def _check_approximate(op, approximate):
    if approximate not in APPROXIMATIONS:
        raise ConfigError(f"{op}: approximate must be one of {APPROXIMATIONS}, got {approximate!r}")


def _upcast(x):
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _gelu_reference(x, approximate):
    """torch's GELU kernel, in fp32 for half inputs: 0.5 x (1 + erf(x / sqrt 2)) or
    0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))."""
    return F.gelu(_upcast(x), approximate=approximate).to(x.dtype)
