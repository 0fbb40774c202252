"""int8 convolutions and linears on the CPU: oneDNN's int8 kernels (VNNI dot products) through torch.ops.onednn.

    n = quantize_int8(unet)                   # in place: convolutions and linears become Int8Conv2d / Int8Linear
    ranges = calibrate(unet, lambda: ...)     # optional: each layer's input range over a few real calls ...
    quantize_int8(unet, ranges=ranges)        # ... then static activation scales (no range pass per call)

Weights: int8, symmetric, one scale per output channel, packed once into oneDNN's blocked layout. Activations:
uint8 with one scale and zero point per call (a per-tensor affine range), quantized in one pass by the CPU kernel
(`cpu_kernel.quantize_u8`); the range is the layer's calibrated one (static) or the input's own min and max (one
more pass, `cpu_kernel.minmax`). The product accumulates in int32 and comes back dequantized, with the bias added, in
the input's dtype (bf16 for a bf16 model): the layers around (norms, attention, activations) run as they were.

What stays in floating point, by rule (`keep`): depthwise and grouped convolutions (oneDNN's int8 grouped
kernels are slower than bf16 on these shapes), layers with fewer than 16 input channels (the UNet's first
convolution: no time to gain, precision to lose), and the layers named in `keep` (default: the UNet's
conv_in/conv_out and time embedding, whose outputs every later layer depends on). Inference only; the quantized
weights are not parameters (state_dict() leaves them out), so quantize a loaded model, and load it again to go back.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from . import cpu_kernel

log = logging.getLogger("mobilediffusion.ops")

KEEP = ("conv_in", "conv_out", "time_embedding", "time_proj", "add_embedding")  # name parts kept in float
MIN_CHANNELS = 16  # layers with fewer input channels stay in float


def int8_unavailable() -> str | None:
    """Why int8 layers cannot run here at speed, or None: they need VNNI (AVX512-VNNI, AVX-VNNI or AMX), torch's
    oneDNN int8 ops and the CPU kernel (for quantizing activations)."""
    flags = cpu_kernel.cpu_flags()
    if not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}:
        return "this CPU has no VNNI int8 dot products (avx512_vnni / avx_vnni / amx_int8)"
    if not all(hasattr(torch.ops.onednn, op) for op in ("qconv_prepack", "qconv_pointwise", "qlinear_prepack",
                                                        "qlinear_pointwise")):
        return f"torch {torch.__version__} has no oneDNN int8 convolution / linear ops"
    why = cpu_kernel.unavailable()
    if why is None and "md_quantize_u8_f32" not in cpu_kernel.load()[0].fns:
        return "the int8 quantize kernel needs AVX-512 (this CPU's kernels are its AVX2 ones)"
    return why


def activation_params(lo: float, hi: float) -> tuple[float, int]:
    """(scale, zero point) of uint8 covering [lo, hi] and 0, with the zero point in 1..255 (oneDNN's weights are
    packed for a nonzero zero point: 255 steps for the range)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi - lo < 1e-12:
        return 1.0, 128
    scale = (hi - lo) / 254.0
    return scale, int(min(255, max(1, 1 + round(-lo / scale))))


def weight_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, fp32 scale per output channel): symmetric, w ~ q * scale along dim 0."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=tuple(range(1, w.dim()))) / 127.0).clamp_min(1e-12)  # (out,)
    q = torch.round(w / scale.view(-1, *[1] * (w.dim() - 1))).clamp(-127, 127).to(torch.int8)
    return q, scale


class _Int8:
    """Shared by Int8Conv2d and Int8Linear: the activation range (static) and the quantize step."""

    act: tuple[float, int] | None = None  # (scale, zero point) from calibration; None: from each input

    def _quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        scale, zp = self.act or activation_params(*cpu_kernel.minmax(x))
        return cpu_kernel.quantize_u8(x, scale, zp), scale, zp


