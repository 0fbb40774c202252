"""What the MobileDiffusion Sampler reads from ComfyUI's graph besides text: the controls that ControlNetApply /
ControlNetApplyAdvanced put in CONDITIONING (run through this package's ControlNet / T2I-Adapter, built from the
weights of ComfyUI's own control model: nothing of ComfyUI's is changed), the LATENT's noise_mask, and the concat
conditioning (InpaintModelConditioning) of 9-channel inpainting UNets."""
from __future__ import annotations

from ._common import ModelCache

_CONVERTED = ModelCache(size=2)  # (ComfyUI's control module, shuffle flag, dtype, device) -> our model


def side_controls(conditioning, what: str) -> tuple:
    """(the side's control chain object or None, its ControlFacts) for one CONDITIONING side. Entries of one side
    must share one chain (ControlNetApply applies its chain to every entry of the side it is given)."""
    from ..mobilediffusion.errors import ConfigError
    from .comfy_reader import BridgeError, control_chain

    chains = {id(d.get("control")): d.get("control") for _, d in conditioning}
    if len(chains) > 1:
        raise ConfigError(f"the {what} CONDITIONING combines entries with different ControlNets; apply the "
                          "ControlNet after Conditioning (Combine) so every entry carries the same one")
    head = next(iter(chains.values()), None)
    try:
        return head, control_chain(head)
    except BridgeError as e:
        raise ConfigError(str(e)) from None


def controls_for_sides(positive, negative) -> tuple[list, list, bool]:
    """(positive's ControlFacts, negative's, whether both sides share one chain). ComfyUI's rule for the negative:
    its own chain, else the positive's when ControlNetApply set control_apply_to_uncond."""
    pos_head, pos = side_controls(positive, "positive")
    neg_head, neg = side_controls(negative, "negative")
    if neg_head is None and any(d.get("control_apply_to_uncond") for _, d in positive):
        return pos, pos, True
    return pos, neg, pos_head is neg_head


def to_controls(facts: list, unet) -> list:
    """ControlFacts -> control.apply.Control with our models (built once per ComfyUI control model and version)."""
    from ..mobilediffusion.control.apply import Control

    return [Control(_converted(f, unet), f.hint.float().cpu(), f.strength, f.start, f.end) for f in facts]


def _converted(facts, unet):
    import dataclasses

    from ..mobilediffusion.control.load import control_from_state
    from ..mobilediffusion.fast import optimize

    p = next(unet.parameters())
    key = (facts.module, facts.global_pool, p.dtype, str(p.device))

    def load():
        state = {k: v.detach().float().cpu() for k, v in facts.module.state_dict().items()}
        model = control_from_state(state, base=unet, name=f"ComfyUI's {type(facts.module).__name__}")
        if facts.global_pool and hasattr(model, "control_config"):
            model.control_config = dataclasses.replace(model.control_config, global_pool=True)
        return optimize(model.to(p.device), dtype=p.dtype)

    return _CONVERTED.get(key, load)


def inpaint_inputs(latent_image: dict | None, positive, unet_handle, shape) -> dict:
    """sample_latents' mask / concat from the LATENT's noise_mask and the positive side's concat conditioning:
    the mask resized bilinearly to the latent (ComfyUI's prepare_mask); for a 9-channel UNet the concat is
    round(mask) and the concat latent image in sampler space, as ComfyUI's concat_cond builds them."""
    import torch
    import torch.nn.functional as F

    from ..mobilediffusion.control.apply import fit_hint, to_batch
    from ..mobilediffusion.errors import ConfigError

    B, _, h, w = shape
    out = {}
    noise_mask = None if latent_image is None else latent_image.get("noise_mask")
    if noise_mask is not None:
        m = noise_mask.float().reshape(-1, 1, *noise_mask.shape[-2:])
        out["mask"] = F.interpolate(m, size=(h, w), mode="bilinear")
    if getattr(unet_handle.unet, "concat_channels", 0) == 0:
        return out
    entry = next((d for _, d in positive if "concat_latent_image" in d), None)
    if entry is None:
        raise ConfigError("this is an inpainting UNet (9 input channels): condition it with InpaintModelConditioning "
                          "(image, mask, VAE) before the sampler")
    image = unet_handle.to_sampler_space(entry["concat_latent_image"].float())
    if tuple(image.shape[-2:]) != (h, w):
        image = fit_hint(image, h, w, mode="bilinear")
    mask = entry.get("concat_mask", noise_mask)
    if mask is None:
        raise ConfigError("the inpainting conditioning has no mask; give InpaintModelConditioning a mask")
    mask = mask.float().reshape(-1, 1, *mask.shape[-2:])
    if tuple(mask.shape[-2:]) != (h, w):
        mask = fit_hint(mask, h, w, mode="bilinear")
    out["concat"] = torch.cat([to_batch(mask.round(), B), to_batch(image, B)], dim=1)  # (B, 1 + C, h, w)
    return out
