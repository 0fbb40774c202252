"""Section `end_to_end` (--end-to-end): one 512x512 image per case and precision, each in a fresh process
(so its peak RSS is its own), with each component's share of the time.

Cases: mobilediffusion-512 one step (lite decoder), sdxs-512 one step (TAESD), SD1.5 4 steps with the
LCM sampler at cfg 1; all on random weights with the fast path (and --compile if given), after a
one-step warm-up. Shares: tokenize + text encoder, the UNet calls, the decoder, and the rest (noise,
sampler arithmetic, conversion to PIL). Also, in its own fresh process, one diffusers fp32 SD1.5 UNet
step (median of --runs): the one-step image times over it are machine-independent ratios. With --int8 (or
--precision int8) each case also runs in precision int8 (int8 UNet and decoder layers, bf16 elsewhere).
With the sdcpp peer, stable-diffusion.cpp makes the SD1.5 case's image in f16 and q8_0 (sdcpp_peer.py).
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

from ..errors import ConfigError
from ..memory import release_memory
from ..presets import get_preset
from .measure import peak_rss_mb
from .models import PROMPT


@dataclasses.dataclass(frozen=True)
class Case:
    preset: str  # the model
    steps: int  # sampling steps
    guidance: float  # classifier-free guidance scale (<= 1: none)
    sampler: str  # sampler name (mobilediffusion.sampling)


CASES = {
    "mobilediffusion-512": Case("mobilediffusion-512", 1, 0.0, "onestep"),
    "sdxs-512": Case("sdxs-512", 1, 0.0, "onestep"),
    "sd15 lcm 4 steps": Case("sd15", 4, 1.0, "lcm"),
}
RATIO_CASES = ("mobilediffusion-512", "sdxs-512")  # their image times over one diffusers fp32 SD1.5 UNet step
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def add_arguments(parser) -> None:
    parser.add_argument("--end-to-end", action="store_true", help="also one 512x512 image per case (mobilediffusion-512 "
                        "and sdxs-512 one step, SD1.5 4 LCM steps at cfg 1) in each precision, each in a fresh process "
                        "(peak RSS, each component's share), and one diffusers fp32 SD1.5 UNet step for the ratio")


def check(args) -> None:
    pass


def enabled(args) -> bool:
    return args.end_to_end


class _TimedUNet:
    """The pipeline's UNet, adding the time of each call to timers["unet"] (what sample_latents uses of it:
    the call, .config and .parameters())."""

    def __init__(self, unet, timers: dict):
        self.unet, self.config, self.timers = unet, unet.config, timers

    def parameters(self):
        return self.unet.parameters()

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.unet(*args, **kwargs)
        self.timers["unet"] += time.perf_counter() - start
        self.timers["unet_calls"] += 1
        return out


def _timed(fn, timers: dict, key: str):
    def call(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        timers[key] += time.perf_counter() - start
        return out

    return call


def end_to_end(preset: str, steps: int, guidance: float, sampler: str, precision: str, compile: bool,
               size: int = 512) -> dict:
    """One size x size image from random weights in this process, after a one-step warm-up: ms, each
    component's ms, peak RSS."""
    from .. import fast
    from ..pipeline import build_pipeline

    if precision != fast.INT8:  # int8: int8 layers in the UNet and decoder of a bf16 model
        fast.check_precision(precision)
    pipe = build_pipeline(get_preset(preset), dtype=precision, compile=compile and precision != fast.INT8)
    kw = dict(height=size, width=size, sampler=sampler, seed=0, guidance=guidance)
    pipe(PROMPT, steps=1, **kw)  # warm-up (and compilation)
    timers = {"text": 0.0, "unet": 0.0, "decoder": 0.0, "unet_calls": 0}
    pipe.encode_prompt = _timed(pipe.encode_prompt, timers, "text")  # tokenize + encode
    pipe.decode = _timed(pipe.decode, timers, "decoder")
    pipe.unet = _TimedUNet(pipe.unet, timers)
    start = time.perf_counter()
    pipe(PROMPT, steps=steps, **kw)
    total = time.perf_counter() - start
    rss_mb = peak_rss_mb()
    parts = {k: timers[k] * 1e3 for k in ("text", "unet", "decoder")}
    parts["other"] = total * 1e3 - sum(parts.values())
    return {"preset": preset, "steps": steps, "guidance": guidance, "sampler": sampler, "precision": precision,
            "compile": compile, "size": size, "ms": total * 1e3, "parts_ms": parts, "unet_calls": timers["unet_calls"],
            "peak_rss_mb": rss_mb}


