"""Peer `comfyui`: ComfyUI's own UNet (comfy.ldm UNetModel behind its ModelPatcher), what a ComfyUI user
runs with the native KSampler, on the same weights and inputs.

ComfyUI needs its own requirements (torchvision, einops, torchsde, ...), usually in its own venv with
its own torch build, so it runs in a worker process on ComfyUI's Python (--comfyui-python, default
this one): the bench writes ours' fp32 weights as an SD single file and the inputs, the worker
(comfyui_worker.py) loads the file into ComfyUI and into ours, times both alternating in its process
(one torch build for both: the row's `vs ms` is ours there) and returns the raw UNet outputs, whose
error the bench measures against the same fp32 truth as every other row.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import ConfigError
from ..memory import release_memory
from .rows import peer_row

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding mobilediffusion/


def _work(spec: dict, python: str, folder: str) -> dict:
    """Run the worker on `spec` in `folder`; its result, or {"error": ...}."""
    spec = {**spec, "result": os.path.join(folder, "result.json"), "parent": os.getpid()}
    spec_path = os.path.join(folder, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([python, "-m", "mobilediffusion.benchmarks.comfyui_worker", spec_path], cwd=folder, env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not os.path.exists(spec["result"]):
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return {"error": f"the worker failed: {tail}"}
    with open(spec["result"]) as f:
        return json.load(f)


def python_for_comfyui(args) -> str:
    return args.comfyui_python or sys.executable


def probe(args) -> tuple[str | None, dict]:
    """(why the peer cannot run, or None; facts: ComfyUI and torch versions, attention, Python)."""
    if not args.comfyui:
        return ("no ComfyUI directory given; pass --comfyui DIR (or set COMFYUI_DIR) and, if this Python lacks "
                "ComfyUI's requirements, --comfyui-python with ComfyUI's own Python"), {}
    folder = Path(args.comfyui)
    if not (folder / "comfy").is_dir():
        return f"{folder} is not a ComfyUI checkout (no comfy/ folder); pass the folder that holds its main.py", {}
    python = python_for_comfyui(args)
    if not os.path.exists(python):
        return f"--comfyui-python {python} does not exist; give ComfyUI's Python, e.g. its venv's bin/python", {}
    with tempfile.TemporaryDirectory(prefix="md-comfyui-") as tmp:
        result = _work({"probe": True, "comfyui_dir": str(folder), "comfyui_args": args.comfyui_args}, python, tmp)
    if "error" in result:
        return (f"{python} cannot import ComfyUI from {folder} ({result['error']}); run it with ComfyUI's own Python "
                f"(--comfyui-python PATH or COMFYUI_PYTHON) or install its requirements: "
                f"{python} -m pip install -r {folder / 'requirements.txt'}"), {}
    return None, result


def run(shared, precisions, args) -> list:
    from safetensors.torch import load_file, save_file

    from ..weights.single_file import save_single_file
    from ..weights.unet_keys import ldm_unet_keymap
    from .models import unet_inputs

    try:
        ldm_unet_keymap(shared.cfg.unet)
    except ConfigError as e:
        why = str(e).split(": ", 1)[-1]
        return [peer_row(shared, "comfyui", ",".join(precisions), note=f"ComfyUI's UNetModel cannot express this UNet: {why}")]
    python = python_for_comfyui(args)
    with tempfile.TemporaryDirectory(prefix="md-comfyui-") as tmp:
        # 1. the weights as an SD single file (ComfyUI reads it as is) and the inputs, fp32
        weights = os.path.join(tmp, "unet.safetensors")
        save_single_file({"unet": shared.make_ours()}, weights)
        x, t, ctx = unet_inputs(shared.cfg, shared.batch, shared.latent)
        save_file({"x": x, "t": t, "context": ctx}, os.path.join(tmp, "inputs.safetensors"))
        # 2. the worker times ComfyUI and ours alternating, on its Python
        import torch

        spec = {"comfyui_dir": str(args.comfyui), "comfyui_args": args.comfyui_args, "weights": weights,
                "inputs": os.path.join(tmp, "inputs.safetensors"), "outputs": os.path.join(tmp, "outputs.safetensors"),
                "config": shared.cfg.to_json(), "precisions": list(precisions), "runs": shared.runs,
                "warmup": shared.warmup, "threads": torch.get_num_threads()}
        release_memory()  # the worker needs the memory this process no longer uses
        result = _work(spec, python, tmp)
        if "error" in result:
            return [peer_row(shared, "comfyui", ",".join(precisions), note=f"ComfyUI failed: {result['error']}")]
        outputs = load_file(spec["outputs"])
    rows = []
    for precision in precisions:
        r = result["precisions"][precision]
        note = (f"ComfyUI {result['comfyui']} on torch {result['torch']}, vs ms = ours in its process; "
                f"{result['attention']}, {r['model_config']} {r['model_type']}, weights {r['weight_dtype']} "
                f"compute {r['compute_dtype']}; loads in {r['load_s']:.1f} s (ours {r['ours_load_s']:.1f} s)")
        if r["unet_input_rel_diff"] > 1e-5 or abs(r["unet_timestep"] - float(t[0])) > 0.5:
            note += (f"; its UNet saw other inputs than ours (latents differ by {r['unet_input_rel_diff']:.1e}, "
                     f"timestep {r['unet_timestep']}), so the error compares different calls")
        rows.append(peer_row(shared, "comfyui", precision, ms=r["ms"], ours_ms=r["ours_ms"], output=outputs[precision],
                             setup_s=r["load_s"], note=note))
    return rows
