"""What a control model adds to a UNet: `Residuals(input, middle, output)`.

The three places are ComfyUI's (`apply_control` in its UNet), indexed here by the UNet's skips, outermost first
(skip k is what the k-th LDM input block gives: conv_in, then each resnet/attention block, each downsample):

- `input[k]` is added to skip k where it is made, so it reaches both the down path and the skip (T2I-Adapter;
  diffusers' `down_intrablock_additional_residuals` land on the last block of each level);
- `middle` is added after the mid block (ControlNet; diffusers' `mid_block_additional_residual`);
- `output[k]` is added to skip k only, as the up path eats it (ControlNet; diffusers'
  `down_block_additional_residuals`).

Entries may be None (nothing added there). Residuals from several control models add up (`+`); `* s` scales.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError


def _add(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _pad(items: tuple, n: int) -> tuple:
    return tuple(items) + (None,) * (n - len(items))


@dataclass(frozen=True)
class Residuals:
    input: tuple = ()  # per skip, outermost first: (B, C_k, h_k, w_k) tensors or None
    middle: torch.Tensor | None = None  # (B, C_mid, h_mid, w_mid)
    output: tuple = ()  # per skip, outermost first

    def __add__(self, other: Residuals) -> Residuals:
        if other is None:
            return self
        n_in, n_out = max(len(self.input), len(other.input)), max(len(self.output), len(other.output))
        return Residuals(
            tuple(_add(a, b) for a, b in zip(_pad(self.input, n_in), _pad(other.input, n_in))),
            _add(self.middle, other.middle),
            tuple(_add(a, b) for a, b in zip(_pad(self.output, n_out), _pad(other.output, n_out))),
        )

    __radd__ = __add__

    def __mul__(self, s) -> Residuals:
        scale = (lambda t: None if t is None else t * s)
        return Residuals(tuple(map(scale, self.input)), scale(self.middle), tuple(map(scale, self.output)))

    __rmul__ = __mul__

    def map(self, fn) -> Residuals:
        """fn applied to every tensor (e.g. a dtype cast or a batch repeat)."""
        f = (lambda t: None if t is None else fn(t))
        return Residuals(tuple(map(f, self.input)), f(self.middle), tuple(map(f, self.output)))

    def is_empty(self) -> bool:
        return self.middle is None and all(t is None for t in self.input + self.output)

    def check(self, skips: int) -> None:
        """ConfigError when there are more per-skip entries than the UNet has skips."""
        for name in ("input", "output"):
            n = len(getattr(self, name))
            if n > skips:
                raise ConfigError(f"control residuals have {n} '{name}' entries but this UNet has {skips} skips: "
                                  "the control model was made for another UNet layout; use one made for this model")

    @classmethod
    def from_comfy(cls, control: dict, skips: int) -> Residuals:
        """ComfyUI's control dict ({"input": [...], "middle": [...], "output": [...]}) for a UNet with `skips` skips
        -> Residuals. ComfyUI's UNet pops each list from its end: "input" as the input blocks run (outermost
        first), "output" as the up path pops the skips (innermost first), so a short "output" list lands on the
        innermost skips."""
        inputs = list(control.get("input") or ())[::-1]
        outputs = list(control.get("output") or ())
        middle = [m for m in (control.get("middle") or ()) if m is not None]
        if len(middle) > 1:
            raise ConfigError(f"control has {len(middle)} middle residuals; an SD-family UNet takes one")
        if len(inputs) > skips or len(outputs) > skips:
            raise ConfigError(f"control has {len(inputs)} input / {len(outputs)} output residuals but this UNet has "
                              f"{skips} skips: the control model was made for another UNet layout")
        return cls(tuple(inputs), middle[0] if middle else None, (None,) * (skips - len(outputs)) + tuple(outputs))


def skip_residual(residuals: Residuals | None, name: str, k: int):
    """The residual for skip k in `name` ("input" / "output"), or None."""
    if residuals is None:
        return None
    items = getattr(residuals, name)
    return items[k] if k < len(items) else None
