"""The CPU fast path, as load options: precision, packed linear weights, channels_last, torch.compile.

    unet = load_unet(path, dtype=torch.bfloat16, compile=True)   # or: optimize(unet, compile=True)

What each option does, and why (measured on a 2-core AVX512-BF16 CPU; see `mobilediffusion bench`):
- dtype (bf16): oneDNN runs bf16 convolutions and matmuls several times faster than fp32. The fused
  ops keep their own fp32 math for norms and attention.
- packed weights (default on CPU): fp32 nn.Linear runs through MKL's sgemm, well below what oneDNN
  reaches on the same shapes, and eager nn.Conv2d reorders its weight into oneDNN's blocked layout on
  every call (as long as the convolution itself for the wide inner levels; for bf16 1x1 convolutions
  oneDNN's shape-agnostic layout is several times slower still). `PackedLinear` (fp32; bf16 for
  products of >= 1024 rows) and `PackedConv2d` (mobilediffusion.packed) reorder once per input shape
  and call oneDNN directly; the packed copy costs the weight's memory once more. Inference only: with
  autograd on they are the plain modules. Same results within fp32 rounding.
- channels_last (default on CPU for UNets): convolutions and GroupNorm read NHWC natively, the packed
  convolutions run oneDNN's NHWC kernels (and return NHWC maps whatever the layout of the weight they
  packed, so packed weights stay as loaded: no copy), and the attention sites turn feature maps into
  tokens without a copy. Unpacked (compile, or no oneDNN), the conv weights are made channels_last and
  the maps follow them. Decoders too, with their own rewrites on top (mobilediffusion.fast_decoder); their large fp32
  maps are normalized by ops.group_norm_act's two-pass channels_last path (torch's one-pass channels_last
  GroupNorm drifts to ~1.5e-5 relative on 512 x 512 maps).
- compile (opt-in): `torch.compile` with inductor freezing (weights folded as constants, prepacked,
  pointwise ops fused into the matmuls), set for this module's compilation only. The first call
  compiles (30-75 s for an SD-size UNet); inductor's FX graph cache (on by default, in
  TORCHINDUCTOR_CACHE_DIR, default /tmp/torchinductor_$USER) makes later processes start much faster.
  Without freezing, compiling was slower than eager on this machine class.
None of these changes parameter names: state_dict() and the key maps see the same module.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .errors import ConfigError
from .packed import PackedConv2d, PackedLinear, forget_packed, pack_weights, packed_weights_available, unpack_weights

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(value) -> torch.dtype:
    """A torch dtype from a dtype or a name ("fp32", "bf16", "fp16", "float32", ...)."""
    if isinstance(value, torch.dtype):
        return value
    names = {**PRECISIONS, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if value in names:
        return names[value]
    raise ConfigError(f"unknown precision {value!r}; choose one of: {', '.join(PRECISIONS)}")


def precision_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in PRECISIONS.items()}.get(dtype, str(dtype))


def unsupported_precision(dtype, device="cpu") -> str | None:
    """Why this machine cannot run `dtype` at speed on `device`, or None if it can."""
    dtype, device = resolve_dtype(dtype), torch.device(device)
    if dtype == torch.float32:
        return None
    if device.type == "cuda":
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            return "this GPU has no bf16 support"
        return None
    if device.type != "cpu":
        return None
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn), which runs half precision on CPU"
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this CPU has no bf16 instructions (AVX512-BF16 / AMX)"
    if dtype == torch.float16 and not torch.ops.mkldnn._is_mkldnn_fp16_supported():
        return "this CPU has no fp16 matrix instructions (AVX512-FP16 / AMX-FP16)"
    return None


INT8 = "int8"  # a precision that is not a dtype: int8 convolutions and linears (ops.int8) in a bf16 model


def int8_plan(precision, device="cpu", *, compile: bool = False) -> tuple[torch.dtype, bool]:
    """(the dtype to build a model in, whether to turn its convolutions and linears int8) for a precision that may
    be "int8". int8 runs as a bf16 model with int8 layers; where it cannot run (no VNNI, not the CPU, no oneDNN int8
    ops) it is bf16 (fp32 without bf16), with one warning line saying why. int8 with `compile` is a ConfigError."""
    if precision != INT8:
        return resolve_dtype(precision), False
    from .ops.int8 import int8_unavailable

    if compile:
        raise ConfigError("precision int8 does not combine with compile; choose one")
    why = "int8 runs on the CPU only" if torch.device(device).type != "cpu" else int8_unavailable()
    if why:
        fallback = float_dtype(INT8, device)
        log.warning("precision int8 is not available: %s; running %s instead", why, precision_name(fallback))
        return fallback, False
    return torch.bfloat16, True


def float_dtype(precision, device="cpu") -> torch.dtype:
    """The torch dtype of a precision; "int8" gives the dtype the int8 mode keeps between its layers (bf16), for
    the parts it does not quantize (text encoder, image encoder)."""
    if precision == INT8:
        return torch.bfloat16 if unsupported_precision(torch.bfloat16, device) is None else torch.float32
    return resolve_dtype(precision)


def check_precision(dtype, device="cpu") -> torch.dtype:
    """The dtype, or a ConfigError saying why the machine lacks it and what to use instead."""
    dtype = resolve_dtype(dtype)
    why = unsupported_precision(dtype, device)
    if why:
        raise ConfigError(f"precision {precision_name(dtype)} is not available on {torch.device(device)}: {why}; "
                          "use fp32" + (" or bf16" if unsupported_precision(torch.bfloat16, device) is None else ""))
    return dtype


# --------------------------------------------------------------------------- packed weights (mobilediffusion.packed)
unpack_linears = unpack_weights  # the name export/components.py imports


# --------------------------------------------------------------------------- compile
def compile_module(module: nn.Module, *, freezing: bool = True) -> nn.Module:
    """Compile `module` in place (nn.Module.compile: the module keeps its class and parameter names) with
    inductor; `freezing` folds the weights in as constants (inference only; call it under
    torch.no_grad()). The inductor options apply to this module's compilations only. Returns the module."""
    unpack_weights(module)  # inductor packs the weights itself
    module.compile(options={"freezing": freezing}, dynamic=False)
    log.info("%s: torch.compile (inductor, freezing=%s); the first call compiles", type(module).__name__, freezing)
    return module


