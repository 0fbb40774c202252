"""What an export needs before it starts: its peak memory against what the machine has free.

The peak comes from converting the largest component (litert-torch holds about two copies of its fp32
weights while it lowers and writes the model, on top of the torch weights it traces), from running it in
the interpreter (the mapped file plus XNNPACK's packed fp32 copy of the weights) and, in the end-to-end
check, from all three interpreters at once. Measured on an SD1.5 UNet (3.44 GB fp32): +6.7 GB over the
torch model while converting, about 1.5x its fp32 size running the fp16 file; see `estimate`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from ..errors import ConfigError

log = logging.getLogger(__name__)

GB = 1e9
CONVERTER_COPIES = 2.0  # fp32 weight copies litert-torch holds while converting (measured 1.95 on an SD1.5 UNet)
ACTIVATIONS_PER_MPIXEL = 3.0 * GB  # interpreter + torch activation memory per megapixel of image, per image
SLACK = 1.0 * GB  # Python, torch and the interpreter libraries themselves
# memory of a component's weights in the interpreter, per fp32 byte: the mapped file plus what XNNPACK
# makes of it (fp32: packed copy; fp16: packed fp32; int8_dynamic: packed int8; int8_weight_only: the
# DEQUANTIZE outputs in fp32 and their packed copy; int8_a16: reference kernels, no copy). SD1.5 UNet.
RUN_FACTOR = {"fp32": 2.0, "fp16": 1.5, "int8_dynamic": 0.5, "int8_weight_only": 2.25, "int8_a16": 0.5}
# a device running the bundle (the memory budget): the interpreters' tensor arenas per megapixel of image per image
# (the UNet's and decoder's, which grow with the size), and what the runtime holds besides the models (tokenizer,
# manifest checks, the run's arrays); see runtime/memory.py for how the bundle's own figures are measured
ARENA_PER_MPIXEL = 1.0 * GB
RUNTIME_BASE = 0.1 * GB
BUDGET_CHOICES = ("fp32", "fp16", "int8_weight_only", "int8_dynamic")  # what a refused budget may suggest, best first
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class Estimate:
    """Peak memory an export adds to what the process already holds, by stage (bytes)."""

    convert: float  # converting the largest component (its copy for tracing + the converter's copies)
    verify: float  # one component's interpreter (mapped file + packed weights) + activations
    end_to_end: float  # every component's interpreter + activations (0 without the end-to-end check)

    @property
    def peak(self) -> float:
        return max(self.convert, self.verify, self.end_to_end) + SLACK


def component_bytes(pipe, components) -> dict[str, tuple[int, int]]:
    """{component: (fp32 bytes of its weights, bytes of weights an export copy must duplicate)}. Weights
    that are already float32, contiguous and on the CPU are shared with the copy, the rest duplicated."""
    import torch

    from .components import SPECS

    out = {}
    for name in components:
        module = SPECS[name].module(pipe)
        total = copied = 0
        for t in [*module.parameters(), *module.buffers()]:
            size = t.numel() * 4 if t.is_floating_point() else t.numel() * t.element_size()
            total += size
            if not (t.device.type == "cpu" and t.is_contiguous() and (t.dtype == torch.float32 or not t.is_floating_point())):
                copied += size
        out[name] = (total, copied)
    return out


def estimate(sizes: dict[str, tuple[int, int]], precision: str, *, pixels: int, batch: int, in_place: bool,
             end_to_end: bool) -> Estimate:
    """The peak of an export of components with `sizes` (component_bytes) at `precision`, for `batch`
    images of `pixels` pixels; `in_place`: the caller's model is converted without a copy."""
    activations = ACTIVATIONS_PER_MPIXEL * pixels / 1e6 * batch
    run = RUN_FACTOR[precision]
    biggest = max(total for total, _ in sizes.values())
    copy = 0 if in_place else max(copied for _, copied in sizes.values())
    return Estimate(
        convert=CONVERTER_COPIES * biggest + copy,
        verify=run * biggest + activations,
        end_to_end=run * sum(total for total, _ in sizes.values()) + activations if end_to_end else 0.0,
    )


def run_estimate(sizes: dict[str, tuple[int, int]], precision: str, *, pixels: int, batch: int) -> float:
    """Bytes one generation of the bundle takes on a device (every component loaded, the largest image): the
    weights in the interpreter (RUN_FACTOR), the arenas and the runtime's own."""
    weights = RUN_FACTOR[precision] * sum(total for total, _ in sizes.values())
    return weights + ARENA_PER_MPIXEL * pixels / 1e6 * batch + RUNTIME_BASE


def human(n: float) -> str:
    """Bytes as '1.23 GB' or '45.6 MB'."""
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def parse_bytes(text) -> int:
    """'2GB', '1.5 GiB', '800MB', '512M' or a number of bytes -> bytes; ConfigError naming the forms taken."""
    import re

    if isinstance(text, (int, float)) and not isinstance(text, bool) and text > 0:
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"a memory budget is a size like 2GB, 1.5GiB or 800MB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def check_budget(budget: int, sizes, precision: str, *, pixels: int, batch: int) -> float:
    """The estimate of one generation at `precision` (run_estimate); ConfigError before any conversion when it is
    over `budget`, naming the best precision that fits (or what to shrink when none does)."""
    need = run_estimate(sizes, precision, pixels=pixels, batch=batch)
    if need <= budget:
        return need
    fits = [(p, run_estimate(sizes, p, pixels=pixels, batch=batch)) for p in BUDGET_CHOICES]
    fits = [(p, n) for p, n in fits if n <= budget]
    head = (f"at {precision} the bundle needs about {human(need)} to run, over the budget of {human(budget)} "
            "(weights in the interpreter, its tensor arenas and the runtime)")
    if fits:
        p, n = fits[0]
        raise ConfigError(f"{head}; export it at {p} (about {human(n)}), or allow a larger budget")
    smallest = min(BUDGET_CHOICES, key=lambda p: run_estimate(sizes, p, pixels=pixels, batch=batch))
    raise ConfigError(f"{head}; no precision fits (the smallest, {smallest}, needs about "
                      f"{human(run_estimate(sizes, smallest, pixels=pixels, batch=batch))}): export a smaller size or "
                      "batch, or a smaller model")


def available_memory() -> int | None:
    """Bytes the machine can still give without swapping (MemAvailable), None when it cannot be read."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(need: Estimate, what: str) -> None:
    """ConfigError before any work when the machine has less memory available than the export needs."""
    free = available_memory()
    if free is None:
        log.warning("export: cannot read the available memory; %s needs about %.1f GB", what, need.peak / GB)
        return
    if need.peak > free:
        raise ConfigError(
            f"{what} needs about {need.peak / GB:.1f} GB of memory on top of the loaded model (converting "
            f"{need.convert / GB:.1f} GB, running {need.verify / GB:.1f} GB, end-to-end check "
            f"{need.end_to_end / GB:.1f} GB), but only {free / GB:.1f} GB are available. Close other programs, "
            "export one component at a time (components), turn the end-to-end check off, or use a machine "
            "with more memory"
        )
