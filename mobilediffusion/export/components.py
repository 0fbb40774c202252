"""The three exportable stages as fixed-shape modules with named inputs and outputs.

Each wrapper takes keyword tensors (their names become the TFLite signature's input names) and
returns a dict (its keys become the output names):

    text_encoder(ids (B, T) int)                                  -> {"context": (B, T, D)}
    unet(sample (N, C, h, w), timestep (N,), context (N, T, D))    -> {"output": (N, C, h, w)}
    decoder(latents (B, C, h, w) sampler space)                   -> {"image": (B, H, W, 3) in [0, 1]}

`export_copy` prepares a module for conversion: a structural copy on the CPU in float32 that shares
nothing it changes with the caller's model, with its GroupNorms computed through the ops' export
path (`odml.group_norm` composites the LiteRT GPU delegate fuses) when backend is "export".
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..ops import Backend, group_norm_act
from ..ops.backend import as_backend

COMPONENTS = ("text_encoder", "unet", "decoder")


class ExportGroupNorm(nn.Module):
    """nn.GroupNorm computed by ops.group_norm_act on the export backend (same weights, same math)."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.num_groups, self.eps = norm.num_groups, norm.eps
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x):
        return group_norm_act(x, self.num_groups, self.weight, self.bias, self.eps, None, backend=Backend.EXPORT)


def export_copy(module: nn.Module, backend="export", *, in_place: bool = False) -> nn.Module:
    """A float32 CPU copy of `module` in eval mode for tracing; GroupNorms on the ops' export path when
    backend is "export" ("reference": plain torch ops, which litert-torch lowers to builtins).
    `in_place`: prepare `module` itself instead (no copy; for a model loaded only to be exported)."""
    backend = as_backend(backend)
    if backend not in (Backend.EXPORT, Backend.REFERENCE):
        raise ValueError(f"a TFLite export traces the 'export' or 'reference' ops backend, not {backend.value!r}")
    if in_place:  # one tensor at a time becomes float32, CPU, contiguous: the peak grows by one tensor
        module.to("cpu", torch.float32).to(memory_format=torch.contiguous_format)
        return _export_form(module, backend)
    # share the tensors that are already what tracing needs, hand deepcopy float32 CPU copies of the rest
    # (a CUDA/fp16 model is never duplicated on its device; litert-torch misreads channels_last weights,
    # which the CPU fast path sets, so every copy is contiguous)
    memo = {}
    for t in [*module.parameters(), *module.buffers()]:
        if t.device.type == "cpu" and t.is_contiguous() and (t.dtype == torch.float32 or not t.is_floating_point()):
            memo[id(t)] = t
        else:
            data = t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype,
                                 memory_format=torch.contiguous_format)
            memo[id(t)] = nn.Parameter(data, requires_grad=False) if isinstance(t, nn.Parameter) else data
    return _export_form(copy.deepcopy(module, memo), backend)


