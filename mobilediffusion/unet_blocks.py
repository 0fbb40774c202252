"""Building blocks of the conditional UNet: timestep embedding, resnet, attention, transformer.

Layouts: feature maps are (B, C, H, W) (or channels_last strides, which every block keeps); token
sequences are (B, T, C) with T = H * W for image tokens and T = 77 for text context (B, 77, D).
Every block keeps its input dtype. GroupNorm + SiLU, GEGLU / GELU, attention and the separable conv
run through `mobilediffusion.ops` on the backend the model sets (`layers.set_ops_backend`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .layers import GroupNormAct, OpsLayer


def timestep_embedding(t: torch.Tensor, dim: int, *, flip_sin_to_cos: bool, freq_shift: float) -> torch.Tensor:
    """Sinusoidal embedding of timesteps (B,) (any real values, e.g. 0..999) -> (B, dim) float32.

    Frequencies exp(-ln(10000) * i / (dim/2 - freq_shift)), i < dim/2; [sin, cos], or [cos, sin]
    when flip_sin_to_cos (DDPM / diffusers `get_timestep_embedding`).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]  # (B, half)
    parts = (torch.cos(args), torch.sin(args)) if flip_sin_to_cos else (torch.sin(args), torch.cos(args))
    emb = torch.cat(parts, dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimeMLP(nn.Module):
    """Timestep features (B, C0) -> time embedding (B, 4 * C0): linear, SiLU, linear."""

    def __init__(self, dim: int, out_dim: int, *, device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(dim, out_dim, device=device, dtype=dtype)
        self.fc2 = nn.Linear(out_dim, out_dim, device=device, dtype=dtype)

    def forward(self, x):
        return self.fc2(F.silu(self.fc1(x)))


class SeparableConv(OpsLayer, nn.Module):
    """3x3 depthwise conv then 1x1 pointwise conv (MobileDiffusion's cheap 3x3 convolution)."""

    def __init__(self, cin: int, cout: int, *, device=None, dtype=None):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, device=device, dtype=dtype)
        self.pointwise = nn.Conv2d(cin, cout, 1, device=device, dtype=dtype)

    def forward(self, x):
        dw, pw = self.depthwise, self.pointwise
        # oneDNN in x's dtype, on the fast path's packed weights (the reference computes half inputs in fp32: 3x
        # slower in bf16 here; in fp32 it is these two convolutions, unpacked)
        if self.backend is ops.Backend.CPU or (self.backend is ops.Backend.REFERENCE and x.dtype == torch.float32):
            return pw(dw(x))
        return ops.separable_conv(x, dw.weight, dw.bias, pw.weight, pw.bias, backend=self.backend)


def conv3x3(cin: int, cout: int, separable: bool, *, device=None, dtype=None) -> nn.Module:
    if separable:
        return SeparableConv(cin, cout, device=device, dtype=dtype)
    return nn.Conv2d(cin, cout, 3, padding=1, device=device, dtype=dtype)


class ResBlock(nn.Module):
    """Pre-norm residual block with an additive time embedding (diffusers ResnetBlock2D, "default" norm).

    x (B, cin, H, W), temb (B, E) -> (B, cout, H, W).
    """

    def __init__(self, cin: int, cout: int, temb_dim: int, *, groups: int, eps: float, separable: bool = False,
                 device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.norm1 = GroupNormAct(groups, cin, eps=eps, act="silu", **kw)
        self.conv1 = conv3x3(cin, cout, separable, **kw)
        self.time_proj = nn.Linear(temb_dim, cout, **kw)
        self.norm2 = GroupNormAct(groups, cout, eps=eps, act="silu", **kw)
        self.conv2 = conv3x3(cout, cout, separable, **kw)
        self.shortcut = nn.Conv2d(cin, cout, 1, **kw) if cin != cout else None

    def forward(self, x, temb_act):
        """temb_act: SiLU(time embedding), computed once per forward by the caller."""
        h = self.conv1(self.norm1(x))  # norm1, norm2: GroupNorm + SiLU
        h = h + self.time_proj(temb_act)[:, :, None, None]
        h = self.conv2(self.norm2(h, inplace=True))  # h is used once (the CPU kernel writes into it)
        return (x if self.shortcut is None else self.shortcut(x)) + h


class Attention(OpsLayer, nn.Module):
    """Multi-head attention over (B, T, C) queries and (B, S, Dk) keys/values (self: the queries).

    `shared_kv`: one projection gives both keys and values (MobileDiffusion).
    `upcast`: half-precision inputs are attended in float32 (SD2.1-v `upcast_attention`); every ops
    backend already computes scores and softmax in float32 for half inputs (the cpu kernel rounds the
    bf16 probabilities for the product with V, accumulated in float32), so it is kept for the record only.
    """

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None, *, shared_kv: bool = False,
                 upcast: bool = False, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        kv_dim = dim if kv_dim is None else kv_dim
        self.heads = heads
        self.upcast = upcast
        self.to_q = nn.Linear(dim, dim, bias=False, **kw)
        if shared_kv:
            self.to_kv = nn.Linear(kv_dim, dim, bias=False, **kw)
        else:
            self.to_k = nn.Linear(kv_dim, dim, bias=False, **kw)
            self.to_v = nn.Linear(kv_dim, dim, bias=False, **kw)
        self.to_out = nn.Linear(dim, dim, **kw)

    def forward(self, x, context=None):
        B, T, C = x.shape
        src = x if context is None else context
        q = self.to_q(x)
        if hasattr(self, "to_kv"):
            k = v = self.to_kv(src)
        else:
            k, v = self.to_k(src), self.to_v(src)
        h = self.heads
        q = q.view(B, T, h, C // h).transpose(1, 2)  # (B, heads, T, d)
        k = k.view(B, -1, h, C // h).transpose(1, 2)  # (B, heads, S, d)
        v = v.view(B, -1, h, C // h).transpose(1, 2)  # (B, heads, S, d)
        out = ops.attention(q, k, v, backend=self.backend)  # (B, heads, T, d); half inputs attended in fp32
        out = out.transpose(1, 2).reshape(B, T, C)  # (B, T, heads * d); a view for the cpu kernel's output
        return self.to_out(out)


class FeedForward(OpsLayer, nn.Module):
    """(B, T, C) -> (B, T, C) through a hidden width mult * C.

    "geglu": fc1 makes 2 * hidden, the second half gates the first through GELU (SD);
    "gelu" / "swish": plain activation between fc1 and fc2 (MobileDiffusion: swish, mult 6).
    """

    def __init__(self, dim: int, mult: int, activation: str, *, device=None, dtype=None):
        super().__init__()
        hidden = dim * mult
        self.activation = activation
        self.fc1 = nn.Linear(dim, hidden * 2 if activation == "geglu" else hidden, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, dim, device=device, dtype=dtype)

    def forward(self, x):
        h = self.fc1(x)
        if getattr(self.fc1, "activation", None) == self.activation:  # an int8 fc1 applied it (ops.int8)
            pass
        elif self.activation == "geglu":
            h = ops.geglu(h, backend=self.backend)  # hidden * gelu(gate), halves of fc1's output
        elif self.activation == "gelu":
            h = ops.gelu(h, backend=self.backend)
        else:
            h = F.silu(h)
        return self.fc2(h)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block on (B, T, C) image tokens with text context (B, S, D).

    kind "full": self-attention (norm1, attn1), cross-attention (norm2, attn2), feed-forward (norm3, ff).
    kind "cross": the same without self-attention (MobileDiffusion at high resolution).
    """

    def __init__(self, dim: int, heads: int, context_dim: int, kind: str, *, ff_mult: int, ff_activation: str,
                 shared_kv: bool, upcast: bool, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        if kind == "full":
            self.norm1 = nn.LayerNorm(dim, **kw)
            self.attn1 = Attention(dim, heads, upcast=upcast, **kw)
        self.norm2 = nn.LayerNorm(dim, **kw)
        self.attn2 = Attention(dim, heads, context_dim, shared_kv=shared_kv, upcast=upcast, **kw)
        self.norm3 = nn.LayerNorm(dim, **kw)
        self.ff = FeedForward(dim, ff_mult, ff_activation, **kw)

    def forward(self, x, context):
        if hasattr(self, "attn1"):
            x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """An attention site: GroupNorm, proj_in, `depth` transformer blocks, proj_out, residual.

    x (B, C, H, W), context (B, S, D) -> (B, C, H, W). The feature map is turned into tokens
    once, (B, C, H, W) -> (B, H*W, C), and back once. proj_in/proj_out are Linear layers; a 1x1
    conv checkpoint (SD1) loads into them unchanged (same weights, trailing 1x1 dropped).
    """

    def __init__(self, dim: int, heads: int, context_dim: int, kind: str, depth: int, *, groups: int,
                 ff_mult: int, ff_activation: str, shared_kv: bool, upcast: bool, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.norm = GroupNormAct(groups, dim, eps=1e-6, act=None, **kw)
        self.proj_in = nn.Linear(dim, dim, **kw)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, heads, context_dim, kind, ff_mult=ff_mult, ff_activation=ff_activation,
                             shared_kv=shared_kv, upcast=upcast, **kw)
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(dim, dim, **kw)

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, HW, C)
        h = self.proj_in(h)
        for block in self.blocks:
            h = block(h, context)
        h = self.proj_out(h).view(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last strides
        return x + h


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsample then a 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, dim: int, *, device=None, dtype=None):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1, device=device, dtype=dtype)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