@dataclass(frozen=True)
class QuantizedMap:
    """A uint8 map an int8 layer takes as it is (written so by the op before it, e.g. `cpu_kernel.group_norm_u8`):
    q (B, C, H, W) channels_last, its scale and zero point, and the dtype of the float map it stands for (the
    layer's output dtype)."""

    q: torch.Tensor
    scale: float
    zero_point: int
    dtype: torch.dtype


class Int8Conv2d(_Int8, nn.Module):
    """A Conv2d (groups 1, zero padding) on int8 weights and uint8 activations; x (B, C, H, W) any layout ->
    channels_last (B, O, H', W') in x's dtype. A 1x1 convolution of stride 1 runs as the linear it is, on the pixels
    of the channels_last map (oneDNN's int8 matmul ran 1x1 convolutions on 16x16 maps at 2.3x the speed of its
    int8 convolution kernel)."""

    def __init__(self, conv: nn.Conv2d, act: tuple[float, int] | None = None):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self.stride, self.padding, self.dilation = list(conv.stride), list(conv.padding), list(conv.dilation)
        self.act = act
        if tuple(conv.kernel_size) == (1, 1) and self.stride == [1, 1] and self.padding == [0, 0]:
            self._pointwise = _Product(conv.weight.flatten(1), conv.bias)  # (O, C, 1, 1) -> (O, C)
            return
        self._pointwise = None
        q, self.w_scale = weight_int8(conv.weight)
        self.w_zp = torch.zeros(self.out_channels, dtype=torch.int32)
        self.bias = None if conv.bias is None else conv.bias.detach().float().clone()
        self._packed = torch.ops.onednn.qconv_prepack(q, self.w_scale, 1.0, 128, self.stride, self.padding,
                                                      self.dilation, 1, None)

    def forward(self, x, relu: bool = False, add: torch.Tensor | None = None):
        """x: a float map, or a QuantizedMap. `relu`: ReLU applied to the output in the same pass (a oneDNN
        post-op; the decoders' conv + ReLU). `add`: a channels_last map of the output's shape and dtype that the
        output is accumulated into, in place (oneDNN's sum post-op; before the ReLU), and returned."""
        if isinstance(x, QuantizedMap):
            xq, scale, zp, dtype = x.q, x.scale, x.zero_point, x.dtype
        else:
            x = x.contiguous(memory_format=torch.channels_last)
            (xq, scale, zp), dtype = self._quantize(x), x.dtype
        post = "relu" if relu else "none"
        if self._pointwise is not None:  # (B, C, H, W) channels_last is (B*H*W, C) rows: no copy either way
            B, C, H, W = xq.shape
            y = self._pointwise(xq.permute(0, 2, 3, 1).reshape(-1, C), scale, zp, dtype,
                                "none" if add is not None else post)  # (B*H*W, O)
            y = y.view(B, H, W, -1).permute(0, 3, 1, 2)
            return y if add is None else (add.add_(y).relu_() if relu else add.add_(y))
        if add is not None:
            return torch.ops.onednn.qconv2d_pointwise.binary(
                xq, scale, zp, self._packed, self.w_scale, self.w_zp, add, self.bias, self.stride, self.padding,
                self.dilation, 1, 1.0, 0, dtype, 1.0, 0, "sum", 1.0, post, [], "")
        return torch.ops.onednn.qconv_pointwise(xq, scale, zp, self._packed, self.w_scale, self.w_zp, self.bias,
                                                self.stride, self.padding, self.dilation, 1, 1.0, 0, dtype, post,
                                                [], "")

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={tuple(self.kernel_size)}, "
                f"stride={tuple(self.stride)}, padding={tuple(self.padding)}, "
                f"activations={'static' if self.act else 'per call'}")


