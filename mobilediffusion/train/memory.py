"""How much memory a training run needs, estimated before it starts, and the refusal when it does not fit.

    est = estimate(unet_config, kind="finetune", batch=4, latent_hw=(64, 64), trained_params=..., ...)
    check_fits(est, what="fine-tuning")     # ConfigError naming the estimate and what to change

Weights and optimizer: float32 weights of every UNet held (trained, frozen, EMA copies, a discriminator, a teacher),
their gradients and Adam's two moments for the trained ones. Activations: what backward keeps, measured by running
the UNet once on the meta device (no memory, no compute) at batch 1 and the largest bucket and summing every layer's
output plus each attention's score matrices (softmax in and out); times the batch. A run is refused when the
estimate is above the memory the system has available now.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError

BASE_BYTES = 1 << 30  # the process itself: torch, the text encoder / decoder while they are loaded, buffers
GiB = float(1 << 30)


@dataclass(frozen=True)
class Estimate:
    weights: int  # every float32 weight held
    optimizer: int  # gradients + Adam moments of the trained weights
    activations: int  # kept for backward, at the batch size
    base: int = BASE_BYTES

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.activations + self.base

    def text(self) -> str:
        return (f"{self.total / GiB:.1f} GiB (weights {self.weights / GiB:.1f}, gradients + Adam "
                f"{self.optimizer / GiB:.1f}, activations {self.activations / GiB:.1f}, process {self.base / GiB:.1f})")


@torch.no_grad()
def activation_bytes(unet_cfg, latent_hw: tuple[int, int]) -> int:
    """Bytes a training forward of one sample keeps for backward (float32), from a meta-device run."""
    from ..unet import UNet
    from ..unet_blocks import Attention
    from ..weights.materialize import build_on_meta

    unet = build_on_meta(UNet, unet_cfg)
    total = 0

    def leaf(module, args, out):
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel() * 4

    def attention(module, args, kwargs, out):
        nonlocal total
        q = args[0]  # (1, N, C)
        kv = args[1] if len(args) > 1 else kwargs.get("context")
        kv = q if kv is None else kv
        total += 2 * module.heads * q.shape[1] * kv.shape[1] * 4  # scores and their softmax

    handles = [m.register_forward_hook(leaf) for m in unet.modules() if not list(m.children())]
    handles += [m.register_forward_hook(attention, with_kwargs=True) for m in unet.modules() if isinstance(m, Attention)]
    h, w = latent_hw
    meta = dict(device="meta")
    unet(torch.empty(1, unet_cfg.in_channels, h, w, **meta), torch.zeros(1, dtype=torch.long, **meta),
         torch.empty(1, 77, unet_cfg.cross_attention_dim, **meta))
    for handle in handles:
        handle.remove()
    return total


def unet_params(unet_cfg) -> int:
    from ..unet import UNet
    from ..weights.materialize import build_on_meta

    return sum(p.numel() for p in build_on_meta(UNet, unet_cfg).parameters())


def estimate(unet_cfg, *, kind: str, batch: int, latent_hw: tuple[int, int], trained: int | None = None,
             ema: bool = False, teacher_cfg=None, shards: int = 1) -> Estimate:
    """kind: "finetune" (the UNet or a LoRA on it: `trained` parameters, default all), "gan" (+ a discriminator
    from the UNet's down half, trained, and D's forwards), "distill" (`unet_cfg` the student, + a frozen teacher).
    `shards`: FSDP over this many processes (each holds 1/shards of the weights, gradients and Adam moments)."""
    p = unet_params(unet_cfg)
    trained = p if trained is None else trained
    acts = activation_bytes(unet_cfg, latent_hw)
    weights = 4 * p + (4 * trained if ema else 0)
    optimizer = 12 * trained
    if kind == "gan":  # D: about the down half, trained in full; its three forwards keep about one UNet's worth
        d = p // 2
        weights, optimizer, acts = weights + 4 * d, optimizer + 12 * d, acts * 2
    elif kind == "distill":
        weights += 4 * unet_params(teacher_cfg)  # (the teacher runs without grad: its activations are transient)
    elif kind != "finetune":
        raise ValueError(f"unknown kind {kind!r}")
    return Estimate(weights // shards, optimizer // shards, acts * batch)


def available_bytes() -> int:
    """Memory the system has available now (MemAvailable), or a very large number where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return 1 << 62


def check_fits(est: Estimate, *, what: str, available: int | None = None) -> None:
    """ConfigError when the estimate is above the available memory (now, unless given)."""
    available = available_bytes() if available is None else available
    if est.total > available:
        raise ConfigError(f"{what} needs about {est.text()}, but {available / GiB:.1f} GiB are available; lower "
                          "--batch-size or --resolution, or train a LoRA (--lora-rank) instead of the whole UNet "
                          "(nothing was trained)")


__all__ = ["Estimate", "estimate", "activation_bytes", "available_bytes", "check_fits"]
