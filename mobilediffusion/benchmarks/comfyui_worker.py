"""The ComfyUI side of the `comfyui` peer: runs in a worker process on ComfyUI's own Python.

    python -m mobilediffusion.benchmarks.comfyui_worker SPEC.json    (PYTHONPATH: this package's root)

It imports ComfyUI from spec["comfyui_dir"] the way its main.py does (command-line options parsed
from spec["comfyui_args"], plus --cpu), loads the UNet file as ComfyUI's "Load Diffusion Model"
node does (comfy.sd.load_diffusion_model_state_dict, weight dtype bf16 for the bf16 precision like
--bf16-unet), loads the models as KSampler does before sampling (model_management.load_models_gpu)
and times one step as KSampler's CFG-1 path calls the model (BaseModel.apply_model at the sigma of
the timestep, under torch.inference_mode). Ours is loaded from the same file with load_unet and timed
alternating with it in this process (same torch build). It writes spec["result"] (JSON) and
spec["outputs"] (the raw UNet outputs, safetensors), or {"error": ...} when ComfyUI cannot be imported
or cannot build the model.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import threading
import time


def import_comfy(comfyui_dir: str, comfyui_args: str):
    """ComfyUI's comfy package, imported with `--cpu` + comfyui_args parsed as its main.py parses them."""
    sys.path.insert(0, comfyui_dir)
    argv = sys.argv
    sys.argv = [f"{comfyui_dir}/main.py", "--cpu", *shlex.split(comfyui_args)]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.model_management
        import comfy.sd
        import comfy.utils
    finally:
        sys.argv = argv
    return comfy


def facts(comfy) -> dict:
    import torch

    try:
        from comfyui_version import __version__ as version
    except ImportError:
        version = "unknown"
    import comfy.ldm.modules.attention as attention

    return {"torch": torch.__version__, "comfyui": version, "attention": attention.optimized_attention.__name__,
            "device": str(comfy.model_management.get_torch_device()), "python": sys.executable}


def load_comfy_unet(comfy, path: str, precision: str):
    """(ModelPatcher, seconds) of the UNet file as the "Load Diffusion Model" node loads it; bf16 weights for
    bf16 (ComfyUI's --bf16-unet; on CPU it computes in fp32 from them, its `manual_cast_dtype`)."""
    import torch

    start = time.perf_counter()
    sd = comfy.utils.load_torch_file(path, safe_load=True)
    options = {"dtype": torch.bfloat16} if precision == "bf16" else {}
    patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options=options)
    if patcher is None:
        raise ValueError("ComfyUI does not recognise this UNet layout (comfy.model_detection found no model config)")
    comfy.model_management.load_models_gpu([patcher])  # what KSampler's prepare_sampling does
    return patcher, time.perf_counter() - start


def comfy_step(patcher, x, t, ctx, control=None):
    """() -> the denoised latents of one KSampler step at timestep t, and a probe that also returns the raw
    UNet input and output. x and ctx are what our UNet takes (fp32). `control`: a ComfyUI control as
    ControlNetApplyAdvanced leaves it (pre_run done), whose get_control on the step's input feeds the call."""
    model = patcher.model
    sigma = model.model_sampling.sigma(t.float())  # (B,)
    x_in = x * (sigma ** 2 + 1).sqrt().view(-1, 1, 1, 1)  # KSampler's x at sigma; calculate_input undoes it

    def step():
        ctl = None if control is None else control.get_control(x_in, sigma, {"c_crossattn": ctx}, len(x), {})
        return model.apply_model(x_in, sigma, c_crossattn=ctx, control=ctl)

    def probe():
        seen = {}
        hook = model.diffusion_model.register_forward_hook(
            lambda m, a, kw, out: seen.update(x=a[0], t=a[1], out=out), with_kwargs=True)
        try:
            step()
        finally:
            hook.remove()
        return seen

    return step, probe


def exit_with_parent(parent: int) -> None:
    """End this process when the bench that started it is gone (e.g. killed), instead of running on."""

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    if spec.get("parent"):
        exit_with_parent(spec["parent"])
    try:
        comfy = import_comfy(spec["comfyui_dir"], spec.get("comfyui_args", ""))
        result = facts(comfy)
    except Exception as e:  # noqa: BLE001 - reported to the bench as the reason to skip the peer
        _write(spec["result"], {"error": f"{type(e).__name__}: {e}"})
        return 0
    if spec.get("probe"):
        _write(spec["result"], result)
        return 0
    try:
        result["precisions"] = run_control(comfy, spec) if spec.get("control") else run(comfy, spec)
    except Exception as e:  # noqa: BLE001
        result["error"] = f"{type(e).__name__}: {e}"
    _write(spec["result"], result)
    return 0


def prepare(spec) -> tuple:
    """The worker's threads as the bench's; (model config, x, t, context) of the spec."""
    import torch
    from safetensors.torch import load_file

    from mobilediffusion.config import ModelConfig

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.set_flush_denormal(True)
    inputs = load_file(spec["inputs"])
    return ModelConfig.from_json(spec["config"]), inputs["x"], inputs["t"], inputs["context"]


