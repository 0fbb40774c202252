"""CLI commands `export`, `run-bundle` and `export-lora`; `add_parser(subparsers)` registers them.

    mobilediffusion export --checkpoint PATH -o DIR --precision fp16 --sizes 512x512,512x768
    mobilediffusion run-bundle DIR "a red circle" -o out.png [--size 512x768] [--lora PACK:0.8]
    mobilediffusion export-lora style.safetensors --bundle DIR      (DIR/loras/style.lorapack)
    mobilediffusion export -o DIR --web     (also the web player: mobilediffusion serve-bundle DIR)
    mobilediffusion export -o DIR --control md-shapes-scribble --inpaint     (a control model; the image encoder)
    mobilediffusion run-bundle DIR "a red circle" -o out.png --control-image edges.png --image in.png --mask m.png

run-bundle does not import torch (it runs the bundle with numpy and the TFLite interpreter).
"""
from __future__ import annotations

from ..runtime.manifest import COMPONENTS, PRECISIONS
from ..runtime.sampler import SAMPLERS
from ..prompts import DEFAULT_CHUNKS
from .endtoend import DEFAULT_STEPS

SAMPLER_CHOICES = ("auto", *SAMPLERS)


def cmd_export(a) -> int:
    from tqdm import tqdm

    from ..cli_common import parse_lora, parse_size, parse_sizes
    from ..errors import ConfigError
    from .budget import parse_bytes
    from .convert import require_litert

    # 1. checks that need no model
    if a.size and a.sizes:
        raise ConfigError("give --size (one size) or --sizes (several), not both")
    width, height = parse_size(a.size) if a.size else (None, None)
    sizes = parse_sizes(a.sizes) if a.sizes else None
    budget = parse_bytes(a.budget) if a.budget else None
    components = tuple(c.strip() for c in a.components.split(",")) if a.components != "all" else COMPONENTS
    if a.batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {a.batch}")
    require_litert()
    if a.web:  # the player's npm packages before any heavy work
        from ..web import check_web_precision, prepare_player

        if set(components) != set(COMPONENTS):
            raise ConfigError("--web runs the whole bundle in the page; export all components (no --components)")
        check_web_precision(a.precision)
        prepare_player()
    loras = [parse_lora(spec) for spec in a.lora or ()]
    if a.end_to_end_steps < 0:
        raise ConfigError(f"--end-to-end-steps must be >= 0, got {a.end_to_end_steps}")
    # 2. model (loaded for this export only: converted in place and released component by component)
    from ..pipeline import load_pipeline

    pipe = load_pipeline(a.checkpoint, loras=loras, encoder=a.inpaint)
    control, control_source = None, None
    if a.control:
        from ..control.load import load_control, resolve_control

        path = resolve_control(a.control)
        control = load_control(path, base=pipe.unet)
        control_source = control_file_source(path)
    # 3. export with a progress bar over the stages (and each step of the end-to-end check)
    from .bundle import export_bundle, summary
    from .provenance import pipeline_source

    with tqdm(total=1, desc="export", unit="stage", disable=a.quiet) as bar:

        def progress(done, total, message):
            bar.total = total
            bar.set_description(message)
            bar.update(done - bar.n)

        path = export_bundle(
            pipe, a.output, a.precision, height=height, width=width, sizes=sizes, prompt_chunks=a.prompt_chunks,
            batch_size=a.batch, steps=a.steps,
            sampler=a.sampler, guidance=a.guidance, components=components, overwrite=a.overwrite,
            make_zip=a.zip, verify=not a.no_verify, ops_backend=a.ops_backend, progress=progress,
            end_to_end_steps=0 if a.no_end_to_end else a.end_to_end_steps, release_model=True, budget=budget,
            source=pipeline_source(pipe, a.checkpoint or "(embedded default)"), control=control,
            control_source=control_source, encoder=a.inpaint,
        )
    print(summary(path))
    if a.web:
        from ..web import write_player

        print(f"  web player: {write_player(path)} (open it with: mobilediffusion serve-bundle {path})")
    return 0


def control_file_source(path) -> dict:
    """What a manifest records of a control model's file: its name, sha256 and size."""
    from pathlib import Path

    from ..runtime.manifest import sha256_file

    p = Path(path)
    if p.is_dir():
        return {"file": p.name, "folder": True}
    return {"file": p.name, "sha256": sha256_file(p), "bytes": p.stat().st_size}


def cmd_export_lora(a) -> int:
    from .lora_pack import export_lora_pack

    path = export_lora_pack(a.lora, a.bundle, a.output, overwrite=a.overwrite)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MiB); run it with: mobilediffusion run-bundle {a.bundle} "
          f"PROMPT --lora {path}:STRENGTH")
    return 0


def cmd_run_bundle(a) -> int:
    from ..cli_common import check_output, parse_lora, parse_size, save_atomic
    from ..runtime import BundlePipeline, to_pil

    out = check_output(a.output)
    width, height = parse_size(a.size) if a.size else (None, None)
    loras = [parse_lora(spec, what="--lora", kind="LoRA pack (.lorapack)") for spec in a.lora or ()]
    pipe = BundlePipeline(a.bundle, num_threads=a.threads, loras=loras)
    images = pipe(a.prompt, a.negative, seed=a.seed, height=height, width=width, control_image=a.control_image,
                  control_strength=a.control_strength, control_start=a.control_start, control_end=a.control_end,
                  image=a.image, mask=a.mask)
    save_atomic(to_pil(images)[0], out)
    print(f"wrote {out} ({images.shape[2]}x{images.shape[1]}, seed {a.seed}, bundle {a.bundle})")
    return 0


