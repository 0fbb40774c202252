"""Load time of SD1.5: "ready to sample" in a fresh process, ours against diffusers and ComfyUI on the same files.

    rows = load_rows("/tmp/md-load", precisions=("fp32", "bf16"), comfyui="/path/to/ComfyUI")

Ready to sample: the model built, its weights in place, our fast path applied and the tokenizer loaded
(ours packs oneDNN weights at the first call, which is not counted; the others have no such step).
Files, written once into the work folder (~2 GB each; random weights: load time does not depend on values):
- sd15-fp16.safetensors: an SD1.5 single file in fp16 with what the released file holds (UNet, CLIP text
  encoder, VAE decoder and encoder): `save_single_file` of build_pipeline(sd15) plus a VAE encoder.
- sd15-diffusers/: a diffusers folder (fp16 .safetensors) from diffusers' save_pretrained.
Loaders, each in its own Python process (torch threads fixed, imports not counted):
- ours: mobilediffusion.load_pipeline(path, dtype=...)
- diffusers: StableDiffusionPipeline.from_single_file(file, config=<the folder>, local_files_only=True),
  which needs no hub access given the folder's configs and tokenizer, and .from_pretrained(folder);
  torch_dtype=... (diffusers keeps the models as they are; no fast path)
- comfyui: comfy.sd.load_checkpoint_guess_config(file) with --cpu --{fp32,bf16}-{unet,vae,text-enc}, then
  model_management.load_models_gpu (what the first KSampler run does), in ComfyUI's own Python.
Cold: the files' pages dropped from the page cache first (posix_fadvise DONTNEED on those files only);
warm: right after, the median of `warm_runs`. Each row also gives the process's peak RSS.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

SINGLE = "sd15-fp16.safetensors"
FOLDER = "sd15-diffusers"
LOADERS = ("ours", "diffusers", "comfyui")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


# --------------------------------------------------------------------------- the files
def ensure_files(workdir) -> tuple[Path, Path]:
    """(single file, diffusers folder) in `workdir`, written if missing."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    single, folder = workdir / SINGLE, workdir / FOLDER
    if not (folder / "model_index.json").is_file():
        write_diffusers_folder(folder)
    if not single.is_file():
        write_single_file(single, folder)
    return single, folder


def write_diffusers_folder(folder: Path) -> None:
    """A diffusers SD1.5 pipeline folder with random weights in fp16 (no safety checker)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from ..presets import get_preset
    from ..text_encoder import PACKAGED_TOKENIZER
    from ..weights.unet_keys import unet_config_to_diffusers
    from ..weights.vae_keys import decoder_config_to_diffusers

    cfg = get_preset("sd15")
    torch.manual_seed(0)
    _, vae_kwargs = decoder_config_to_diffusers(cfg.decoder)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**vae_kwargs), text_encoder=CLIPTextModel(cfg.text.to_transformers()),
        tokenizer=CLIPTokenizer.from_pretrained(str(PACKAGED_TOKENIZER)),
        unet=UNet2DConditionModel(**_as_released(unet_config_to_diffusers(cfg.unet))),
        scheduler=PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                skip_prk_steps=True, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)


def _as_released(kwargs: dict) -> dict:
    """The UNet config as SD1.5's released unet/config.json spells it: per-level lists that repeat one value
    as that value (diffusers' from_single_file reads layers_per_block as an int)."""
    return {k: v[0] if k in ("layers_per_block", "attention_head_dim") and isinstance(v, (list, tuple))
            and len(set(v)) == 1 else v for k, v in kwargs.items()}


# diffusers' AutoencoderKL encoder names -> the LDM names an SD single file uses (first_stage_model.*)
def _encoder_keymap():
    from ..weights.keymap import KeyMap

    return KeyMap("diffusers VAE encoder -> LDM", (
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.conv_shortcut\.(.+)", r"encoder.down.\1.block.\2.nin_shortcut.\3"),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", r"encoder.down.\1.block.\2.\3"),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", r"encoder.down.\1.downsample.conv.\2"),
        (r"encoder\.mid_block\.resnets\.0\.(.+)", r"encoder.mid.block_1.\1"),
        (r"encoder\.mid_block\.resnets\.1\.(.+)", r"encoder.mid.block_2.\1"),
        (r"encoder\.mid_block\.attentions\.0\.group_norm\.(.+)", r"encoder.mid.attn_1.norm.\1"),
        (r"encoder\.mid_block\.attentions\.0\.to_(q|k|v)\.(.+)", r"encoder.mid.attn_1.\1.\2"),
        (r"encoder\.mid_block\.attentions\.0\.to_out\.0\.(.+)", r"encoder.mid.attn_1.proj_out.\1"),
        (r"encoder\.conv_norm_out\.(.+)", r"encoder.norm_out.\1"),
        (r"(encoder\.conv_(?:in|out)\..+|quant_conv\..+)", r"\1"),
        (r"(?:decoder|post_quant_conv)\..+", None),
    ))


