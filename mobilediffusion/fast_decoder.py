"""The decoders' CPU fast path: what `fast.optimize` adds for a Decoder on top of packed channels_last convolutions.

Decoders spend nearly all their time in 3x3 convolutions on large maps (a 512 x 512 image: 0.14 TFLOP for
TAESD, 0.6 for the lite decoder, 2.5 for the SD VAE). Besides running them through oneDNN on packed
weights in channels_last (packed.PackedConv2d), two rewrites cut the work around them, each exact up to
fp32 rounding of the same sums in another order:

- nearest 2x upsample, then a 3x3 convolution = four 2x2 convolutions on the small map, one per output
  pixel phase, whose taps are sums of the 3x3 taps (`phase_weight`): 16/36 of the multiply-adds and no
  upsampled copy of the input. The four phases run as one convolution with 4x the output channels and
  are interleaved into the large map in one copy.
- a residual add after a convolution (ResBlock, TinyBlock) and a ReLU after it (TAESD) run inside the
  convolution (oneDNN post-ops) instead of as passes over the output.

The rewrites change module classes only (parameters, names and state_dict stay); with autograd on,
while tracing or compiling, and for plain (unpacked) convolutions every module runs its plain forward.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from .decoder import Decoder, ResBlock, TinyBlock
from .ops.int8 import Int8Conv2d, QuantizedMap
from .packed import PackedConv2d

# R[a] maps the 3 taps of a 3x3 kernel onto the 2 source rows of output phase a after a nearest 2x upsample:
# output row 2i (a = 0) reads upsampled rows 2i-1, 2i, 2i+1 = source rows i-1, i, i; row 2i+1 reads i, i, i+1
_R = ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0))


def phase_weight(w: torch.Tensor) -> torch.Tensor:
    """(O, I, 3, 3) kernel after a nearest 2x upsample -> (4 * O, I, 2, 2) kernels on the source map, the
    output channels ordered (row phase, column phase, O). Summed in fp64, returned in w's dtype."""
    R = torch.tensor(_R, dtype=torch.float64)  # (phase, 2 source taps, 3 kernel taps)
    k = torch.einsum("apd,oide,bqe->aboipq", R, w.detach().double(), R)  # (2, 2, O, I, 2, 2)
    return k.reshape(4 * w.shape[0], w.shape[1], 2, 2).to(w.dtype)


def _ready(conv, x) -> bool:
    """Whether `conv` runs packed on x (else the plain modules run)."""
    return isinstance(conv, PackedConv2d) and x.dim() == 4 and conv.padding_mode == "zeros" \
        and not isinstance(conv.padding, str) and conv._use_packed(x)


def _conv(x, conv, w, bias, *, padding=None, other=None, relu=False):
    """oneDNN convolution of x with the packed weight w (+ other) (then ReLU); output channels_last."""
    args = (padding or conv.padding, conv.stride, conv.dilation, conv.groups)
    if other is None:
        return torch.ops.mkldnn._convolution_pointwise(x, w, bias, *args, "relu" if relu else "none", [], "")
    return torch.ops.mkldnn._convolution_pointwise.binary(x, other, w, bias, *args, "add", None,
                                                          "relu" if relu else None, [], None)


def conv_fused(conv, x, *, other=None, relu=False):
    """conv(x) (+ other) (then ReLU) in one oneDNN call; `other` must be channels_last like the output."""
    if other is not None and not (other.dtype == x.dtype
                                  and other.is_contiguous(memory_format=torch.channels_last)):
        other = other.contiguous(memory_format=torch.channels_last).to(x.dtype)
    return _conv(x, conv, conv._packed_weight(x), conv.bias, other=other, relu=relu)


class _Derived:
    """A weight derived from a conv's (the phase kernels), packed for an input shape; remade when
    the conv gets another weight tensor (held by a weak reference, so a new tensor at a freed one's address
    is told apart), or its weight changes in place (version counter; inference tensors have none, as in
    packed._Packed). Kept on the container module, dropped by copies and pickles."""

    def __init__(self):
        self.ref, self.key, self.value = None, None, None

    def get(self, conv, shape, make):
        w = conv.weight
        key = (-1 if w.is_inference() else w._version, w.dtype, tuple(shape))
        if self.ref is None or self.ref() is not w or key != self.key:
            self.value = None  # free the old one first
            self.value = make(w)
            self.ref, self.key = weakref.ref(w), key
        return self.value


def _pack(w, padding, shape):
    w = w.contiguous(memory_format=torch.channels_last)
    return torch.ops.mkldnn._reorder_convolution_weight(w, list(padding), [1, 1], [1, 1], 1, list(shape))


def upsample_conv(conv, x, cache: _Derived):
    """conv(nearest_2x(x)) for a 3x3 / stride 1 / padding 1 conv, as the four phase convolutions."""
    B, C, H, W = x.shape
    O = conv.out_channels

    def make(w):
        bias = None if conv.bias is None else conv.bias.detach().repeat(4)
        return _pack(phase_weight(w), (1, 1), x.shape), bias

    w, bias = cache.get(conv, x.shape, make)
    return _interleave(_conv(x, conv, w, bias, padding=[1, 1]), O)


