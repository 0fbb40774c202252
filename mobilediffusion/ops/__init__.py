"""GPU-aware fused ops (arXiv 2304.11267), one public function each.

Every op takes `backend=`: Backend.REFERENCE (plain torch, the truth), Backend.CPU (attention through
an AVX-512 kernel compiled on this machine at first use, see `cpu_kernel`; SeparableConv layers run their
two (packed) convolutions in the input's dtype; the other ops as the reference), Backend.TRITON (fused
Triton kernels for CUDA) or Backend.EXPORT (what litert-torch lowers to TFLite builtins or to `odml.*`
composites the LiteRT GPU delegate fuses). A model calls `choose_backend(device)` once and passes the
result to every op. Shapes an op does not support raise ConfigError; inputs the CPU kernel does not take
go to the reference, logged once per reason.
Importing this package imports torch but not triton or litert-torch, and compiles nothing.
"""
from .activation import clamp_unit, geglu, gelu
from .attention import attention
from .backend import Backend, choose_backend
from .conv import separable_conv
from .norm import group_norm_act

__all__ = ["Backend", "choose_backend", "group_norm_act", "gelu", "geglu", "clamp_unit", "attention", "separable_conv"]
