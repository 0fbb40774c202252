"""Epochs over bucketed data: every batch from one bucket (one image size), every item once per epoch.

    order = BucketBatches([120, 7, 33], batch_size=8, seed=0)   # items per bucket
    rows = order.batch(step)            # (B,) indices into the buckets laid end to end; B <= batch_size

Epoch e shuffles each bucket (numpy generator seeded by (seed, e)), cuts it into batches of batch_size (the last
one of a bucket shorter), and shuffles the batches of all buckets together. The batch of a step is a function of
the step alone, so a resumed run continues at the exact data position, and every process of a multi-process run
computes the same whole batch (each then keeps its rows: loop.Rows).
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError


class BucketBatches:
    def __init__(self, sizes: list[int], batch_size: int, seed: int = 0):
        if not sizes or min(sizes) < 1:
            raise ConfigError(f"every bucket needs at least one item, got sizes {sizes}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.sizes, self.batch_size, self.seed = list(sizes), batch_size, seed
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])  # bucket b holds rows offsets[b] .. offsets[b+1]-1
        self.steps_per_epoch = sum(-(-n // batch_size) for n in sizes)
        self._epoch, self._batches = -1, []

    def epoch(self, e: int) -> list[np.ndarray]:
        """The batches of epoch e in order (global row indices)."""
        if e != self._epoch:
            rng = np.random.default_rng([self.seed, e])
            batches = []
            for b, n in enumerate(self.sizes):
                perm = self.offsets[b] + rng.permutation(n)
                batches += [perm[i:i + self.batch_size] for i in range(0, n, self.batch_size)]
            self._epoch, self._batches = e, [batches[i] for i in rng.permutation(len(batches))]
        return self._batches

    def batch(self, step: int) -> torch.Tensor:
        e, i = divmod(step, self.steps_per_epoch)
        return torch.from_numpy(self.epoch(e)[i].astype(np.int64))

    def bucket_of(self, row: int) -> int:
        return int(np.searchsorted(self.offsets, row, side="right") - 1)


__all__ = ["BucketBatches"]
