"""Layers shared by the UNet and the decoders that run a fused op from `mobilediffusion.ops`.

A model picks its ops backend once (`ops.choose_backend(device)`) and hands it to every such layer
with `set_ops_backend(model, backend)`; a layer built on its own uses the reference (torch) path.
The layers keep the parameter names of the torch modules they replace, so checkpoints and key maps
do not see them.
"""
from __future__ import annotations

from torch import nn

from .ops import Backend, clamp_unit, group_norm_act


class OpsLayer:
    """Mixin: a module that calls a fused op on `self.backend` (the reference path until told otherwise)."""

    backend: Backend = Backend.REFERENCE


class GroupNormAct(OpsLayer, nn.GroupNorm):
    """nn.GroupNorm followed by an activation ("silu" or None), computed by `ops.group_norm_act`
    (one fused kernel on the Triton and CPU backends). (B, C, *spatial) -> same shape and dtype.
    Parameters `weight`, `bias` as in nn.GroupNorm. `inplace=True`: x may be overwritten with the result
    (for a caller that does not use x again)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, act: str | None = "silu", *,
                 device=None, dtype=None):
        super().__init__(num_groups, num_channels, eps=eps, device=device, dtype=dtype)
        self.act = act

    def forward(self, x, inplace: bool = False):
        return group_norm_act(x, self.num_groups, self.weight, self.bias, self.eps, self.act, backend=self.backend,
                              inplace=inplace)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act={self.act}"


class UnitClamp(OpsLayer, nn.Module):
    """x -> x clamped to [0, 1] by `ops.clamp_unit` (a decoder's last layer; no parameters)."""

    def forward(self, x):
        return clamp_unit(x, backend=self.backend)


def set_ops_backend(model: nn.Module, backend: Backend) -> nn.Module:
    """Give every ops layer inside `model` the backend (chosen once per model); returns the model."""
    for m in model.modules():
        if isinstance(m, OpsLayer):
            m.backend = backend
    return model


def model_backend(model: nn.Module, device, requested=None) -> Backend:
    """Choose the backend for a model on `device` (logged once by choose_backend) and set it inside."""
    from .ops import choose_backend

    backend = choose_backend("cpu" if device is None else device, requested)
    set_ops_backend(model, backend)
    return backend
