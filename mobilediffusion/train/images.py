"""Training images as people have them, made uniform: decoded to RGB uint8 whatever the file (EXIF rotation applied,
CMYK, 16-bit, greyscale, palette and transparent images converted), then fitted to an aspect-ratio bucket.

    rgb = decode(path_or_bytes)                       # uint8 (H, W, 3); UnreadableImage when it is not an image
    cfg = BucketConfig(resolution=512)                # sides in 64 px steps, area <= 512 x 512, never upscaled
    size = bucket_for(width, height, cfg)             # (W, H), or None when the image is smaller than every bucket
    x = fit_to_bucket(rgb, size, cfg, rng)            # uint8 (H, W, 3): downscaled to cover, cropped, maybe flipped

numpy and PIL only.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ConfigError

CROPS = ("center", "random")


class UnreadableImage(Exception):
    """A file that is not an image PIL can decode (the sources count and skip it)."""


@dataclass(frozen=True)
class BucketConfig:
    """Aspect-ratio buckets: (W, H) multiples of `step` with W * H <= resolution**2 and sides ratio <= max_ratio."""

    resolution: int = 512  # the square side whose area every bucket keeps within
    step: int = 64  # bucket sides are multiples of this
    max_ratio: float = 2.0  # longest side / shortest side of a bucket
    crop: str = "center"  # "center" or "random" (where the bucket's window sits in the resized image)
    flip: bool = False  # mirror half of the images left-right

    def __post_init__(self):
        if self.step < 8 or self.resolution < self.step or self.resolution % self.step:
            raise ConfigError(f"bucket resolution must be a multiple of step (>= 8), got {self.resolution} and "
                              f"{self.step}")
        if self.max_ratio < 1:
            raise ConfigError(f"bucket max_ratio must be >= 1, got {self.max_ratio}")
        if self.crop not in CROPS:
            raise ConfigError(f"crop must be one of {CROPS}, got {self.crop!r}")


def buckets(cfg: BucketConfig) -> list[tuple[int, int]]:
    """Every (W, H) bucket of `cfg`, the square first."""
    limit, s = cfg.resolution ** 2, cfg.step
    out = [(cfg.resolution, cfg.resolution)]
    for w in range(s, limit // s + 1, s):
        h = (limit // w) // s * s
        if h >= s and max(w, h) / min(w, h) <= cfg.max_ratio and (w, h) not in out:
            out.append((w, h))
    return out


def bucket_for(width: int, height: int, cfg: BucketConfig) -> tuple[int, int] | None:
    """The bucket whose aspect ratio is nearest the image's among those it covers without upscaling (W <= width,
    H <= height), the larger on a tie; None when the image is smaller than every bucket."""
    fits = [(w, h) for w, h in buckets(cfg) if w <= width and h <= height]
    if not fits:
        fits = [(w, h) for w in range(cfg.step, width + 1, cfg.step) for h in range(cfg.step, height + 1, cfg.step)
                if w * h <= cfg.resolution ** 2 and max(w, h) / min(w, h) <= cfg.max_ratio]
    if not fits:
        return None
    aspect = math.log(width / height)
    return min(fits, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def decode(source) -> np.ndarray:
    """A path or the bytes of an image file -> RGB uint8 (H, W, 3): EXIF orientation applied; CMYK, greyscale,
    palette and 16-bit images converted (16-bit by its top 8 bits); transparency composited on white."""
    try:
        im = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        im.load()
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise UnreadableImage(str(e)) from None
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.int64)
        scale = 65535 if im.mode != "I" or a.max() > 255 else 255
        im = Image.fromarray((np.clip(a, 0, scale) * 255 // scale).astype(np.uint8), "L")
    elif im.mode == "F":
        a = np.asarray(im, dtype=np.float32)
        im = Image.fromarray((np.clip(a if a.max() <= 1.0 else a / 255.0, 0, 1) * 255).round().astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def fit_to_bucket(image: np.ndarray, bucket: tuple[int, int], cfg: BucketConfig,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """uint8 (h, w, 3) -> uint8 (H, W, 3) for bucket (W, H): downscaled (Lanczos; never up) until it covers the
    bucket, then cropped to it (centered, or at a random place), mirrored with probability 1/2 when cfg.flip."""
    W, H = bucket
    h, w = image.shape[:2]
    if W > w or H > h:
        raise ConfigError(f"bucket {W}x{H} is larger than the {w}x{h} image; buckets never upscale")
    scale = max(W / w, H / h)
    size = (max(W, round(w * scale)), max(H, round(h * scale)))
    im = Image.fromarray(image)
    if size != (w, h):
        im = im.resize(size, Image.Resampling.LANCZOS)
    rng = rng or np.random.default_rng(0)
    if cfg.crop == "random":
        x, y = int(rng.integers(size[0] - W + 1)), int(rng.integers(size[1] - H + 1))
    else:
        x, y = (size[0] - W) // 2, (size[1] - H) // 2
    out = np.asarray(im.crop((x, y, x + W, y + H)), dtype=np.uint8)
    if cfg.flip and rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)
