"""Command line: `mobilediffusion generate|info ...`. Errors print one line and exit non-zero."""
from __future__ import annotations

import argparse
import os
import sys

from .cli_common import check_output, parse_control, parse_lora, parse_size, save_atomic
from .errors import ConfigError, MobileDiffusionError

VOCABULARY_NOTICE = (
    "note: the embedded default model only knows simple shapes: one {colours} {shapes} at a position of a 3x3 grid "
    "({positions}) on a white background, e.g. \"a red circle in the top left on a white background\"{pairs}. This "
    "prompt is outside that vocabulary, so the image will not follow it. Load other weights with --checkpoint PATH."
)
PAIRS_NOTICE = ", or two of them {relations} each other (\"a red circle left of a blue square on a white background\")"


def cmd_generate(a) -> int:
    from tqdm import tqdm

    from .pipeline import load_pipeline

    # 1. everything that can be checked without loading a model
    out = check_output(a.output)
    size = parse_size(a.size) if a.size else None
    if a.steps is not None and a.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {a.steps}")
    loras = [parse_lora(spec) for spec in a.lora or ()]
    controls = [parse_control(spec) for spec in a.control or ()]
    for flag, path in (("--image", a.image), ("--mask", a.mask)):
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"{flag} {path}: no such file; give an image file")
    if a.mask and not a.image:
        raise ConfigError("--mask needs --image (the picture to repaint)")
    if a.denoise is not None and not a.image:
        raise ConfigError("--denoise needs --image (img2img)")
    from .fast import INT8, check_precision

    if a.precision != INT8:
        check_precision(a.precision)  # unknown or missing here: says which and what to use
    if a.calibrate and a.precision != INT8:
        raise ConfigError("--calibrate is for --precision int8 (static int8 scales); leave it out or add "
                          "--precision int8")
    # 2. model (and control models, checked against it)
    pipe = load_pipeline(a.checkpoint, loras=loras, encoder=bool(a.image), dtype=a.precision,
                         calibration=a.calibrate or None)
    if controls:
        from .control.load import load_control, resolve_control

        controls = [(load_control(resolve_control(model), base=pipe.unet), image, strength)
                    for model, image, strength in controls]
    if a.checkpoint is None:  # the default knows the synthetic scenes' words only
        from .train.config import default_config_path, load_stage_config
        from .train.data import parse_caption

        vocab = load_stage_config(default_config_path("diffusion")).data  # the scenes the default learnt
        if parse_caption(a.prompt, vocab) is None:
            pairs = PAIRS_NOTICE.format(relations="/".join(vocab.relations)) if vocab.pair_fraction > 0 else ""
            print(VOCABULARY_NOTICE.format(colours="/".join(vocab.colours), shapes="/".join(vocab.shapes),
                                           positions=", ".join(vocab.positions), pairs=pairs), file=sys.stderr)
    cfg = pipe.config
    if a.image:
        from .control.apply import as_hint

        picture = as_hint(a.image)
        width, height = size or (picture.shape[3], picture.shape[2])
    else:
        width, height = size or (cfg.resolution, cfg.resolution)
    steps = a.steps if a.steps is not None else cfg.default_steps
    guidance = a.guidance if a.guidance is not None else cfg.default_guidance
    pipe.check_request(steps=steps, height=height, width=width, sampler=a.sampler)
    # 3. sample with a progress bar
    with tqdm(total=steps, desc="sampling", unit="step", disable=a.quiet) as bar:
        images = pipe(
            a.prompt, negative_prompt=a.negative, steps=steps, guidance=guidance, seed=a.seed,
            height=height, width=width, sampler=a.sampler, callback=lambda i, n, x: bar.update(1), control=controls,
            image=a.image, mask=a.mask, denoise=1.0 if a.denoise is None else a.denoise,
        )
    save_atomic(images[0], out)
    print(f"wrote {out} ({width}x{height}, {steps} step{'s' * (steps != 1)}, seed {a.seed})")
    return 0


def cmd_preprocess(a) -> int:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from .control.preprocess import canny, scribble

    out = check_output(a.output)
    try:
        with Image.open(a.image) as im:
            picture = np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError) as e:
        raise ConfigError(f"{a.image} cannot be read as an image ({e})") from None
    if a.kind == "canny":
        edges = canny(picture, a.low, a.high)
    else:
        edges = scribble(picture, a.threshold, a.thickness)
    save_atomic(Image.fromarray((np.repeat(edges[..., None], 3, -1) * 255).astype(np.uint8)), out)
    print(f"wrote {out} ({a.kind}, {edges.shape[1]}x{edges.shape[0]}, {int(edges.sum())} line pixels)")
    return 0


