"""Checks and helpers shared by the launchers and kernels."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...errors import ConfigError

HALF_TYPES = (torch.float16, torch.bfloat16)
FLOAT_TYPES = (torch.float32,) + HALF_TYPES


def is_interpreted(kernel) -> bool:
    """True if `kernel` was decorated while TRITON_INTERPRET=1 (it then runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_launch(kernel, op: str, *tensors: torch.Tensor | None) -> None:
    """Raise a ConfigError unless `tensors` can be handed to `kernel`: one device, CUDA or interpreter,
    float32/float16/bfloat16, and fewer than 2**31 elements (kernels index with int32)."""
    given = [t for t in tensors if t is not None]
    devices = {t.device for t in given}
    if len(devices) != 1:
        raise ConfigError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != "cuda" and not is_interpreted(kernel):
        raise ConfigError(f"{op}: Triton kernels run on CUDA tensors, got device {device}; "
                          "choose_backend(device) picks the reference path off-GPU "
                          "(set TRITON_INTERPRET=1 before importing triton to run kernels on CPU)")
    for t in given:
        if t.dtype not in FLOAT_TYPES:
            raise ConfigError(f"{op}: the Triton kernel takes float32/float16/bfloat16 tensors, got {t.dtype}")
        if t.numel() >= 2**31:
            raise ConfigError(f"{op}: tensor of shape {tuple(t.shape)} has >= 2**31 elements, "
                              "more than the kernel's int32 indexing; split the batch")


def dot_in_fp32(dtype: torch.dtype, device: torch.device) -> bool:
    """True if tl.dot must take fp32 operands: float32 inputs (IEEE, no TF32, to match the reference),
    and bfloat16 off-GPU (triton 3.9's interpreter computes bf16 tl.dot wrongly)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and device.type != "cuda")


@triton.jit
def dot(a, b, FP32: tl.constexpr):
    """a @ b accumulated in fp32; FP32 upcasts the operands and asks for IEEE precision (no TF32)."""
    if FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def sigmoid(x):
    """1 / (1 + exp(-x)) from e = exp(-|x|) <= 1, so no lane overflows, for any fp32 x."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
