"""The decoders at 512 x 512 output: ms, GFLOP/s, % of the machine's peak and error, mode by mode and stage by stage.

    rows = decoder_rows(["mobilediffusion-512", "sdxs-512", "sd15"], ["fp32", "bf16"])

Each preset's decoder (lite: mobilediffusion-512, TAESD: sdxs-512, SD VAE: sd15) runs on the same random
weights as diffusers' AutoencoderKL / AutoencoderTiny (when installed) in these modes, timed alternating
in one process (median of `runs` after `warmup`):
- "nchw": the fast path as it was for decoders before channels_last (NCHW maps, eager convolutions,
  packed linears): the baseline of the "vs nchw" column.
- "fast": `fast.optimize` now (channels_last, packed convolutions, fast_decoder's rewrites).
- "diffusers": the reference in the same precision.
GFLOP counts the decoder as written (torch's FlopCounterMode on a meta copy; the 3x3 convolution after an
upsample at full size), so the fast mode's GFLOP/s is effective: its phase convolutions do 16/36 of the
multiply-adds of those layers. Errors are against diffusers in fp32 (our nchw fp32 without diffusers):
relative L2, and PSNR of the [0, 1] image. `stages=True` adds each top-level stage of the fast mode
(ms, GFLOP, GFLOP/s, % of peak) timed on its own input, and the op types torch's profiler sees.
"""
from __future__ import annotations

import copy
import math

PRESETS = ("mobilediffusion-512", "sdxs-512", "sd15")
KIND = {"kl": "KL", "tiny": "TAESD"}


def decoder_rows(presets=PRESETS, precisions=("fp32", "bf16"), *, size: int = 512, batch: int = 1, runs: int = 3,
                 warmup: int = 1, stages: bool = False, peaks: dict | None = None,
                 with_reference: bool = True) -> list[dict]:
    """Rows (dicts) for each preset x precision x mode; see the module docstring. `peaks`: {precision:
    bench.measure_peak(...)} (measured here when None)."""
    import torch

    from .. import fast
    from .measure import count_gflop, measure_peak
    from .models import build_decoders
    from ..decoder import build_decoder
    from ..presets import get_preset

    peaks = peaks or {p: measure_peak(fast.PRECISIONS[p]) for p in precisions}
    rows = []
    for preset in presets:
        cfg = get_preset(preset)
        dc = cfg.decoder
        latent = size // dc.upscale
        make_ours, ref, why = build_decoders(cfg, with_reference=with_reference)
        g = torch.Generator().manual_seed(4)
        lat = torch.randn(batch, dc.latent_channels, latent, latent, generator=g) * dc.scaling_factor
        meta = build_decoder(dc, device="meta")
        gflop = count_gflop(lambda: meta(lat.to("meta")))
        with torch.no_grad():
            truth = _reference_fn(ref, dc, lat)() if ref is not None else _mode(make_ours(), "nchw", None)(lat)
        name = "lite" if preset.startswith("mobilediffusion") else KIND[dc.kind]
        for precision in precisions:
            dtype = fast.PRECISIONS[precision]
            x = lat.to(dtype)
            models = {m: _mode(make_ours(), m, dtype) for m in ("nchw", "fast")}
            fns = {m: (lambda f=f: f(x)) for m, f in models.items()}
            if ref is not None:
                ref_p = ref if dtype == torch.float32 else copy.deepcopy(ref).to(dtype)
                fns["diffusers"] = _reference_fn(ref_p, dc, x)
            with torch.no_grad():
                ms = _time(fns, runs, warmup)
                outs = {m: fn().float() for m, fn in fns.items()}
            peak = peaks[precision]["gflops"]
            for mode, out in outs.items():
                row = {
                    "preset": preset, "decoder": name, "precision": precision, "mode": mode,
                    "shape": f"latents {tuple(lat.shape)} -> image {tuple(out.shape)}", "ms": ms[mode],
                    "gflop": gflop, "gflops": gflop / ms[mode] * 1e3, "peak_fraction": gflop / ms[mode] * 1e3 / peak,
                    "vs_nchw": ms["nchw"] / ms[mode], "rel_err": _rel(out, truth), "psnr_db": _psnr(out, truth),
                    "truth": "diffusers fp32" if ref is not None else f"ours nchw fp32 ({why})",
                }
                if stages and mode == "fast":
                    row["stages"] = stage_table(models["fast"], x, peak)
                    row["ops"] = op_table(models["fast"], x)
                rows.append(row)
            del models, fns, outs
    return rows


def _mode(decoder, mode, dtype):
    from .. import fast

    if mode == "nchw":  # the decoders' fast path before channels_last
        return fast.optimize(decoder, dtype=dtype, channels_last=False)
    return fast.optimize(decoder, dtype=dtype)


def _reference_fn(ref, dc, lat):
    return lambda: (ref.decode(lat / dc.scaling_factor + dc.shift_factor).sample / 2 + 0.5).clamp(0, 1)


def _time(fns, runs, warmup):
    from .measure import time_alternating

    return time_alternating(fns, runs=runs, warmup=warmup)


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _psnr(a, b) -> float:
    mse = (a.double() - b.double()).square().mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


