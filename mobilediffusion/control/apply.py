"""Controls as a sampler meets them: `Control(model, hint, strength, start, end)` and `ControlStack`, the callable
that gives the UNet its residuals for each call, as ComfyUI's ControlNetApplyAdvanced applies them:

- the hint is fitted to the latent's size x 8 (centre crop to the aspect ratio, then nearest-exact resize:
  ComfyUI's `common_upscale(..., "nearest-exact", "center")`); a 1-channel adapter gets the channels' mean;
- residuals are scaled by `strength` and only given while the step lies in [start, end] of the schedule
  (fractions: 0 the first, noisiest step; ComfyUI's `percent_to_sigma`, here on the timestep scale:
  percent p <-> timestep (1 - p) * (num_train_timesteps - 1));
- a ControlNet runs at every step on the UNet's own input, a T2I-Adapter once per hint size and dtype;
- several controls add up (ComfyUI's chained `previous_controlnet`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..runtime.conditioning import control_problem, control_window, crop_margins
from .adapter import Adapter, adapter_skips
from .controlnet import ControlNet, check_controlnet_fits
from .residuals import Residuals


@dataclass(frozen=True)
class Control:
    model: ControlNet | Adapter
    hint: torch.Tensor  # (1 or B, C, H, W) float in [0, 1]
    strength: float = 1.0
    start: float = 0.0  # fraction of the schedule where the control starts (0: from the first step)
    end: float = 1.0  # ... and ends (1: to the last step)

    def __post_init__(self):
        if not isinstance(self.model, (ControlNet, Adapter)):
            raise ConfigError(f"a control model is a ControlNet or T2I-Adapter (load_control), got {type(self.model)}")
        problem = control_problem(self.strength, self.start, self.end)
        if problem:
            raise ConfigError(problem)
        hint = self.hint
        if not isinstance(hint, torch.Tensor) or hint.dim() != 4 or hint.shape[1] not in (1, 3, 4):
            raise ConfigError("a control hint is an image tensor (B, C, H, W) with 1, 3 or 4 channels in [0, 1] "
                              f"(as_hint reads files and PIL images), got {getattr(hint, 'shape', type(hint))}")


def fit_hint(hint: torch.Tensor, height: int, width: int, mode: str = "nearest-exact") -> torch.Tensor:
    """(B, C, h, w) -> (B, C, height, width): centre crop to the target's aspect ratio, then resize (`mode`)."""
    h, w = hint.shape[-2:]
    y, x = crop_margins(h, w, height, width)
    hint = hint[..., y:h - y, x:w - x]
    if tuple(hint.shape[-2:]) == (height, width):
        return hint
    return F.interpolate(hint, size=(height, width), mode=mode)


def as_hint(image) -> torch.Tensor:
    """A PIL image, a path, a numpy (H, W[, C]) uint8/float array or a tensor -> (1, C, H, W) float32 in [0, 1];
    RGBA loses its alpha, greyscale stays one channel (a 3-channel model repeats it)."""
    if isinstance(image, torch.Tensor):
        t = image.float()
        if t.dim() == 3:
            t = t[None]
    else:  # files, PIL images and arrays are read as the bundle runtime reads them
        from ..runtime.conditioning import as_array
        from ..runtime.manifest import BundleError

        try:
            a = as_array(image)  # (H, W, 1 or 3) float32 in [0, 1]
        except BundleError as e:
            raise ConfigError(f"the control image: {e}") from None
        t = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None]
    if t.dim() != 4 or t.shape[1] not in (1, 3, 4):
        raise ConfigError(f"a control image has 1, 3 or 4 channels, got shape {tuple(t.shape)}")
    return t[:, :3] if t.shape[1] == 4 else t


class ControlStack:
    """(x (B, C, h, w) the UNet's input, t (0-dim timestep), context (B, T, D)) -> the summed Residuals of the
    controls active at t, or None."""

    def __init__(self, controls, unet, *, num_train_timesteps: int = 1000):
        self.controls = [c if isinstance(c, Control) else Control(*c) for c in controls]
        self.skips, self.levels, self.count = unet.skip_count, adapter_skips(unet), unet.skip_count
        self.windows = [control_window(c.start, c.end, num_train_timesteps) for c in self.controls]
        self._fitted = {}  # (control index, latent shape, dtype) -> the fitted hint / an adapter's residuals
        for c in self.controls:
            check_fits(c.model, unet)

    def __call__(self, x: torch.Tensor, t, context: torch.Tensor) -> Residuals | None:
        step = float(t)
        total = None
        for i, (c, (lo, hi)) in enumerate(zip(self.controls, self.windows)):
            if not lo <= step <= hi or c.strength == 0:
                continue
            res = self._residuals(i, c, x, t, context) * float(c.strength)
            total = res if total is None else total + res
        return total

    def _residuals(self, i: int, c: Control, x, t, context) -> Residuals:
        model = c.model
        p = next(model.parameters())
        key = (i, tuple(x.shape), x.dtype)
        if isinstance(model, ControlNet):
            if key not in self._fitted:  # the hint fitted once per latent shape, not at every step
                f = model.control_config.hint_factor
                hint = _channels(fit_hint(c.hint, f * x.shape[2], f * x.shape[3]), model.control_config.hint_channels)
                self._fitted[key] = to_batch(hint, x.shape[0]).to(p.device, p.dtype)
            return model(x.to(p.dtype), t, context.to(p.dtype), self._fitted[key])
        if key not in self._fitted:  # the adapter runs once per latent shape
            f = model.config.unshuffle
            hint = _channels(fit_hint(c.hint, f * x.shape[2], f * x.shape[3]), model.config.hint_channels)
            with torch.no_grad():
                res = model(hint.to(p.device, p.dtype), self.levels, self.count)
            self._fitted[key] = res.map(lambda r: to_batch(r, x.shape[0]))
        return self._fitted[key]


def to_batch(t: torch.Tensor, B: int) -> torch.Tensor:
    """(b, ...) -> (B, ...): one hint for every sample, or b hints repeated for the guided halves (B = k b)."""
    if t.shape[0] == B:
        return t
    if t.shape[0] == 1:
        return t.expand(B, *t.shape[1:])
    if B % t.shape[0] == 0:
        return t.repeat(B // t.shape[0], *([1] * (t.dim() - 1)))
    raise ConfigError(f"{t.shape[0]} control images cannot drive a batch of {B}: give one, or one per image")


def _channels(hint: torch.Tensor, want: int) -> torch.Tensor:
    if hint.shape[1] == want:
        return hint
    if want == 1:
        return hint.mean(dim=1, keepdim=True)
    return hint.expand(-1, want, -1, -1) if hint.shape[1] == 1 else hint[:, :want]


def check_fits(model, unet) -> None:
    if isinstance(model, ControlNet):
        check_controlnet_fits(model.control_config.unet, unet.config, "this ControlNet")
    elif tuple(model.config.channels) != tuple(unet.config.block_out_channels):
        raise ConfigError(f"this T2I-Adapter gives features of widths {model.config.channels}, but the model's levels "
                          f"are {unet.config.block_out_channels}: use an adapter made for this model's family")
