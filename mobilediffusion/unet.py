"""The conditional UNet: one implementation for SD 1.x/2.x, BK-SDM, SDXS and MobileDiffusion.

Layout (see UNetConfig): conv_in -> down levels -> mid block -> up levels -> norm, SiLU, conv_out.
A level is a list of blocks (a resnet, then an optional attention site) and an optional 2x
resample. Every down block output and each level's input are kept as skips; the up path
concatenates them back in reverse, as diffusers' UNet2DConditionModel does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import UNetConfig
from .control.residuals import Residuals, skip_residual
from .errors import ConfigError
from .layers import GroupNormAct, model_backend
from .unet_blocks import (
    ResBlock,
    SpatialTransformer,
    TimeMLP,
    Upsample,
    timestep_embedding,
)


class Recomputed(nn.Module):
    """A block that can drop its activations in training and recompute them in backward (gradient checkpointing:
    `set_gradient_checkpointing(unet, True)`); `_run` is the block's computation."""

    checkpointed = False

    def forward(self, x, temb_act, context):
        if self.checkpointed and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self._run, x, temb_act, context, use_reentrant=False)
        return self._run(x, temb_act, context)


def set_gradient_checkpointing(unet: nn.Module, on: bool = True) -> None:
    """Recompute every block's activations in backward (less memory, about a third more compute) or not."""
    for m in unet.modules():
        if isinstance(m, Recomputed):
            m.checkpointed = on


