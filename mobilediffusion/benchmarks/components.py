"""Section `components`: the text encoder, one UNet step and the decoder of each preset, ours in each mode
against the reference (diffusers / transformers) and, for the UNet, against the peers (ComfyUI, OpenVINO).

Per precision (fp32 first, its reference output is the truth every row's error is measured against):
ours eager and the reference (at that precision, and in fp32 too for the others) are timed
alternating; then each extra mode of ours (--compile, --int8)
alternating with ours eager; then each peer alternating with ours eager (see peers.py). Only a few
models are alive at a time, so an SD-size UNet in fp32 fits in ~10 GB.
"""
from __future__ import annotations

import copy
import dataclasses
import time

from ..config import ModelConfig
from ..errors import ConfigError
from . import peers
from ..memory import release_memory
from ..presets import get_preset
from .measure import count_gflop, keep_last, rel_err, time_alternating
from .models import BUILDERS, COMPONENTS, build_ours
from .rows import Row, format_peer, format_row

MODES = ("eager", "compile", "int8", "int8-static")


def add_arguments(parser) -> None:
    parser.add_argument("--components", action="append", default=None,
                        help=f"which of {', '.join(COMPONENTS)}, or none (default: all)")
    parser.add_argument("--compile", action="store_true", help="also time the UNet under torch.compile (inductor "
                        "freezing); the first call compiles (30-75 s for SD-size UNets)")
    parser.add_argument("--int8", action="store_true", help="also time the UNet and decoder with int8 convolutions "
                        "and linears (mobilediffusion.ops.int8; activation scales per call, and static ones calibrated "
                        "on six inputs) and report the shipped model's image PSNR and SSIM in each mode")
    peers.add_arguments(parser)


def components(args) -> list[str]:
    names = [c for spec in (args.components or [",".join(COMPONENTS)]) for c in spec.split(",") if c]
    return [] if names == ["none"] else names


def check(args) -> None:
    for c in components(args):
        if c not in COMPONENTS:
            raise ConfigError(f"unknown component {c!r}; choose from {', '.join(COMPONENTS)} or none")
    peers.check(args)


def int8_skipped(args) -> str | None:
    """Why the int8 rows cannot run here (--int8 / --precision int8 on a CPU without VNNI), or None; the bench says
    so in one line and runs the rest, as the int8 precision runs bf16 there."""
    if not args.int8:
        return None
    from ..ops.int8 import int8_unavailable

    return int8_unavailable()


def enabled(args) -> bool:
    return bool(components(args))


def run(args, bench) -> dict:
    from . import accuracy
    from .rows import HEADER, LEGEND

    out = {"rows": [], "peers": []}
    bench.print(HEADER)
    for preset in bench.presets:
        cfg = get_preset(preset)
        for comp in components(args):
            rows, peer_rows = bench_component(
                comp, preset, cfg, precisions=bench.precisions, modes=_modes(args, comp), batch=args.batch,
                latent=args.size // 8, runs=args.runs, warmup=args.warmup, with_reference=bench.reference,
                peaks={p: bench.peak(p) for p in bench.precisions + (["int8"] if args.int8 else [])},
                peer_names=bench.peers if comp == "unet" else [], args=args, emit=bench.print)
            out["rows"] += [dataclasses.asdict(r) for r in rows]
            out["peers"] += [dataclasses.asdict(r) for r in peer_rows]
    bench.print(f"({LEGEND})")
    if args.int8 and "unet" in components(args):
        out["accuracy"] = accuracy.run(bench)
    return out


def _modes(args, comp: str) -> list[str]:
    """Our modes for a component: --compile times the UNet compiled, --int8 the UNet and decoder in int8 (the parts
    the int8 precision quantizes)."""
    extra = (["compile"] if args.compile and comp == "unet" else []) + (
        ["int8", "int8-static"] if args.int8 and comp in ("unet", "decoder") else [])
    return ["eager"] + extra