def write_single_file(path: Path, folder: Path) -> None:
    """Our SD1.5 (random weights) in the single-file layout, fp16, with the folder's VAE encoder added."""
    import torch
    from safetensors.torch import save_file

    from ..atomic import atomic_file
    from ..pipeline import build_pipeline
    from ..presets import get_preset
    from ..weights.io import read_tensors
    from ..weights.single_file import single_file_tensors

    tensors = {k: v.detach().to(torch.float16).contiguous()
               for k, v in single_file_tensors(build_pipeline(get_preset("sd15"))).items()}
    encoder = _encoder_keymap().apply(read_tensors(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    for k, v in encoder.items():
        if ".attn_1." in k and k.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        tensors["first_stage_model." + k] = v.to(torch.float16).contiguous()
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})


# --------------------------------------------------------------------------- one timed load
OURS_CODE = """
import json, resource, sys, time
spec = json.loads(sys.argv[1])
t0 = time.perf_counter()
import torch
from mobilediffusion import load_pipeline
from transformers import CLIPTextModel, CLIPTokenizer  # imported before t1 as the peers' code does (comfy.sd, diffusers)
torch.set_num_threads(spec["threads"])
t1 = time.perf_counter()
pipe = load_pipeline(spec["path"], dtype=getattr(torch, spec["dtype"]))
pipe.text_encoder.tokenizer
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

DIFFUSERS_CODE = """
import json, resource, sys, time
spec = json.loads(sys.argv[1])
t0 = time.perf_counter()
import torch
from diffusers import StableDiffusionPipeline
torch.set_num_threads(spec["threads"])
t1 = time.perf_counter()
dtype = getattr(torch, spec["dtype"])
if spec["path"].endswith(".safetensors"):
    pipe = StableDiffusionPipeline.from_single_file(spec["path"], config=spec["folder"], local_files_only=True,
                                                    torch_dtype=dtype, safety_checker=None)
else:
    pipe = StableDiffusionPipeline.from_pretrained(spec["path"], local_files_only=True, torch_dtype=dtype,
                                                   safety_checker=None)
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "dtype": str(pipe.unet.dtype),
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

