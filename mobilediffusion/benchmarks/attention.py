"""Attention kernels on the shapes of this package's UNets: the cpu ops backend against torch's SDPA.

`kernel_rows()` times, for each shape and precision, the cpu kernel (`ops.attention(backend="cpu")`),
torch's SDPA on the same tensors (its CPU flash kernel; bf16 inputs directly) and the reference ops path
(SDPA in fp32 for bf16 inputs), alternating runs, median of `runs`. Inputs are laid out as the UNet's
Attention makes them: views of (B, T, heads * d) projections. Each row gives ms, GFLOP/s
(4 B heads Tq Tk d per call), that as a fraction of the machine's matmul peak for the precision (the
probe of `mobilediffusion.bench`), the ratio SDPA ms / ours, and the relative error against float64 math
on the same inputs (over the first ROWS_CHECKED queries of every head, which keeps the check cheap).

`candidate_rows()` adds the routes measured before choosing the kernel: torch's `flex_attention` and SDPA
under torch.compile (inductor's CPU templates) and a blocked bf16 formulation in eager torch (oneDNN
matmuls, fp32 softmax). They compile for seconds to minutes: `mobilediffusion bench --attention candidates`.
"""
from __future__ import annotations

import dataclasses
import math
import sys

import torch
import torch.nn.functional as F

ROWS_CHECKED = 256

# (where the shape occurs, B, heads, query tokens, key tokens, head dim); 512x512 images (64x64 latents)
SHAPES = (
    ("sd15 64x64 self", 1, 8, 4096, 4096, 40),
    ("sd15 64x64 self, CFG batch", 2, 8, 4096, 4096, 40),
    ("sd15 32x32 self", 1, 8, 1024, 1024, 80),
    ("sd15 16x16 self", 1, 8, 256, 256, 160),
    ("sd15 8x8 self", 1, 8, 64, 64, 160),
    ("sd15 64x64 cross", 1, 8, 4096, 77, 40),
    ("sd15 32x32 cross", 1, 8, 1024, 77, 80),
    ("sd2/sdxs 64x64 self", 1, 5, 4096, 4096, 64),
    ("sd2/md 32x32 self", 1, 10, 1024, 1024, 64),
    ("md-512 16x16 self", 1, 16, 256, 256, 64),
    ("sd2 64x64 cross", 1, 5, 4096, 77, 64),
)


@dataclasses.dataclass
class AttentionRow:
    """One route on one shape and precision."""

    shape: str  # where it occurs
    dims: str  # "B x heads x Tq x Tk x d"
    precision: str  # "fp32" | "bf16"
    route: str  # "cpu kernel" | "torch sdpa" | "reference" | a candidate
    ms: float  # median
    gflop: float  # one call
    gflops: float
    peak_fraction: float  # of the machine's matmul peak for the precision
    sdpa_ms: float | None = None  # torch's SDPA in the same run
    ratio: float | None = None  # sdpa_ms / ms
    rel_err: float | None = None  # against float64 on the same inputs
    first_call_s: float | None = None  # compiled candidates: the first call (compilation)
    note: str = ""


def inputs(B, heads, Tq, Tk, d, dtype, seed=0):
    """q, k, v (B, heads, T, d) as views of (B, T, heads * d) tensors, like the UNet's projections."""
    g = torch.Generator().manual_seed(seed)

    def make(T):
        return torch.randn(B, T, heads * d, generator=g).to(dtype).view(B, T, heads, d).transpose(1, 2)

    return make(Tq), make(Tk), make(Tk)


def rel_err_sampled(out, q, k, v) -> float:
    """||out - exact|| / ||exact|| over the first ROWS_CHECKED queries, exact = float64 math."""
    n = min(ROWS_CHECKED, q.shape[2])
    exact = F.scaled_dot_product_attention(q[:, :, :n].double(), k.double(), v.double())
    return ((out[:, :, :n].double() - exact).norm() / exact.norm()).item()


def routes() -> dict:
    """The routes of the kernel table: name -> fn(q, k, v)."""
    from .. import ops

    return {
        "cpu kernel": lambda q, k, v: ops.attention(q, k, v, backend="cpu"),
        "torch sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
        "reference": lambda q, k, v: ops.attention(q, k, v, backend="reference"),
    }


