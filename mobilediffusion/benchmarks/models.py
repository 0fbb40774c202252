"""The benchmarked components on shared random weights: ours and the diffusers / transformers reference.

Weights are random: speed does not depend on their values (denormals are flushed to zero). Each builder
returns (factory of fresh fp32 copies of ours, the fp32 reference or None, why there is no reference).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING

from ..config import ModelConfig
from ..errors import ConfigError

if TYPE_CHECKING:
    import torch

PROMPT = "a photo of an astronaut riding a horse on the moon"


def perturb(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Small random changes to every weight, so nothing stays zero-initialised (diffusers zeroes some)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.02)
    return module


def diffusers_module():
    """diffusers, or None when it is not installed."""
    try:
        import diffusers
    except ImportError:
        return None
    return diffusers


def _from_state(make, state, keymap, what):
    """A factory of fresh fp32 modules holding `state` (built on meta, so no random init is paid)."""
    from ..weights.keymap import load_state
    from ..weights.materialize import build_on_meta

    def factory():
        # built on meta without naming a device, so its ops backend is the CPU's (as the loaders build):
        # make(device="meta") would choose the meta device's backend (the reference) and keep it
        module = build_on_meta(make, device=None).to_empty(device="cpu")
        load_state(module, state, keymap, what=what)
        return module.eval()

    return factory


def _copies(module):
    return lambda: copy.deepcopy(module)


def build_unets(cfg: ModelConfig, *, with_reference: bool):
    import torch

    from ..unet import UNet
    from ..weights.unet_keys import unet_config_to_diffusers, unet_keymap

    diffusers = diffusers_module() if with_reference else None
    kwargs, why = None, None
    if not with_reference:
        why = "reference not requested"
    elif diffusers is None:
        why = "diffusers is not installed (pip install diffusers)"
    else:
        try:
            kwargs = unet_config_to_diffusers(cfg.unet)
        except ConfigError as e:
            why = f"diffusers cannot express this UNet: {str(e).split(': ', 1)[-1]}"
    if kwargs is None:
        return _copies(perturb(UNet(cfg.unet).eval(), 0)), None, why
    torch.manual_seed(0)
    ref = perturb(diffusers.UNet2DConditionModel(**kwargs).eval(), 0)
    make = lambda device: UNet(cfg.unet, device=device)  # noqa: E731
    return _from_state(make, ref.state_dict(), unet_keymap(cfg.unet), "UNet"), ref, None


def build_decoders(cfg: ModelConfig, *, with_reference: bool):
    import torch

    from ..decoder import build_decoder
    from ..weights.vae_keys import decoder_config_to_diffusers, decoder_keymap

    diffusers = diffusers_module() if with_reference else None
    if diffusers is None:
        why = "diffusers is not installed (pip install diffusers)" if with_reference else "reference not requested"
        return _copies(perturb(build_decoder(cfg.decoder).eval(), 1)), None, why
    cls_name, kwargs = decoder_config_to_diffusers(cfg.decoder)
    torch.manual_seed(1)
    ref = perturb(getattr(diffusers, cls_name)(**kwargs).eval(), 1)
    make = lambda device: build_decoder(cfg.decoder, device=device)  # noqa: E731
    return _from_state(make, ref.state_dict(), decoder_keymap(cfg.decoder, "diffusers"), "decoder"), ref, None


def build_text(cfg: ModelConfig, *, with_reference: bool):
    import torch
    from transformers import CLIPTextModel

    from ..text_encoder import TextEncoder

    torch.manual_seed(2)
    ours = TextEncoder(cfg.text).eval()
    if not with_reference:
        return _copies(ours), None, "reference not requested"
    ref = CLIPTextModel(cfg.text.to_transformers()).eval()
    ref.load_state_dict(ours.model.state_dict())
    return _copies(ours), ref, None


# --------------------------------------------------------------------------- one call of a component
@dataclasses.dataclass
class Case:
    """One call of a component: ours and the reference as callables on inputs in the precision."""

    ours: object  # () -> output tensor
    ref: object  # () -> output tensor, or None
    flop_fn: object  # one call of an fp32 meta-device copy
    shape: str  # what one call takes
    ref_name: str  # what the reference is
    why_no_ref: str | None
    inputs: tuple = ()  # the fp32 inputs (peers take them as they are)


def unet_inputs(cfg: ModelConfig, batch: int, latent: int):
    """(latents (B, C, h, w), timesteps (B,), context (B, 77, D)), fp32, the same every time."""
    import torch

    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, cfg.unet.in_channels, latent, latent, generator=g)
    ctx = torch.randn(batch, cfg.text.max_position_embeddings, cfg.unet.cross_attention_dim, generator=g)
    return x, torch.full((batch,), 999), ctx


def unet_case(cfg, ours, ref, why, dtype, batch, latent):
    import torch

    from ..unet import UNet

    x32, t, ctx32 = unet_inputs(cfg, batch, latent)
    x, ctx = x32.to(dtype), ctx32.to(dtype)
    meta = UNet(cfg.unet, device="meta")
    return Case(
        ours=lambda: ours(x, t, ctx),
        ref=None if ref is None else (lambda: ref(x, t, ctx).sample),
        flop_fn=lambda: meta(x.to("meta", torch.float32), t.to("meta"), ctx.to("meta", torch.float32)),
        shape=f"latents {tuple(x.shape)}, context {tuple(ctx.shape)}", ref_name="diffusers UNet2DConditionModel",
        why_no_ref=why, inputs=(x32, t, ctx32),
    )


def decoder_case(cfg, ours, ref, why, dtype, batch, latent):
    import torch

    from ..decoder import build_decoder

    dc = cfg.decoder
    lat = torch.randn(batch, dc.latent_channels, latent, latent, generator=torch.Generator().manual_seed(4))
    lat = (lat * dc.scaling_factor).to(dtype)
    meta = build_decoder(dc, device="meta")
    ref_fn = None
    if ref is not None:
        ref_fn = lambda: (ref.decode(lat / dc.scaling_factor + dc.shift_factor).sample / 2 + 0.5).clamp(0, 1)  # noqa: E731
    return Case(
        ours=lambda: ours(lat), ref=ref_fn, flop_fn=lambda: meta(lat.to("meta", torch.float32)),
        shape=f"latents {tuple(lat.shape)}", ref_name=f"diffusers {type(ref).__name__}" if ref is not None else "",
        why_no_ref=why,
    )


def text_case(cfg, ours, ref, why, dtype, batch, latent):
    ids = ours.tokenize([PROMPT] * batch)
    return Case(
        ours=lambda: ours.encode(ids), ref=None if ref is None else (lambda: ref(input_ids=ids).last_hidden_state),
        flop_fn=lambda: ours.encode(ids), shape=f"ids {tuple(ids.shape)}",
        ref_name="transformers CLIPTextModel", why_no_ref=why,
    )


CALIBRATION_TIMESTEPS = (999, 800, 600, 400, 200, 50)  # one calibration input per timestep


def calibration_inputs(cfg: ModelConfig, name: str, batch: int, latent: int) -> list[tuple]:
    """What a component is calibrated on for static int8 scales (ours' int8-static mode, OpenVINO's NNCF): for the
    UNet (latents, timesteps, context) with noise at each of CALIBRATION_TIMESTEPS and its own random context (the
    weights are random: no prompt would encode to better); for the decoder as many random latents. fp32, drawn apart
    from the timed inputs."""
    import torch

    g = torch.Generator().manual_seed(11)
    if name == "decoder":
        dc = cfg.decoder
        return [(torch.randn(batch, dc.latent_channels, latent, latent, generator=g) * dc.scaling_factor,)
                for _ in CALIBRATION_TIMESTEPS]
    x, _, ctx = (t.shape for t in unet_inputs(cfg, batch, latent))
    return [(torch.randn(x, generator=g), torch.full((batch,), t), torch.randn(ctx, generator=g))
            for t in CALIBRATION_TIMESTEPS]


def build_ours(make_ours, name: str, dtype, mode: str, calibration=()):
    """A fresh copy of ours in `dtype` with the fast path, compiled or with int8 convolutions and linears
    (ops.int8) as `mode` says: "int8" with activation scales per call, "int8-static" with static ones from the
    ranges its layers see on `calibration` (calibration_inputs)."""
    from .. import fast

    ours = make_ours()
    ours.to(dtype)
    target = ours.model if name == "text" else ours
    fast.optimize(target, compile=mode == "compile")
    if mode in ("int8", "int8-static"):
        from ..ops.int8 import calibrate, quantize_int8

        ranges = None
        if mode == "int8-static":
            if not calibration:
                raise ConfigError("the int8-static mode needs calibration inputs")
            cast = [tuple(t.to(dtype) if t.is_floating_point() else t for t in inp) for inp in calibration]
            ranges = calibrate(target, lambda: [ours(*inp) for inp in cast])
        quantize_int8(target, ranges=ranges)
    return ours


BUILDERS = {"text": (build_text, text_case), "unet": (build_unets, unet_case), "decoder": (build_decoders, decoder_case)}
COMPONENTS = tuple(BUILDERS)
