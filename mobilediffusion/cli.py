"""Command line: `mobilediffusion generate|info ...`. Errors print one line and exit non-zero."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

from .errors import ConfigError, MobileDiffusionError

VOCABULARY_NOTICE = (
    "note: the embedded default model only knows simple shapes: one {colours} {shapes} at a position of a 3x3 grid "
    "({positions}) on a white background, e.g. \"a red circle in the top left on a white background\". This prompt "
    "is outside that vocabulary, so the image will not follow it. Load other weights with --checkpoint PATH."
)


def parse_size(text: str) -> tuple[int, int]:
    """'512x384' -> (width, height); '512' -> (512, 512)."""
    parts = text.lower().split("x")
    try:
        if len(parts) == 1:
            return int(parts[0]), int(parts[0])
        if len(parts) == 2:
            return int(parts[0]), int(parts[1])
    except ValueError:
        pass
    raise ConfigError(f"--size takes WIDTHxHEIGHT like 512x512, got {text!r}")


def _check_output(path: str) -> Path:
    out = Path(path)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise ConfigError(f"output must end in .png, .jpg or .webp, got {out.name!r}")
    if not out.parent.exists():
        raise ConfigError(f"the output folder {out.parent} does not exist; create it first")
    return out


def _save_atomic(image, out: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.stem}.", suffix=out.suffix)
    os.close(fd)
    try:
        image.save(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def cmd_generate(a) -> int:
    from tqdm import tqdm

    from .pipeline import load_pipeline

    # 1. everything that can be checked without loading a model
    out = _check_output(a.output)
    size = parse_size(a.size) if a.size else None
    if a.steps is not None and a.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {a.steps}")
    # 2. model
    pipe = load_pipeline(a.checkpoint)
    if a.checkpoint is None:  # the default knows the synthetic scenes' words only
        from .train.data import SceneConfig, parse_caption

        vocab = SceneConfig()
        if parse_caption(a.prompt, vocab) is None:
            print(VOCABULARY_NOTICE.format(colours="/".join(vocab.colours), shapes="/".join(vocab.shapes),
                                           positions=", ".join(vocab.positions)), file=sys.stderr)
    cfg = pipe.config
    width, height = size or (cfg.resolution, cfg.resolution)
    steps = a.steps if a.steps is not None else cfg.default_steps
    guidance = a.guidance if a.guidance is not None else cfg.default_guidance
    pipe.check_request(steps=steps, height=height, width=width, sampler=a.sampler)
    # 3. sample with a progress bar
    with tqdm(total=steps, desc="sampling", unit="step", disable=a.quiet) as bar:
        images = pipe(
            a.prompt, negative_prompt=a.negative, steps=steps, guidance=guidance, seed=a.seed,
            height=height, width=width, sampler=a.sampler, callback=lambda i, n, x: bar.update(1),
        )
    _save_atomic(images[0], out)
    print(f"wrote {out} ({width}x{height}, {steps} step{'s' * (steps != 1)}, seed {a.seed})")
    return 0


def cmd_info(a) -> int:
    from .config import get_preset
    from .info import describe, describe_bundle, is_bundle

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
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="what a checkpoint, an exported bundle (or --preset name) is")
    i.add_argument("path", help="checkpoint file/folder, bundle folder, or a preset name with --preset")
    i.add_argument("--preset", action="store_true", help="PATH is a preset name")
    i.set_defaults(func=cmd_info)

    from .bench import add_parser as add_bench_parser
    from .export.cli import add_parser as add_export_parsers
    from .train.cli import add_parser as add_train_parser

    add_export_parsers(sub)  # export, run-bundle
    add_bench_parser(sub)  # bench
    add_train_parser(sub)  # train
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return a.func(a)
    except MobileDiffusionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