def _interleave(y: torch.Tensor, O: int) -> torch.Tensor:
    """The phase convolutions' output (B, 4 O, H + 1, W + 1) channels_last -> the upsampled conv's (B, O, 2H, 2W)
    channels_last, in one copy."""
    B, _, H1, W1 = y.shape
    H, W = H1 - 1, W1 - 1
    y = y.permute(0, 2, 3, 1).view(B, H1, W1, 2, 2, O)  # (B, H+1, W+1, row phase, col phase, O)
    out = y.new_empty(B, H, 2, W, 2, O)  # (B, H, row phase, W, col phase, O) = (B, 2H, 2W, O)
    for a in (0, 1):
        for b in (0, 1):  # phase (a, b) of source pixel (i, j) is the 2x2 window at padded (i + a, j + b)
            out[:, :, a, :, b] = y[:, a:a + H, b:b + W, a, b]
    return out.view(B, 2 * H, 2 * W, O).permute(0, 3, 1, 2)  # (B, O, 2H, 2W) channels_last


class Int8UpsampleConv(nn.Module):
    """conv(nearest_2x(x)) of a 3x3 / stride 1 / padding 1 convolution in int8 (ops.int8): its four phase kernels
    (phase_weight, quantized per output channel) as one int8 convolution on the small map, interleaved, as
    upsample_conv does in float. What ops.int8.quantize_int8 puts in place of such a convolution (its Upsample
    becomes an Identity); x (B, C, H, W) -> channels_last (B, O, 2H, 2W) in x's dtype."""

    def __init__(self, conv: nn.Conv2d, act=None):
        super().__init__()
        self.out_channels = conv.out_channels
        phase = nn.Conv2d(conv.in_channels, 4 * conv.out_channels, 2, padding=1, bias=conv.bias is not None,
                          device="meta")
        phase.weight = nn.Parameter(phase_weight(conv.weight.float()), requires_grad=False)
        if conv.bias is not None:
            phase.bias = nn.Parameter(conv.bias.detach().float().repeat(4), requires_grad=False)
        self.phase = Int8Conv2d(phase, act)  # its input's range is the upsampled map's

    def forward(self, x):
        return _interleave(self.phase(x), self.out_channels)


def int8_upsampled(parent: nn.Module, name: str, conv: nn.Module) -> bool:
    """Whether `conv`, child `name` of `parent`, follows a nearest 2x Upsample in an nn.Sequential (and fits the
    phase rewrite): quantize_int8 then makes the pair Identity + Int8UpsampleConv."""
    if not isinstance(parent, nn.Sequential) or not name.isdigit() or int(name) == 0:
        return False
    return _upsample_pair(parent[int(name) - 1], conv)


def _upsample_pair(up, conv) -> bool:
    """nn.Upsample(nearest 2x) followed by a 3x3 / stride 1 / padding 1 / ungrouped conv."""
    if not isinstance(up, nn.Upsample):
        return False
    scale = up.scale_factor if isinstance(up.scale_factor, tuple) else (up.scale_factor,) * 2
    return (up.mode == "nearest" and up.size is None and scale is not None
            and tuple(float(s) for s in scale) == (2.0, 2.0) and isinstance(conv, nn.Conv2d)
            and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1)