def blocked_bf16(q, k, v, block=256):
    """Softmax attention per block of queries in eager torch: Q K^T and P V as batched matmuls in the input
    dtype (oneDNN for bf16), the softmax in fp32, P cast back."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    kt = k.transpose(-1, -2)  # (B, heads, d, Tk)
    out = torch.empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3], dtype=q.dtype).transpose(1, 2)
    for s in range(0, q.shape[2], block):
        scores = torch.matmul(q[:, :, s:s + block], kt).float().mul_(scale)  # (B, heads, block, Tk)
        out[:, :, s:s + block] = torch.matmul(torch.softmax(scores, -1).to(q.dtype), v)
    return out


def candidate_routes() -> dict:
    """The routes tried before choosing the kernel (compiled ones compile at their first call)."""
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    sdpa = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), dynamic=False)
    return {"flex_attention compiled": flex, "sdpa compiled": sdpa, "blocked bf16 eager": blocked_bf16}


def kernel_rows(*, precisions=("fp32", "bf16"), shapes=SHAPES, runs=5, warmup=1, peaks=None,
                candidates=False, echo=None) -> list[AttentionRow]:
    """Rows for every shape x precision x route (see the module docstring). peaks: {"fp32": {"gflops": ...}}
    as `bench.measure_peak` returns them (measured here when None). echo: called with each row as it is done."""
    from ..fast import PRECISIONS
    from ..ops import cpu_kernel
    from .measure import measure_peak, time_alternating

    peaks = peaks or {p: measure_peak(PRECISIONS[p]) for p in precisions}
    rows = []
    with torch.no_grad():
        for label, B, heads, Tq, Tk, d in shapes:
            for precision in precisions:
                dims, dtype = f"{B}x{heads}x{Tq}x{Tk}x{d}", PRECISIONS[precision]
                q, k, v = inputs(B, heads, Tq, Tk, d, dtype)
                if candidates:  # compiled afresh for each case (dynamo's recompile limit would fall back to eager)
                    torch._dynamo.reset()
                extra = candidate_routes() if candidates else {}
                fns, notes = {**routes(), **extra}, {}
                why = cpu_kernel.unsupported(q, k, v, 1.0 / math.sqrt(d))
                if why:  # the row would time the reference under the kernel's name
                    notes["cpu kernel"] = f"not run here: {why}"
                    del fns["cpu kernel"]
                first, errs = {}, {}
                for name, fn in list(fns.items()):  # first call: compiles (candidates) and is checked
                    try:
                        first[name], out = _timed(lambda fn=fn: fn(q, k, v))
                    except Exception as e:  # noqa: BLE001 - a candidate that cannot run: a row saying why
                        if name not in extra:
                            raise
                        notes[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
                        del fns[name]
                        continue
                    errs[name] = rel_err_sampled(out, q, k, v)
                ms = time_alternating({n: (lambda fn=fn: fn(q, k, v)) for n, fn in fns.items()}, runs=runs,
                                      warmup=warmup)
                gflop = 4 * B * heads * Tq * Tk * d / 1e9
                for name in [*ms, *notes]:
                    if name in notes:
                        row = AttentionRow(label, dims, precision, name, math.nan, gflop, math.nan, math.nan,
                                           note=notes[name])
                    else:
                        gflops = gflop / ms[name] * 1e3
                        row = AttentionRow(label, dims, precision, name, ms[name], gflop, gflops,
                                           gflops / peaks[precision]["gflops"], rel_err=errs[name],
                                           first_call_s=first[name] if name in extra else None)
                        if "torch sdpa" in ms:
                            row.sdpa_ms, row.ratio = ms["torch sdpa"], ms["torch sdpa"] / ms[name]
                    rows.append(row)
                    if echo:
                        echo(row)
    return rows


def _timed(fn):
    import time

    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


HEADER = (f"{'shape':27s} {'B x h x Tq x Tk x d':20s} {'prec':5s} {'route':24s} {'ms':>8s} {'GFLOP/s':>8s} "
          f"{'%peak':>6s} {'sdpa ms':>8s} {'x sdpa':>6s} {'rel err':>8s}")


def format_row(r: AttentionRow) -> str:
    def num(v, fmt):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    line = (f"{r.shape:27s} {r.dims:20s} {r.precision:5s} {r.route:24s} {num(r.ms, '8.2f')} {num(r.gflops, '8.1f')} "
            f"{num(100 * r.peak_fraction, '5.1f')}% {num(r.sdpa_ms, '8.2f')} {num(r.ratio, '6.2f')} "
            f"{num(r.rel_err, '8.1e')}")
    if r.first_call_s is not None:
        line += f"  (first call {r.first_call_s:.1f} s)"
    return line + (f"  ({r.note})" if r.note else "")


def main(args) -> int:
    """`mobilediffusion bench --attention [kernels|candidates]`: the table (or --json), on --threads threads,
    for --precision, --runs and --warmup as the other bench rows."""
    import json

    from ..fast import PRECISIONS, check_precision
    from .cli import asked_precisions
    from .measure import measure_peak

    precisions, skipped = asked_precisions(args)
    for p in precisions:
        check_precision(p)  # unknown or unavailable: a ConfigError saying which and why
    for p, why in skipped.items():  # the default's precisions this machine lacks: one line each
        print(f"{p} rows skipped: {why}", file=sys.stderr if args.json else sys.stdout)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    peaks = {p: measure_peak(PRECISIONS[p]) for p in precisions}
    if not args.json:
        print(HEADER, flush=True)
    echo = None if args.json else (lambda row: print(format_row(row), flush=True))
    rows = kernel_rows(precisions=precisions, runs=args.runs, warmup=args.warmup, peaks=peaks,
                       candidates=args.attention == "candidates", echo=echo)
    threads = torch.get_num_threads()
    if args.json:
        print(json.dumps({"threads": threads, "peak": peaks, "attention": [dataclasses.asdict(r) for r in rows]},
                         indent=1))
    else:
        print(f"peak on {threads} threads: " + ", ".join(f"{p} {v['gflops']:.0f} GFLOP/s ({v['probe']})"
                                                         for p, v in peaks.items()))
    return 0
