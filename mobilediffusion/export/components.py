"""The exportable stages: one table (`SPECS`) of what each needs, which the exporter, the memory budget and
the nodes loop over.

Each wrapper takes keyword tensors (their names become the TFLite signature's input names) and
returns a dict (its keys become the output names):

    text_encoder(ids (B, 77) int)                                 -> {"context": (B, 77, D)}   one chunk
    encoder(image (B, H, W, 3) in [0, 1])                         -> {"latents": (B, C, h, w)} sampler space
    adapter(hint (B, c, H, W) in [0, 1])                          -> {"res_input_k": (B, C_k, h_k, w_k), ...}
    controlnet(sample, timestep, context (N, ...), hint (N, c, H, W)) -> {"res_middle", "res_output_k", ...}
    unet(sample (N, C, h, w), timestep (N,), context (N, T, D)
         [, concat (N, 5, h, w)] [, res_* as the control gives])   -> {"output": (N, C, h, w)}
    decoder(latents (B, C, h, w) sampler space)                   -> {"image": (B, H, W, 3) in [0, 1]}

The encoder (img2img / inpainting) and a control model (a T2I-Adapter `adapter`, run once, or a ControlNet
`controlnet`, run every step) are optional. A UNet exported with a control takes the control's residuals as
inputs under the control's output names (Residuals.input[k] -> res_input_k, middle -> res_middle, output[k] ->
res_output_k); the runtime feeds zeros when no control image is given. An inpainting UNet (9 channels) takes
`concat` (mask and masked-image latents).

A component has one TFLite signature per shape it must take, over one set of weights (litert-torch
shares the constants of signatures that trace the same module): the UNet one per image size and
context length (T = 77 k for prompts of k chunks), the decoder one per image size. The first signature
(the default size, one chunk) carries the component's own name, so a reader of older bundles runs it.

`export_copy` prepares a module for conversion: a structural copy on the CPU in float32 that shares
nothing it changes with the caller's model, with its GroupNorms computed through the ops' export
path (`odml.group_norm` composites the LiteRT GPU delegate fuses) when backend is "export".
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..ops import Backend, group_norm_act
from ..ops.backend import as_backend
from ..runtime.manifest import ALL_COMPONENTS



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


def residual_name(place: str, k: int | None = None) -> str:
    """The input/output name of one control residual: res_input_k, res_middle, res_output_k."""
    return f"res_{place}" if k is None else f"res_{place}_{k}"


def as_residuals(named: dict):
    """{res_* name: tensor} -> control.Residuals (None where no name is given)."""
    from ..control.residuals import Residuals

    def listed(place):
        ks = sorted(int(n.rsplit("_", 1)[1]) for n in named if n.startswith(f"res_{place}_"))
        if not ks:
            return ()
        return tuple(named.get(residual_name(place, k)) for k in range(ks[-1] + 1))

    return Residuals(listed("input"), named.get("res_middle"), listed("output"))


class UNetExport(nn.Module):
    """The UNet with its optional inputs: `concat` (inpainting UNets) and the control residuals (by name)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, context, concat=None, **residuals):
        control = as_residuals(residuals) if residuals else None
        return {"output": self.unet(sample, timestep, context, control=control, concat=concat)}


class EncoderExport(nn.Module):
    """NHWC image in [0, 1] (the decoder's output layout, a canvas's) -> sampler-space latents."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, image):
        return {"latents": self.encoder(image.permute(0, 3, 1, 2))}


class AdapterExport(nn.Module):
    """hint -> the T2I-Adapter's features under their residual names (res_input_k, k each level's last skip)."""

    def __init__(self, adapter, levels):
        super().__init__()
        self.adapter, self.levels = adapter, list(levels)

    def forward(self, hint):
        return {residual_name("input", k): f for k, f in zip(self.levels, self.adapter.features(hint))}


class ControlNetExport(nn.Module):
    """(sample, timestep, context, hint) -> the ControlNet's residuals (res_middle, res_output_k)."""

    def __init__(self, controlnet):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, timestep, context, hint):
        r = self.controlnet(sample, timestep, context, hint)
        return {residual_name("middle"): r.middle, **{residual_name("output", k): o for k, o in enumerate(r.output)}}


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
    tokens: int  # tokens per prompt chunk (77): the text encoder's input
    context_dim: int  # D
    latent_channels: int  # C
    upscale: int  # f: image pixels per latent pixel
    sizes: tuple  # image sizes (H, W), the first the default
    context_lengths: tuple = ()  # context tokens the UNet takes (77 k); () -> (tokens,)
    concat_channels: int = 0  # channels an inpainting UNet takes besides the latent (5), else 0
    hint: tuple | None = None  # (channels, pixels per latent pixel) of the control model's hint
    residuals: tuple = ()  # ((name, skip index or None for the middle), ...) the control gives the UNet
    skip_shapes: Callable | None = None  # (h, w) -> [(C, h_k, w_k)] per skip, then the middle's (UNet.skip_shapes)
    levels: tuple = ()  # the skip index of each UNet level's last block (where adapter features land)

    def latent_hw(self, size) -> tuple[int, int]:
        return size[0] // self.upscale, size[1] // self.upscale

    def residual_shapes(self, size, n: int) -> dict:
        """{residual name: (n, C, h, w)} at image size (H, W) for a batch of n."""
        shapes = self.skip_shapes(*self.latent_hw(size))
        return {name: (n, *shapes[-1 if k is None else k]) for name, k in self.residuals}

    def hint_shape(self, size, n: int) -> tuple:
        c, f = self.hint
        h, w = self.latent_hw(size)
        return (n, c, f * h, f * w)

    def lengths(self) -> tuple:
        return tuple(self.context_lengths) or (self.tokens,)


