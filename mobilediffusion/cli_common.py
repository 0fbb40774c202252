"""What the CLI commands share (mobilediffusion/cli.py and the export/bundle commands): sizes and LoRAs given
as text, output paths checked before any work, images written atomically."""
from __future__ import annotations

import os
from pathlib import Path

from .atomic import atomic_file
from .errors import ConfigError, MobileDiffusionError


def parse_size(text: str, *, what: str = "--size") -> tuple[int, int]:
    """'512x384' -> (width, height); '512' -> (512, 512)."""
    parts = text.strip().lower().split("x")
    try:
        if len(parts) == 1:
            return int(parts[0]), int(parts[0])
        if len(parts) == 2:
            return int(parts[0]), int(parts[1])
    except ValueError:
        pass
    raise ConfigError(f"{what} takes WIDTHxHEIGHT like 512x512, got {text!r}")


def parse_sizes(text: str, *, what: str = "--sizes") -> list[tuple[int, int]]:
    """'512x512,512x768' -> [(height, width), ...] in the order given (the first is the default)."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        try:
            width, height = parse_size(part)
        except ConfigError:
            raise ConfigError(f"{what} takes WIDTHxHEIGHT sizes separated by commas like 512x512,512x768, got "
                              f"{text!r}") from None
        out.append((height, width))
    return out


def check_output(path: str) -> Path:
    out = Path(path)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise ConfigError(f"output must end in .png, .jpg or .webp, got {out.name!r}")
    if not out.parent.exists():
        raise ConfigError(f"the output folder {out.parent} does not exist; create it first")
    return out


def save_atomic(image, out: Path) -> None:
    """A PIL image to `out` (atomically), in the format its suffix names."""
    from PIL import Image

    with atomic_file(out) as tmp:  # the temporary ends in .tmp, so PIL is told the format
        image.save(tmp, format=Image.registered_extensions()[out.suffix.lower()])


__all__ = ["parse_size", "parse_sizes", "check_output", "save_atomic", "parse_lora"]


def parse_lora(text: str, *, what: str = "--lora", kind: str = "LoRA file (.safetensors)") -> tuple[str, float]:
    """'style.safetensors:0.8' -> (path, 0.8); 'style.safetensors' -> (path, 1.0). A path that exists as
    written wins over reading a strength after its last colon."""
    from .lora_strength import check_strength

    path, colon, tail = text.rpartition(":")
    if not colon or not path or os.path.exists(text):
        path, strength = text, 1.0
    else:
        try:
            strength = float(tail)
        except ValueError:
            raise ConfigError(f"{what} takes FILE or FILE:STRENGTH with a number for STRENGTH, got {text!r}") from None
    try:
        strength = check_strength(strength)
    except MobileDiffusionError as e:
        raise ConfigError(f"{what} {text}: {e}") from None
    if not os.path.isfile(path):
        raise ConfigError(f"{what} {text}: no such file {path!r}; give a {kind}")
    return path, strength


def parse_control(text: str) -> tuple[str, str, float]:
    """'canny.safetensors:edges.png:0.8' -> (control model, image, 0.8); without ':STRENGTH' the strength is 1.0.
    Both files must exist."""
    from .lora_strength import check_strength

    head, strength = text, 1.0
    rest, colon, tail = text.rpartition(":")
    if colon and ":" in rest:
        try:
            head, strength = rest, float(tail)
        except ValueError:
            pass
    model, colon, image = head.partition(":")
    if not colon or not model or not image:
        raise ConfigError(f"--control takes CONTROL_MODEL:IMAGE[:STRENGTH], got {text!r}")
    try:
        strength = check_strength(strength)
    except MobileDiffusionError as e:
        raise ConfigError(f"--control {text}: {e}") from None
    from .control.load import shipped_controls

    if not os.path.exists(model) and model not in shipped_controls():
        raise ConfigError(f"--control {text}: no such file {model!r}; give a ControlNet or T2I-Adapter file or "
                          f"folder, or a shipped plugin ({', '.join(shipped_controls()) or 'none'})")
    if not os.path.exists(image):
        raise ConfigError(f"--control {text}: no such file {image!r}; give a control image")
    return model, image, strength
