"""Dynamic int8 linears: a CPU speed mode for the UNet's matmuls.

    quantize_linears(unet)   # in place; every nn.Linear becomes a DynamicInt8Linear

Weights are quantized once to int8 (symmetric, one scale per output channel); activations are
quantized per call (per tensor, asymmetric uint8, from their min and max) and the product runs in
torch's quantized CPU engine (`torch.backends.quantized.engine`, "x86" on x86: FBGEMM / oneDNN int8
GEMMs, VNNI where the CPU has it), the result coming back in the input's dtype (a bf16 model gets
bf16 back; the product itself takes fp32 activations; quantizing the activations is fused into the
GEMM call, where doing it with separate torch ops costs as much as the int8 GEMM saves). Convolutions, norms and attention stay as they
are. Inference only; the quantized weights are not parameters (state_dict() leaves them out), so
quantize a loaded model, and load a new one to go back. The cost is accuracy: measure it with
`mobilediffusion bench --int8` (UNet output error and the shipped model's image PSNR). torch 2.13
deprecates quantized tensors, which the weight packing goes through: `int8_unavailable()` says
when a build no longer has them.
"""
from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from .errors import ConfigError

log = logging.getLogger(__name__)


def has_vnni() -> bool:
    """Whether the CPU has VNNI int8 dot products (avx512_vnni / avx_vnni / AMX), from /proc/cpuinfo (Linux;
    False where that cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def int8_unavailable() -> str | None:
    """Why this torch build cannot run dynamic int8 linears on the CPU, or None if it can."""
    engine = torch.backends.quantized.engine
    if engine in (None, "none") or engine not in torch.backends.quantized.supported_engines:
        return f"this torch build has no quantized CPU engine (supported: {torch.backends.quantized.supported_engines})"
    if not hasattr(torch.ops.quantized, "linear_dynamic"):
        return "this torch build has no quantized.linear_dynamic op"
    return None


class DynamicInt8Linear(nn.Module):
    """y = x W^T + b with W in int8 (per output channel) and x quantized to uint8 per call; x (..., in)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float().cpu()  # (out, in)
        scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12).double()
        with warnings.catch_warnings():  # torch >= 2.13 warns that quantized tensor creation is deprecated
            # (pytorch#184982); the prepacked weight below is all that is kept, so it is made once here
            warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
            qw = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float().cpu()
        self._packed = torch.ops.quantized.linear_prepack(qw, bias)
        self.engine = torch.backends.quantized.engine
        # 7-bit activations where int8 dot products go through int16 pairs that can saturate (no VNNI)
        self.reduce_range = not has_vnni()

    def forward(self, x):
        y = torch.ops.quantized.linear_dynamic(x.float(), self._packed, self.reduce_range)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, engine={self.engine}, "
                f"reduce_range={self.reduce_range}")


def quantize_linears(module: nn.Module) -> int:
    """Replace every nn.Linear (and subclass, e.g. fast.PackedLinear) inside `module` by a DynamicInt8Linear,
    in place; returns how many. Raises ConfigError when this torch build cannot run them."""
    why = int8_unavailable()
    if why:
        raise ConfigError(f"dynamic int8 linears are not available: {why}; use the fp32 or bf16 modes")
    targets = [(name, child) for name, child in module.named_modules() if isinstance(child, nn.Linear)]
    for name, child in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, DynamicInt8Linear(child))
    log.info("%s: %d linears run dynamic int8 (%s engine)", type(module).__name__, len(targets),
             torch.backends.quantized.engine)
    return len(targets)


__all__ = ["DynamicInt8Linear", "quantize_linears", "int8_unavailable"]
