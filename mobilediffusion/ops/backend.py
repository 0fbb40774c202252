"""Which implementation an op runs: the plain-torch reference, the CPU kernel, a Triton kernel, or the
export path.

A model picks its backend once, from its device, with `choose_backend`, keeps the result and passes
it to every op call (`backend=`). There is no module-level switch: the choice is a value.
"""
from __future__ import annotations

import enum
import functools
import importlib.util
import logging

import torch

from ..errors import ConfigError
from .cpu_kernel import unavailable as cpu_unavailable

log = logging.getLogger("mobilediffusion.ops")

EXPORT_INSTALL = "pip install litert-torch==0.10.0 ai-edge-litert==2.3.0"


@functools.cache
def log_once(message: str) -> None:
    """Log `message` (info) the first time it is given in this process."""
    log.info(message)


class Backend(str, enum.Enum):
    """How an op is computed.

    REFERENCE: plain torch, fp32 math for half inputs; the truth.
    CPU: attention and channels_last GroupNorm (+ SiLU) through the AVX-512 kernels compiled on this machine
        (`cpu_kernel`: fp32, and bf16 with AVX512-BF16), the other ops and the inputs the kernels do not
        take on the reference path (logged once per reason, `log_once`).
    TRITON: fused Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).
    EXPORT: torch ops that litert-torch lowers to TFLite builtins or to `odml.*` composites
        that the LiteRT GPU delegate fuses.
    """

    REFERENCE = "reference"
    CPU = "cpu"
    TRITON = "triton"
    EXPORT = "export"


def as_backend(value) -> Backend:
    """A `Backend` from a Backend or its name; anything else is a ConfigError naming the choices."""
    if isinstance(value, Backend):
        return value
    try:
        return Backend(value)
    except ValueError:
        choices = ", ".join(repr(b.value) for b in Backend)
        raise ConfigError(f"unknown ops backend {value!r}; choose one of {choices}") from None


def triton_available() -> bool:
    """True if the `triton` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def choose_backend(device, requested=None) -> Backend:
    """The backend for a model on `device`; call once per model and keep the result.

    requested None: Triton on a CUDA device when triton is installed; on the CPU, the CPU kernel when
    it runs here (compiled at the first call in a process, see `cpu_kernel`); else the reference.
    requested "cpu" or "triton" where it cannot run (another device, no compiler or AVX-512, no CUDA or
    triton): what None would choose, with one warning line naming it and why (never an error, so a
    config tuned for one machine still runs on another). "export" needs litert-torch (ConfigError
    otherwise). Logs exactly one line with the choice.
    """
    device = torch.device(device)
    want = None if requested is None else as_backend(requested)
    if want is Backend.EXPORT:
        composite_builder()  # raises with the install command when litert-torch is missing
        chosen = Backend.EXPORT
    elif want is Backend.REFERENCE:
        chosen = Backend.REFERENCE
    elif want is not None and (why := _why_not(want, device)):
        chosen = _default(device)
        log.warning("ops backend: %s requested but %s; using %s", want.value, why, _describe(chosen))
        return chosen
    else:
        chosen = want or _default(device)
    log.info("ops backend: %s (device %s%s)", chosen.value, device, "" if want is None else ", requested")
    return chosen


def _default(device: torch.device) -> Backend:
    for backend in (Backend.TRITON, Backend.CPU):
        if _why_not(backend, device) is None:
            return backend
    return Backend.REFERENCE


def _why_not(backend: Backend, device: torch.device) -> str | None:
    """Why `backend` cannot run a model on `device` here, or None (TRITON and CPU only)."""
    if backend is Backend.TRITON:
        if not (device.type == "cuda" and torch.cuda.is_available()):
            return f"device {device} is not an available CUDA device"
        return None if triton_available() else "triton is not installed"
    if backend is Backend.CPU:
        if device.type != "cpu":
            return f"device {device} is not the CPU"
        return cpu_unavailable()
    return None


def _describe(backend: Backend) -> str:
    return {Backend.REFERENCE: "the reference (torch) path", Backend.CPU: "the cpu kernel path",
            Backend.TRITON: "triton"}.get(backend, backend.value)


def composite_builder():
    """litert-torch's StableHLOCompositeBuilder class, or a ConfigError with the install command."""
    for module in ("litert_torch.hlfb", "ai_edge_torch.hlfb"):
        try:
            return importlib.import_module(module).StableHLOCompositeBuilder
        except ImportError:
            continue
    raise ConfigError(f"the export ops backend needs litert-torch; install it with: {EXPORT_INSTALL}")


def triton_kernels(name: str):
    """Import `mobilediffusion.ops.kernels.<name>` (which imports triton), or a ConfigError."""
    if not triton_available():
        raise ConfigError("the triton ops backend needs the triton package (pip install triton); "
                          "or use choose_backend(device), which picks the reference path without it")
    return importlib.import_module(f"{__package__}.kernels.{name}")