def run(comfy, spec) -> dict:
    import torch
    from safetensors.torch import save_file

    from mobilediffusion.fast import PRECISIONS
    from mobilediffusion.loading import load_unet
    from mobilediffusion.memory import release_memory

    from .measure import keep_last, rel_err, time_alternating

    cfg, x, t, ctx = prepare(spec)
    out, outputs = {}, {}
    for precision in spec["precisions"]:
        dtype = PRECISIONS[precision]
        with torch.inference_mode():  # as ComfyUI runs nodes
            patcher, load_s = load_comfy_unet(comfy, spec["weights"], precision)
            step, probe = comfy_step(patcher, x, t, ctx)
            start = time.perf_counter()
            ours = load_unet(spec["weights"], dtype=dtype, config=cfg.unet)
            ours_load_s = time.perf_counter() - start
            xo, co = x.to(dtype), ctx.to(dtype)
            kept = {}
            ms = time_alternating({"comfyui": step, "ours": keep_last(lambda o=ours: o(xo, t, co), kept, "ours")},
                                  runs=spec["runs"], warmup=spec["warmup"])
            seen = probe()
        model = patcher.model
        outputs[precision] = seen["out"].float().contiguous()
        out[precision] = {
            "ms": ms["comfyui"], "ours_ms": ms["ours"], "load_s": load_s, "ours_load_s": ours_load_s,
            "model_config": type(model.model_config).__name__, "model_type": str(model.model_type.name),
            "weight_dtype": str(patcher.model_dtype()).replace("torch.", ""),
            "compute_dtype": str(model.manual_cast_dtype or patcher.model_dtype()).replace("torch.", ""),
            "unet_input_rel_diff": rel_err(seen["x"].float(), x), "unet_timestep": float(seen["t"].flatten()[0]),
            "ours_vs_comfyui_rel_err": rel_err(kept["ours"].float(), seen["out"].float()),
        }
        del patcher, model, ours, step, probe, seen, kept
        comfy.model_management.unload_all_models()
        release_memory()
    save_file(outputs, spec["outputs"])
    return out


def run_control(comfy, spec) -> dict:
    """A UNet step with a ControlNet and with a T2I-Adapter as ComfyUI's KSampler runs it after
    ControlNetApplyAdvanced (strength 1): the control's get_control on the step's input, then apply_model with its
    output; ComfyUI's T2I-Adapter keeps its features between steps as ours does. spec["control"]: {"controlnet",
    "t2i": files ComfyUI's ControlNetLoader reads, "hint": a safetensors file with "hint" (B, H, W, 3)}."""
    import torch
    from safetensors.torch import load_file, save_file

    import comfy.controlnet
    from mobilediffusion.control.adapter import adapter_skips
    from mobilediffusion.control.load import load_control
    from mobilediffusion.fast import PRECISIONS, optimize
    from mobilediffusion.loading import load_unet
    from mobilediffusion.memory import release_memory

    from .measure import time_alternating

    cfg, x, t, ctx = prepare(spec)
    hint = load_file(spec["control"]["hint"])["hint"].movedim(-1, 1)  # an IMAGE (B, H, W, 3) -> (B, 3, H, W)
    out, outputs = {}, {}
    for precision in spec["precisions"]:
        dtype = PRECISIONS[precision]
        row = {}
        with torch.inference_mode():
            patcher, load_s = load_comfy_unet(comfy, spec["weights"], precision)
            model = patcher.model
            ours = load_unet(spec["weights"], dtype=dtype, config=cfg.unet)
            levels, skips = adapter_skips(ours), ours.skip_count
            xo, co, ho = x.to(dtype), ctx.to(dtype), hint.to(dtype)
            for kind in ("controlnet", "t2i"):
                try:
                    control = comfy.controlnet.load_controlnet(spec["control"][kind])
                    if control is None:
                        raise ValueError("ControlNetLoader does not recognise the file")
                except Exception as e:  # noqa: BLE001 - e.g. a T2I layout ComfyUI builds only at SD widths
                    row[kind] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
                    continue
                c = control.copy().set_cond_hint(hint, 1.0, (0.0, 1.0))
                c.pre_run(model, lambda p: model.model_sampling.percent_to_sigma(p))
                step, probe = comfy_step(patcher, x, t, ctx, control=c)
                theirs = optimize(load_control(spec["control"][kind], base=ours), dtype=dtype)
                if kind == "controlnet":
                    def ours_step(m=theirs, ours=ours):
                        return ours(xo, t, co, control=m(xo, t, co, ho))
                else:
                    def ours_step(r=theirs(ho, levels, skips), ours=ours):
                        return ours(xo, t, co, control=r)
                ms = time_alternating({"comfyui": step, "ours": ours_step}, runs=spec["runs"], warmup=spec["warmup"])
                outputs[f"{kind}_{precision}"] = probe()["out"].float().contiguous()  # its raw UNet output
                row[kind] = {"ms": ms["comfyui"], "ours_ms": ms["ours"], "comfy_class": type(control).__name__}
                c.cleanup()
            row.update(load_s=load_s, weight_dtype=str(patcher.model_dtype()).replace("torch.", ""),
                       compute_dtype=str(model.manual_cast_dtype or patcher.model_dtype()).replace("torch.", ""))
        out[precision] = row
        patcher = model = ours = theirs = control = c = step = probe = None  # freed before the next precision
        comfy.model_management.unload_all_models()
        release_memory()
    save_file(outputs, spec["outputs"])
    return out


def _write(path: str, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
