"""Held-out losses during training (`--heldout IMAGES`): the denoising loss at fixed noise levels and the one-step
error, logged at every checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import loop
from .diffusion import noised, predicted_x0, target
from .pools import BucketPool


@torch.no_grad()
def heldout_losses(unet, pool: BucketPool, abar: torch.Tensor, prediction_type: str, *, seed: int = 0,
                   levels: int = 8) -> dict[str, float]:
    """The denoising loss on held-out latents at fixed noise levels (t = 0, T/levels, ..., T-1 for every item, the
    same noise each time), and the one-step error: x0 read from the output at t = T-1 vs x0 (MSE)."""
    was = unet.training
    unet.eval()
    T = len(abar)
    steps = torch.linspace(0, T - 1, levels).round().long()
    total = last = count = 0.0
    for b, (latents, contexts) in enumerate(zip(pool.latents, pool.contexts)):
        g = torch.Generator().manual_seed(seed * 1000 + b)
        for t0 in steps.tolist():
            noise = torch.randn(latents.shape, generator=g)
            t = torch.full((len(latents),), t0, dtype=torch.long)
            out = unet(noised(latents, t, noise, abar), t, contexts)
            total += (out - target(latents, t, noise, abar, prediction_type)).pow(2).mean(dim=(1, 2, 3)).sum().item()
            if t0 == T - 1:
                x0 = predicted_x0(noised(latents, t, noise, abar), t, out, abar, prediction_type)
                last += (x0 - latents).pow(2).mean(dim=(1, 2, 3)).sum().item()
            count += len(latents)
    unet.train(was)
    n = sum(len(x) for x in pool.latents)
    return {"heldout_loss": round(total / count, 6), "heldout_x0_last": round(last / n, 6)}


def heldout_logger(unet, pool, abar, prediction_type, out_dir, every: int, acc=None, *, everyone: bool = False):
    """on_step for loop.run: every `every` steps (and at the end), the held-out losses of `unet` as a log.jsonl row
    {"step", "heldout_loss", "heldout_x0_last"} (main process). `everyone`: every process runs the forwards (a
    sharded UNet gathers its weights from all of them); the main one writes."""
    import json

    def on_step(step, total, losses):
        main = acc is None or acc.is_main_process
        if ((step + 1) % every and step + 1 != total) or not (main or everyone):
            return
        row = {"step": step + 1, **heldout_losses(unet, pool, abar, prediction_type)}
        if not main:
            return
        with open(Path(out_dir) / loop.LOG, "a") as f:
            f.write(json.dumps(row) + "\n")
    return on_step


__all__ = ["heldout_losses", "heldout_logger"]