@dataclass(frozen=True)
class Signature:
    """One TFLite signature of a component: the image size and context length it runs at (None: any)."""

    name: str
    size: tuple | None = None  # (H, W)
    tokens: int | None = None  # context length T

    def manifest(self) -> dict:
        return {"signature": self.name, "size": list(self.size) if self.size else None, "tokens": self.tokens}


@dataclass(frozen=True)
class ComponentSpec:
    """What exporting one stage takes; `SPECS` holds one per component and every consumer loops over it."""

    name: str
    module: Callable  # pipe -> the torch module whose weights the file holds
    wrap: Callable  # (prepared module, decoder_space (scale, shift), Shapes) -> the module traced, keyword inputs
    signatures: Callable  # Shapes -> [Signature], the default first
    example: Callable  # (Shapes, Signature, generator, ids) -> {input name: tensor}, for tracing and checks
    calibration: Callable  # (Calibration, Shapes, Signature) -> [{input name: numpy array}] (int8_a16)
    lora_prefix: str | None  # its parameters' prefix in the traced module when LoRA packs may patch them


def _sized(component: str, shapes: Shapes, lengths=(None,)) -> list[Signature]:
    """One signature per size (x context length); the first named as the component."""
    out = []
    for H, W in shapes.sizes:
        for T in lengths:
            first = not out
            suffix = "" if first else f"_{W}x{H}" + (f"_t{T}" if T is not None else "")
            out.append(Signature(component + suffix, (H, W), T))
    return out


def _text_example(shapes, sig, g, ids):
    if ids is None or tuple(ids.shape) != (shapes.batch, shapes.tokens):
        raise ValueError(f"the text encoder's example input is token ids of shape ({shapes.batch}, {shapes.tokens})")
    return {"ids": ids}


def _unet_example(shapes, sig, g, ids):
    n, (h, w) = shapes.unet_batch, shapes.latent_hw(sig.size)
    out = {"sample": torch.randn(n, shapes.latent_channels, h, w, generator=g),
           "timestep": torch.full((n,), 500.0),
           "context": torch.randn(n, sig.tokens, shapes.context_dim, generator=g)}
    if shapes.concat_channels:
        out["concat"] = torch.randn(n, shapes.concat_channels, h, w, generator=g)
    for name, shape in (shapes.residual_shapes(sig.size, n) if shapes.residuals else {}).items():
        out[name] = 0.5 * torch.randn(shape, generator=g)
    return out


def _encoder_example(shapes, sig, g, ids):
    return {"image": torch.rand(shapes.batch, *sig.size, 3, generator=g)}


def _hint(shape, g):
    """A hint like an edge map or scribble: strokes of 1 on 0."""
    return (torch.rand(shape, generator=g) > 0.9).float()


def _adapter_example(shapes, sig, g, ids):
    return {"hint": _hint(shapes.hint_shape(sig.size, shapes.batch), g)}


def _controlnet_example(shapes, sig, g, ids):
    x = _unet_example(dataclasses.replace(shapes, residuals=(), concat_channels=0), sig, g, ids)
    return {**x, "hint": _hint(shapes.hint_shape(sig.size, shapes.unet_batch), g)}


def _decoder_example(shapes, sig, g, ids):
    h, w = shapes.latent_hw(sig.size)
    return {"latents": torch.randn(shapes.batch, shapes.latent_channels, h, w, generator=g)}


CALIBRATION_PROMPTS = ("a photo of a red fox in the snow, highly detailed", "", "an oil painting of a lighthouse "
                       "at dusk", "a close-up of a bowl of ramen, studio lighting")


class Calibration:
    """What every component's calibration inputs draw from (int8_a16): real prompts through the tokenizer and
    the torch text encoder, the baked timesteps, one seeded generator."""

    def __init__(self, pipe, shapes: Shapes, timesteps, *, seed: int = 0):
        text, B = pipe.text_encoder, shapes.batch
        self.ids = [text.tokenize([p] * B) for p in CALIBRATION_PROMPTS]
        with torch.no_grad():
            self.contexts = [text.encode(i).float().cpu() for i in self.ids]  # (B, 77, D) each
        self.timesteps = timesteps
        self.g = torch.Generator().manual_seed(seed)


def _text_calibration(c: Calibration, shapes, sig):
    return [{"ids": i.numpy().astype(np.int32)} for i in c.ids]


