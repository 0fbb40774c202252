"""What a bundle takes in memory when the interpreter runs it, measured in a fresh process as an app would run it.

    python -m mobilediffusion.runtime.memory BUNDLE [HxW]   -> one JSON line (see `measure_here`)

Resident memory (RSS) is read from /proc/self/status after each stage: loading a component (its mapped file pages
as the interpreter touches them, and XNNPACK's packed copy of the weights) and its first run (the tensor arena it
allocates then, kept for later runs). The peak of one generation is the process's high-water mark (VmHWM) over a
generation (text, one UNet step, decode: the UNet's arena does not grow with the step count; with the encoder and
the control model when the bundle has them: a picture and mask, a control image) minus what the
process held before loading the bundle (Python, numpy, the interpreter library): the components, the tokenizer,
the manifest checks and the run's own arrays. Linux only (/proc); elsewhere the figures are None.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

MEMORY_TIMEOUT = 3600  # seconds for the measuring process (an SD1.5 UNet step on a slow CPU fits)


def _status(key: str) -> int | None:
    """VmRSS / VmHWM of this process in bytes, None without /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def measure_here(folder, size: tuple[int, int] | None = None) -> dict:
    """In this (fresh) process: {"components": {name: {"weights_bytes", "arena_bytes", "resident_bytes"}},
    "generation_peak_bytes", "size": [H, W]} for one generation at `size` (default: the bundle's largest)."""
    from .interpreter import interpreter_class
    from .manifest import image_sizes
    from .pipeline import BundlePipeline
    from .sampler import numpy_noise

    class Measured(BundlePipeline):
        def _load(self, name, entry, content=None):
            before = _status("VmRSS")
            component = super()._load(name, entry, content)
            out[name] = {"weights_bytes": _delta(_status("VmRSS"), before)}
            return component

    interpreter_class()  # the interpreter library is the process's own, not the bundle's
    out = {}
    base = _status("VmRSS")
    pipe = Measured(folder)
    size = tuple(size) if size else max(image_sizes(pipe.manifest), key=lambda s: s[0] * s[1])
    section = dict(pipe.manifest["sampler"])  # one step: the UNet's arena does not grow with the steps
    for key in ("timesteps", "c_in", "a", "b", "c", "d", "x0_p", "x0_q", "sigmas"):
        if key in section:
            section[key] = list(section[key][:1])
    # one generation, stage by stage: each component's first run allocates its arena
    before = _status("VmRSS")
    context = pipe.encode("a photo")
    uncond = pipe.encode("") if pipe.guidance > 1.0 else None
    arenas = {"text_encoder": _delta(_status("VmRSS"), before)}
    extra = {}
    H, W = size
    import numpy as np

    if "encoder" in pipe.components:  # a repaint: the encoder's arena, and the known region kept
        before = _status("VmRSS")
        mask = np.zeros((H, W), np.float32)
        mask[: H // 2] = 1.0
        extra.update(pipe.inpaint_inputs(np.full((H, W, 3), 0.5, np.float32), mask, H, W))
        arenas["encoder"] = _delta(_status("VmRSS"), before)
    control = pipe.control["component"] if pipe.control else None
    if control:  # a control image (the adapter runs inside sample, the ControlNet at each step)
        extra["hint"] = pipe.control_hint(np.zeros((H, W, 3), np.float32), H, W)
    before = _status("VmRSS")
    latents = pipe.sample(context, uncond, noise=numpy_noise(0), sampler=section, height=H, width=W, **extra)
    arenas["unet"] = _delta(_status("VmRSS"), before)  # (with a control model's: both run in this stage)
    before = _status("VmRSS")
    pipe.decode(latents)
    arenas["decoder"] = _delta(_status("VmRSS"), before)
    for name, row in out.items():
        row["arena_bytes"] = arenas.get(name)
        row["resident_bytes"] = None if None in (row["weights_bytes"], row["arena_bytes"]) else \
            row["weights_bytes"] + row["arena_bytes"]
    return {"components": out, "generation_peak_bytes": _delta(_status("VmHWM"), base), "size": list(size)}


def _delta(after, before):
    return None if after is None or before is None else max(0, after - before)


def measure(folder, size=None) -> dict:
    """measure_here in a fresh Python process (what this process already holds does not count)."""
    cmd = [sys.executable, "-m", "mobilediffusion.runtime.memory", str(folder)]
    if size:
        cmd.append(f"{size[0]}x{size[1]}")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=MEMORY_TIMEOUT,
                       cwd=str(Path(__file__).resolve().parents[2]))
    if r.returncode != 0:
        raise RuntimeError(f"measuring the bundle's memory failed: {(r.stderr or r.stdout).strip()[-800:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    size = tuple(int(v) for v in argv[1].split("x")) if len(argv) > 1 else None
    print(json.dumps(measure_here(argv[0], size)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