# --------------------------------------------------------------------------- stage by stage
def segments(decoder) -> list[tuple[str, list[int]]]:
    """Top-level stages of decoder.layers as (name, child indices): the KL stages by name; TAESD's flat
    list as conv_in, one segment per level (its blocks and the upsample; the last one with conv_out)."""
    names = [n for n, _ in decoder.layers.named_children()]
    if decoder.config.kind == "kl":
        return [(n, [i]) for i, n in enumerate(names)]
    from torch import nn

    mods, out, cur, level = list(decoder.layers), [], [], 0
    for i, m in enumerate(mods):
        cur.append(i)
        if i == 2:  # clamp, conv, relu
            out.append(("conv_in", cur))
            cur = []
        elif isinstance(m, nn.Conv2d) and i > 2 and (i == len(mods) - 1 or isinstance(mods[i - 1], nn.Upsample)):
            out.append((f"level{level}" if i < len(mods) - 1 else f"level{level}+conv_out", cur))
            cur, level = [], level + 1
    return out


def stage_table(decoder, x, peak: float, runs: int = 3) -> list[dict]:
    """Each segment of the decoder timed on its own input (median of runs), with its GFLOP (as written)."""
    import time

    import torch
    from torch import nn

    from .measure import count_gflop
    from ..decoder import build_decoder
    from ..fast_decoder import FusedSequential

    meta = build_decoder(decoder.config, device="meta")
    cfg = decoder.config
    h = (x / cfg.scaling_factor + cfg.shift_factor).to(x.dtype)
    hm = h.to("meta", torch.float32)
    rows = []
    with torch.no_grad():
        for name, idx in segments(decoder):
            seg = nn.Sequential(*[decoder.layers[i] for i in idx])
            if isinstance(decoder.layers, FusedSequential):
                seg.__class__ = FusedSequential
                seg.plan()
            seg_meta = nn.Sequential(*[meta.layers[i] for i in idx])
            gflop = count_gflop(lambda: seg_meta(hm))
            seg(h)
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                out = seg(h)
                times.append(time.perf_counter() - start)
            ms = sorted(times)[len(times) // 2] * 1e3
            rows.append({"stage": name, "in": tuple(h.shape), "ms": ms, "gflop": gflop,
                         "gflops": gflop / ms * 1e3, "peak_fraction": gflop / ms * 1e3 / peak})
            h, hm = out, seg_meta(hm)
    return rows


def op_table(decoder, x, top: int = 8) -> list[dict]:
    """The ops with the most self CPU time in one call (torch.profiler)."""
    import torch

    with torch.no_grad():
        decoder(x)
        with torch.profiler.profile() as prof:
            decoder(x)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    return [{"op": e.key, "ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in events]


def format_rows(rows: list[dict]) -> list[str]:
    """Text lines: one per row, then the stage and op tables of rows that have them."""
    lines = [f"{'decoder':22s} {'prec':5s} {'mode':10s} {'ms':>9s} {'vs nchw':>7s} {'GFLOP':>7s} "
             f"{'GFLOP/s':>8s} {'%peak':>6s} {'rel err':>8s} {'PSNR':>6s}"]
    for r in rows:
        lines.append(f"{r['preset'] + ' (' + r['decoder'] + ')':22s} {r['precision']:5s} {r['mode']:10s} "
                     f"{r['ms']:9.1f} {r['vs_nchw']:7.2f} {r['gflop']:7.1f} {r['gflops']:8.1f} "
                     f"{100 * r['peak_fraction']:5.1f}% {r['rel_err']:8.1e} {r['psnr_db']:6.1f}")
        for s in r.get("stages", []):
            lines.append(f"    stage {s['stage']:16s} in {str(s['in']):22s} {s['ms']:8.1f} ms {s['gflop']:7.1f} GFLOP "
                         f"{s['gflops']:7.1f} GFLOP/s {100 * s['peak_fraction']:5.1f}%")
        for o in r.get("ops", []):
            lines.append(f"    op {o['op']:36s} {o['ms']:8.1f} ms {100 * o['share']:5.1f}%  x{o['calls']}")
    return lines


# --------------------------------------------------------------------------- as a `bench` section
def add_arguments(parser) -> None:
    parser.add_argument("--decoders", action="store_true", help="the presets' decoders at --size output, mode by "
                        "mode (nchw: before channels_last, fast: now, diffusers) and stage by stage, with an op profile")


def check(args) -> None:
    pass


def enabled(args) -> bool:
    return bool(getattr(args, "decoders", False))


def run(args, bench) -> dict:
    """`bench`: the request and the machine (presets, precisions, peak(precision), reference, print(line))."""
    rows = decoder_rows(bench.presets, bench.precisions, size=args.size, batch=args.batch, runs=args.runs,
                        warmup=args.warmup, stages=True, peaks={p: bench.peak(p) for p in bench.precisions},
                        with_reference=bench.reference)
    for line in format_rows(rows):
        bench.print(line)
    return {"decoders": rows}


__all__ = ["PRESETS", "decoder_rows", "stage_table", "op_table", "segments", "format_rows", "add_arguments", "check",
           "enabled", "run"]