class Block(Recomputed):
    """One resnet followed by an optional attention site (absent for attention kind "none")."""

    def __init__(self, cin: int, cout: int, cfg: UNetConfig, *, kind: str, heads: int, depth: int, separable: bool,
                 device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        temb = 4 * cfg.block_out_channels[0]
        self.res = ResBlock(cin, cout, temb, groups=cfg.norm_num_groups, eps=cfg.norm_eps, separable=separable, **kw)
        self.attn = None if kind == "none" else _transformer(cout, heads, kind, depth, cfg, **kw)

    def _run(self, x, temb_act, context):
        x = self.res(x, temb_act)
        return x if self.attn is None else self.attn(x, context)


def _transformer(dim: int, heads: int, kind: str, depth: int, cfg: UNetConfig, **kw) -> SpatialTransformer:
    return SpatialTransformer(
        dim, heads, cfg.cross_attention_dim, kind, depth, groups=cfg.norm_num_groups, ff_mult=cfg.ff_mult,
        ff_activation=cfg.ff_activation, shared_kv=cfg.shared_kv, upcast=cfg.upcast_attention, **kw,
    )


class DownLevel(nn.Module):
    """Down level i: layers_per_block[i] blocks, then a stride-2 3x3 conv if the level downsamples."""

    def __init__(self, cin: int, i: int, cfg: UNetConfig, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        c = cfg.block_out_channels[i]
        self.blocks = nn.ModuleList(
            Block(cin if j == 0 else c, c, cfg, kind=cfg.attention[i], heads=cfg.num_attention_heads[i],
                  depth=cfg.transformer_depth[i], separable=cfg.separable_flags[i], **kw)
            for j in range(cfg.layers_per_block[i])
        )
        self.downsample = nn.Conv2d(c, c, 3, stride=2, padding=1, **kw) if cfg.down_flags[i] else None


class UpLevel(nn.Module):
    """Mirror of down level i: layers_per_block[i] + 1 blocks, each eating one skip, then a 2x
    upsample if down level i - 1 downsampled."""

    def __init__(self, cin: int, i: int, cfg: UNetConfig, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        u = len(cfg.block_out_channels) - 1 - i  # index in up order (innermost first)
        c = cfg.block_out_channels[i]
        c_entry = cfg.block_out_channels[max(i - 1, 0)]  # channels of the skip taken at the level's entry
        count = cfg.layers_per_block[i] + 1
        self.blocks = nn.ModuleList(
            Block((cin if j == 0 else c) + (c_entry if j == count - 1 else c), c, cfg, kind=cfg.up_attention_kinds[u],
                  heads=cfg.num_attention_heads[i], depth=cfg.up_depths[u], separable=cfg.separable_flags[i], **kw)
            for j in range(count)
        )
        self.upsample = Upsample(c, **kw) if i > 0 and cfg.down_flags[i - 1] else None


class MidBlock(Recomputed):
    """Bottleneck at the innermost width: resnet, full transformer (mid depth), resnet."""

    def __init__(self, cfg: UNetConfig, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        c = cfg.block_out_channels[-1]
        temb, sep = 4 * cfg.block_out_channels[0], cfg.separable_flags[-1]
        self.res = nn.ModuleList(
            ResBlock(c, c, temb, groups=cfg.norm_num_groups, eps=cfg.norm_eps, separable=sep, **kw) for _ in range(2)
        )
        self.attn = _transformer(c, cfg.mid_heads, "full", cfg.mid_depth, cfg, **kw)

    def _run(self, x, temb_act, context):
        x = self.res[0](x, temb_act)
        return self.res[1](self.attn(x, context), temb_act)


class DownHalf(nn.Module):
    """The time embedding, conv_in, down levels and mid block of a UNet: what the UNet and a ControlNet (a copy of
    this half with its own input) share. `run_down(sample, timestep, context, extra, control) -> (x, skips, temb_act)`.
    """

    def __init__(self, cfg: UNetConfig, *, device=None, dtype=None):
        super().__init__()
        self.config = cfg
        kw = dict(device=device, dtype=dtype)
        ch = cfg.block_out_channels
        # 1. input and time embedding
        self.time_embed = TimeMLP(ch[0], 4 * ch[0], **kw)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1, **kw)
        # 2. down path, outermost first
        self.down = nn.ModuleList(DownLevel(ch[max(i - 1, 0)], i, cfg, **kw) for i in range(len(ch)))
        # 3. bottleneck
        self.mid = MidBlock(cfg, **kw) if cfg.mid_block else None

    @property
    def skip_count(self) -> int:
        """How many skips the down path keeps (12 for SD1.5): the length of a control's per-skip residuals."""
        return sum(len(level.blocks) + 1 for level in self.down)

    def skip_shapes(self, h: int, w: int) -> list[tuple[int, int, int]]:
        """(C, h, w) of each skip for a latent of h x w, outermost first: the shapes of a control's residuals."""
        ch, out = self.config.block_out_channels, []
        for i, level in enumerate(self.down):
            out.append((ch[max(i - 1, 0)], h, w))
            out += [(ch[i], h, w)] * len(level.blocks)
            if level.downsample is not None:
                h, w = (h + 1) // 2, (w + 1) // 2
        return out

    def run_down(self, sample: torch.Tensor, timestep, context: torch.Tensor, extra: torch.Tensor | None = None,
                 control: Residuals | None = None):
        """sample (B, C_in, h, w) -> (bottleneck x, skips outermost first, SiLU(time embedding)); `extra` is added
        to conv_in's output (a ControlNet's hint features), `control` adds its "input" and "middle" residuals."""
        cfg = self.config
        B, _, h, w = sample.shape
        m = cfg.size_multiple
        if h % m or w % m:
            raise ConfigError(
                f"latent size {h}x{w} is not a multiple of {m}: this UNet needs image sides that are "
                f"multiples of {8 * m} pixels (latent sides multiples of {m})"
            )
        # 1. time embedding, SiLU applied once for every resnet
        t = torch.as_tensor(timestep, device=sample.device)
        if t.numel() not in (1, B):
            raise ConfigError(f"timestep must be a scalar or hold one value per sample ({B}), got shape {tuple(t.shape)}")
        t = t.reshape(-1).expand(B)
        temb = timestep_embedding(t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                  freq_shift=cfg.freq_shift).to(sample.dtype)
        temb_act = F.silu(self.time_embed(temb))
        if control is not None:
            control.check(self.skip_count)
        # 2. down path, keeping skips (a control's "input" residual joins the path and the skip)
        x = _plus(self.conv_in(sample), extra)
        skips = []
        for level in self.down:
            x = _plus(x, skip_residual(control, "input", len(skips)))
            skips.append(x)  # the level's input: the last skip its up level eats
            for block in level.blocks:
                x = _plus(block(x, temb_act, context), skip_residual(control, "input", len(skips)))
                skips.append(x)
            if level.downsample is not None:
                x = level.downsample(x)
        # 3. bottleneck
        if self.mid is not None:
            x = self.mid(x, temb_act, context)
        return _plus(x, None if control is None else control.middle), skips, temb_act


class UNet(DownHalf):
    """Noise-prediction UNet conditioned on a timestep and text context.

    forward(sample (B, C_in, h, w) latents, timestep (B,) or scalar in the training schedule's
    units (0..999), context (B, T, cross_attention_dim) text features) -> (B, C_out, h, w), the
    model output in `config.prediction_type` (epsilon, v or x0). h and w must be multiples of
    `config.size_multiple`. `control`: a ControlNet's / T2I-Adapter's residuals (control.Residuals, one entry per
    skip; absent: nothing is added, nothing costs). `concat` (B, in_channels - out_channels, h, w): what an
    inpainting UNet takes beside the latent (the mask, then the masked image's latents).

    The fused ops run on `ops_backend`, chosen once from `device` (`backend=` overrides it: "reference",
    "cpu", "triton", "export"; see mobilediffusion.ops.choose_backend) and logged.
    """

    def __init__(self, cfg: UNetConfig, *, device=None, dtype=None, backend=None):
        super().__init__(cfg, device=device, dtype=dtype)
        kw = dict(device=device, dtype=dtype)
        ch = cfg.block_out_channels
        # 4. up path, innermost first; each level starts from the previous level's width
        self.up = nn.ModuleList(
            UpLevel(ch[min(i + 1, len(ch) - 1)], i, cfg, **kw) for i in reversed(range(len(ch)))
        )
        # 5. output
        self.norm_out = GroupNormAct(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps, act="silu", **kw)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1, **kw)
        # 6. the ops backend, once for the whole model
        self.ops_backend = model_backend(self, device, backend)

    @property
    def concat_channels(self) -> int:
        """Channels concatenated to the latent before conv_in (5 for SD inpainting UNets: mask + masked image)."""
        return self.config.in_channels - self.config.out_channels

    def forward(self, sample: torch.Tensor, timestep, context: torch.Tensor, control: Residuals | None = None,
                concat: torch.Tensor | None = None) -> torch.Tensor:
        sample = self._with_concat(sample, concat)
        x, skips, temb_act = self.run_down(sample, timestep, context, control=control)
        # 4. up path: pop skips in reverse (a control's "output" residual joins the skip only)
        for level in self.up:
            for block in level.blocks:
                skip = _plus(skips.pop(), skip_residual(control, "output", len(skips)))
                x = block(torch.cat([x, skip], dim=1), temb_act, context)
            if level.upsample is not None:
                x = level.upsample(x)
        # 5. output
        return self.conv_out(self.norm_out(x))  # norm_out: GroupNorm + SiLU

    def _with_concat(self, sample: torch.Tensor, concat: torch.Tensor | None) -> torch.Tensor:
        """(B, C, h, w) latent + (B, k, h, w) concat -> (B, C + k, h, w), checked against in_channels."""
        k = self.concat_channels
        if concat is None and k == 0:
            return sample
        if concat is None:
            raise ConfigError(f"this is an inpainting UNet: it takes {k} more channels (mask and masked-image "
                              "latents) beside the latent; give an image and a mask")
        if concat.shape[1] != k or concat.shape[2:] != sample.shape[2:]:
            raise ConfigError(f"this UNet takes {k} concatenated channels at {tuple(sample.shape[2:])}, got "
                              f"{tuple(concat.shape[1:])}")
        return torch.cat([sample, concat.to(sample.dtype)], dim=1)


def _plus(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """x + residual in x's dtype (a new tensor: x may be a skip kept for later), or x when there is none."""
    return x if residual is None else x + residual.to(x.dtype)