def diffusers_unet_step(preset: str, size: int, runs: int, warmup: int) -> dict:
    """Median ms of one diffusers fp32 UNet step of `preset` at size x size (random weights), and peak RSS."""
    import torch

    from .measure import time_alternating
    from .models import build_unets, unet_inputs

    _, ref, why = build_unets(get_preset(preset), with_reference=True)
    if ref is None:
        raise ConfigError(f"no diffusers UNet step: {why}")
    x, t, ctx = unet_inputs(get_preset(preset), 1, size // 8)
    with torch.no_grad():
        ms = time_alternating({"ref": lambda: ref(x, t, ctx)}, runs=runs, warmup=warmup)["ref"]
    return {"preset": preset, "size": size, "ms": ms, "runs": runs, "peak_rss_mb": peak_rss_mb()}


def in_fresh_process(call: str, threads: int = 0) -> dict:
    """Evaluate `call` (an expression of this module's functions returning a dict) in a fresh Python process
    running this package; its result."""
    code = ("import json, torch; from mobilediffusion.benchmarks.end_to_end import *; "
            + (f"torch.set_num_threads({threads}); " if threads else "")
            + f"torch.set_flush_denormal(True); print(json.dumps({call}))")
    release_memory()  # the child needs the memory this process no longer uses
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise ConfigError(f"end-to-end run {call} failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def end_to_end_subprocess(case: Case, precision: str, compile: bool, threads: int = 0, size: int = 512) -> dict:
    """end_to_end of `case` in a fresh Python process."""
    return in_fresh_process(f"end_to_end({case.preset!r}, {case.steps}, {case.guidance}, {case.sampler!r}, "
                            f"{precision!r}, {compile}, size={size})", threads)


def format_result(name: str, r: dict) -> str:
    mode = r["precision"] + ("+compile" if r["compile"] and r["precision"] != "int8" else "")
    parts = r["parts_ms"]
    shares = " + ".join(f"{k} {v:.0f}" + (f" ({r['unet_calls']} calls)" if k == "unet" else "")
                        + f" [{100 * v / r['ms']:.0f}%]" for k, v in parts.items())
    return (f"end-to-end {name:20s} {mode:13s} {r['size']}x{r['size']} {r['steps']} step(s) {r['sampler']}: "
            f"{r['ms']:7.0f} ms = {shares}; peak RSS {r['peak_rss_mb']:.0f} MB")


def run(args, bench) -> dict:
    results, failed = [], []
    precisions = sorted(bench.precisions, key=lambda p: p != "fp32") + (["int8"] if args.int8 else [])
    for name, case in CASES.items():
        for precision in precisions:
            try:
                r = end_to_end_subprocess(case, precision, args.compile, args.threads)
            except ConfigError as e:  # one case failing (e.g. out of memory) leaves the others to run
                failed.append({"name": name, "precision": precision, "error": str(e)})
                bench.print(f"end-to-end {name} {precision}: {e}")
                continue
            r["name"] = name
            results.append(r)
            bench.print(format_result(name, r))
    out = {"end_to_end": results, "end_to_end_failed": failed}
    if "sdcpp" in bench.peers:
        from . import sdcpp_peer

        out["sdcpp"] = sdcpp_peer.run(results, args.threads, bench.print)
    if "diffusers" not in bench.peers:
        return out
    try:
        step = in_fresh_process(f"diffusers_unet_step('sd15', 512, {args.runs}, {args.warmup})", args.threads)
    except ConfigError as e:
        bench.print(f"end-to-end diffusers SD1.5 fp32 UNet step: {e}")
        return out
    out["diffusers_sd15_fp32_step"] = step
    bench.print(f"end-to-end diffusers SD1.5 fp32 UNet step (512x512, median of {args.runs}): {step['ms']:.0f} ms; "
                f"peak RSS {step['peak_rss_mb']:.0f} MB")
    ratios = {f"{r['name']} {r['precision']}" + ("+compile" if r["compile"] and r["precision"] != "int8" else ""):
              r["ms"] / step["ms"] for r in results if r["name"] in RATIO_CASES}
    out["ratio_to_diffusers_sd15_step"] = ratios
    bench.print("end-to-end image / diffusers fp32 SD1.5 UNet step: "
                + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    return out
