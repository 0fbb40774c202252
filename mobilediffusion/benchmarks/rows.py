"""The rows of the component table (ours, and each peer) and how they print."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Row:
    """One timed component of ours at one preset / precision / mode, against the reference (diffusers /
    transformers at the same precision, timed alternating with ours eager)."""

    preset: str
    component: str  # "text" | "unet" | "decoder"
    precision: str  # "fp32" | "bf16" | "fp16"
    mode: str  # "eager" | "compile" (torch.compile, inductor freezing) | "int8" (ops.int8 convolutions, linears;
    # scales per call) | "int8-static" (the same with static scales from calibration inputs)
    shape: str  # input shape of one call
    ms: float  # ours, median
    gflop: float  # one call
    gflops: float  # achieved by ours
    peak_fraction: float  # gflops / the machine's peak for this precision
    ref: str | None = None  # what the reference is
    ref_ms: float | None = None  # the reference at the same precision, eager, median
    ratio: float | None = None  # the reference at this precision over ours (> 1: ours is faster); eager: ref_ms / ms,
    # compile / int8: the eager row's ratio x eager_ms / ms (chained through alternations, see components.py)
    ref_fp32_ms: float | None = None  # the reference in fp32 eager (half-precision eager rows: timed in their own
    # alternation; compile / int8 rows: the fp32 eager row's)
    ratio_vs_ref_fp32: float | None = None  # over the reference in fp32 eager, chained the same way
    rel_err: float | None = None  # ||out - truth|| / ||truth||, truth: the reference's fp32 output (ours fp32
    # where there is no reference; None on the row that is the truth)
    eager_ms: float | None = None  # compile / int8 rows: ours eager at this precision, timed alternating with it
    compile_s: float | None = None  # first call (compilation) for compiled rows
    note: str = ""


@dataclasses.dataclass
class PeerRow:
    """Another implementation a user could run instead (ComfyUI, OpenVINO) on the same weights and inputs,
    timed alternating with ours eager at the same precision (int8 rows: with ours int8)."""

    preset: str
    component: str
    peer: str  # "comfyui" | "openvino"
    precision: str  # the precision asked for ("int8": against ours int8, the bf16+int8 row); `note` says how the
    # peer runs it
    shape: str
    ms: float | None  # the peer, median; None when it cannot run this model (the note says why)
    ours_ms: float | None = None  # ours eager at this precision, timed alternating with the peer
    ratio: float | None = None  # ms / ours_ms (> 1: ours is faster)
    ref_fp32_ms: float | None = None  # diffusers fp32 eager, from the reference rows of this run
    ratio_vs_ref_fp32: float | None = None  # over diffusers fp32 eager: ours eager's ratio x ours_ms / ms
    gflop: float | None = None
    gflops: float | None = None
    peak_fraction: float | None = None  # of this machine's peak measured by the bench (its own process)
    rel_err: float | None = None  # against the same fp32 truth as the Row of this preset
    setup_s: float | None = None  # conversion / compilation / loading before the first call
    note: str = ""


def peer_row(shared, peer: str, precision: str, *, ms=None, ours_ms=None, output=None, setup_s=None,
             note="", ours: Row | None = None) -> PeerRow:
    """A PeerRow with the ratios, rates and error filled in from the shared facts of the component. `ours`: the row
    of ours that was timed alongside the peer (ours_ms), default ours eager at `precision`; the peer's rate is
    measured against that row's peak (int8 rows: the int8 peak) and its `x d32` is chained through it."""
    row = PeerRow(preset=shared.preset, component=shared.component, peer=peer, precision=precision,
                  shape=shared.shape, ms=ms, ours_ms=ours_ms, setup_s=setup_s, note=note)
    if ms is None:
        return row
    ours = ours if ours is not None else shared.eager.get(precision)
    perf = shared.row_perf(ours.precision, ms, ours.mode) if ours is not None else shared.row_perf(precision, ms)
    row.gflop, row.gflops, row.peak_fraction = perf["gflop"], perf["gflops"], perf["peak_fraction"]
    if ours_ms is not None:
        row.ratio = ms / ours_ms
    if ours is not None and ours.ratio_vs_ref_fp32 is not None and ours_ms is not None:
        row.ref_fp32_ms = ours.ref_fp32_ms  # chained through ours, as for our mode rows
        row.ratio_vs_ref_fp32 = ours.ratio_vs_ref_fp32 * ours_ms / ms
    if output is not None:
        row.rel_err = shared.error(output)
    return row


HEADER = (f"{'preset':20s} {'component':8s} {'mode':16s} {'ms':>9s} {'vs ms':>9s} {'ours x':>6s} "
          f"{'x d32':>6s} {'GFLOP':>8s} {'GFLOP/s':>8s} {'%peak':>6s} {'rel err':>8s}")
LEGEND = ("eager rows: vs ms = diffusers/transformers at the same precision (and in fp32 for x d32) timed "
          "alternating with ours, ours x = vs ms / ms; compile/int8 rows: ours x and x d32 chained through the eager row (its ratio x eager "
          "alongside / ms); peer rows: vs ms = ours eager timed alternating with the peer, ours x = ms / vs ms "
          "(> 1: ours faster); x d32: times faster than diffusers fp32 eager; rel err against the fp32 reference "
          "output")


def _num(v, fmt):
    """v formatted, or "-" as wide as the format."""
    return format(v, fmt) if v is not None else "-".rjust(int(fmt.split(".")[0] or 0))


def format_row(r: Row) -> str:
    mode = r.precision + ("" if r.mode == "eager" else f"+{r.mode}")
    line = (f"{r.preset:20s} {r.component:8s} {mode:16s} {r.ms:9.1f} {_num(r.ref_ms, '9.1f')} "
            f"{_num(r.ratio, '6.2f')} {_num(r.ratio_vs_ref_fp32, '6.2f')} {r.gflop:8.1f} {r.gflops:8.1f} "
            f"{100 * r.peak_fraction:5.1f}% {_num(r.rel_err, '8.1e')}")
    extra = [f"first call {r.compile_s:.0f} s"] if r.compile_s is not None else []
    if r.eager_ms is not None:
        extra.append(f"eager alongside {r.eager_ms:.1f} ms")
    if r.note:
        extra.append(r.note)
    return line + (f"  ({'; '.join(extra)})" if extra else "")


def format_peer(r: PeerRow) -> str:
    mode = f"{r.peer} {r.precision}"
    if r.ms is None:
        return f"{r.preset:20s} {r.component:8s} {mode:16s} {'-':>9s}  ({r.note})"
    peak = f"{100 * r.peak_fraction:5.1f}%" if r.peak_fraction is not None else f"{'-':>6s}"
    line = (f"{r.preset:20s} {r.component:8s} {mode:16s} {r.ms:9.1f} {_num(r.ours_ms, '9.1f')} "
            f"{_num(r.ratio, '6.2f')} {_num(r.ratio_vs_ref_fp32, '6.2f')} {_num(r.gflop, '8.1f')} "
            f"{_num(r.gflops, '8.1f')} {peak} {_num(r.rel_err, '8.1e')}")
    extra = ([f"setup {r.setup_s:.1f} s"] if r.setup_s is not None else []) + ([r.note] if r.note else [])
    return line + (f"  ({'; '.join(extra)})" if extra else "")
