"""Model-free condition images, in numpy (the runtime has no torch): `canny` as ComfyUI's Canny node computes it
(kornia's algorithm: grey, 5x5 Gaussian blur sigma 1 with reflected borders, Sobel with replicated borders,
non-maximum suppression along the gradient rounded to 45 degrees, two thresholds, hysteresis), and `scribble`
(dark strokes on a light page -> white lines on black, as scribble ControlNets and adapters take them).

Both take an (H, W, 3) or (H, W) image, uint8 or float in [0, 1], and give (H, W) float32 in {0, 1}.
"""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError

GREY = np.array([0.299, 0.587, 0.114], np.float32)  # kornia's rgb_to_grayscale weights
# the 8 neighbours by direction index k (angle = k * 45 degrees, y down): (dy, dx)
NEIGHBOURS = [(0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1)]


def _grey(image) -> np.ndarray:
    a = np.asarray(image)
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    a = a.astype(np.float32)
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[..., :3]
    if a.ndim == 3 and a.shape[2] == 3:
        return a @ GREY
    if a.ndim == 3 and a.shape[2] == 1:
        return a[..., 0]
    if a.ndim != 2:
        raise ConfigError(f"a condition image is (H, W) or (H, W, 1|3|4), got shape {a.shape}")
    return a


def _shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """out[y, x] = a[y + dy, x + dx], zero outside."""
    out = np.zeros_like(a)
    H, W = a.shape
    src = (slice(max(0, dy), H + min(0, dy)), slice(max(0, dx), W + min(0, dx)))
    dst = (slice(max(0, -dy), H - max(0, dy)), slice(max(0, -dx), W - max(0, dx)))
    out[dst] = a[src]
    return out


def _blur(a: np.ndarray, sigma: float = 1.0, size: int = 5) -> np.ndarray:
    x = np.arange(size, dtype=np.float32) - size // 2
    k = np.exp(-(x ** 2) / (2 * sigma ** 2)).astype(np.float32)
    k /= k.sum()
    r = size // 2
    p = np.pad(a, r, mode="reflect")
    rows = sum(k[i] * p[:, i:i + a.shape[1]] for i in range(size))  # (H + 2r, W)
    return sum(k[i] * rows[i:i + a.shape[0]] for i in range(size)).astype(np.float32)


def canny(image, low: float = 0.4, high: float = 0.8) -> np.ndarray:
    """Edges (H, W) float32 in {0, 1}; `low` / `high` as ComfyUI's Canny node (0 < low <= high < 1)."""
    if not 0.0 < low <= high < 1.0:
        raise ConfigError(f"canny thresholds need 0 < low <= high < 1, got {low}, {high}")
    g = _blur(_grey(image))
    p = np.pad(g, 1, mode="edge")
    H, W = g.shape
    win = lambda dy, dx: p[1 + dy:1 + dy + H, 1 + dx:1 + dx + W]  # noqa: E731
    gx = (win(-1, 1) + 2 * win(0, 1) + win(1, 1)) - (win(-1, -1) + 2 * win(0, -1) + win(1, -1))
    gy = (win(1, -1) + 2 * win(1, 0) + win(1, 1)) - (win(-1, -1) + 2 * win(-1, 0) + win(-1, 1))
    magnitude = np.sqrt(gx * gx + gy * gy + np.float32(1e-6)).astype(np.float32)
    k = np.round(np.arctan2(gy, gx) * np.float32(4 / np.pi)).astype(np.int64)
    nms = np.stack([magnitude - _shift(magnitude, dy, dx) for dy, dx in NEIGHBOURS])  # (8, H, W)
    pos = np.take_along_axis(nms, (k % 8)[None], 0)[0]
    neg = np.take_along_axis(nms, ((k + 4) % 8)[None], 0)[0]
    magnitude = magnitude * (np.minimum(pos, neg) > 0)
    edges = (magnitude > low) * np.float32(0.5) + (magnitude > high) * np.float32(0.5)
    while True:  # hysteresis: weak edges next to strong ones become strong, until nothing changes
        weak, strong = edges == 0.5, edges == 1.0
        near = np.zeros_like(strong)
        for dy, dx in NEIGHBOURS:
            near |= _shift(edges, dy, dx) == 1.0
        grown = (near & weak) | strong
        new = grown.astype(np.float32) + (~grown & weak) * np.float32(0.5)
        if np.array_equal(new, edges):
            return grown.astype(np.float32)
        edges = new


def scribble(image, threshold: float = 0.5, thickness: int = 1) -> np.ndarray:
    """Strokes darker than `threshold` on a lighter page -> white lines (1) on black (0), widened by `thickness`
    pixels on each side."""
    if not 0.0 < threshold < 1.0 or thickness < 0:
        raise ConfigError(f"scribble needs 0 < threshold < 1 and thickness >= 0, got {threshold}, {thickness}")
    lines = _grey(image) < threshold
    out = lines.copy()
    for dy in range(-thickness, thickness + 1):
        for dx in range(-thickness, thickness + 1):
            out |= _shift(lines, dy, dx)
    return out.astype(np.float32)


PREPROCESSORS = {"canny": canny, "scribble": scribble}