class _Product:
    """One int8 weight (out, in), packed, with its scales and bias: x uint8 (rows, in) -> (rows, out)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        q, self.w_scale = weight_int8(weight)
        self.w_zp = torch.zeros(weight.shape[0], dtype=torch.int32)
        self.bias = None if bias is None else bias.detach().float().clone()
        self.packed = torch.ops.onednn.qlinear_prepack(q, None)

    def __call__(self, xq, scale, zp, dtype, post_op="none"):
        return torch.ops.onednn.qlinear_pointwise(xq, scale, zp, self.packed, self.w_scale, self.w_zp, self.bias, 1.0,
                                                  0, dtype, post_op, [], "none")


# activations oneDNN applies to a linear's output in the same pass (post-ops); "gelu" is the exact (erf) GELU
POST_OPS = {"gelu": "gelu", "swish": "swish"}


class Int8Linear(_Int8, nn.Module):
    """A Linear on int8 weights and uint8 activations; x (..., in) -> (..., out) in x's dtype. `activation`
    ("gelu", "swish") is applied to the output in the same pass; "geglu" makes it the first linear of a GEGLU
    feed-forward: out_features // 2 outputs, hidden * gelu(gate) of the two halves (as ops.geglu)."""

    def __init__(self, linear: nn.Linear, act: tuple[float, int] | None = None, activation: str | None = None):
        super().__init__()
        if activation not in (None, "geglu", *POST_OPS):
            raise ConfigError(f"Int8Linear: activation {activation!r} is not one of geglu, {', '.join(POST_OPS)}")
        self.in_features, self.activation, self.act = linear.in_features, activation, act
        w, b = linear.weight, linear.bias
        if activation == "geglu":  # hidden, gate = the halves of the output, as in diffusers' GEGLU
            d = w.shape[0] // 2
            self._products = [_Product(w[:d], None if b is None else b[:d]),
                              _Product(w[d:], None if b is None else b[d:])]
        else:
            self._products = [_Product(w, b)]
        self.out_features = w.shape[0] // 2 if activation == "geglu" else w.shape[0]

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1]).contiguous()  # (rows, in)
        xq, scale, zp = self._quantize(x)
        if self.activation == "geglu":
            hidden, gate = self._products
            y = gate(xq, scale, zp, x.dtype, "gelu").mul_(hidden(xq, scale, zp, x.dtype))
        else:
            y = self._products[0](xq, scale, zp, x.dtype, POST_OPS.get(self.activation, "none"))
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"activation={self.activation}, activations={'static' if self.act else 'per call'}")


def eligible(name: str, m: nn.Module, keep=KEEP) -> str | None:
    """Why layer `name` stays in float, or None if it runs int8 (see the module docstring)."""
    if any(part in keep for part in name.split(".")):
        return "kept by name"
    if isinstance(m, nn.Conv2d):
        if m.groups != 1:
            return "grouped / depthwise convolution"
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            return f"padding {m.padding!r} ({m.padding_mode})"
        if m.in_channels < MIN_CHANNELS:
            return f"{m.in_channels} input channels"
        return None
    if isinstance(m, nn.Linear):
        return f"{m.in_features} input features" if m.in_features < MIN_CHANNELS else None
    return "not a convolution or linear"