def add_parser(subparsers) -> None:
    """Register `export` and `run-bundle` on the CLI's subparsers."""
    e = subparsers.add_parser("export", help="export a model to a verified TFLite device bundle")
    e.add_argument("-o", "--output", required=True, help="bundle folder to create")
    e.add_argument("--checkpoint", help="model file or folder (default: the embedded model)")
    e.add_argument("--precision", default="fp16", choices=PRECISIONS,
                   help="fp16 (default), fp32, int8_dynamic / int8_weight_only (int8 weights), int8_a16 (int8 "
                        "weights, int16 activations, calibrated: for NPUs)")
    e.add_argument("--size", help="WIDTHxHEIGHT or SIZE in pixels, fixed in the bundle (default: the model's)")
    e.add_argument("--sizes", help="several sizes in one bundle, WIDTHxHEIGHT separated by commas (the first is the "
                                   "default), e.g. 512x512,512x768,768x512: one signature per size, shared weights")
    e.add_argument("--prompt-chunks", type=int, default=DEFAULT_CHUNKS, metavar="K",
                   help=f"longest prompt the bundle takes, in chunks of 75 tokens (default {DEFAULT_CHUNKS}; a UNet "
                        "signature per context length)")
    e.add_argument("--batch", type=int, default=1, help="images per run, fixed in the bundle")
    e.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    e.add_argument("--sampler", default="auto", choices=SAMPLER_CHOICES, help="sampler baked into the bundle")
    e.add_argument("--guidance", type=float, help="classifier-free guidance; > 1 doubles the UNet batch")
    e.add_argument("--components", default="all",
                   help=f"'all' or a comma list of {', '.join(COMPONENTS)} (the runtime needs all three)")
    e.add_argument("--budget", metavar="SIZE", help="memory one generation may take on the device, e.g. 2GB: refused "
                   "before converting when the precision cannot fit (naming one that does), checked after")
    e.add_argument("--zip", action="store_true", help="also write DIR.zip")
    e.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    e.add_argument("--no-verify", action="store_true", help="skip the interpreter-vs-torch checks (all of them) and "
                   "the memory measurement")
    e.add_argument("--no-end-to-end", action="store_true", help="skip the end-to-end check (the components "
                   "are still checked)")
    e.add_argument("--end-to-end-steps", type=int, default=DEFAULT_STEPS, metavar="N",
                   help=f"sampling steps the end-to-end check runs, bundle vs torch (default {DEFAULT_STEPS}; the "
                        "sampler's coefficients are checked over all steps)")
    e.add_argument("--ops-backend", default="export", choices=("export", "reference"),
                   help="export: fused-op composites for the GPU delegate; reference: plain builtins")
    e.add_argument("--lora", action="append", metavar="FILE[:STRENGTH]",
                   help="bake a LoRA into the bundle (strength default 1.0; repeatable); the manifest records it")
    e.add_argument("--web", action="store_true",
                   help="also write the web player (LiteRT.js) into DIR/web; needs Node.js and npm")
    e.add_argument("--control", metavar="FILE",
                   help="a ControlNet or T2I-Adapter to write as the bundle's control component (or the name of a "
                        "shipped one, e.g. md-shapes-scribble); its UNet takes the control's residuals")
    e.add_argument("--inpaint", action="store_true",
                   help="also write the image encoder: run-bundle --image/--mask repaints part of an image "
                        "(always for a 9-channel inpainting model)")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_export)

    r = subparsers.add_parser("run-bundle", help="run an exported bundle without torch")
    r.add_argument("bundle", help="bundle folder (or .zip)")
    r.add_argument("prompt")
    r.add_argument("-o", "--output", required=True, help="image file to write (.png)")
    r.add_argument("--negative", default="", help="negative prompt (bundles exported with guidance > 1)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--size", help="WIDTHxHEIGHT: one of the bundle's sizes (default: its first; `info` lists them)")
    r.add_argument("--threads", type=int, help="interpreter threads (default: the interpreter's)")
    r.add_argument("--lora", action="append", metavar="PACK[:STRENGTH]",
                   help="a LoRA pack made for this bundle (export-lora), patched in at load (strength default 1.0; "
                        "repeatable)")
    r.add_argument("--control-image", metavar="IMAGE",
                   help="the control image (edges, scribble, ...) of a bundle exported with --control")
    r.add_argument("--control-strength", type=float, default=1.0, help="control strength (default 1.0)")
    r.add_argument("--control-start", type=float, default=0.0, help="fraction of the schedule where the control "
                   "starts (default 0)")
    r.add_argument("--control-end", type=float, default=1.0, help="... and ends (default 1)")
    r.add_argument("--image", help="an image to repaint (bundles exported with --inpaint); needs --mask")
    r.add_argument("--mask", help="the mask: white = repaint, black = keep")
    r.set_defaults(func=cmd_run_bundle)

    p = subparsers.add_parser("export-lora", help="a LoRA pack for a bundle: the LoRA switched on at run time")
    p.add_argument("lora", help="LoRA file (any format the loader reads: kohya, LyCORIS, diffusers, PEFT, ComfyUI)")
    p.add_argument("--bundle", required=True, help="the bundle folder the pack is for")
    p.add_argument("-o", "--output", help="pack file to write (default: BUNDLE/loras/<lora name>.lorapack, which the "
                                          "web player lists)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing pack")
    p.set_defaults(func=cmd_export_lora)
