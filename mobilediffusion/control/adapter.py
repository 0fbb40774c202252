"""T2I-Adapter: a small network that reads the hint once and gives one feature map per UNet level.

Two layouts (TencentARC's originals, as ComfyUI and diffusers read them):
- "full": pixel-unshuffle by 8, conv_in, then per level `blocks_per_level` resnets (1x1 or 3x3 convs, ReLU);
  levels after the first halve the size first (average pooling, or a stride-2 conv in some originals) and
  change width with an `in_conv`.
- "light": per level an extractor (avg-pool for levels after the first, 1x1 in to width/4, `blocks_per_level`
  3x3 resnets, 1x1 out).
Feature i is added to the UNet after the last block of level i (`Residuals.input`, ComfyUI's "input" control).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .residuals import Residuals

KINDS = ("full", "light")


@dataclass(frozen=True)
class AdapterConfig:
    kind: str = "full"  # "full" | "light"
    hint_channels: int = 3  # 3 (RGB: canny, depth, ...) or 1 (sketch)
    channels: tuple[int, ...] = (320, 640, 1280, 1280)  # one per UNet level: the UNet's block_out_channels
    blocks_per_level: int = 2  # resnets per level (full: 2, light: 4)
    kernel: int = 1  # the full layout's in_conv / block2 kernel (1 in TencentARC's SD1.x adapters, else 3)
    conv_down: bool = False  # the full layout halves with a stride-2 conv instead of average pooling
    unshuffle: int = 8  # hint pixels per latent pixel

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"T2I-Adapter kind must be one of {KINDS}, got {self.kind!r}")
        if not self.channels or self.blocks_per_level < 1 or self.kernel not in (1, 3):
            raise ConfigError("AdapterConfig needs channels, blocks_per_level >= 1 and kernel 1 or 3")


class _Down(nn.Module):
    """Halve (B, C, H, W): 2x2 average pooling (odd sides: ceil, as ComfyUI and diffusers do) or a stride-2 conv."""

    def __init__(self, c: int, conv: bool, **kw):
        super().__init__()
        self.op = nn.Conv2d(c, c, 3, stride=2, padding=1, **kw) if conv else None

    def forward(self, x):
        if self.op is not None:
            return self.op(x)
        return F.avg_pool2d(x, 2, stride=2, ceil_mode=True)


class _Resnet(nn.Module):
    """x + block2(ReLU(block1(x))); block1 3x3, block2 `kernel` x `kernel`."""

    def __init__(self, c: int, kernel: int, **kw):
        super().__init__()
        self.block1 = nn.Conv2d(c, c, 3, padding=1, **kw)
        self.block2 = nn.Conv2d(c, c, kernel, padding=kernel // 2, **kw)

    def forward(self, x):
        return x + self.block2(F.relu(self.block1(x)))


class _FullLevel(nn.Module):
    def __init__(self, cin: int, cout: int, cfg: AdapterConfig, down: bool, **kw):
        super().__init__()
        self.down = _Down(cin, cfg.conv_down, **kw) if down else None
        k = cfg.kernel
        self.in_conv = nn.Conv2d(cin, cout, k, padding=k // 2, **kw) if cin != cout else None
        self.resnets = nn.ModuleList(_Resnet(cout, k, **kw) for _ in range(cfg.blocks_per_level))

    def forward(self, x):
        if self.down is not None:
            x = self.down(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        for r in self.resnets:
            x = r(x)
        return x


class _LightLevel(nn.Module):
    def __init__(self, cin: int, cout: int, cfg: AdapterConfig, down: bool, **kw):
        super().__init__()
        mid = cout // 4
        self.down = _Down(cin, False, **kw) if down else None
        self.in_conv = nn.Conv2d(cin, mid, 1, **kw)
        self.resnets = nn.ModuleList(_Resnet(mid, 3, **kw) for _ in range(cfg.blocks_per_level))
        self.out_conv = nn.Conv2d(mid, cout, 1, **kw)

    def forward(self, x):
        if self.down is not None:
            x = self.down(x)
        x = self.in_conv(x)
        for r in self.resnets:
            x = r(x)
        return self.out_conv(x)


class Adapter(nn.Module):
    """features(hint (B, hint_channels, f h, f w) in [0, 1]) -> [level i: (B, channels[i], h / 2^i, w / 2^i)];
    forward(hint, skip_indices) -> Residuals with each feature at its level's last skip (`UNet` gives the indices:
    `adapter_skips(unet)`)."""

    def __init__(self, cfg: AdapterConfig, *, device=None, dtype=None):
        super().__init__()
        self.config = cfg
        kw = dict(device=device, dtype=dtype)
        cin = cfg.hint_channels * cfg.unshuffle ** 2
        ch = cfg.channels
        if cfg.kind == "full":
            self.conv_in = nn.Conv2d(cin, ch[0], 3, padding=1, **kw)
            self.levels = nn.ModuleList(_FullLevel(ch[max(i - 1, 0)], ch[i], cfg, i > 0, **kw) for i in range(len(ch)))
        else:
            self.conv_in = None
            self.levels = nn.ModuleList(
                _LightLevel(cin if i == 0 else ch[i - 1], ch[i], cfg, i > 0, **kw) for i in range(len(ch)))

    def check_hint(self, hint: torch.Tensor, latent_hw: tuple[int, int] | None = None) -> None:
        c, f = self.config.hint_channels, self.config.unshuffle
        ok = hint.dim() == 4 and hint.shape[1] == c and hint.shape[2] % f == 0 and hint.shape[3] % f == 0
        if ok and latent_hw is not None:
            ok = (hint.shape[2] // f, hint.shape[3] // f) == tuple(latent_hw)
        if not ok:
            size = "" if latent_hw is None else f" of {f * latent_hw[0]}x{f * latent_hw[1]}"
            raise ConfigError(f"this T2I-Adapter takes a hint of shape (B, {c}, H, W){size} with H, W multiples of "
                              f"{f}, got {tuple(hint.shape)}; resize the control image to the picture's size")

    def features(self, hint: torch.Tensor) -> list[torch.Tensor]:
        self.check_hint(hint)
        x = F.pixel_unshuffle(hint, self.config.unshuffle)
        if self.conv_in is not None:
            x = self.conv_in(x)
        out = []
        for level in self.levels:
            x = level(x)
            out.append(x)
        return out

    def forward(self, hint: torch.Tensor, skip_indices: list[int], skips: int) -> Residuals:
        feats = self.features(hint)
        if len(skip_indices) != len(feats):
            raise ConfigError(f"this T2I-Adapter gives {len(feats)} feature maps but the UNet has {len(skip_indices)} "
                              "levels: use an adapter made for this model")
        inputs = [None] * skips
        for k, f in zip(skip_indices, feats):
            inputs[k] = f
        return Residuals(input=tuple(inputs))


def adapter_skips(unet) -> list[int]:
    """The skip index of each level's last block in `unet` (where level i's adapter feature is added)."""
    out, k = [], 0
    for level in unet.down:
        k += len(level.blocks) + 1
        out.append(k - 1)
    return out
