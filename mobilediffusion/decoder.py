"""Latent decoders: sampler-space latents -> images in [0, 1].

Two architectures, each one list of stages (`Decoder.layers`):
- "kl": the SD VAE decoder (diffusers AutoencoderKL: post_quant_conv, conv_in, a mid block of
  resnet / self-attention / resnet, up levels of resnets + nearest-2x upsample, GroupNorm, SiLU,
  conv_out), outputs [-1, 1]. MobileDiffusion's lite decoder (arXiv 2311.16567, 8-channel
  latents, 9.8M params) is this design, narrower and without the mid attention (presets.LITE_DECODER).
- "tiny": TAESD (madebyollin/taesd; diffusers AutoencoderTiny's decoder): a tanh soft clamp, then
  plain 3x3 convs with ReLU, residual blocks and nearest-2x upsamples; outputs [0, 1].

Stage and parameter names follow diffusers where they can (norm1, conv1, to_q, ...), so the key
maps in weights/vae_keys.py stay short tables. GroupNorm + SiLU and attention run through
`mobilediffusion.ops` on the backend chosen once per decoder from its device.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .config import DecoderConfig
from .errors import ConfigError
from .layers import GroupNormAct, OpsLayer, UnitClamp, model_backend

NORM_EPS = 1e-6  # the VAE's GroupNorm eps (diffusers hard-codes it for AutoencoderKL)


def conv(n_in, n_out, k=3, *, bias=True, dd):
    return nn.Conv2d(n_in, n_out, k, padding=k // 2, bias=bias, **dd)


def group_norm(groups, channels, *, dd, act=None):
    """GroupNorm (parameters weight, bias), then `act` ("silu" or None) fused into it."""
    return GroupNormAct(groups, channels, eps=NORM_EPS, act=act, **dd)


class ResBlock(nn.Module):
    """Pre-norm residual block without time embedding: x + conv(silu(norm(conv(silu(norm(x))))))."""

    def __init__(self, n_in, n_out, groups, *, dd):
        super().__init__()
        self.norm1 = group_norm(groups, n_in, dd=dd, act="silu")
        self.conv1 = conv(n_in, n_out, dd=dd)
        self.norm2 = group_norm(groups, n_out, dd=dd, act="silu")
        self.conv2 = conv(n_out, n_out, dd=dd)
        self.conv_shortcut = conv(n_in, n_out, 1, dd=dd) if n_in != n_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(self.norm1(x))  # norm1, norm2: GroupNorm + SiLU
        h = self.conv2(self.norm2(h))
        return self.conv_shortcut(x) + h


class SelfAttention(OpsLayer, nn.Module):
    """Single-head self-attention over all pixels, with a residual (the VAE mid block's)."""

    def __init__(self, channels, groups, *, dd):
        super().__init__()
        self.group_norm = group_norm(groups, channels, dd=dd)
        self.to_q = nn.Linear(channels, channels, **dd)
        self.to_k = nn.Linear(channels, channels, **dd)
        self.to_v = nn.Linear(channels, channels, **dd)
        self.to_out = nn.Linear(channels, channels, **dd)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1 head, HW, C)
        h = ops.attention(q, k, v, backend=self.backend).squeeze(1)  # (B, HW, C)
        return x + self.to_out(h).transpose(1, 2).reshape(B, C, H, W)


class Clamp(nn.Module):
    """TAESD's soft clamp of the input latents to (-3, 3)."""

    def forward(self, x):
        return torch.tanh(x / 3) * 3


class TinyBlock(nn.Module):
    """TAESD block: relu(conv-relu-conv-relu-conv(x) + x)."""

    def __init__(self, channels, *, dd):
        super().__init__()
        self.conv = nn.Sequential(
            conv(channels, channels, dd=dd), nn.ReLU(),
            conv(channels, channels, dd=dd), nn.ReLU(),
            conv(channels, channels, dd=dd),
        )

    def forward(self, x):
        return F.relu(self.conv(x) + x)


