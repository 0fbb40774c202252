"""The weight update of one adapter, in float32, with ComfyUI's formulas (comfy/weight_adapter/*.py):

    LoRA / LoCon  dW = (alpha / r) * up.flatten(1) @ down.flatten(1)    r = rows of down
                  Tucker `mid` [r, r, kh, kw]: down' = mid . down (1x1), as a 3x3 down
    LoHa          dW = (alpha / r) * (w1a @ w1b) * (w2a @ w2b)           r = rows of w1b
                  Tucker t1/t2: wX = einsum("ijkl,jr,ip->prkl", tX, wXb, wXa)
    LoKr          dW = (alpha / r) * kron(w1, w2), w1 = w1a @ w1b and w2 = w2a @ w2b (or t2) when decomposed;
                  r = rows of the decomposed factor's b (w2's if both), factor 1 if neither is decomposed
    diff          dW = the stored full difference (also .w_norm; .diff_b / .b_norm for biases)
no alpha -> factor 1 (ComfyUI; PEFT's default alpha = r is the same), rsLoRA: alpha / sqrt(r).
The update is reshaped to the parameter's shape (a 1x1-conv LoRA on our Linear proj_in/out).
DoRA (`dora_scale`, ComfyUI's weight_decompose): W' = (W + s_a dW) * dora_scale / |W + s_a dW| with
the norm per input channel, or per output channel of the ORIGINAL W when dora_scale has one entry per
output; then W + m (W' - W).  Merged: W + m * dW, in float32, cast once by the caller.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import CheckpointError

KINDS = ("lora", "loha", "lokr", "diff")


@dataclass(frozen=True, eq=False)
class Patch:
    """One adapter on one parameter; strength-independent (the strength comes with the application)."""

    param: str  # parameter name in the patched object, e.g. "down.0.blocks.0.res.conv1.weight"
    kind: str  # one of KINDS
    factors: dict  # role (up, down, mid, w1a, ..., diff) -> tensor, as stored in the file
    alpha: float | None  # the file's alpha (or PEFT lora_alpha); None: factor 1
    rslora: bool = False  # PEFT use_rslora: alpha / sqrt(r)
    dora_scale: torch.Tensor | None = None  # DoRA magnitude, or None
    keys: tuple = ()  # the file keys of the factors (in their order), then of dora_scale, for messages

    # ------------------------------------------------------------------ the math
    def update(self, device=None) -> torch.Tensor:
        """dW before any scale, float32, in the adapter's natural shape (checked against the parameter
        by `check`)."""
        f = {k: v.to(device=device, dtype=torch.float32) for k, v in self.factors.items()}
        if self.kind == "diff":
            return f["diff"]
        if self.kind == "lora":
            up, down = f["up"], f["down"]
            if "mid" in f:  # Tucker: fold mid [r, r, kh, kw] into the 1x1 down [r, in] -> [r, in, kh, kw]
                down = torch.einsum("abhw,bc->achw", f["mid"], down.flatten(1))
            # [out, r] @ [r, in * kh * kw] -> [out, in, kh, kw] (or [out, in] for a linear down)
            return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        if self.kind == "loha":
            return _pair(f, "1") * _pair(f, "2")
        w1 = f["w1"] if "w1" in f else f["w1a"] @ f["w1b"]
        w2 = f["w2"] if "w2" in f else _pair(f, "2", lokr=True)
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2)

    def scale(self) -> float:
        """alpha / r (or alpha / sqrt(r)); 1 without alpha or (LoKr) without a decomposed factor."""
        if self.alpha is None or self.kind == "diff":
            return 1.0
        if self.kind == "lora":
            r = self.factors["down"].shape[0]
        elif self.kind == "loha":
            r = self.factors["w1b"].shape[0]
        else:
            r = self.factors["w2b"].shape[0] if "w2b" in self.factors else \
                self.factors["w1b"].shape[0] if "w1b" in self.factors else None
            if r is None:
                return 1.0
        return self.alpha / (math.sqrt(r) if self.rslora else r)

    def apply(self, weight: torch.Tensor, strength: float) -> torch.Tensor:
        """The float32 weight after this adapter at `strength` (a new tensor)."""
        dw = self.update(weight.device).reshape(weight.shape)
        if self.dora_scale is None:
            return weight + (strength * self.scale()) * dw
        return _dora(weight, dw * self.scale(), self.dora_scale.to(weight.device, torch.float32), strength)

    # ------------------------------------------------------------------ validation (no arithmetic)
    def check(self, shape: tuple) -> None:
        """CheckpointError unless the update fits a parameter of `shape` (1x1 conv vs linear allowed)."""
        try:
            natural = tuple(self.update(device="meta").shape)  # shapes only: meta tensors hold no data
        except RuntimeError as e:
            raise CheckpointError(f"{self.keys[0]}: the adapter's tensors do not fit together "
                                  f"({_shapes(self)}): {e}; the LoRA file is damaged") from e
        shape = tuple(shape)
        # equal up to trailing 1s (1x1 conv vs linear); a flat [out, in * kh * kw] update fits a conv, as in ComfyUI
        fits = natural[0] == shape[0] and math.prod(natural) == math.prod(shape) \
            and (len(natural) == 2 or _squeeze(natural) == _squeeze(shape))
        if not fits:
            raise CheckpointError(
                f"{self.keys[0]}: the LoRA changes a weight of shape {natural} but {self.param} is "
                f"{shape}; this LoRA was made for another model (e.g. an SDXL LoRA on SD 1.5): use a "
                "LoRA trained for this base model")
        if self.dora_scale is not None:
            n, first = self.dora_scale.numel(), self.dora_scale.shape[0] if self.dora_scale.ndim else 1
            per_output = first == shape[0] and n == shape[0]  # the test _dora makes
            if not per_output and (len(shape) < 2 or n != shape[1]):
                raise CheckpointError(f"{self.keys[0]}: dora_scale has {n} entries but {self.param} {shape} "
                                      "has neither that many outputs nor inputs; the LoRA file is damaged")
        for key, t in zip(self.keys, self.tensors()):
            if not torch.isfinite(t.float()).all():
                raise CheckpointError(f"{key} holds NaN or infinite values; the LoRA file is damaged: re-download it")

    def tensors(self) -> list:
        return list(self.factors.values()) + ([self.dora_scale] if self.dora_scale is not None else [])


def _pair(f: dict, n: str, lokr: bool = False) -> torch.Tensor:
    """LoHa `w{n}a @ w{n}b`, or with a Tucker core `t{n}`; LoKr spells the same factors `w{n}a/w{n}b/t{n}`."""
    a, b, t = f[f"w{n}a"], f[f"w{n}b"], f.get(f"t{n}")
    if t is None:
        return a @ b
    return torch.einsum("ijkl,jr,ip->prkl", t, b, a)


def _dora(weight, dw, dora_scale, strength):
    """ComfyUI's weight_decompose on float32 tensors (the norm's epsilon is float32's)."""
    calc = weight + dw
    if dora_scale.shape[0] == calc.shape[0] and dora_scale.numel() == calc.shape[0]:  # one magnitude per output
        shape = (weight.shape[0],) + (1,) * (weight.dim() - 1)
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(shape)
    else:  # one magnitude per input channel: norms over the outputs (and kernel) of W + dW
        shape = (1, calc.shape[1]) + (1,) * (calc.dim() - 2)
        norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True).reshape(shape)
    norm = norm + torch.finfo(torch.float32).eps
    calc = calc * (dora_scale.reshape(shape) / norm)
    return calc if strength == 1.0 else weight + strength * (calc - weight)


def _squeeze(shape) -> tuple:
    shape = tuple(shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _shapes(p: Patch) -> str:
    return ", ".join(f"{k} {tuple(v.shape)}" for k, v in p.factors.items())


__all__ = ["Patch", "KINDS"]
