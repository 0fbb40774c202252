"""Training pools: the latents and text contexts a stage draws its batches from; `take(rows) -> (x0, context)`.

    BucketPool   a latent cache's buckets (one image size each), rows numbered over the buckets end to end
    MemoryPool   tensors handed over in memory (ComfyUI's LATENT + CONDITIONING), contexts of any length
(loop.TensorPool: one tensor of latents and one of contexts, the synthetic stages' pool.)
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from .batches import BucketBatches


class BucketPool:
    """Cached latents and contexts of several buckets (one image size each); take(rows) reads rows of one bucket,
    numbered over the buckets laid end to end (batches.BucketBatches's numbering)."""

    def __init__(self, parts, empty: torch.Tensor, order: BucketBatches):
        self.latents = [p.latents.float() for p in parts]  # [(N_b, C, h_b, w_b)]
        self.contexts = [p.contexts.float() for p in parts]  # [(N_b, 77, D)]
        self.empty, self.order = empty.float(), order  # (1, 77, D): the empty prompt's context

    def take(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.order.bucket_of(int(rows[0]))
        local = rows - int(self.order.offsets[b])
        return self.latents[b][local], self.contexts[b][local]

    def to(self, device) -> "BucketPool":
        pool = BucketPool([], self.empty.to(device), self.order)
        pool.latents, pool.contexts = [x.to(device) for x in self.latents], [x.to(device) for x in self.contexts]
        return pool


class MemoryPool:
    """Latents (N, C, h, w) and a context per item ((T_i, D), lengths may differ: long prompts) held in memory, as
    ComfyUI's nodes hand them over; take(rows) stacks a batch (its contexts must be of one length)."""

    def __init__(self, latents: torch.Tensor, contexts: list, empty: torch.Tensor | None = None):
        self.latents, self.contexts, self.empty = latents, list(contexts), empty

    def take(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = [self.contexts[int(i)] for i in rows]
        if len({c.shape[0] for c in ctx}) > 1:
            raise ConfigError(f"a batch mixes captions of {sorted({c.shape[0] for c in ctx})} tokens (prompts over 75 "
                              "tokens come in chunks of 77); use batch size 1 or captions of one chunk")
        return self.latents[rows.to(self.latents.device)], torch.stack(ctx)

    def to(self, device) -> "MemoryPool":
        return MemoryPool(self.latents.to(device), [c.to(device) for c in self.contexts],
                          None if self.empty is None else self.empty.to(device))


__all__ = ["BucketPool", "MemoryPool"]
