"""Measuring: alternating timed runs, FLOP counts, the machine's peak, output errors."""
from __future__ import annotations

import math
import statistics
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used, so the CLI parser stays light
    import torch


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def time_alternating(fns: dict, *, runs: int, warmup: int) -> dict[str, float]:
    """Median ms of each callable over `runs` rounds after `warmup` rounds; within a round they run in
    turn, the order reversed every other round (so drifts in machine load hit all alike)."""
    names = list(fns)
    samples = {n: [] for n in names}
    for r in range(warmup + runs):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            start = time.perf_counter()
            fns[n]()
            if r >= warmup:
                samples[n].append(time.perf_counter() - start)
    return {n: median_ms(s) for n, s in samples.items()}


def keep_last(fn, store: dict, name: str):
    """fn wrapped so that its last result is kept in store[name] (outputs of timed runs, no extra call)."""

    def call():
        store[name] = fn()

    return call


def count_gflop(fn) -> float:
    """GFLOP of one call of fn() as torch's FlopCounterMode counts it (matmuls, convolutions)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def measure_peak(dtype: torch.dtype, *, runs: int = 5) -> dict:
    """The machine's GFLOP/s for `dtype` on this process's threads: the best rate (fastest of `runs` after a
    warm-up) over UNet- and decoder-shaped matmuls (nn.Linear's path and oneDNN's on packed weights) and
    3x3 convolutions (oneDNN, channels_last)."""
    import torch
    import torch.nn.functional as F

    from ..fast import packed_weights_available

    g = torch.Generator().manual_seed(0)
    probes = {}
    for M, K, N in ((4096, 320, 1280), (2048, 1280, 1280)):  # tokens x width
        a, w = torch.randn(M, K, generator=g).to(dtype), torch.randn(N, K, generator=g).to(dtype)
        probes[f"matmul {M}x{K}x{N}"] = (lambda a=a, w=w: F.linear(a, w), 2 * M * K * N)
        if packed_weights_available():
            packed = torch.ops.mkldnn._reorder_linear_weight(w, M)
            probes[f"onednn matmul {M}x{K}x{N}"] = (
                lambda a=a, p=packed: torch.ops.mkldnn._linear_pointwise(a, p, None, "none", [], ""), 2 * M * K * N)
    for C, S in ((320, 64), (640, 32), (128, 128)):  # channels, side
        x = torch.randn(1, C, S, S, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
        k = torch.randn(C, C, 3, 3, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
        probes[f"conv3x3 {C}ch {S}x{S}"] = (lambda x=x, k=k: F.conv2d(x, k, padding=1), 2 * C * C * 9 * S * S)
    return _best_rate(probes, runs)


def measure_int8_peak(*, runs: int = 5) -> dict:
    """The machine's int8 GOP/s on this process's threads: oneDNN's u8 x s8 products (VNNI), the kernels of
    ops.int8, on the shapes of measure_peak with inputs already uint8 (so without the quantize pass each int8 layer
    also makes): the ceiling the int8 rows are measured against. Requires ops.int8.int8_unavailable() to be None."""
    import torch

    g = torch.Generator().manual_seed(0)
    probes = {}
    for M, K, N in ((4096, 320, 1280), (2048, 1280, 1280)):  # tokens x width
        a = torch.randint(0, 256, (M, K), generator=g, dtype=torch.uint8)
        w = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
        packed, w_scale, w_zp = torch.ops.onednn.qlinear_prepack(w, None), torch.ones(N), torch.zeros(N, dtype=torch.int32)
        probes[f"u8s8 matmul {M}x{K}x{N}"] = (lambda a=a, p=packed, s=w_scale, z=w_zp: torch.ops.onednn.qlinear_pointwise(
            a, 0.01, 128, p, s, z, None, 1.0, 0, torch.bfloat16, "none", [], "none"), 2 * M * K * N)
    for C, S in ((320, 64), (640, 32), (128, 128)):  # channels, side
        x = torch.randint(0, 256, (1, C, S, S), generator=g, dtype=torch.uint8).contiguous(
            memory_format=torch.channels_last)
        k = torch.randint(-127, 128, (C, C, 3, 3), generator=g, dtype=torch.int8)
        w_scale, w_zp = torch.ones(C), torch.zeros(C, dtype=torch.int32)
        packed = torch.ops.onednn.qconv_prepack(k, w_scale, 0.01, 128, [1, 1], [1, 1], [1, 1], 1, None)
        probes[f"u8s8 conv3x3 {C}ch {S}x{S}"] = (lambda x=x, p=packed, s=w_scale, z=w_zp: torch.ops.onednn.qconv_pointwise(
            x, 0.01, 128, p, s, z, None, [1, 1], [1, 1], [1, 1], 1, 1.0, 0, torch.bfloat16, "none", [], ""),
            2 * C * C * 9 * S * S)
    return _best_rate(probes, runs)


def _best_rate(probes: dict, runs: int) -> dict:
    """{gflops, probe, probes} of {name: (fn, flop)}: each probe's best rate, the fastest of at least `runs` calls
    and 0.08 s x runs after 0.04 s x runs of warm-up (a probe of a few ms reads low on its first calls: the clock
    ramps up, oneDNN's kernels are generated on first use; at the default 5 runs a cold int8 probe read 552 GOP/s,
    a warm one 893)."""
    import torch

    warm_s, min_s = 0.04 * runs, 0.08 * runs
    rates = {}
    with torch.no_grad():
        for name, (fn, flop) in probes.items():
            start = time.perf_counter()
            fn()
            while time.perf_counter() - start < warm_s:
                fn()
            times, start = [], time.perf_counter()
            while len(times) < runs or time.perf_counter() - start < min_s:
                times.append(_timed(fn))
            rates[name] = flop / min(times) / 1e9
    top = max(rates, key=rates.get)
    return {"gflops": rates[top], "probe": top, "probes": {n: round(v, 1) for n, v in rates.items()}}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """||ours - ref|| / ||ref||, in float64."""
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def psnr(image: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1] (inf when equal)."""
    mse = (image.double() - ref.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: Linux's VmHWM (ru_maxrss of a child started by fork + exec
    can report the parent's peak), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024  # kB
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


__all__ = ["median_ms", "time_alternating", "keep_last", "count_gflop", "measure_peak", "measure_int8_peak", "rel_err", "psnr",
           "peak_rss_mb"]