def _export_form(module: nn.Module, backend: Backend) -> nn.Module:
    _plain_torch(module)
    _set_ops_layers(module, backend)  # the model's own fused-op layers (GroupNormAct, attention, ...)
    if backend is Backend.EXPORT:  # plain GroupNorms the model still has
        for parent in list(module.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.GroupNorm:
                    setattr(parent, name, ExportGroupNorm(child))
    return module.eval()


def _plain_torch(module: nn.Module) -> None:
    """Undo the CPU fast path on the copy: no torch.compile wrapper, no oneDNN-packed linears (a traced
    packed linear computes garbage in TFLite); tracing must see plain torch ops."""
    for m in module.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    try:
        from ..fast import unpack_linears
    except ImportError:  # a model package without the fast path: nothing to undo
        return
    unpack_linears(module)


def _set_ops_layers(module: nn.Module, backend: Backend) -> None:
    """Put the copy's ops layers on `backend` (a copy on the CPU must not keep a CUDA model's Triton path)."""
    try:
        from ..layers import set_ops_backend
    except ImportError:  # a model package without fused-op layers: only the GroupNorm swap applies
        return
    set_ops_backend(module, backend)


class TextEncoderExport(nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, ids):
        return {"context": self.text_encoder.encode(ids)}


class UNetExport(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, context):
        return {"output": self.unet(sample, timestep, context)}


class DecoderExport(nn.Module):
    """Sampler-space latents -> NHWC image in [0, 1]. `scale`/`shift` map the UNet's latent space to the
    decoder's (identity when both belong to one model): decoder(latents * scale + shift)."""

    def __init__(self, decoder, scale: float = 1.0, shift: float = 0.0):
        super().__init__()
        self.decoder, self.scale, self.shift = decoder, float(scale), float(shift)

    def forward(self, latents):
        if (self.scale, self.shift) != (1.0, 0.0):
            latents = latents * self.scale + self.shift
        return {"image": self.decoder(latents).permute(0, 2, 3, 1)}  # (B, H, W, 3)


@dataclass(frozen=True)
class Shapes:
    """The fixed shapes of one export."""

    batch: int  # images per run (B)
    unet_batch: int  # B, or 2B with classifier-free guidance ([uncond, cond])
    tokens: int  # T
    context_dim: int  # D
    latent_channels: int  # C
    latent_hw: tuple[int, int]  # (h, w)
    image_hw: tuple[int, int]  # (H, W)


def sample_inputs(name: str, shapes: Shapes, *, ids: torch.Tensor | None = None, seed: int = 0) -> dict:
    """Fixed, seeded example inputs of a component (used to trace it and to verify the conversion);
    the text encoder's are the given token ids (B, T) of a real prompt."""
    g = torch.Generator().manual_seed(seed)
    h, w = shapes.latent_hw
    if name == "text_encoder":
        if ids is None or tuple(ids.shape) != (shapes.batch, shapes.tokens):
            raise ValueError(f"the text encoder's example input is token ids of shape "
                             f"({shapes.batch}, {shapes.tokens})")
        return {"ids": ids}
    if name == "unet":
        n = shapes.unet_batch
        return {"sample": torch.randn(n, shapes.latent_channels, h, w, generator=g),
                "timestep": torch.full((n,), 500.0),
                "context": torch.randn(n, shapes.tokens, shapes.context_dim, generator=g)}
    if name == "decoder":
        return {"latents": torch.randn(shapes.batch, shapes.latent_channels, h, w, generator=g)}
    raise ValueError(f"unknown component {name!r}; expected one of {COMPONENTS}")


CALIBRATION_PROMPTS = ("a photo of a red fox in the snow, highly detailed", "", "an oil painting of a lighthouse "
                       "at dusk", "a close-up of a bowl of ramen, studio lighting")


def calibration_inputs(pipe, shapes: Shapes, timesteps, *, seed: int = 0) -> dict[str, list[dict]]:
    """{component: [inputs {name: numpy array}, ...]} that cover what each stage sees at run time, for
    precisions with static activation ranges (int8_a16): real prompts through the tokenizer and the torch
    text encoder (their contexts drive the UNet, [uncond, cond] as the runtime batches them), unit-variance
    latents (the scaled sampler state, and finished latents) at the first, middle and last baked timestep
    (the timestep input's range is set here)."""
    g = torch.Generator().manual_seed(seed)
    h, w = shapes.latent_hw
    B, N = shapes.batch, shapes.unet_batch
    text = pipe.text_encoder
    ids = [text.tokenize([p] * B) for p in CALIBRATION_PROMPTS]
    with torch.no_grad():
        contexts = [text.encode_prompts([p] * B).float().cpu() for p in CALIBRATION_PROMPTS]  # (B, T, D) each
    uncond = contexts[1]  # the empty prompt
    pick = sorted({0, len(timesteps) // 2, len(timesteps) - 1})
    unet = []
    for k, i in enumerate(pick):
        cond = contexts[(0, 2, 3)[k % 3]]
        context = torch.cat([uncond, cond]) if N == 2 * B else cond  # (N, T, D)
        unet.append({"sample": torch.randn(N, shapes.latent_channels, h, w, generator=g).numpy(),
                     "timestep": np.full((N,), float(timesteps[i]), np.float32), "context": context.numpy()})
    return {
        "text_encoder": [{"ids": i.numpy().astype(np.int32)} for i in ids],
        "unet": unet,
        "decoder": [{"latents": torch.randn(B, shapes.latent_channels, h, w, generator=g).numpy()} for _ in range(3)],
    }