def is_compiled(module: nn.Module) -> bool:
    """Whether `module` was compiled in place (compile_module / nn.Module.compile)."""
    return getattr(module, "_compiled_call_impl", None) is not None


# --------------------------------------------------------------------------- all together
def _has_convs(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def _packs(on_cpu: bool, compile: bool, packed: bool | None) -> bool:
    """Whether optimize() packs weights for oneDNN: on CPU unless told otherwise, never under compile (inductor
    packs its own)."""
    return not compile and (on_cpu if packed is None else packed) and packed_weights_available()


def _channels_last_weights(module: nn.Module, on_cpu: bool, channels_last: bool | None, compile: bool,
                           packed: bool | None) -> bool:
    """Whether optimize() converts `module`'s conv weights to channels_last: for NHWC maps on CPU when its
    convolutions are not packed (a packed convolution returns NHWC maps from a weight of either layout)."""
    return ((on_cpu if channels_last is None else channels_last) and _has_convs(module)
            and not _packs(on_cpu, compile, packed))


def weight_memory_format(module: nn.Module, device="cpu", *, compile: bool = False) -> torch.memory_format | None:
    """The layout optimize(module, compile=compile) gives `module`'s 4-D weights once it runs on `device`:
    channels_last where its convolutions will not be packed, else None (kept as they are). A loader casts
    checkpoint tensors straight into it, so optimize() has nothing left to copy."""
    on_cpu = torch.device(device).type == "cpu"
    return torch.channels_last if _channels_last_weights(module, on_cpu, None, compile, None) else None


def optimize(module: nn.Module, *, dtype=None, compile: bool = False, channels_last: bool | None = None,
             packed: bool | None = None) -> nn.Module:
    """Apply the fast path to a loaded model in place and return it (the same object).

    dtype: cast the weights (None keeps them). channels_last: NHWC feature maps; None means on for CPU.
    packed: oneDNN-packed linear weights, and conv weights when channels_last (packed convolutions return
    channels_last maps whatever their weight's layout; a decoder then gets fast_decoder.fuse); None means
    on for CPU. Conv weights themselves are made channels_last only where they are not packed.
    compile: torch.compile with inductor freezing (see compile_module). Outputs stay within fp32
    rounding of the unoptimized module (bf16: within bf16 rounding).
    """
    p = next(module.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    on_cpu = device.type == "cpu"
    if dtype is not None:
        module.to(dtype=check_precision(dtype, device))
    if channels_last is None:
        channels_last = on_cpu
    if _channels_last_weights(module, on_cpu, channels_last, compile, packed):
        module.to(memory_format=torch.channels_last)  # 4-D weights only; the first conv's output follows
    if compile:
        compile_module(module)
    elif _packs(on_cpu, compile, packed):
        from .decoder import Decoder

        if pack_weights(module, convs=channels_last) and channels_last and isinstance(module, Decoder):
            from .fast_decoder import fuse

            fuse(module)
    return module


__all__ = [
    "PRECISIONS", "INT8", "int8_plan", "float_dtype", "resolve_dtype", "check_precision", "unsupported_precision",
    "PackedLinear", "PackedConv2d", "pack_weights", "unpack_weights", "forget_packed", "compile_module", "is_compiled", "optimize",
    "weight_memory_format",
]
