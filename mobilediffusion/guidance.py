"""The model a sampler calls: the UNet under one or several text conditions and classifier-free guidance.

A condition is a list of (context (B, T, D), weight) entries; several entries (ComfyUI's
"Conditioning (Combine)") average the UNet outputs by weight. With one entry each side,
guidance runs as one batched UNet call on [uncond, cond] (contexts of different lengths, e.g. a long
prompt and a short negative one, repeated to a common length first: `batch_contexts`).
"""
from __future__ import annotations

import torch

from .prompts import common_length

Cond = list[tuple[torch.Tensor, float]]


def as_cond(c) -> Cond:
    """A tensor (B, T, D) or a list of (tensor, weight) -> list of (tensor, weight)."""
    return [(c, 1.0)] if isinstance(c, torch.Tensor) else list(c)


SAME = object()  # uncond_extra's default: the same keywords as the condition's


def guided_model(unet, cond: Cond, uncond: Cond | None, guidance: float, *, extra=None, uncond_extra=SAME):
    """-> model(x (B,C,h,w) float32, t) -> float32 output; runs the UNet in its own device and dtype.

    Classifier-free guidance (out = u + guidance * (c - u)) runs when guidance > 1 and uncond is given.
    `extra(x, t, context) -> dict`: more keywords for each UNet call, made from that call's own inputs (e.g.
    {"control": residuals} from a control.ControlStack), so every sampler passes them without knowing them;
    `uncond_extra` the same for the unconditional side (default: `extra`; None: nothing).
    """
    p = next(unet.parameters())
    cond = [(c.to(p.device, p.dtype), w) for c, w in cond]
    use_cfg = guidance > 1.0 and bool(uncond)
    uncond = [(c.to(p.device, p.dtype), w) for c, w in uncond] if use_cfg else None
    uncond_extra = extra if uncond_extra is SAME else uncond_extra

    def call(x, t, context, more):
        x = x.to(p.dtype)
        return unet(x, t, context, **(more(x, t, context) if more is not None else {})).float()

    def run(x, t, entries, more):
        total = sum(w for _, w in entries)
        return sum(w * call(x, t, _batch(c, x), more) for c, w in entries) / total

    if use_cfg and len(cond) == 1 and len(uncond) == 1 and uncond_extra is extra:
        both = batch_contexts([_batch(uncond[0][0], cond[0][0]), cond[0][0]])  # (2B, T, D)

        def model(x, t):
            xx = torch.cat([x, x])
            u, c = call(xx, t, _batch(both, xx), extra).chunk(2)
            return u + guidance * (c - u)

        return model
    if use_cfg:

        def model(x, t):
            u = run(x, t, uncond, uncond_extra)
            return u + guidance * (run(x, t, cond, extra) - u)

        return model
    return lambda x, t: run(x, t, cond, extra)


def _batch(context: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Repeat a (1, T, D) context to like's batch; a matching batch passes through."""
    B = like.shape[0]
    if context.shape[0] == B:
        return context
    if context.shape[0] == 1:
        return context.expand(B, -1, -1)
    raise ValueError(f"a condition of batch {context.shape[0]} cannot drive a batch of {B}")


def batch_contexts(contexts: list[torch.Tensor]) -> torch.Tensor:
    """Contexts (b_i, T_i, D) -> one batch (sum b_i, T, D), each repeated along T to their common length
    (ComfyUI's CONDCrossAttn.concat: attention over a context repeated n times equals attention over it once)."""
    T = common_length([c.shape[1] for c in contexts])
    return torch.cat([c.repeat(1, T // c.shape[1], 1) if c.shape[1] != T else c for c in contexts])