@dataclasses.dataclass
class Shared:
    """What the rows of one preset's component share: its weights, inputs, truth and reference timings."""

    preset: str
    cfg: ModelConfig
    component: str
    make_ours: object  # () -> fresh fp32 copy of ours (no fast path yet)
    ref_base: object  # the fp32 reference module, or None
    batch: int
    latent: int
    gflop: float
    peaks: dict  # precision -> measure_peak result
    runs: int
    warmup: int
    shape: str = ""  # what one call takes
    truth: object = None  # fp32 output every row is compared with
    eager: dict = dataclasses.field(default_factory=dict)  # precision -> ours' eager Row (timed with the reference)
    modes: dict = dataclasses.field(default_factory=dict)  # (precision, mode) -> ours' Row in that mode, with ratios

    def row_perf(self, precision: str, ms: float, mode: str = "eager") -> dict:
        """GFLOP, GFLOP/s and the fraction of the peak: int8 rows against the int8 peak (the VNNI probe) when the
        bench measured it, else the precision's."""
        gflops = self.gflop / ms * 1e3
        peak = self.peaks.get("int8") if mode.startswith("int8") else None
        peak = peak or self.peaks[precision]
        return {"gflop": self.gflop, "gflops": gflops, "peak_fraction": gflops / peak["gflops"]}

    def error(self, output) -> float | None:
        return None if self.truth is None else rel_err(output.float(), self.truth)


def bench_component(name, preset, cfg, *, precisions, modes=("eager",), batch, latent, runs, warmup, with_reference,
                    peaks, peer_names=(), args=None, emit=print) -> tuple[list[Row], list]:
    """Rows of ours (each precision and mode) and of each peer for one component of one preset; each row is
    passed to `emit` as a printed line when it is done."""
    import torch

    from .. import fast

    build, make_case = BUILDERS[name]
    make_ours, ref_base, why = build(cfg, with_reference=with_reference)
    with torch.no_grad():  # counted in fp32 before the fast path (FlopCounterMode knows no oneDNN calls)
        fp32_case = make_case(cfg, make_ours(), None, why, torch.float32, batch, latent)
        gflop = count_gflop(fp32_case.flop_fn)
    sh = Shared(preset, cfg, name, make_ours, ref_base, batch, latent, gflop, peaks, runs, warmup, fp32_case.shape)
    del fp32_case
    precisions = sorted(precisions, key=lambda p: p != "fp32")  # fp32 first: its output is the truth
    if "fp32" not in precisions:
        with torch.no_grad():
            case = make_case(cfg, make_ours(), ref_base, why, torch.float32, batch, latent)
            sh.truth = (case.ref or case.ours)().float()
            del case
    rows = []
    for precision in precisions:
        dtype = fast.PRECISIONS[precision]
        ours = build_ours(make_ours, name, dtype, "eager")
        ref = None if ref_base is None else ref_base if dtype == torch.float32 else copy.deepcopy(ref_base).to(dtype)
        case = make_case(cfg, ours, ref, why, dtype, batch, latent)
        outs = {}
        with torch.no_grad():
            fns = {"ours": keep_last(case.ours, outs, "ours")}
            if case.ref is not None:
                fns["ref"] = keep_last(case.ref, outs, "ref")
                if dtype != torch.float32:  # the reference in fp32 too, so `x d32` comes from this alternation
                    fns["ref_fp32"] = make_case(cfg, ours, ref_base, why, torch.float32, batch, latent).ref
            ms = time_alternating(fns, runs=runs, warmup=warmup)
        is_truth = sh.truth is None
        if is_truth:
            sh.truth = outs.get("ref", outs["ours"]).float()
        eager = Row(preset=preset, component=name, precision=precision, mode="eager", shape=case.shape,
                    ms=ms["ours"], **sh.row_perf(precision, ms["ours"]), ref=case.ref_name if "ref" in ms else None,
                    ref_ms=ms.get("ref"), ref_fp32_ms=ms.get("ref_fp32"),
                    rel_err=None if is_truth and "ref" not in outs else sh.error(outs["ours"]),
                    note="" if case.ref is not None else (case.why_no_ref or ""))
        rows.append(eager)
        sh.eager[precision] = _with_ratios(eager, sh)
        emit(format_row(eager))
        for mode in modes:
            if mode != "eager":
                row = _with_ratios(_mode_row(sh, mode, precision, case, ref_ms=ms.get("ref")), sh)
                rows.append(row)
                sh.modes[precision, mode] = row
                emit(format_row(row))
        del ours, ref, case, outs, fns
        release_memory()
    peer_rows = []
    for peer in peer_names:
        if peer == "diffusers" or peer in peers.IMAGE_PEERS:
            continue  # the reference columns of the rows above; whole-image peers run in the end-to-end section
        for row in peers.run(peer, sh, precisions, args):
            peer_rows.append(row)
            emit(format_peer(row))
    return rows, peer_rows