class FusedSequential(nn.Sequential):
    """nn.Sequential that runs (Upsample, Conv2d) pairs as `upsample_conv` and (Conv2d, ReLU) pairs as one
    convolution; the plan is made once (`plan`), and again when a child has been replaced (int8 layers)."""

    def plan(self) -> "FusedSequential":
        mods, steps, i = list(self), [], 0
        while i < len(mods):
            m, nxt = mods[i], mods[i + 1] if i + 1 < len(mods) else None
            if _upsample_pair(m, nxt):
                steps.append(("upsample_conv", (nxt,)))
                i += 2
            elif isinstance(m, (nn.Conv2d, Int8Conv2d)) and type(nxt) is nn.ReLU:
                steps.append(("conv_relu", (m, nxt)))
                i += 2
            else:
                steps.append(("module", (m,)))
                i += 1
        self.__dict__["_steps"] = steps
        self.__dict__["_planned_for"] = tuple(map(id, self))  # the children the plan holds
        self.__dict__["_caches"] = {}
        return self

    def forward(self, x):
        if tuple(map(id, self)) != self.__dict__["_planned_for"]:  # children replaced (e.g. by int8 layers)
            self.plan()
        for kind, mods in self.__dict__["_steps"]:
            conv = mods[0]
            if kind == "conv_relu" and isinstance(conv, Int8Conv2d):
                x = conv(x, relu=True)
            elif kind == "module" or not _ready(conv, x):
                if kind == "upsample_conv":
                    x = conv(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
                else:
                    for m in mods:
                        x = m(x)
            elif kind == "conv_relu":
                x = conv_fused(conv, x, relu=True)
            else:
                x = upsample_conv(conv, x, self._cache(conv))
        return x

    def _cache(self, conv) -> _Derived:
        return self.__dict__["_caches"].setdefault(id(conv), _Derived())

    def __getstate__(self):  # copies and pickles leave the plan and derived weights behind
        state = dict(super().__getstate__())
        state.pop("_steps", None)
        state.pop("_planned_for", None)
        state.pop("_caches", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.plan()  # on the copy's own children


def _int8_ready(block: ResBlock, x) -> bool:
    """Whether the block's int8 path runs on x: both convolutions int8 and not observed (calibration's hooks read
    their float inputs), a bf16 channels_last map, eager inference, and the CPU group-norm kernel's uint8 entry."""
    from .ops import Backend, cpu_kernel

    convs = (block.conv1, block.conv2)
    if not all(isinstance(c, Int8Conv2d) and not c._forward_pre_hooks for c in convs):
        return False
    if x.dtype != torch.bfloat16 or (torch.is_grad_enabled() and x.requires_grad):
        return False
    if any(n.backend is not Backend.CPU or n.act != "silu" for n in (block.norm1, block.norm2)):
        return False
    return cpu_kernel.group_norm_unsupported(x) is None and "md_group_norm_u8_bf16" in cpu_kernel.load()[0].fns


def _norm_u8(norm, x, conv) -> QuantizedMap:
    """GroupNorm + SiLU of x written as uint8 for the int8 convolution `conv` (its calibrated scale, if any)."""
    from .ops import cpu_kernel

    q, scale, zp = cpu_kernel.group_norm_u8(x, norm.num_groups, norm.weight, norm.bias, norm.eps, True, conv.act)
    return QuantizedMap(q, scale, zp, x.dtype)


class FastResBlock(ResBlock):
    """ResBlock with the residual add inside conv2. With int8 convolutions, each GroupNorm + SiLU writes the uint8
    map its convolution takes (no float map, no quantize pass), and conv2 accumulates into the shortcut in place:
    into x itself when the shortcut is the identity, so the block consumes its input (a decoder's blocks run on
    maps nothing else holds)."""

    def forward(self, x):
        if _int8_ready(self, x):
            h = self.conv1(_norm_u8(self.norm1, x, self.conv1))
            other = self.conv_shortcut(x).contiguous(memory_format=torch.channels_last)
            return self.conv2(_norm_u8(self.norm2, h, self.conv2), add=other)
        if not _ready(self.conv2, x):
            return super().forward(x)
        h = self.conv1(self.norm1(x))  # norm1, norm2: GroupNorm + SiLU
        # h is used once: normalized in place (a new large map costs its page faults)
        return conv_fused(self.conv2, self.norm2(h, inplace=True), other=self.conv_shortcut(x))


class FastTinyBlock(TinyBlock):
    """TinyBlock with its ReLUs and the residual add inside the convolutions (with int8 convolutions, the add
    accumulates into x in place: the block consumes its input, as a decoder's blocks may)."""

    def forward(self, x):
        c0, _, c1, _, c2 = self.conv
        if all(isinstance(c, Int8Conv2d) for c in (c0, c1, c2)):  # int8: ReLUs, the add and its ReLU in the convs
            h = c1(c0(x, relu=True), relu=True)
            if x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last) and \
                    not (torch.is_grad_enabled() and x.requires_grad):
                return c2(h, relu=True, add=x)  # accumulated into x: the block consumes its input
            return c2(h).add_(x).relu_()
        if not _ready(c2, x):
            return super().forward(x)
        h = conv_fused(c1, conv_fused(c0, x, relu=True), relu=True)
        return conv_fused(c2, h, other=x, relu=True)


SWAPS = {ResBlock: FastResBlock, TinyBlock: FastTinyBlock}


def fuse(decoder: Decoder) -> int:
    """Apply the rewrites to a decoder whose convolutions are packed (in place); returns how many modules
    changed class. `unfuse` undoes it."""
    n = 0
    for m in decoder.modules():
        if type(m) in SWAPS:
            m.__class__ = SWAPS[type(m)]
            n += 1
        elif type(m) is nn.Sequential and any(_upsample_pair(a, b) for a, b in zip(m, list(m)[1:])):
            m.__class__ = FusedSequential
            m.plan()
            n += 1
    return n


def unfuse(decoder: nn.Module) -> int:
    """Undo `fuse` (plain classes again)."""
    back = {v: k for k, v in SWAPS.items()}
    n = 0
    for m in decoder.modules():
        if type(m) in back:
            m.__class__ = back[type(m)]
            n += 1
        elif type(m) is FusedSequential:
            m.__class__ = nn.Sequential
            m.__dict__.pop("_steps", None)
            m.__dict__.pop("_planned_for", None)
            m.__dict__.pop("_caches", None)
            n += 1
    return n


__all__ = ["phase_weight", "upsample_conv", "conv_fused", "FusedSequential", "Int8UpsampleConv", "int8_upsampled",
           "FastResBlock", "FastTinyBlock", "fuse", "unfuse"]
