"""Static int8 activation scales for a pipeline: calibrated once from a few prompts, then read from a cache file.

    pipe = load_pipeline(path, dtype="int8", calibration=["a cat on a sofa", "a city street at night"])
    # or, on a loaded int8 pipeline:  calibrate_int8(pipe, prompts, source=path)

Without calibration each int8 layer (mobilediffusion.ops.int8) quantizes its input with the input's own range, one
more pass over the input per call. Calibrated, the prompts are generated once at the model's defaults (steps,
guidance, size; seed i for prompt i) while every int8 layer of the UNet and the decoder records the range of what it
reads; from then on each layer quantizes with that fixed range (static scale and zero point). Values outside it
saturate, so calibrate with prompts like the ones to be generated.

The ranges are kept as JSON in the cache folder (`$MOBILEDIFFUSION_CACHE/int8`, else ~/.cache/mobilediffusion/int8),
one file per (checkpoint path, LoRAs and strengths, prompts, steps, guidance, size). The file records what the
ranges were measured on: each weights file's identity (size, modification time and the sha256 of its first and
last MiB) and the int8 layers' names. A later load with the same request reads it; if a weights file or the layer
list has changed since, the cache is stale: recalibrated and rewritten, with one log line saying why.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from .atomic import atomic_file
from .errors import ConfigError

log = logging.getLogger(__name__)

FORMAT = 1  # the cache file's layout; another value is stale


def cache_dir() -> Path:
    """Where calibrations are kept (see the module docstring)."""
    if os.environ.get("MOBILEDIFFUSION_CACHE"):
        return Path(os.environ["MOBILEDIFFUSION_CACHE"]) / "int8"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mobilediffusion" / "int8"


def file_identity(path) -> dict:
    """{size, mtime_ns, sha256 of the first and last MiB} of a weights file (or of each file in a folder)."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in (
        ".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".json"))
    out = {}
    for f in files:
        st = f.stat()
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if st.st_size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read(1 << 20))
        out[str(f.relative_to(p)) if f != p else f.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                                            "sha256_ends": h.hexdigest()}
    return out


def request_key(source, loras, prompts, steps, guidance, size) -> str:
    """The cache file's name: what the same calibration is asked with (not the files' contents: those are checked)."""
    parts = [str(Path(source).resolve()) if source is not None else "(embedded default)",
             [[str(Path(p).resolve()), float(s)] for p, s in loras], list(prompts), steps, guidance, list(size)]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def _sources(source, loras) -> dict:
    from .pipeline import DEFAULT_WEIGHTS

    files = {"checkpoint": file_identity(DEFAULT_WEIGHTS if source is None else source)}
    for i, (path, _) in enumerate(loras):
        files[f"lora {i}"] = file_identity(path)
    return files


def int8_modules(pipe) -> dict:
    """{"unet": UNet, "decoder": decoder} for the parts of `pipe` that have int8 layers."""
    from .ops.int8 import int8_layers

    return {k: m for k, m in (("unet", pipe.unet), ("decoder", pipe.decoder)) if int8_layers(m)}


def check_prompts(prompts) -> list[str]:
    """The calibration prompts as a list, or a ConfigError when there are none or one is empty."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts or ())
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ConfigError("int8 calibration needs prompts, none of them empty: give a few like the ones you will "
                          "generate, or leave calibration out (each layer then takes its input's own range per call)")
    return prompts


def calibrate_int8(pipe, prompts: Sequence[str], *, source=None, loras=(), cache: bool = True) -> str:
    """Give the int8 layers of `pipe` (loaded with dtype="int8") static activation ranges from `prompts` (see the
    module docstring); `source` and `loras` are what it was loaded from (None: the embedded default), for the cache.
    Returns what happened: "cached" (read), "calibrated", "recalibrated" (the cache was stale) or "no int8 layers"
    (int8 could not run here and the model is bf16: nothing to calibrate)."""
    from .ops.int8 import int8_layers, record_ranges, set_ranges

    prompts = check_prompts(prompts)
    parts = int8_modules(pipe)
    if not parts:
        log.info("int8 calibration skipped: the model has no int8 layers (int8 does not run here)")
        return "no int8 layers"
    cfg = pipe.config
    steps, guidance, size = cfg.default_steps, cfg.default_guidance, (cfg.resolution, cfg.resolution)
    loras = [(str(p), float(s)) for p, s in loras]
    layers = {k: sorted(n for n, _ in int8_layers(m)) for k, m in parts.items()}
    path = cache_dir() / f"{request_key(source, loras, prompts, steps, guidance, size)}.json"
    sources = _sources(source, loras)
    state = "calibrated"
    if cache and path.is_file():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            saved = {}
        why = _stale(saved, sources, layers)
        if why is None:
            for k, m in parts.items():
                set_ranges(m, {n: tuple(r) for n, r in saved["ranges"][k].items()})
            return "cached"
        log.warning("int8 calibration cache %s is stale (%s): recalibrating", path.name, why)
        state = "recalibrated"
    for m in parts.values():
        set_ranges(m, {})  # per call while measuring
    ranges = record_ranges(parts, lambda: [pipe(p, seed=i) for i, p in enumerate(prompts)])
    for k, m in parts.items():
        set_ranges(m, ranges[k])
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            Path(tmp).write_text(json.dumps({"format": FORMAT, "sources": sources, "layers": layers,
                                             "prompts": prompts, "steps": steps, "guidance": guidance,
                                             "size": list(size), "ranges": ranges}))
    log.info("int8 calibration: %d prompts, %s", len(prompts),
             ", ".join(f"{k} {len(v)} layers" for k, v in ranges.items()))
    return state


def _stale(saved: dict, sources: dict, layers: dict) -> str | None:
    """Why a cache file cannot be used for this model, or None."""
    if saved.get("format") != FORMAT or "ranges" not in saved:
        return "written by another version"
    if saved.get("sources") != sources:
        changed = sorted(k for k in set(sources) | set(saved.get("sources", {}))
                         if saved.get("sources", {}).get(k) != sources.get(k))
        return f"{', '.join(changed)} changed since it was calibrated"
    if saved.get("layers") != layers:
        return "the int8 layers differ from the ones calibrated"
    return None


__all__ = ["calibrate_int8", "check_prompts", "cache_dir", "file_identity", "request_key"]