def _mode_row(sh: Shared, mode: str, precision: str, eager_case, *, ref_ms) -> Row:
    """ours in `mode` (compile / int8) timed alternating with ours eager at the same precision."""
    import torch

    from .. import fast

    _, make_case = BUILDERS[sh.component]
    dtype = fast.PRECISIONS[precision]
    from .models import calibration_inputs

    calibration = calibration_inputs(sh.cfg, sh.component, sh.batch, sh.latent) if mode == "int8-static" else ()
    ours = build_ours(sh.make_ours, sh.component, dtype, mode, calibration)
    float_layers = ""
    if mode == "int8":  # what the int8 rule left in float (the convolutions and linears still float), on the row
        from ..ops.int8 import kept

        float_layers = "; kept in float: " + (", ".join(
            f"{len(names)} {why}" + (f" ({', '.join(names)})" if len(names) <= 3 else "")
            for why, names in kept(ours).items()) or "none")
    case = make_case(sh.cfg, ours, None, None, dtype, sh.batch, sh.latent)
    outs, compile_s = {}, None
    with torch.no_grad():
        if mode == "compile":
            start = time.perf_counter()
            case.ours()
            compile_s = time.perf_counter() - start
        ms = time_alternating({"mode": keep_last(case.ours, outs, "mode"), "eager": eager_case.ours},
                              runs=sh.runs, warmup=sh.warmup)
    note = {"int8": "int8 convolutions and linears (mobilediffusion.ops.int8), scales per call",
            "int8-static": f"the same, static scales calibrated on {len(calibration)} inputs (OpenVINO int8's)"}.get(
        mode, "") + float_layers
    del ours, case
    release_compiled()
    return Row(preset=sh.preset, component=sh.component, precision=precision, mode=mode, shape=sh.shape,
               ms=ms["mode"], **sh.row_perf(precision, ms["mode"], mode),
               ref=None if ref_ms is None else eager_case.ref_name,
               ref_ms=ref_ms, rel_err=sh.error(outs["mode"]), eager_ms=ms["eager"], compile_s=compile_s, note=note)


def release_compiled() -> None:
    """Free what torch.compile keeps of modules that are gone (its caches hold their frozen weights)."""
    import torch

    torch._dynamo.reset()
    release_memory()


def _with_ratios(row: Row, sh: Shared) -> Row:
    """Fill the ratios of a row. An eager row's come from its own alternation with the reference; a mode
    row's are chained through the eager row of its precision, the eager row's ratio times (ours eager
    alongside the mode / the mode), each factor from one alternation (load that changes between
    alternations, from other work on the machine, cancels out)."""
    if row.mode == "eager":
        if row.ref_ms is not None:
            row.ratio = row.ref_ms / row.ms
            if row.precision == "fp32":
                row.ref_fp32_ms = row.ref_ms
        if row.ref_fp32_ms is not None:  # half precisions: the fp32 reference ran in the same alternation
            row.ratio_vs_ref_fp32 = row.ref_fp32_ms / row.ms
        return row
    speedup = row.eager_ms / row.ms  # over ours eager, alternating
    eager = sh.eager[row.precision]
    if eager.ratio is not None:
        row.ratio = eager.ratio * speedup
    if eager.ratio_vs_ref_fp32 is not None:
        row.ref_fp32_ms = eager.ref_fp32_ms
        row.ratio_vs_ref_fp32 = eager.ratio_vs_ref_fp32 * speedup
    return row
