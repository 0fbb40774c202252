"""Images a bundle run takes besides the prompt, prepared in numpy exactly as the torch pipeline prepares them:
a control image (hint), an image to start from and a mask (white = repaint).

    hint = prepare_hint(picture, 64, 64, channels=3)          # (1, 3, 64, 64) float32 in [0, 1]
    known = prepare_known(picture, mask, 64, 64, latent_hw=(16, 16), inpainting_unet=False)

Resizes follow torch.nn.functional.interpolate (control.apply.fit_hint: centre crop to the aspect ratio, then
"nearest-exact"; a noise mask "bilinear"; an inpainting UNet's mask "nearest"), so the runtime and the torch
pipeline see the same arrays. The web player's conditioning.js does the same in JavaScript.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .manifest import BundleError


def as_array(image) -> np.ndarray:
    """A path, PIL image or array (H, W[, C]) uint8 / float in [0, 1] -> float32 (H, W, C), C in (1, 3): RGBA loses
    its alpha, greyscale stays one channel. BundleError for what is not an image."""
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(image) as im:
                im.load()
                image = im.convert("L" if im.mode in ("L", "1", "I", "I;16", "F") else "RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise BundleError(f"{image} cannot be read as an image ({e}); give a PNG or JPEG") from None
    elif hasattr(image, "mode"):
        image = image.convert("L" if image.mode in ("L", "1", "I", "I;16", "F") else "RGB")
    a = np.asarray(image)
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / np.float32(255.0)
    elif a.dtype.kind != "f":
        raise BundleError(f"an image is uint8 or float in [0, 1], got an array of {a.dtype}")
    a = a.astype(np.float32)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or min(a.shape[:2]) < 1:
        raise BundleError(f"an image is (H, W) or (H, W, 1/3/4 channels), got shape {a.shape}")
    return a[..., :3] if a.shape[2] == 4 else a


def crop_margins(h: int, w: int, height: int, width: int) -> tuple[int, int]:
    """(y, x): rows and columns to drop on each side of an h x w image to reach the aspect ratio of height x width
    (ComfyUI's centre crop; control.apply.fit_hint and centre_crop use it)."""
    old, new = w / h, width / height
    if old > new:
        return 0, round((w - w * (new / old)) / 2)
    if old < new:
        return round((h - h * (old / new)) / 2), 0
    return 0, 0


def centre_crop(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, C) cropped about its centre to the aspect ratio of height x width (fit_hint's crop)."""
    h, w = a.shape[:2]
    y, x = crop_margins(h, w, height, width)
    return a[y:h - y, x:w - x]


def control_problem(strength, start: float, end: float) -> str | None:
    """What is wrong with a control's strength and start/end fractions, or None (one rule for the torch Control and
    the bundle runtime)."""
    if not 0.0 <= start <= end <= 1.0:
        return f"a control's start and end are fractions with 0 <= start <= end <= 1, got {start}, {end}"
    if not -100.0 <= float(strength) <= 100.0:
        return f"a control's strength is a number from -100 to 100, got {strength}"
    return None


def control_window(start: float, end: float, num_train_timesteps: int) -> tuple[float, float]:
    """The timesteps [lo, hi] where a control acts: ComfyUI's start/end percent of the schedule, on the timestep
    scale (percent p <-> timestep (1 - p) (T - 1))."""
    last = num_train_timesteps - 1
    return (1.0 - end) * last, (1.0 - start) * last


def _nearest_index(n_in: int, n_out: int, exact: bool) -> np.ndarray:
    scale = np.float32(n_in / n_out)
    i = np.arange(n_out, dtype=np.float32)
    src = np.floor((i + np.float32(0.5)) * scale if exact else i * scale).astype(np.int64)
    return np.minimum(src, n_in - 1)


def resize_nearest(a: np.ndarray, height: int, width: int, *, exact: bool = True) -> np.ndarray:
    """(H, W, C) -> (height, width, C): torch's "nearest-exact" (or "nearest" with exact=False)."""
    if a.shape[:2] == (height, width):
        return a
    return a[_nearest_index(a.shape[0], height, exact)][:, _nearest_index(a.shape[1], width, exact)]


def _bilinear_weights(n_in: int, n_out: int):
    scale = np.float32(n_in / n_out)
    src = np.maximum((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = (src - i0).astype(np.float32)
    return i0, i1, lam


def resize_bilinear(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, C) -> (height, width, C): torch's "bilinear" with align_corners=False (no antialiasing)."""
    y0, y1, ly = _bilinear_weights(a.shape[0], height)
    x0, x1, lx = _bilinear_weights(a.shape[1], width)
    ly, lx = ly[:, None, None], lx[None, :, None]
    one = np.float32(1)
    top = a[y0][:, x0] * (one - lx) + a[y0][:, x1] * lx
    bottom = a[y1][:, x0] * (one - lx) + a[y1][:, x1] * lx
    return (top * (one - ly) + bottom * ly).astype(np.float32)


def fit(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """fit_hint: centre crop to the aspect ratio, then nearest-exact resize."""
    return resize_nearest(centre_crop(a, height, width), height, width)


def with_channels(a: np.ndarray, want: int) -> np.ndarray:
    if a.shape[2] == want:
        return a
    if want == 1:
        return a.mean(axis=2, keepdims=True, dtype=np.float32)
    return np.repeat(a, want, axis=2) if a.shape[2] == 1 else a[..., :want]


def prepare_hint(image, height: int, width: int, channels: int) -> np.ndarray:
    """A control image -> the hint (1, channels, height, width) float32 in [0, 1] (control.apply's fitting)."""
    a = with_channels(fit(as_array(image), height, width), channels)
    return np.ascontiguousarray(a.transpose(2, 0, 1)[None])


@dataclass
class Known:
    """What the runtime needs for img2img / inpainting: the image (1, H, W, 3) for the encoder, the noise mask at
    latent size (1, 1, h, w) (1 = repaint) for an ordinary UNet, or an inpainting UNet's (mask, masked image)."""

    image: np.ndarray  # (1, H, W, 3) float32 in [0, 1], NHWC (the encoder's input)
    mask: np.ndarray | None = None  # (1, 1, h, w) the noise mask (ordinary UNet)
    hard_mask: np.ndarray | None = None  # (1, 1, h, w) {0, 1} (inpainting UNet)
    masked_image: np.ndarray | None = None  # (1, H, W, 3) the masked pixels grey (inpainting UNet)


def prepare_known(image, mask, height: int, width: int, latent_hw: tuple[int, int], *,
                  inpainting_unet: bool) -> Known:
    """The start image and mask of an inpainting run, as Pipeline._source prepares them. BundleError for a
    missing, empty (all black) or full (all white, ordinary UNet) mask."""
    if image is None:
        raise BundleError("a mask needs an image to repaint: give image= (--image) with it")
    if mask is None:
        raise BundleError("give a mask with the image (white = repaint); this bundle repaints, it does not run "
                          "img2img without one")
    picture = with_channels(fit(as_array(image), height, width), 3)  # (H, W, 3)
    m = np.clip(fit(with_channels(as_array(mask), 1), height, width), 0, 1)  # (H, W, 1)
    if m.max() < 0.5:
        raise BundleError("the mask is empty (all black): nothing to repaint; white marks what to repaint")
    if m.min() >= 0.5 and not inpainting_unet:
        raise BundleError("the mask covers the whole image (all white): that is text-to-image; leave out the image "
                          "and mask")
    h, w = latent_hw
    if not inpainting_unet:
        small = resize_bilinear(m, h, w)  # (h, w, 1)
        return Known(picture[None], mask=small.transpose(2, 0, 1)[None])
    hard = (m >= 0.5).astype(np.float32)
    masked = picture * (np.float32(1) - hard) + np.float32(0.5) * hard
    small = resize_nearest(hard, h, w, exact=False)
    return Known(picture[None], hard_mask=small.transpose(2, 0, 1)[None], masked_image=masked[None])