def _unet_calibration(c: Calibration, shapes, sig):
    """Unit-variance latents (the scaled sampler state) at the first, middle and last baked timestep (the
    timestep input's range is set here); contexts of the prompts, [uncond, cond] as the runtime batches them,
    repeated to the signature's length as the runtime repeats them."""
    B, N = shapes.batch, shapes.unet_batch
    (h, w), T = shapes.latent_hw(sig.size), sig.tokens
    repeat = lambda x: x.repeat(1, T // x.shape[1], 1)  # noqa: E731  (B, T, D)
    uncond = repeat(c.contexts[1])  # the empty prompt
    pick = sorted({0, len(c.timesteps) // 2, len(c.timesteps) - 1})
    out = []
    for k, i in enumerate(pick):
        cond = repeat(c.contexts[(0, 2, 3)[k % 3]])
        context = torch.cat([uncond, cond]) if N == 2 * B else cond  # (N, T, D)
        feed = {"sample": torch.randn(N, shapes.latent_channels, h, w, generator=c.g).numpy(),
                "timestep": np.full((N,), float(c.timesteps[i]), np.float32), "context": context.numpy()}
        if shapes.concat_channels:
            feed["concat"] = torch.randn(N, shapes.concat_channels, h, w, generator=c.g).numpy()
        for name, shape in (shapes.residual_shapes(sig.size, N) if shapes.residuals else {}).items():
            feed[name] = (0.5 * torch.randn(shape, generator=c.g)).numpy()
        out.append(feed)
    return out


def _encoder_calibration(c: Calibration, shapes, sig):
    return [{"image": torch.rand(shapes.batch, *sig.size, 3, generator=c.g).numpy()} for _ in range(3)]


def _hint_calibration(c: Calibration, shapes, sig, n):
    return _hint(shapes.hint_shape(sig.size, n), c.g).numpy()


def _adapter_calibration(c: Calibration, shapes, sig):
    return [{"hint": _hint_calibration(c, shapes, sig, shapes.batch)} for _ in range(3)]


def _controlnet_calibration(c: Calibration, shapes, sig):
    plain = dataclasses.replace(shapes, residuals=(), concat_channels=0)
    return [{**x, "hint": _hint_calibration(c, shapes, sig, shapes.unet_batch)} for x in _unet_calibration(c, plain, sig)]


def _decoder_calibration(c: Calibration, shapes, sig):
    h, w = shapes.latent_hw(sig.size)
    return [{"latents": torch.randn(shapes.batch, shapes.latent_channels, h, w, generator=c.g).numpy()}
            for _ in range(3)]


SPECS = {spec.name: spec for spec in (
    ComponentSpec(
        "text_encoder", module=lambda pipe: pipe.text_encoder, wrap=lambda m, space, shapes: TextEncoderExport(m),
        signatures=lambda shapes: [Signature("text_encoder")], example=_text_example,
        calibration=_text_calibration, lora_prefix="text_encoder."),
    ComponentSpec(
        "encoder", module=lambda pipe: pipe.encoder, wrap=lambda m, space, shapes: EncoderExport(m),
        signatures=lambda shapes: _sized("encoder", shapes), example=_encoder_example,
        calibration=_encoder_calibration, lora_prefix=None),
    ComponentSpec(
        "adapter", module=lambda pipe: pipe.control, wrap=lambda m, space, shapes: AdapterExport(m, shapes.levels),
        signatures=lambda shapes: _sized("adapter", shapes), example=_adapter_example,
        calibration=_adapter_calibration, lora_prefix=None),
    ComponentSpec(
        "controlnet", module=lambda pipe: pipe.control, wrap=lambda m, space, shapes: ControlNetExport(m),
        signatures=lambda shapes: _sized("controlnet", shapes, shapes.lengths()), example=_controlnet_example,
        calibration=_controlnet_calibration, lora_prefix=None),
    ComponentSpec(
        "unet", module=lambda pipe: pipe.unet, wrap=lambda m, space, shapes: UNetExport(m),
        signatures=lambda shapes: _sized("unet", shapes, shapes.lengths()), example=_unet_example,
        calibration=_unet_calibration, lora_prefix="unet."),
    ComponentSpec(
        "decoder", module=lambda pipe: pipe.decoder,
        wrap=lambda m, space, shapes: DecoderExport(m, *(space or (1.0, 0.0))),
        signatures=lambda shapes: _sized("decoder", shapes), example=_decoder_example,
        calibration=_decoder_calibration, lora_prefix=None),
)}
assert tuple(SPECS) == ALL_COMPONENTS  # the runtime's list of components, in the order a run uses them


def example_inputs(name: str, shapes: Shapes, sig: Signature, *, ids: torch.Tensor | None = None,
                   seed: int = 0) -> dict:
    """Fixed, seeded example inputs of one signature of a component (used to trace it and to verify the
    conversion); the text encoder's are the given token ids (B, 77) of a real prompt."""
    if name not in SPECS:
        raise ValueError(f"unknown component {name!r}; expected one of {ALL_COMPONENTS}")
    return SPECS[name].example(shapes, sig, torch.Generator().manual_seed(seed), ids)