def cmd_info(a) -> int:
    from .info import describe, describe_bundle, is_bundle
    from .presets import get_preset

    if not a.preset and is_bundle(a.path):
        print(describe_bundle(a.path))
        return 0
    if a.preset:
        cfg, source = get_preset(a.path), f"preset {a.path}"
    else:
        from .loading import load_model_config

        cfg, source = load_model_config(a.path), a.path
    print(describe(cfg, source))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mobilediffusion", description="Efficient text-to-image (MobileDiffusion).")
    p.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="make an image from a prompt")
    g.add_argument("prompt")
    g.add_argument("-o", "--output", required=True, help="image file to write (.png)")
    g.add_argument("--checkpoint", help="model file or folder (default: the embedded model)")
    g.add_argument("--negative", default="", help="negative prompt (used when guidance > 1)")
    g.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale; <= 1 disables it")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--size", help="WIDTHxHEIGHT in pixels (default: the model's resolution)")
    g.add_argument("--sampler", default="auto", help="onestep, ddim, euler, euler_ancestral, dpmpp_2m, lcm")
    g.add_argument("--lora", action="append", metavar="FILE[:STRENGTH]",
                   help="merge a LoRA (strength -100..100, default 1.0); repeat for several. An LCM-LoRA wants "
                        "--sampler lcm, few steps and guidance 1-2")
    g.add_argument("--control", action="append", metavar="MODEL:IMAGE[:STRENGTH]",
                   help="a ControlNet or T2I-Adapter (file or diffusers folder) with its control image (an edge map, "
                        "scribble, depth map... fitted to the picture's size), strength default 1.0; repeat for "
                        "several (they add up)")
    g.add_argument("--image", help="start from this picture: img2img with --denoise, inpainting with --mask (its "
                                   "size unless --size)")
    g.add_argument("--mask", help="inpainting mask for --image: white repaints, black keeps")
    g.add_argument("--denoise", type=float, help="how much of --image to change, in (0, 1] (default 1 with --mask)")
    g.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16", "int8"),
                   help="fp32 (default), bf16 (about 2x faster on CPUs with AVX512-BF16), fp16, or int8 (CPUs with "
                        "VNNI: the UNet's and decoder's convolutions and linears in int8 in a bf16 model; bf16 where "
                        "int8 cannot run)")
    g.add_argument("--calibrate", action="append", metavar="PROMPT",
                   help="with --precision int8: a prompt like the ones to come (repeatable); the int8 layers then use "
                        "static scales measured on these prompts, cached per checkpoint")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_generate)

    pp = sub.add_parser("preprocess", help="a control image from a picture, without a model: canny edges (as "
                                           "ComfyUI's Canny node) or scribble lines")
    pp.add_argument("kind", choices=["canny", "scribble"])
    pp.add_argument("image")
    pp.add_argument("-o", "--output", required=True, help="image file to write (.png)")
    pp.add_argument("--low", type=float, default=0.4, help="canny: lower threshold (ComfyUI's default 0.4)")
    pp.add_argument("--high", type=float, default=0.8, help="canny: upper threshold (ComfyUI's default 0.8)")
    pp.add_argument("--threshold", type=float, default=0.5, help="scribble: strokes darker than this")
    pp.add_argument("--thickness", type=int, default=1, help="scribble: pixels added on each side of a stroke")
    pp.set_defaults(func=cmd_preprocess)

    i = sub.add_parser("info", help="what a checkpoint, an exported bundle (or --preset name) is")
    i.add_argument("path", help="checkpoint file/folder, bundle folder, or a preset name with --preset")
    i.add_argument("--preset", action="store_true", help="PATH is a preset name")
    i.set_defaults(func=cmd_info)

    from .benchmarks.cli import add_parser as add_bench_parser
    from .export.cli import add_parser as add_export_parsers
    from .train.cli import add_parser as add_train_parser
    from .web.cli import add_parser as add_web_parsers

    add_export_parsers(sub)  # export, run-bundle
    add_bench_parser(sub)  # bench
    add_train_parser(sub)  # train
    add_web_parsers(sub)  # web, serve-bundle
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    from .quiet import configure_cli_logging

    configure_cli_logging(a.verbose)
    try:
        return a.func(a)
    except MobileDiffusionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130


def entry() -> None:
    """The console script: main() with native libraries' stderr chatter detached unless -v."""
    argv = sys.argv[1:]
    if not {"-v", "--verbose"} & set(argv):
        from .quiet import detach_c_stderr

        detach_c_stderr()
    sys.exit(main(argv))


if __name__ == "__main__":
    entry()
