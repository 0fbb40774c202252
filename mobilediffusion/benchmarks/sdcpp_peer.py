"""Peer `sdcpp`: stable-diffusion.cpp (ggml, through stable-diffusion-cpp-python), the engine many CPU users run,
on the same SD1.5 weights as ours: the end-to-end section's "sd15 lcm 4 steps" image (512x512, LCM, cfg 1) with
its weights in f16 and in q8_0, each in a fresh process, split as stable-diffusion.cpp logs it: the text encoder
(get_learned_condition), the sampling (per step) and the decoder (decode_first_stage). Set beside ours in bf16 and
int8 on the same case.

stable-diffusion.cpp reads SD 1.x single files with `cond_stage_model.transformer.text_model.*` keys: the bench
writes the random SD1.5 pipeline the end-to-end case builds (same preset, same seed) as one, in float16;
stable-diffusion.cpp converts the weights to the asked type while loading.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile

from ..errors import ConfigError
from ..memory import release_memory

WEIGHT_TYPES = {"f16": "bf16", "q8_0": "int8"}  # stable-diffusion.cpp's weight type -> ours compared with it
CASE = "sd15 lcm 4 steps"  # the end-to-end case it runs (end_to_end.CASES)
INSTALL = ("pip install stable-diffusion-cpp-python (builds stable-diffusion.cpp from source: needs cmake and a C++ "
           "compiler, about 3 minutes on 2 cores)")
# what stable-diffusion.cpp logs (stable-diffusion.cpp, generate_image), in seconds
PARTS = {"text": r"get_learned_condition completed, taking ([\d.]+)s",
         "unet": r"sampling completed, taking ([\d.]+)s",
         "decoder": r"decode_first_stage completed, taking ([\d.]+)s"}


def probe() -> tuple[str | None, dict]:
    """(why the peer cannot run, or None; its version)."""
    if importlib.util.find_spec("stable_diffusion_cpp") is None:
        return f"not installed; install it with: {INSTALL}", {}
    from importlib.metadata import version

    return None, {"version": version("stable-diffusion-cpp-python")}


def parse_log(text: str) -> dict[str, float]:
    """{"text", "unet", "decoder"}: ms of each part from stable-diffusion.cpp's log; ConfigError if one is missing."""
    parts = {}
    for name, pattern in PARTS.items():
        found = re.findall(pattern, text)
        if not found:
            tail = (text.strip().splitlines() or ["(no output)"])[-1]
            raise ConfigError(f"stable-diffusion.cpp logged no {name} time (its last line: {tail})")
        parts[name] = sum(float(s) for s in found) * 1e3
    return parts


def write_weights(path: str) -> str:
    """The random SD1.5 pipeline of the end-to-end case (build_pipeline's default seed) as an SD single file, fp16."""
    import torch

    from ..pipeline import build_pipeline
    from ..presets import get_preset
    from ..weights.single_file import save_single_file

    save_single_file(build_pipeline(get_preset("sd15")), path, dtype=torch.float16)
    return path


def _child(model: str, wtype: str, steps: int, size: int, threads: int) -> None:
    """In a fresh process: load `model` as `wtype`, one image; prints {"ms", "load_s", "peak_rss_mb"} as JSON on the
    last line (the parts are in stable-diffusion.cpp's log, on stderr)."""
    import time

    from stable_diffusion_cpp import StableDiffusion

    from .measure import peak_rss_mb

    start = time.perf_counter()
    sd = StableDiffusion(model_path=model, wtype=wtype, n_threads=threads or os.cpu_count(), vae_decode_only=True,
                         verbose=True)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    sd.generate_image(prompt="a photograph of a red circle", width=size, height=size, sample_steps=steps,
                      cfg_scale=1.0, sample_method="lcm", seed=0)
    ms = (time.perf_counter() - start) * 1e3
    print(json.dumps({"ms": ms, "load_s": load_s, "peak_rss_mb": peak_rss_mb()}))


def image(model: str, wtype: str, *, steps: int = 4, size: int = 512, threads: int = 0) -> dict:
    """One image by stable-diffusion.cpp in a fresh process: {"wtype", "ms", "parts_ms", "step_ms", ...}."""
    from .end_to_end import PACKAGE_ROOT

    code = ("from mobilediffusion.benchmarks.sdcpp_peer import _child; "
            f"_child({model!r}, {wtype!r}, {steps}, {size}, {threads})")
    release_memory()  # the child needs the memory this process no longer uses
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise ConfigError(f"stable-diffusion.cpp ({wtype}) failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    parts = parse_log(out.stderr + out.stdout)
    parts["other"] = result["ms"] - sum(parts.values())
    return {"wtype": wtype, "steps": steps, "size": size, "parts_ms": parts, "step_ms": parts["unet"] / steps,
            **result}


def run(ours: list[dict], threads: int, emit) -> list[dict]:
    """stable-diffusion.cpp's image in each weight type, with ratios to ours of the same case where it ran."""
    from .end_to_end import CASES

    case = CASES[CASE]
    results = []
    with tempfile.TemporaryDirectory(prefix="md-sdcpp-") as tmp:
        model = write_weights(os.path.join(tmp, "sd15.safetensors"))
        for wtype, precision in WEIGHT_TYPES.items():
            try:
                r = image(model, wtype, steps=case.steps, threads=threads)
            except ConfigError as e:
                emit(f"end-to-end stable-diffusion.cpp {wtype}: {e}")
                continue
            mine = next((o for o in ours if o["name"] == CASE and o["precision"] == precision), None)
            if mine is not None:  # how many times faster ours is, per part
                p = mine["parts_ms"]
                r["ours"] = {"precision": precision, "ms": mine["ms"], "step_ms": p["unet"] / case.steps,
                             "text_ms": p["text"], "decoder_ms": p["decoder"]}
                r["speedup"] = {"image": r["ms"] / mine["ms"], "step": r["step_ms"] / r["ours"]["step_ms"],
                                "text": r["parts_ms"]["text"] / p["text"],
                                "decoder": r["parts_ms"]["decoder"] / p["decoder"]}
            results.append(r)
            emit(format_result(r))
    return results


def format_result(r: dict) -> str:
    p = r["parts_ms"]
    line = (f"end-to-end stable-diffusion.cpp sd15 {r['wtype']:5s} {r['size']}x{r['size']} {r['steps']} step(s) lcm: "
            f"{r['ms']:7.0f} ms = "
            f"text {p['text']:.0f} + unet {p['unet']:.0f} ({r['step_ms']:.0f} per step) + decoder {p['decoder']:.0f} "
            f"+ other {p['other']:.0f}; loads in {r['load_s']:.1f} s; peak RSS {r['peak_rss_mb']:.0f} MB")
    if "speedup" in r:
        s = r["speedup"]
        line += (f"; ours {r['ours']['precision']} is {s['image']:.1f}x faster per image (step {s['step']:.1f}x, "
                 f"text {s['text']:.1f}x, decoder {s['decoder']:.1f}x)")
    return line


__all__ = ["probe", "parse_log", "image", "run", "write_weights", "WEIGHT_TYPES"]
