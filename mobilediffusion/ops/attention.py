"""Scaled dot-product attention without mask: softmax(q k^T * scale) v."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .cpu_kernel import attention as cpu_attention, unsupported as cpu_unsupported
from .backend import Backend, as_backend, composite_builder, log_once, triton_kernels

VARIANTS = ("flash", "partial_softmax")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
              backend: Backend | str = Backend.REFERENCE, variant: str = "flash") -> torch.Tensor:
    """softmax(q k^T * scale) v over q (B, heads, Tq, d), k and v (B, heads, Tk, d) -> (B, heads, Tq, d).

    scale defaults to 1 / sqrt(d). `variant` picks the Triton kernel: "flash" (FlashAttention tiling
    with online softmax, d <= 128) or "partial_softmax" (reductions, then exp/divide fused into the
    product with V; any d); the reference, cpu and export paths compute the same math for both.
    Half inputs are computed in fp32 by the reference. The cpu kernel takes fp32 and bf16 (scores,
    softmax and accumulation in fp32; for bf16 the probabilities are rounded to bf16 for the product
    with V); its output is (B, heads, Tq, d) with (B, Tq, heads, d) memory. Inputs it does not take
    (other dtypes, devices, head dims > 256 in fp32 or > 512 in bf16, inputs needing gradients) go to the reference, logged
    once per reason.
    """
    _check(q, k, v, variant)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    backend = as_backend(backend)
    if backend is Backend.CPU:
        why = cpu_unsupported(q, k, v, scale)
        if why is None:
            return cpu_attention(q, k, v, scale)
        log_once(f"cpu attention kernel: {why}; the reference path takes these inputs")
    if backend is Backend.TRITON:
        kernels = triton_kernels("attention")
        if variant == "flash":
            return kernels.flash_attention_triton(q, k, v, scale)
        return kernels.partial_softmax_attention_triton(q, k, v, scale)
    if backend is Backend.EXPORT:
        return _export(q, k, v, scale)
    return _reference(q, k, v, scale)


def _check(q, k, v, variant):
    if variant not in VARIANTS:
        raise ConfigError(f"attention: variant must be one of {VARIANTS}, got {variant!r}")
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if not q.dim() == k.dim() == v.dim() == 4:
        raise ConfigError(f"attention: q, k, v must be 4-D (B, heads, T, d), got {shapes}")
    if q.shape[:2] != k.shape[:2] or k.shape != v.shape:
        raise ConfigError(f"attention: k and v must both be (B, heads, Tk, d) with q's B and heads, got {shapes}")
    if q.shape[-1] != k.shape[-1]:
        raise ConfigError(f"attention: q and k need the same head dim, got {shapes}")
    if not q.dtype == k.dtype == v.dtype:
        raise ConfigError(f"attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape[2] == 0:
        raise ConfigError(f"attention: no keys (Tk = 0) to attend to, got {shapes}")


def _reference(q, k, v, scale):
    """torch's SDPA (its math or flash CPU kernel), in fp32 for half inputs."""
    if q.dtype in (torch.float16, torch.bfloat16):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _export(q, k, v, scale):
    """An `odml.scaled_dot_product_attention` composite; its inputs and output are (B, T, heads, d),
    the layout of litert-torch's SDPA composite (the LiteRT GPU delegate fuses it)."""
    builder = composite_builder()(name="odml.scaled_dot_product_attention", attr={"scale": scale})
    q, k, v = builder.mark_inputs(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, T, heads, d)
    out = _reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale)  # (B, heads, Tq, d)
    out = builder.mark_outputs(out.transpose(1, 2))  # (B, Tq, heads, d)
    return out.transpose(1, 2)  # (B, heads, Tq, d)
