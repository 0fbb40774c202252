"""oneDNN-packed weights for the CPU fast path: nn.Linear and nn.Conv2d whose inference forward runs oneDNN on
their weight reordered once per input shape (see mobilediffusion.fast for when and why).

The swap changes module classes only: parameters, names and state_dict stay the torch module's.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .ops import cpu_kernel


def packed_weights_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise") \
        and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


@functools.cache
def packed_dtypes() -> tuple[torch.dtype, ...]:
    """The weight dtypes oneDNN runs packed on this CPU: fp32, and bf16 where oneDNN has bf16 kernels here
    (AVX512-BF16 or AMX; on a CPU without AVX-512, oneDNN refuses to reorder a bf16 weight, and a bf16 model
    runs torch's plain bf16 ops)."""
    bf16 = hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported") and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return (torch.float32, torch.bfloat16) if bf16 else (torch.float32,)


class _Packed:
    """Mixin for a module whose inference forward runs oneDNN on its weight reordered once into the blocked
    layout oneDNN picks for the input shape (cached; redone when the input shape or the weight changes,
    moves or changes dtype: without the shape oneDNN may pick a layout several times slower, e.g. for
    bf16 1x1 convolutions). Parameters and state_dict stay the torch module's. Off CPU, for other dtypes,
    with autograd recording and while tracing (torch.compile / torch.export) it is the plain torch module."""

    _pack_key = None
    _packed = None

    def _use_packed(self, x) -> bool:
        w = self.weight
        return not ((torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)) or w.device.type != "cpu"
                    or w.dtype not in packed_dtypes() or x.dtype != w.dtype
                    or torch.compiler.is_compiling() or torch.jit.is_tracing())

    def _packed_weight(self, x):
        w = self.weight
        # inference tensors (a model loaded under torch.inference_mode, as ComfyUI runs nodes) keep no
        # version counter: they cannot change outside inference mode, so their storage identifies them
        version = -1 if w.is_inference() else w._version
        b = getattr(self, "bias", None)
        bias_key = None if b is None else (b.data_ptr(), -1 if b.is_inference() else b._version)
        key = (w.data_ptr(), version, w.dtype, self._shape_key(x), bias_key)
        if key != self._pack_key:
            self._packed = None  # free the old layout first
            self._packed = self._pack(w.detach(), x.shape)
            self._pack_key = key
        return self._packed

    def _shape_key(self, x):
        """What of the input the packed layout depends on (its shape: oneDNN picks a layout per shape)."""
        return x.shape

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
    on CPU, reaches well under half of oneDNN's rate on UNet shapes), or, on CPUs without AVX-512, through the
    AVX2 kernel of `cpu_kernel.linear` (there both torch routes ran SD1.5's linears at 60-75% of the fp32 peak,
    the kernel at 90-100%). bf16: for products of at least
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

    def _shape_key(self, x):
        return None if _avx2_linear(x) else x.shape  # the AVX2 kernel's panels serve every shape

    def _pack(self, w, shape):
        if w.dtype == torch.float32 and _avx2_linear(w):  # (panels, bias padded to them)
            bias = None if self.bias is None else F.pad(self.bias.detach().float(), (0, -self.out_features % 16))
            return cpu_kernel.pack_linear_weight(w), bias
        return torch.ops.mkldnn._reorder_linear_weight(w, _rows(shape))

    def forward(self, x):
        if not self._use_packed(x):
            return F.linear(x, self.weight, self.bias)
        packed = self._packed_weight(x)
        if isinstance(packed, tuple):
            return cpu_kernel.linear(x, *packed, self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")


def _avx2_linear(t: torch.Tensor) -> bool:
    """Whether fp32 linears on tensors like t run the AVX2 kernel (cpu_kernel.linear_kernel: CPUs without
    AVX-512)."""
    return t.dtype == torch.float32 and cpu_kernel.linear_kernel()[0] is not None


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


__all__ = ["packed_weights_available", "packed_dtypes", "PackedLinear", "PackedConv2d", "PACKED", "pack_weights",
           "unpack_weights", "forget_packed"]