def upsample(channels, *, dd):
    """Nearest-neighbour 2x, then a 3x3 conv."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), conv(channels, channels, dd=dd))


def kl_stages(cfg: DecoderConfig, dd) -> nn.Sequential:
    """The KL (SD VAE / lite) decoder: raw latents -> image in about [-1, 1]."""
    groups = cfg.norm_num_groups
    widths = cfg.block_out_channels[::-1]  # innermost first: the order the up levels run
    c = widths[0]
    stages = OrderedDict()
    if cfg.post_quant_conv:
        stages["post_quant_conv"] = conv(cfg.latent_channels, cfg.latent_channels, 1, dd=dd)
    stages["conv_in"] = conv(cfg.latent_channels, c, dd=dd)
    mid = [("res0", ResBlock(c, c, groups, dd=dd))]
    if cfg.mid_attention:
        mid.append(("attn", SelfAttention(c, groups, dd=dd)))
    mid.append(("res1", ResBlock(c, c, groups, dd=dd)))
    stages["mid"] = nn.Sequential(OrderedDict(mid))
    for i, width in enumerate(widths):
        level = [(f"res{j}", ResBlock(c if j == 0 else width, width, groups, dd=dd))
                 for j in range(cfg.layers_per_block + 1)]
        if i < len(widths) - 1:
            level.append(("upsample", upsample(width, dd=dd)))
        stages[f"up{i}"] = nn.Sequential(OrderedDict(level))
        c = width
    stages["norm_out"] = group_norm(groups, c, dd=dd, act="silu")  # GroupNorm + SiLU
    stages["conv_out"] = conv(c, 3, dd=dd)
    return nn.Sequential(stages)


def tiny_stages(cfg: DecoderConfig, dd) -> nn.Sequential:
    """The TAESD decoder, stage for stage as in taesd.py (so taesd_decoder.pth keys are its indices):
    raw latents -> image in about [0, 1]."""
    c = cfg.tiny_channels[0]  # one width for every level (checked by DecoderConfig)
    layers = [Clamp(), conv(cfg.latent_channels, c, dd=dd), nn.ReLU()]
    for i, n_blocks in enumerate(cfg.tiny_blocks):
        layers += [TinyBlock(c, dd=dd) for _ in range(n_blocks)]
        if i < len(cfg.tiny_blocks) - 1:
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), conv(c, c, bias=False, dd=dd)]
        else:
            layers.append(conv(c, 3, dd=dd))
    return nn.Sequential(*layers)


class Decoder(nn.Module):
    """Sampler-space latents (B, latent_channels, h, w) -> images (B, 3, h*s, w*s) in [0, 1], s = cfg.upscale.

    Undoes the latent scaling itself: raw = latents / scaling_factor + shift_factor.
    The fused ops run on `ops_backend`, chosen once from `device` (`backend=` overrides it) and logged.
    """

    def __init__(self, cfg: DecoderConfig, device=None, dtype=None, backend=None):
        super().__init__()
        self.config = cfg
        dd = {"device": device, "dtype": dtype}
        self.layers = kl_stages(cfg, dd) if cfg.kind == "kl" else tiny_stages(cfg, dd)
        self.clamp = UnitClamp()  # to [0, 1]
        self.ops_backend = model_backend(self, device, backend)

    @property
    def upscale(self) -> int:
        return self.config.upscale

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        self._check(latents)
        dtype = next(self.parameters()).dtype  # fp32 latents (ComfyUI's) into an fp16 decoder
        x = (latents / cfg.scaling_factor + cfg.shift_factor).to(dtype)
        x = self.layers(x)
        if cfg.kind == "kl":
            x = x / 2 + 0.5  # [-1, 1] -> [0, 1]
        return self.clamp(x)

    def _check(self, latents):
        want = self.config.latent_channels
        if latents.ndim != 4 or latents.shape[1] != want:
            raise ConfigError(
                f"this decoder expects latents of shape (B, {want}, h, w), got {tuple(latents.shape)}; "
                f"use the decoder that belongs to the model ({want}-channel latents)"
            )


def build_decoder(cfg: DecoderConfig, device=None, dtype=None, backend=None) -> Decoder:
    """The decoder for `cfg` (either kind), with freshly initialised weights."""
    return Decoder(cfg, device=device, dtype=dtype, backend=backend)


__all__ = ["Decoder", "build_decoder"]
