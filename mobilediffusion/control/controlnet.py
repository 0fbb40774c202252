"""ControlNet: a copy of the UNet's down half that reads a hint image and gives residuals for every skip.

Layout (diffusers ControlNetModel / LDM `ControlNet`): the hint (B, hint_channels, 8h, 8w) in [0, 1] goes through
a small conv stack (`HintEmbedding`, three stride-2 steps to the latent size) and is added to conv_in's output;
the down levels and mid block run as in the UNet; a 1x1 "zero convolution" per skip and one after the mid block
make the residuals (`Residuals.output` and `.middle`), which the UNet adds to its skips and bottleneck.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UNetConfig
from ..errors import ConfigError
from ..layers import model_backend
from ..unet import DownHalf
from .residuals import Residuals


@dataclass(frozen=True)
class ControlNetConfig:
    unet: UNetConfig  # the down half's layout: the UNet the ControlNet was made for (its up fields are unused)
    hint_channels: int = 3  # channels of the hint image (RGB)
    hint_widths: tuple[int, ...] = (16, 32, 96, 256)  # the hint stack's widths; a stride-2 step between each two
    global_pool: bool = False  # residuals averaged over space ("shuffle" ControlNets)

    def __post_init__(self):
        if len(self.hint_widths) < 1 or self.hint_channels < 1:
            raise ConfigError("ControlNetConfig needs hint_channels >= 1 and at least one hint width")

    @property
    def hint_factor(self) -> int:
        """Hint pixels per latent pixel (8 for SD)."""
        return 2 ** (len(self.hint_widths) - 1)


def check_controlnet_fits(cfg: UNetConfig, base: UNetConfig, what: str) -> None:
    """ConfigError naming both when a ControlNet made for UNet layout `cfg` cannot drive a UNet of layout `base`."""
    if (cfg.block_out_channels, cfg.layers_per_block, cfg.cross_attention_dim) != \
            (base.block_out_channels, base.layers_per_block, base.cross_attention_dim):
        raise ConfigError(f"{what} was made for a UNet with widths {cfg.block_out_channels} and context "
                          f"{cfg.cross_attention_dim}, but this model has {base.block_out_channels} and "
                          f"{base.cross_attention_dim}: use a ControlNet made for this model's family")


class HintEmbedding(nn.Module):
    """Hint (B, hint_channels, f h, f w) -> features (B, C0, h, w): 3x3 convs with SiLU between them, a stride-2
    conv into each next width, and a last conv to the UNet's first width (diffusers ControlNetConditioningEmbedding,
    LDM input_hint_block). `convs[k]` is LDM's input_hint_block.{2k}."""

    def __init__(self, cfg: ControlNetConfig, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        w = cfg.hint_widths
        convs = [nn.Conv2d(cfg.hint_channels, w[0], 3, padding=1, **kw)]
        for a, b in zip(w, w[1:]):
            convs += [nn.Conv2d(a, a, 3, padding=1, **kw), nn.Conv2d(a, b, 3, padding=1, stride=2, **kw)]
        convs.append(nn.Conv2d(w[-1], cfg.unet.block_out_channels[0], 3, padding=1, **kw))
        self.convs = nn.ModuleList(convs)

    def forward(self, hint):
        for conv in self.convs[:-1]:
            hint = F.silu(conv(hint))
        return self.convs[-1](hint)


class ControlNet(DownHalf):
    """forward(sample (B, C, h, w), timestep, context (B, T, D), hint (B, hint_channels, f h, f w) in [0, 1]) ->
    Residuals (output: one per skip, middle), unscaled (strength is the caller's)."""

    def __init__(self, cfg: ControlNetConfig, *, device=None, dtype=None, backend=None):
        super().__init__(cfg.unet, device=device, dtype=dtype)
        self.control_config = cfg
        kw = dict(device=device, dtype=dtype)
        self.hint = HintEmbedding(cfg, **kw)
        self.zero_convs = nn.ModuleList(nn.Conv2d(c, c, 1, **kw) for c, _, _ in self.skip_shapes(8, 8))
        c = cfg.unet.block_out_channels[-1]
        self.mid_out = nn.Conv2d(c, c, 1, **kw)
        self.ops_backend = model_backend(self, device, backend)

    def check_hint(self, sample: torch.Tensor, hint: torch.Tensor) -> None:
        f, c = self.control_config.hint_factor, self.control_config.hint_channels
        want = (sample.shape[0], c, f * sample.shape[2], f * sample.shape[3])
        if hint.dim() != 4 or tuple(hint.shape[1:]) != want[1:] or hint.shape[0] not in (1, want[0]):
            raise ConfigError(f"this ControlNet takes a hint of shape (B, {c}, {want[2]}, {want[3]}) for a latent of "
                              f"{sample.shape[2]}x{sample.shape[3]}, got {tuple(hint.shape)}; resize the control "
                              "image to the picture's size")

    def forward(self, sample: torch.Tensor, timestep, context: torch.Tensor, hint: torch.Tensor) -> Residuals:
        self.check_hint(sample, hint)
        hint = hint.to(sample.dtype).expand(sample.shape[0], -1, -1, -1)
        x, skips, _ = self.run_down(sample, timestep, context, extra=self.hint(hint))
        outs = [conv(s) for conv, s in zip(self.zero_convs, skips)]  # (B, C_k, h_k, w_k) each
        mid = self.mid_out(x)
        if self.control_config.global_pool:
            outs = [o.mean(dim=(2, 3), keepdim=True).expand_as(o) for o in outs]
            mid = mid.mean(dim=(2, 3), keepdim=True).expand_as(mid)
        return Residuals(output=tuple(outs), middle=mid)
