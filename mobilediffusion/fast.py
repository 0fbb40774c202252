"""The CPU fast path, as load options: precision, packed linear weights, channels_last, torch.compile.

    unet = load_unet(path, dtype=torch.bfloat16, compile=True)   # or: optimize(unet, compile=True)

What each option does, and why (measured on a 2-core AVX512-BF16 CPU; see `mobilediffusion bench`):
- dtype (bf16): oneDNN runs bf16 convolutions and matmuls several times faster than fp32. The fused
  ops keep their own fp32 math for norms and attention.
- packed weights (default on CPU): fp32 nn.Linear runs through MKL's sgemm, well below what oneDNN
  reaches on the same shapes, and eager nn.Conv2d reorders its weight into oneDNN's blocked layout on
  every call (as long as the convolution itself for the wide inner levels; for bf16 1x1 convolutions
  oneDNN's shape-agnostic layout is several times slower still). `PackedLinear` (fp32; bf16 for
  products of >= 1024 rows) and `PackedConv2d` reorder once per input shape and call oneDNN directly;
  the packed copy costs the weight's memory once more. Inference only: with autograd on they are the
  plain modules. Same results within fp32 rounding.
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
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

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


def check_precision(dtype, device="cpu") -> torch.dtype:
    """The dtype, or a ConfigError saying why the machine lacks it and what to use instead."""
    dtype = resolve_dtype(dtype)
    why = unsupported_precision(dtype, device)
    if why:
        raise ConfigError(f"precision {precision_name(dtype)} is not available on {torch.device(device)}: {why}; "
                          "use fp32" + (" or bf16" if unsupported_precision(torch.bfloat16, device) is None else ""))
    return dtype


# --------------------------------------------------------------------------- packed weights
def packed_weights_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise") \
        and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class _Packed:
    """Mixin for a module whose inference forward runs oneDNN on its weight reordered once into the blocked
    layout oneDNN picks for the input shape (cached; redone when the input shape or the weight changes,
    moves or changes dtype: without the shape oneDNN may pick a layout several times slower, e.g. for
    bf16 1x1 convolutions). Parameters and state_dict stay the torch module's. Off CPU, for other dtypes,
    with autograd recording and while tracing (torch.compile / torch.export) it is the plain torch module."""

    _pack_key = None
    _packed = None
    _dtypes = (torch.float32, torch.bfloat16)  # weight dtypes run packed

    def _use_packed(self, x) -> bool:
        w = self.weight
        return not ((torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)) or w.device.type != "cpu"
                    or w.dtype not in self._dtypes or x.dtype != w.dtype
                    or torch.compiler.is_compiling() or torch.jit.is_tracing())

    def _packed_weight(self, x):
        w = self.weight
        # inference tensors (a model loaded under torch.inference_mode, as ComfyUI runs nodes) keep no
        # version counter: they cannot change outside inference mode, so their storage identifies them
        version = -1 if w.is_inference() else w._version
        key = (w.data_ptr(), version, w.dtype, x.shape)
        if key != self._pack_key:
            self._packed = None  # free the old layout first
            self._packed = self._pack(w.detach(), x.shape)
            self._pack_key = key
        return self._packed

    def __getstate__(self):  # copies and pickles leave the packed weight behind (remade on first use)
        state = dict(super().__getstate__())
        state.pop("_packed", None)
        state.pop("_pack_key", None)
        return state


def _rows(shape: torch.Size) -> int:
    """Rows of the product a linear computes for an input of this shape (..., in_features)."""
    return shape.numel() // max(shape[-1], 1)


class PackedLinear(_Packed, nn.Linear):
    """nn.Linear through oneDNN's linear on a packed weight. fp32: always (MKL's sgemm, nn.Linear's fp32 path
    on CPU, reaches well under half of oneDNN's rate on UNet shapes). bf16: for products of at least
    `BF16_MIN_ROWS` rows, i.e. where a weight is reused for thousands of tokens: there bf16's addmm (which
    first copies the bias into the output) ran 236-393 GFLOP/s against 411-436 packed on SD1.5's 64x64
    shapes (4096 x 320 x 320/2560), while its packed copy is small (SD1.5: 25 MB at 64x64, 92 MB at 32x32).
    Below that (the 16x16 bottlenecks with 256 tokens, time embeddings) packing gained 3-8% for twice the
    weights' memory, so those stay plain."""

    BF16_MIN_ROWS = 1024

    def _use_packed(self, x) -> bool:
        if not super()._use_packed(x):
            return False
        return x.dtype == torch.float32 or _rows(x.shape) >= self.BF16_MIN_ROWS

    def _pack(self, w, shape):
        return torch.ops.mkldnn._reorder_linear_weight(w, _rows(shape))

    def forward(self, x):
        if not self._use_packed(x):
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight(x), self.bias, "none", [], "")


class PackedConv2d(_Packed, nn.Conv2d):
    """nn.Conv2d through oneDNN on a packed weight (eager convolutions reorder the weight on every call;
    for the wide 3x3 convolutions of a UNet's inner levels that is as long as the convolution).
    Outputs are channels_last."""

    def _pack(self, w, shape):
        return torch.ops.mkldnn._reorder_convolution_weight(w, self.padding, self.stride, self.dilation, self.groups,
                                                            list(shape))

    def forward(self, x):
        if self.padding_mode != "zeros" or isinstance(self.padding, str) or x.dim() != 4 or not self._use_packed(x):
            return self._conv_forward(x, self.weight, self.bias)
        return torch.ops.mkldnn._convolution_pointwise(
            x, self._packed_weight(x), self.bias, self.padding, self.stride, self.dilation, self.groups, "none", [], "")


PACKED = {nn.Linear: PackedLinear, nn.Conv2d: PackedConv2d}


def pack_weights(module: nn.Module, *, convs: bool = True) -> int:
    """Turn every nn.Linear (and nn.Conv2d if `convs`) inside `module` into its packed twin (in place, same
    parameters); returns how many."""
    if not packed_weights_available():
        return 0
    n = 0
    for m in module.modules():
        if type(m) in PACKED and (convs or type(m) is not nn.Conv2d):
            m.__class__ = PACKED[type(m)]
            n += 1
    return n


def unpack_weights(module: nn.Module) -> int:
    """Undo pack_weights (e.g. before tracing or export, which do not know oneDNN's packed tensors)."""
    plain = {v: k for k, v in PACKED.items()}
    n = 0
    for m in module.modules():
        if type(m) in plain:
            m.__class__ = plain[type(m)]
            forget_packed(m)
            n += 1
    return n


def forget_packed(module: nn.Module) -> None:
    """Drop `module`'s packed weight copy (remade from the current weight on the next call). Call it after
    giving the module a new weight tensor: a freed tensor's address can be reused by the next one, so the
    (address, version) key alone could take a new weight for the old one."""
    module.__dict__.pop("_packed", None)
    module.__dict__.pop("_pack_key", None)


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
    "PRECISIONS", "resolve_dtype", "check_precision", "unsupported_precision", "PackedLinear", "PackedConv2d",
    "pack_weights", "unpack_weights", "forget_packed", "compile_module", "is_compiled", "optimize",
    "weight_memory_format",
]
