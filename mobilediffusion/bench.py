"""`mobilediffusion bench`: how fast the text encoder, a UNet step and the decoder run, against the reference.

For each preset, size and precision the three components are built on the same random weights as
the reference implementations (diffusers' UNet2DConditionModel and AutoencoderKL / AutoencoderTiny,
transformers' CLIPTextModel), when diffusers is installed and can express the architecture. Ours runs
with the load-time fast path (`fast.optimize`). Both are timed in this process, alternating runs, as the
median of N runs after warm-up. Each row gives ms, the reference's ms and the ratio (reference / ours:
> 1 means faster), the GFLOP of one call (torch's FlopCounterMode, counted on a meta-device copy),
the achieved GFLOP/s and that as a fraction of the machine's peak for the precision, measured here by a
matmul / convolution probe. `--compile` adds UNet rows with torch.compile (inductor freezing) and
`--end-to-end` one 512x512 image from the mobilediffusion-512 one-step path and from the SD1.5 20-step
CFG path, each in a fresh process that also reports its peak RSS.

Weights are random: speed does not depend on their values (denormals are flushed to zero).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import copy
import logging
import platform
import statistics
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from .config import PRESETS, ModelConfig, get_preset
from .errors import ConfigError

if TYPE_CHECKING:  # torch is imported where it is used, so the CLI parser stays light
    import torch

log = logging.getLogger(__name__)

COMPONENTS = ("text", "unet", "decoder")
PROMPT = "a photo of an astronaut riding a horse on the moon"


@dataclasses.dataclass
class Row:
    """One timed component: ours against the reference at one preset / size / precision / mode."""

    preset: str
    component: str  # "text" | "unet" | "decoder"
    precision: str  # "fp32" | "bf16" | "fp16"
    mode: str  # "eager" | "compile"
    shape: str  # input shape of one call
    ms: float  # ours, median
    gflop: float  # one call
    gflops: float  # achieved by ours
    peak_fraction: float  # gflops / the machine's peak for this precision
    ref: str | None = None  # what the reference is
    ref_ms: float | None = None  # the reference at the same precision, eager, median
    ratio: float | None = None  # ref_ms / ms
    ref_fp32_ms: float | None = None  # the reference in fp32 eager (for half / compiled rows)
    ratio_vs_ref_fp32: float | None = None
    rel_err: float | None = None  # ||ours - ref|| / ||ref|| on the timed inputs
    compile_s: float | None = None  # first call (compilation) for compiled rows
    note: str = ""


# --------------------------------------------------------------------------- measuring
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

    from .fast import packed_weights_available

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
    rates = {}
    with torch.no_grad():
        for name, (fn, flop) in probes.items():
            fn()
            best = min(_timed(fn) for _ in range(runs))
            rates[name] = flop / best / 1e9
    top = max(rates, key=rates.get)
    return {"gflops": rates[top], "probe": top, "probes": {n: round(v, 1) for n, v in rates.items()}}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    import torch

    ours, ref = ours.double(), ref.double()
    return ((ours - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------- models on shared weights
def _perturb(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Small random changes to every weight, so nothing stays zero-initialised (diffusers zeroes some)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.02)
    return module


def _diffusers():
    try:
        import diffusers
    except ImportError:
        return None
    return diffusers


def _from_state(make, state, keymap, what):
    """A factory of fresh fp32 modules holding `state` (built on meta, so no random init is paid)."""
    from .weights.keymap import load_state

    def factory():
        module = make(device="meta").to_empty(device="cpu")
        load_state(module, state, keymap, what=what)
        return module.eval()

    return factory


def _copies(module):
    return lambda: copy.deepcopy(module)


def build_unets(cfg: ModelConfig, *, with_reference: bool):
    """(factory of ours, reference or None, why there is no reference) on the same random fp32 weights."""
    import torch

    from .unet import UNet
    from .weights.unet_keys import unet_config_to_diffusers, unet_keymap

    diffusers = _diffusers() if with_reference else None
    kwargs, why = None, None
    if not with_reference:
        why = "reference not requested"
    elif diffusers is None:
        why = "diffusers is not installed"
    else:
        try:
            kwargs = unet_config_to_diffusers(cfg.unet)
        except ConfigError:
            why = "diffusers cannot express this UNet"
    if kwargs is None:
        return _copies(_perturb(UNet(cfg.unet).eval(), 0)), None, why
    torch.manual_seed(0)
    ref = _perturb(diffusers.UNet2DConditionModel(**kwargs).eval(), 0)
    make = lambda device: UNet(cfg.unet, device=device)  # noqa: E731
    return _from_state(make, ref.state_dict(), unet_keymap(cfg.unet), "UNet"), ref, None


def build_decoders(cfg: ModelConfig, *, with_reference: bool):
    import torch

    from .decoder import build_decoder
    from .weights.vae_keys import decoder_config_to_diffusers, decoder_keymap

    diffusers = _diffusers() if with_reference else None
    if diffusers is None:
        why = "diffusers is not installed" if with_reference else "reference not requested"
        return _copies(_perturb(build_decoder(cfg.decoder).eval(), 1)), None, why
    cls_name, kwargs = decoder_config_to_diffusers(cfg.decoder)
    torch.manual_seed(1)
    ref = _perturb(getattr(diffusers, cls_name)(**kwargs).eval(), 1)
    make = lambda device: build_decoder(cfg.decoder, device=device)  # noqa: E731
    return _from_state(make, ref.state_dict(), decoder_keymap(cfg.decoder, "diffusers"), "decoder"), ref, None


def build_text(cfg: ModelConfig, *, with_reference: bool):
    import torch

    from transformers import CLIPTextModel

    from .text_encoder import TextEncoder

    torch.manual_seed(2)
    ours = TextEncoder(cfg.text).eval()
    if not with_reference:
        return _copies(ours), None, "reference not requested"
    ref = CLIPTextModel(cfg.text.to_transformers()).eval()
    ref.load_state_dict(ours.model.state_dict())
    return _copies(ours), ref, None


# --------------------------------------------------------------------------- one component
@dataclasses.dataclass
class Case:
    """What a component call needs: ours and the reference as callables, inputs in the precision."""

    ours: object
    ref: object
    flop_fn: object  # one call of an fp32 meta-device copy
    shape: str
    ref_name: str
    why_no_ref: str | None


def _unet_case(cfg, ours, ref, why, dtype, batch, latent):
    import torch

    from .unet import UNet

    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, cfg.unet.in_channels, latent, latent, generator=g).to(dtype)
    ctx = torch.randn(batch, cfg.text.max_position_embeddings, cfg.unet.cross_attention_dim, generator=g).to(dtype)
    t = torch.full((batch,), 999)
    meta = UNet(cfg.unet, device="meta")
    return Case(
        ours=lambda: ours(x, t, ctx),
        ref=None if ref is None else (lambda: ref(x, t, ctx).sample),
        flop_fn=lambda: meta(x.to("meta", torch.float32), t.to("meta"), ctx.to("meta", torch.float32)),
        shape=f"latents {tuple(x.shape)}, context {tuple(ctx.shape)}", ref_name="diffusers UNet2DConditionModel",
        why_no_ref=why,
    )


def _decoder_case(cfg, ours, ref, why, dtype, batch, latent):
    import torch

    from .decoder import build_decoder

    dc = cfg.decoder
    lat = torch.randn(batch, dc.latent_channels, latent, latent, generator=torch.Generator().manual_seed(4))
    lat = (lat * dc.scaling_factor).to(dtype)
    meta = build_decoder(dc, device="meta")
    ref_fn = None
    if ref is not None:
        ref_fn = lambda: (ref.decode(lat / dc.scaling_factor + dc.shift_factor).sample / 2 + 0.5).clamp(0, 1)  # noqa: E731
    return Case(
        ours=lambda: ours(lat), ref=ref_fn, flop_fn=lambda: meta(lat.to("meta", torch.float32)),
        shape=f"latents {tuple(lat.shape)}", ref_name=f"diffusers {type(ref).__name__}" if ref is not None else "",
        why_no_ref=why,
    )


def _text_case(cfg, ours, ref, why, dtype, batch, latent):
    ids = ours.tokenize([PROMPT] * batch)
    return Case(
        ours=lambda: ours.encode(ids), ref=None if ref is None else (lambda: ref(input_ids=ids).last_hidden_state),
        flop_fn=lambda: ours.encode(ids), shape=f"ids {tuple(ids.shape)}",
        ref_name="transformers CLIPTextModel", why_no_ref=why,
    )


BUILDERS = {"text": (build_text, _text_case), "unet": (build_unets, _unet_case),
            "decoder": (build_decoders, _decoder_case)}


def bench_component(name, preset, cfg, *, precisions, compile, batch, latent, runs, warmup, with_reference,
                    peaks) -> list[Row]:
    """Rows for one component of one preset: each precision eager, then compiled (UNet only)."""
    import torch

    from . import fast

    build, make_case = BUILDERS[name]
    make_ours, ref_base, why = build(cfg, with_reference=with_reference)
    rows, ref_fp32_ms, gflop = [], None, None
    modes = [(p, False) for p in precisions] + ([(p, True) for p in precisions] if compile and name == "unet" else [])
    for precision, compiled in modes:
        dtype = fast.PRECISIONS[precision]
        ours = make_ours()
        if gflop is None:  # counted in fp32 before the fast path (FlopCounterMode knows no oneDNN calls)
            gflop = count_gflop(make_case(cfg, ours, None, why, torch.float32, batch, latent).flop_fn)
        ours.to(dtype)
        ref = None if ref_base is None else ref_base if dtype == torch.float32 else copy.deepcopy(ref_base).to(dtype)
        target = ours.model if name == "text" else ours
        compile_s = None
        fast.optimize(target, compile=compiled)
        case = make_case(cfg, ours, ref, why, dtype, batch, latent)
        with torch.no_grad():
            if compiled:
                start = time.perf_counter()
                case.ours()
                compile_s = time.perf_counter() - start
            fns = {"ours": case.ours} if case.ref is None else {"ours": case.ours, "ref": case.ref}
            ms = time_alternating(fns, runs=runs, warmup=warmup)
            err = rel_err(case.ours().float(), case.ref().float()) if case.ref is not None else None
        row = Row(
            preset=preset, component=name, precision=precision, mode="compile" if compiled else "eager",
            shape=case.shape, ms=ms["ours"], gflop=gflop, gflops=gflop / ms["ours"] * 1e3,
            peak_fraction=gflop / ms["ours"] * 1e3 / peaks[precision]["gflops"], compile_s=compile_s,
            ref=case.ref_name if "ref" in ms else None, ref_ms=ms.get("ref"), rel_err=err,
            note="" if case.ref is not None else (case.why_no_ref or ""),
        )
        if row.ref_ms is not None:
            row.ratio = row.ref_ms / row.ms
            if precision == "fp32" and not compiled:
                ref_fp32_ms = row.ref_ms
        rows.append(row)
        del ours, ref, case
    for row in rows:
        if ref_fp32_ms is not None and (row.precision != "fp32" or row.mode == "compile"):
            row.ref_fp32_ms = ref_fp32_ms
            row.ratio_vs_ref_fp32 = ref_fp32_ms / row.ms
    return rows


# --------------------------------------------------------------------------- end to end
E2E = {  # name -> (preset, steps, guidance, sampler)
    "mobilediffusion-512 1 step": ("mobilediffusion-512", 1, 0.0, "onestep"),
    "sd15 20 steps CFG": ("sd15", 20, 7.5, "dpmpp_2m"),
}


def end_to_end(preset: str, steps: int, guidance: float, sampler: str, precision: str, compile: bool,
               size: int = 512) -> dict:
    """One size x size image from random weights in this process, after a one-step warm-up: ms and peak RSS."""
    import resource

    from . import fast
    from .pipeline import build_pipeline

    dtype = fast.check_precision(precision)
    pipe = build_pipeline(get_preset(preset), dtype=dtype, compile=compile)  # with the fast path
    kw = dict(height=size, width=size, sampler=sampler, seed=0, guidance=guidance)
    pipe(PROMPT, steps=1, **kw)  # warm-up (and compilation)
    start = time.perf_counter()
    pipe(PROMPT, steps=steps, **kw)
    ms = (time.perf_counter() - start) * 1e3
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {"preset": preset, "steps": steps, "guidance": guidance, "precision": precision, "compile": compile,
            "size": size, "ms": ms, "peak_rss_mb": rss_mb}


def end_to_end_subprocess(name: str, precision: str, compile: bool, threads: int = 0) -> dict:
    """end_to_end in a fresh Python process (so its peak RSS is its own)."""
    preset, steps, guidance, sampler = E2E[name]
    code = ("import json, torch; from mobilediffusion.bench import end_to_end; "
            + (f"torch.set_num_threads({threads}); " if threads else "")
            + "torch.set_flush_denormal(True); "
            + f"print(json.dumps(end_to_end({preset!r}, {steps}, {guidance}, {sampler!r}, {precision!r}, {compile})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise ConfigError(f"end-to-end run {name!r} failed: {out.stderr.strip().splitlines()[-1:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["name"] = name
    return result


# --------------------------------------------------------------------------- report
def run(args) -> dict:
    """Everything `mobilediffusion bench` measures, as a dict (what --json prints)."""
    import torch

    from . import fast

    # 1. check the request before any heavy work
    presets = [p for spec in args.preset for p in spec.split(",") if p]
    for p in presets:
        get_preset(p)  # unknown names: ConfigError listing the known ones
    precisions = [p for spec in args.precision for p in spec.split(",") if p]
    for p in precisions:
        fast.check_precision(p)  # unknown or unavailable: ConfigError saying which and why
    components = [c for spec in args.components for c in spec.split(",") if c]
    for c in components:
        if c not in COMPONENTS:
            raise ConfigError(f"unknown component {c!r}; choose from {', '.join(COMPONENTS)}")
    if args.size % 8:
        raise ConfigError(f"--size is in image pixels and must be a multiple of 8, got {args.size}")
    if args.runs < 1 or args.warmup < 0:
        raise ConfigError(f"--runs must be >= 1 and --warmup >= 0, got {args.runs}, {args.warmup}")
    # 2. the machine
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    peaks = {p: measure_peak(fast.PRECISIONS[p]) for p in precisions}
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "peak": peaks},
        "settings": {"size": args.size, "latent": args.size // 8, "batch": args.batch, "runs": args.runs,
                     "warmup": args.warmup},
        "rows": [], "end_to_end": [],
    }
    if not args.json:
        print(HEADER, flush=True)
    # 3. components
    for preset in presets:
        cfg = get_preset(preset)
        m = cfg.unet.size_multiple
        latent = args.size // 8
        if latent % m:
            raise ConfigError(f"preset {preset}: --size must be a multiple of {8 * m} pixels, got {args.size}")
        for comp in components:
            rows = bench_component(comp, preset, cfg, precisions=precisions, compile=args.compile, batch=args.batch,
                                   latent=latent, runs=args.runs, warmup=args.warmup,
                                   with_reference=not args.no_reference, peaks=peaks)
            for row in rows:
                result["rows"].append(dataclasses.asdict(row))
                if not args.json:
                    print(format_row(row), flush=True)
    # 4. end to end
    if args.end_to_end:
        precision = precisions[-1]
        for name in E2E:
            r = end_to_end_subprocess(name, precision, args.compile, args.threads)
            result["end_to_end"].append(r)
            if not args.json:
                print(f"end-to-end {name:28s} {precision}{'+compile' if args.compile else ''}: "
                      f"{r['ms']:9.0f} ms, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
        if len(result["end_to_end"]) == 2:
            a, b = result["end_to_end"]
            result["end_to_end_speedup"] = b["ms"] / a["ms"]
            if not args.json:
                print(f"end-to-end speedup (sd15 20-step CFG / mobilediffusion-512 1-step): "
                      f"{result['end_to_end_speedup']:.1f}x")
    return result


HEADER = (f"{'preset':20s} {'component':8s} {'mode':12s} {'ms':>9s} {'ref ms':>9s} {'ratio':>6s} "
          f"{'vs fp32':>7s} {'GFLOP':>8s} {'GFLOP/s':>8s} {'%peak':>6s} {'rel err':>8s}")


def format_row(r: Row) -> str:
    def num(v, fmt):
        return format(v, fmt) if v is not None else "-"

    mode = r.precision + ("+compile" if r.mode == "compile" else "")
    line = (f"{r.preset:20s} {r.component:8s} {mode:12s} {r.ms:9.1f} {num(r.ref_ms, '9.1f')} {num(r.ratio, '6.2f')} "
            f"{num(r.ratio_vs_ref_fp32, '7.2f')} {r.gflop:8.1f} {r.gflops:8.1f} {100 * r.peak_fraction:5.1f}% "
            f"{num(r.rel_err, '8.1e')}")
    if r.compile_s is not None:
        line += f"  (first call {r.compile_s:.0f} s)"
    if r.note:
        line += f"  ({r.note})"
    return line


def cmd_bench(args) -> int:
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        peaks = ", ".join(f"{p} {v['gflops']:.0f} GFLOP/s ({v['probe']})" for p, v in result["machine"]["peak"].items())
        print(f"peak on {result['machine']['threads']} threads: {peaks}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `bench` command to the CLI's subparsers."""
    b = subparsers.add_parser(
        "bench", help="time text encoder, UNet step and decoder against diffusers",
        description="Times each component of the given presets on random weights, ours against the "
                    "reference (diffusers / transformers) on the same weights; median of --runs after --warmup.")
    b.add_argument("--preset", action="append", default=None,
                   help=f"preset(s), comma-separated or repeated (default: sd15,sdxs-512); one of {', '.join(PRESETS)}")
    b.add_argument("--precision", action="append", default=None,
                   help="fp32, bf16 or fp16, comma-separated or repeated (default: fp32,bf16)")
    b.add_argument("--components", action="append", default=None,
                   help=f"which of {', '.join(COMPONENTS)} (default: all)")
    b.add_argument("--size", type=int, default=512, help="image size in pixels (latents are size / 8)")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--runs", type=int, default=5, help="timed runs per variant (median)")
    b.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    b.add_argument("--compile", action="store_true", help="also time the UNet under torch.compile (inductor "
                   "freezing); the first call compiles (30-75 s for SD-size UNets)")
    b.add_argument("--end-to-end", action="store_true", help="also one 512x512 image: mobilediffusion-512 "
                   "1 step vs SD1.5 20 steps with CFG, in the last precision given (fresh processes; peak RSS)")
    b.add_argument("--no-reference", action="store_true", help="time ours only")
    b.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    b.add_argument("--bundle", action="append", help="time an exported bundle's .tflite files (XNNPACK) against "
                   "torch and one image through the numpy runtime instead (repeatable; see benchmarks/bundle.py)")
    b.add_argument("--checkpoint", help="with --bundle: the torch side's weights (default: random, same architecture)")
    b.set_defaults(func=_cmd_with_defaults)
    return b


def _cmd_with_defaults(args) -> int:
    if args.bundle:
        from .benchmarks.bundle import cmd_bundle_bench

        return cmd_bundle_bench(args)
    args.preset = args.preset or ["sd15,sdxs-512"]
    args.precision = args.precision or ["fp32,bf16"]
    args.components = args.components or [",".join(COMPONENTS)]
    return cmd_bench(args)


__all__ = ["add_parser", "run", "measure_peak", "count_gflop", "time_alternating", "end_to_end", "Row"]