def targets(module: nn.Module, keep=KEEP) -> list[tuple[str, nn.Module]]:
    """The (name, layer) pairs of `module` that quantize_int8 turns int8."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
            and eligible(n, m, keep) is None]


def kept(module: nn.Module, keep=KEEP) -> dict[str, list[str]]:
    """{why: [layer names]} of the convolutions and linears of `module` that quantize_int8 leaves in float."""
    out: dict[str, list[str]] = {}
    for n, m in module.named_modules():
        why = eligible(n, m, keep) if isinstance(m, (nn.Conv2d, nn.Linear)) else None
        if why:
            out.setdefault(why if why != "kept by name" else "kept by name (first / last layers, time embedding)",
                           []).append(n)
    return out


def calibrate(module: nn.Module, run: Callable[[], object], keep=KEEP) -> dict[str, tuple[float, float]]:
    """{layer name: (min, max) of its inputs} over everything `run()` makes `module` compute (e.g. a few prompts
    sampled at the model's steps), for quantize_int8's `ranges`."""
    return record_ranges({"": (module, targets(module, keep))}, run)[""]


def int8_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, layer) pairs of `module` that are int8 (Int8Conv2d / Int8Linear)."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, _Int8)]


def set_ranges(module: nn.Module, ranges: dict[str, tuple[float, float]]) -> None:
    """Static activation scales for the int8 layers of `module` that `ranges` names, per call for the others."""
    for name, layer in int8_layers(module):
        layer.act = activation_params(*ranges[name]) if name in ranges else None


def record_ranges(parts: dict, run: Callable[[], object]) -> dict[str, dict[str, tuple[float, float]]]:
    """{part: {layer name: (min, max) of its inputs}} over what `run()` computes. `parts`: {part: module} (its int8
    layers are watched) or {part: (module, [(name, layer), ...])}. ConfigError when no watched layer ran."""
    ranges: dict[str, dict[str, list[float]]] = {k: {} for k in parts}

    def hook(part, name):
        def record(_, args):
            x = args[0]
            lo, hi = cpu_kernel.minmax(x if cpu_kernel.dense(x) else x.contiguous())
            r = ranges[part].setdefault(name, [lo, hi])
            r[0], r[1] = min(r[0], lo), max(r[1], hi)
        return record

    handles = []
    for part, spec in parts.items():
        layers = spec[1] if isinstance(spec, tuple) else int8_layers(spec)
        handles += [m.register_forward_pre_hook(hook(part, n)) for n, m in layers]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    if not any(ranges.values()):
        raise ConfigError("calibration saw no int8 layer run: give calibration prompts that run the model")
    return {k: {n: (v[0], v[1]) for n, v in r.items()} for k, r in ranges.items()}


def quantize_int8(module: nn.Module, *, ranges: dict[str, tuple[float, float]] | None = None, keep=KEEP) -> int:
    """Turn the eligible convolutions and linears of `module` into Int8Conv2d / Int8Linear in place; returns how
    many. `ranges` (from calibrate): static activation scales for the layers it names, per call for the others.
    Raises ConfigError where int8 cannot run here (int8_unavailable)."""
    why = int8_unavailable()
    if why:
        raise ConfigError(f"int8 layers cannot run here: {why}; use bf16 or fp32")
    from ..fast_decoder import Int8UpsampleConv, int8_upsampled  # (it imports the decoder: not at the top)

    ranges = ranges or {}
    chosen = targets(module, keep)
    for name, child in chosen:
        act = activation_params(*ranges[name]) if name in ranges else None
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        if isinstance(child, nn.Conv2d) and int8_upsampled(parent, attr, child):  # after a nearest 2x upsample:
            parent[int(attr) - 1] = nn.Identity()  # the phase kernels on the small map (fast_decoder)
            setattr(parent, attr, Int8UpsampleConv(child, act))
        elif isinstance(child, nn.Conv2d):
            setattr(parent, attr, Int8Conv2d(child, act))
        else:  # a feed-forward's first linear takes its activation along (FeedForward then skips its own)
            fused = getattr(parent, "activation", None) if attr == "fc1" else None
            setattr(parent, attr, Int8Linear(child, act, fused if fused in ("geglu", *POST_OPS) else None))
    log.info("%s: %d convolutions and linears run int8 (%d with static activation scales)", type(module).__name__,
             len(chosen), sum(n in ranges for n, _ in chosen))
    return len(chosen)


__all__ = ["Int8Conv2d", "Int8Linear", "quantize_int8", "calibrate", "int8_unavailable", "activation_params",
           "weight_int8", "targets", "eligible", "kept", "int8_layers", "set_ranges", "record_ranges", "QuantizedMap"]
