"""Image encoders: images in [0, 1] -> sampler-space latents (the space the decoders and samplers take).

Two architectures, each one list of stages (`Encoder.layers`), the mirrors of the decoders:
- "kl": the SD VAE encoder (diffusers AutoencoderKL: conv_in, down levels of resnets each ending
  (but the last) in a stride-2 3x3 conv, a mid block of resnet / self-attention / resnet, GroupNorm,
  SiLU, conv_out to 2 * latent_channels (mean, log-variance), quant_conv). The posterior mean is
  the latent, as diffusers' `latent_dist.mean` and ComfyUI's VAEEncode take it. MobileDiffusion's
  lite encoder (trained by mobilediffusion.train, stored in native files as `encoder.*`) is this
  design without mid attention and with symmetric stride-2 padding (`lite_encoder_config`).
- "tiny": TAESD (madebyollin/taesd; diffusers AutoencoderTiny's encoder): plain 3x3 convs with ReLU,
  residual blocks and stride-2 convs; its output is already sampler-space latents.

Stage and parameter names follow diffusers where they can, so the key maps in
weights/encoder_keys.py stay short tables.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .config import DecoderConfig, EncoderConfig
from .decoder import ResBlock, SelfAttention, TinyBlock, conv, group_norm
from .errors import ConfigError
from .layers import model_backend

LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp


class AsymmetricDownsample(nn.Conv2d):
    """Stride-2 3x3 conv that pads one zero row and column on the right and bottom only (SD's VAE)."""

    def forward(self, x):
        return super().forward(F.pad(x, (0, 1, 0, 1)))


def downsample(channels, padding: str, *, dd) -> nn.Conv2d:
    if padding == "asymmetric":
        return AsymmetricDownsample(channels, channels, 3, stride=2, padding=0, **dd)
    return nn.Conv2d(channels, channels, 3, stride=2, padding=1, **dd)


def kl_stages(cfg: EncoderConfig, dd) -> nn.Sequential:
    """The KL (SD VAE / lite) encoder: image in [-1, 1] (B, 3, H, W) -> moments (B, 2 * latent_channels, h, w)."""
    groups, widths = cfg.norm_num_groups, cfg.block_out_channels  # full resolution first
    stages = OrderedDict(conv_in=conv(3, widths[0], dd=dd))
    c = widths[0]
    for i, width in enumerate(widths):
        level = [(f"res{j}", ResBlock(c if j == 0 else width, width, groups, dd=dd))
                 for j in range(cfg.layers_per_block)]
        if not level and c != width:  # no resnet to change the width: a 1x1 conv does
            level.append(("proj", conv(c, width, 1, dd=dd)))
        if i < len(widths) - 1:
            level.append(("downsample", downsample(width, cfg.downsample_padding, dd=dd)))
        stages[f"down{i}"] = nn.Sequential(OrderedDict(level)) if level else nn.Identity()
        c = width
    mid = [("res0", ResBlock(c, c, groups, dd=dd))]
    if cfg.mid_attention:
        mid.append(("attn", SelfAttention(c, groups, dd=dd)))
    mid.append(("res1", ResBlock(c, c, groups, dd=dd)))
    stages["mid"] = nn.Sequential(OrderedDict(mid))
    stages["norm_out"] = group_norm(groups, c, dd=dd, act="silu")  # GroupNorm + SiLU
    stages["conv_out"] = conv(c, 2 * cfg.latent_channels, dd=dd)
    if cfg.quant_conv:
        stages["quant_conv"] = conv(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1, dd=dd)
    return nn.Sequential(stages)


def tiny_stages(cfg: EncoderConfig, dd) -> nn.Sequential:
    """The TAESD encoder, stage for stage as in taesd.py (so taesd_encoder.pth keys are its indices):
    image in [0, 1] -> sampler-space latents."""
    c = cfg.tiny_channels[0]  # one width for every level (checked by EncoderConfig)
    layers = []
    for i, n_blocks in enumerate(cfg.tiny_blocks):
        layers.append(conv(3, c, dd=dd) if i == 0 else nn.Conv2d(c, c, 3, stride=2, padding=1, bias=False, **dd))
        layers += [TinyBlock(c, dd=dd) for _ in range(n_blocks)]
    layers.append(conv(c, cfg.latent_channels, dd=dd))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """Images (B, 3, H, W) in [0, 1] -> sampler-space latents (B, latent_channels, H / s, W / s), s = cfg.downscale.

    The mirror of the Decoder: `decoder(encoder(x))` reconstructs x for a matching pair. A "kl"
    encoder's `moments(x)` gives the raw (mean, logvar) of its diagonal Gaussian posterior (training);
    `forward` returns the mean, or a sample when a `generator` is given, scaled as the decoder expects:
    (raw - shift_factor) * scaling_factor, in float32 whatever the weights' dtype. The fused ops run
    on `ops_backend`, chosen once from `device` (`backend=` overrides it).
    """

    def __init__(self, cfg: EncoderConfig, device=None, dtype=None, backend=None):
        super().__init__()
        self.config = cfg
        dd = {"device": device, "dtype": dtype}
        self.layers = kl_stages(cfg, dd) if cfg.kind == "kl" else tiny_stages(cfg, dd)
        self.ops_backend = model_backend(self, device, backend)

    @property
    def downscale(self) -> int:
        return self.config.downscale

    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [0, 1] -> raw latent (mean, logvar), each (B, latent_channels, h, w); "kl" only."""
        if self.config.kind != "kl":
            raise ConfigError("a TAESD ('tiny') encoder has no posterior moments; call the encoder itself")
        x = self._input(images) * 2 - 1  # [0, 1] -> [-1, 1]
        mean, logvar = self.layers(x).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        cfg = self.config
        if cfg.kind == "tiny":
            raw = self.layers(self._input(images))  # TAESD reads [0, 1]
        else:
            mean, logvar = self.moments(images)
            raw = mean
            if generator is not None:
                noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
                raw = mean + torch.exp(0.5 * logvar) * noise
        return (raw.float() - cfg.shift_factor) * cfg.scaling_factor

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        """Check the image shape and cast to the weights' dtype (fp32 IMAGEs into a bf16 encoder)."""
        s = self.downscale
        if images.ndim != 4 or images.shape[1] != 3:
            raise ConfigError(f"the encoder takes RGB images (B, 3, H, W), got shape {tuple(images.shape)}")
        H, W = images.shape[2:]
        if H % s or W % s or H < s or W < s:
            down = f"{max(s, H // s * s)}x{max(s, W // s * s)}"
            up = f"{-(-H // s) * s}x{-(-W // s) * s}"
            raise ConfigError(
                f"this encoder takes images whose height and width are multiples of {s} (it downscales {s}x), "
                f"got {H}x{W} (height x width); crop or resize it, e.g. to {down} or {up}"
            )
        return images.to(next(self.parameters()).dtype)


def build_encoder(cfg: EncoderConfig, device=None, dtype=None, backend=None) -> Encoder:
    """The encoder for `cfg` (either kind), with freshly initialised weights."""
    return Encoder(cfg, device=device, dtype=dtype, backend=backend)


def lite_encoder_config(decoder: DecoderConfig) -> EncoderConfig:
    """The lite encoder that mirrors a "kl" (lite) decoder, as mobilediffusion.train builds and native
    files store it: the decoder's widths and latent space, one resnet fewer per level, no mid attention,
    symmetric stride-2 padding, quant_conv."""
    if decoder.kind != "kl":
        raise ConfigError(f"the lite encoder mirrors a 'kl' decoder config, got kind {decoder.kind!r}")
    return EncoderConfig(
        kind="kl", latent_channels=decoder.latent_channels, scaling_factor=decoder.scaling_factor,
        shift_factor=decoder.shift_factor, block_out_channels=decoder.block_out_channels,
        layers_per_block=decoder.layers_per_block, mid_attention=False, quant_conv=True,
        norm_num_groups=decoder.norm_num_groups, downsample_padding="symmetric",
    )


__all__ = ["Encoder", "build_encoder", "lite_encoder_config"]