COMFYUI_CODE = """
import json, os, resource, sys, time
spec = json.loads(sys.argv[1])
sys.path.insert(0, spec["comfyui"])
os.chdir(spec["comfyui"])
p = spec["precision"]
sys.argv = ["main.py", "--cpu", f"--{p}-unet", f"--{p}-vae", f"--{p}-text-enc"]
t0 = time.perf_counter()
import comfy.options
comfy.options.enable_args_parsing()
import torch
import comfy.sd, comfy.model_management
torch.set_num_threads(spec["threads"])
t1 = time.perf_counter()
model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(spec["path"], output_vae=True, output_clip=True)
t2 = time.perf_counter()
comfy.model_management.load_models_gpu([model])  # what the first KSampler run does before sampling
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t3 - t1, "checkpoint_s": t2 - t1, "dtype": str(model.model_dtype()),
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def drop_from_page_cache(paths) -> None:
    """Ask the kernel to drop these files' cached pages (POSIX_FADV_DONTNEED; other files are untouched)."""
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run_once(loader: str, path: Path, precision: str, *, folder: Path, threads: int, comfyui=None,
             comfyui_python=None) -> dict:
    """One load in a fresh process -> {"load_s", "import_s", "rss_mb", ...}."""
    spec = {"path": str(path), "folder": str(folder), "dtype": DTYPES[precision], "precision": precision,
            "threads": threads, "comfyui": str(comfyui) if comfyui else None}
    code = {"ours": OURS_CODE, "diffusers": DIFFUSERS_CODE, "comfyui": COMFYUI_CODE}[loader]
    python = comfyui_python if loader == "comfyui" else sys.executable
    env = dict(os.environ)
    if loader == "ours":  # this package's code, wherever it is imported from
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    out = subprocess.run([python, "-c", code, json.dumps(spec)], capture_output=True, text=True, env=env,
                         check=False)
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit code {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- rows
def load_rows(workdir, precisions=("fp32", "bf16"), *, loaders=LOADERS, layouts=("single_file", "diffusers_folder"),
              warm_runs: int = 3, threads: int = 2, comfyui=None, comfyui_python=None) -> list[dict]:
    """One row per layout x precision x loader: cold s, warm s (median), peak RSS; see the module docstring.
    ComfyUI reads single files only; a loader that cannot run here gets a row with `skipped` saying why."""
    single, folder = ensure_files(workdir)
    comfyui_python = comfyui_python or (_comfy_python(comfyui) if comfyui else None)
    rows = []
    for layout in layouts:
        path = single if layout == "single_file" else folder
        for precision in precisions:
            todo = []
            for loader in loaders:
                why = _why_skip(loader, layout, comfyui, comfyui_python)
                if why:
                    rows.append({"layout": layout, "precision": precision, "loader": loader, "skipped": why})
                else:
                    todo.append(loader)
            results = {loader: {"warm": []} for loader in todo}
            for loader in todo:  # cold: each loader after dropping the files from the page cache
                drop_from_page_cache([path, folder] if layout == "single_file" else [path])
                results[loader]["cold"] = run_once(loader, path, precision, folder=folder, threads=threads,
                                                   comfyui=comfyui, comfyui_python=comfyui_python)
            for r in range(warm_runs):  # warm: alternating, the order reversed every other round
                for loader in (todo if r % 2 == 0 else todo[::-1]):
                    results[loader]["warm"].append(run_once(loader, path, precision, folder=folder, threads=threads,
                                                            comfyui=comfyui, comfyui_python=comfyui_python))
            for loader in todo:
                cold, warm = results[loader]["cold"], results[loader]["warm"]
                errors = [x["error"] for x in [cold, *warm] if "error" in x]
                if errors:
                    rows.append({"layout": layout, "precision": precision, "loader": loader, "error": errors[0]})
                    continue
                rows.append({"layout": layout, "precision": precision, "loader": loader,
                             "cold_s": cold["load_s"], "warm_s": statistics.median(x["load_s"] for x in warm),
                             "import_s": statistics.median(x["import_s"] for x in warm),
                             "rss_mb": max(x["rss_mb"] for x in [cold, *warm]),
                             "model_dtype": cold.get("dtype", DTYPES[precision])})
    return rows


def _comfy_python(comfyui) -> str | None:
    """ComfyUI's venv python next to its folder (../venv/bin/python), else this Python."""
    cand = Path(comfyui).resolve().parent / "venv" / "bin" / "python"
    return str(cand) if cand.is_file() else sys.executable


def _why_skip(loader, layout, comfyui, comfyui_python) -> str | None:
    if loader == "comfyui":
        if comfyui is None:
            return "no ComfyUI folder given (--comfyui PATH)"
        if layout != "single_file":
            return "ComfyUI's CheckpointLoaderSimple reads single files"
        if not (Path(comfyui) / "comfy" / "sd.py").is_file():
            return f"{comfyui} is not a ComfyUI folder (no comfy/sd.py)"
    if loader == "diffusers":
        import importlib.util

        if importlib.util.find_spec("diffusers") is None:
            return "diffusers is not installed (pip install diffusers)"
    return None


def format_rows(rows: list[dict]) -> list[str]:
    lines = [f"{'load SD1.5':18s} {'prec':5s} {'loader':10s} {'cold s':>7s} {'warm s':>7s} {'vs ours':>7s} "
             f"{'RSS MB':>7s}  model dtype"]
    ours = {(r["layout"], r["precision"]): r["warm_s"] for r in rows if r["loader"] == "ours" and "warm_s" in r}
    for r in rows:
        head = f"{r['layout']:18s} {r['precision']:5s} {r['loader']:10s}"
        if "warm_s" not in r:
            lines.append(f"{head} ({r.get('skipped') or 'failed: ' + r.get('error', '')})")
            continue
        base = ours.get((r["layout"], r["precision"]))
        ratio = f"{r['warm_s'] / base:7.2f}" if base else f"{'-':>7s}"
        lines.append(f"{head} {r['cold_s']:7.2f} {r['warm_s']:7.2f} {ratio} {r['rss_mb']:7.0f}  {r['model_dtype']}")
    return lines


# --------------------------------------------------------------------------- as a `bench` section
def add_arguments(parser) -> None:
    parser.add_argument("--load", metavar="DIR", default=None,
                        help="load times of an SD1.5 single file and diffusers folder (written into DIR once, ~4 GB), "
                             "ours vs diffusers (and ComfyUI with --comfyui), in each precision, cold and warm")


def check(args) -> None:
    from ..errors import ConfigError

    if getattr(args, "load", None) and not Path(args.load).resolve().parent.is_dir():
        raise ConfigError(f"--load {args.load}: its parent folder does not exist; create it first")


def enabled(args) -> bool:
    return bool(getattr(args, "load", None))


def run(args, bench) -> dict:
    """`bench`: the request (precisions, print(line)); ComfyUI from args.comfyui / args.comfyui_python."""
    rows = load_rows(args.load, bench.precisions, threads=args.threads or 2, comfyui=getattr(args, "comfyui", None),
                     comfyui_python=getattr(args, "comfyui_python", None))
    for line in format_rows(rows):
        bench.print(line)
    return {"load": rows}


__all__ = ["ensure_files", "load_rows", "run_once", "drop_from_page_cache", "format_rows", "add_arguments", "check",
           "enabled", "run"]
