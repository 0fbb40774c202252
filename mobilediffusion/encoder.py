"""Image -> latent encoder: the mirror of a "kl" decoder (SD VAE encoder layout, lite widths).

Used to train the lite autoencoder (mobilediffusion.train) and for img2img with a native file
that carries `encoder.*` weights. Stages, full resolution first: conv_in, down levels of resnets
each ending (but the last) in a stride-2 3x3 conv, a mid block of two resnets (no attention, as in
the lite decoder), GroupNorm, SiLU, conv_out to 2 * latent_channels (mean, log-variance), and
quant_conv (1x1). Parameter names follow diffusers' Encoder where they can.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .config import DecoderConfig
from .decoder import ResBlock, conv, group_norm
from .errors import CheckpointError, ConfigError

LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp


def encoder_stages(cfg: DecoderConfig, dd) -> nn.Sequential:
    """Image in [-1, 1] (B, 3, H, W) -> moments (B, 2 * latent_channels, H / s, W / s)."""
    groups, widths = cfg.norm_num_groups, cfg.block_out_channels  # full resolution first
    stages = OrderedDict(conv_in=conv(3, widths[0], dd=dd))
    c = widths[0]
    for i, width in enumerate(widths):
        level = [(f"res{j}", ResBlock(c if j == 0 else width, width, groups, dd=dd))
                 for j in range(cfg.layers_per_block)]
        if not level and c != width:  # no resnet to change the width: a 1x1 conv does
            level.append(("proj", conv(c, width, 1, dd=dd)))
        if i < len(widths) - 1:
            level.append(("downsample", nn.Conv2d(width, width, 3, stride=2, padding=1, **dd)))
        stages[f"down{i}"] = nn.Sequential(OrderedDict(level)) if level else nn.Identity()
        c = width
    stages["mid"] = nn.Sequential(OrderedDict(res0=ResBlock(c, c, groups, dd=dd), res1=ResBlock(c, c, groups, dd=dd)))
    stages["norm_out"] = group_norm(groups, c, dd=dd)
    stages["act"] = nn.SiLU()
    stages["conv_out"] = conv(c, 2 * cfg.latent_channels, dd=dd)
    stages["quant_conv"] = conv(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1, dd=dd)
    return nn.Sequential(stages)


class Encoder(nn.Module):
    """Images (B, 3, H, W) in [0, 1] -> sampler-space latents (B, latent_channels, H / s, W / s), s = cfg.upscale.

    The mirror of `Decoder(cfg)` for a "kl" config: `decoder(encoder(x))` reconstructs x.
    `moments(x)` gives the raw (mean, logvar) of the diagonal Gaussian posterior (training);
    `forward` returns its mean, or a sample when a `generator` is given, scaled like the decoder
    expects: (raw - shift_factor) * scaling_factor.
    """

    def __init__(self, cfg: DecoderConfig, *, device=None, dtype=None):
        super().__init__()
        if cfg.kind != "kl":
            raise ConfigError(f"the encoder mirrors a 'kl' decoder config, got kind {cfg.kind!r}")
        self.config = cfg
        self.layers = encoder_stages(cfg, {"device": device, "dtype": dtype})

    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [0, 1] -> raw latent (mean, logvar), each (B, latent_channels, h, w)."""
        B, C, H, W = images.shape
        s = self.config.upscale
        if C != 3 or H % s or W % s:
            raise ConfigError(f"the encoder takes RGB images (B, 3, H, W) with sides that are multiples of {s}, "
                              f"got {tuple(images.shape)}")
        dtype = next(self.parameters()).dtype
        mean, logvar = self.layers((images * 2 - 1).to(dtype)).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        mean, logvar = self.moments(images)
        raw = mean
        if generator is not None:
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
            raw = mean + torch.exp(0.5 * logvar) * noise
        cfg = self.config
        return (raw - cfg.shift_factor) * cfg.scaling_factor


def load_encoder(path, *, device="cpu", dtype=torch.float32) -> Encoder:
    """The encoder stored in a native MobileDiffusion .safetensors (keys `encoder.*`), for img2img."""
    from .weights.formats import detect
    from .weights.keymap import load_state
    from .weights.native import read_native_component, read_native_config

    src = detect(path)
    if src.kind != "native":
        raise CheckpointError(f"{src.path} is a {src.kind} checkpoint; only native MobileDiffusion files carry "
                              "a lite encoder (encoder.* keys)")
    state = read_native_component(src.path, "encoder")
    enc = Encoder(read_native_config(src.path).decoder, device=device, dtype=dtype)
    load_state(enc, state, None, what="encoder")
    return enc.eval()


__all__ = ["Encoder", "load_encoder"]
