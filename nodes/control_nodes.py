"""Load MobileDiffusion Control (-> MD_CONTROL) and Apply MobileDiffusion Control (CONDITIONING -> CONDITIONING):
control models ComfyUI's own loaders cannot read (the default model's shipped plugin, which works at the default's
latent scale of 4) or that should run on the MobileDiffusion fast path from the start; also what the Export TFLite
Bundle node writes as the bundle's control component.

Apply puts (control, image, strength, start, end) under "md_control" in each CONDITIONING entry, chained after the
ones before it, as ComfyUI's ControlNetApplyAdvanced chains its ControlNets; the MobileDiffusion Sampler reads them
beside ComfyUI's own controls. ComfyUI's samplers ignore the key.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from ._common import CATEGORY, ModelCache, file_key, list_files, memory_guard, resolve

KEY = "md_control"  # the CONDITIONING entry key the Apply node writes and the sampler reads
SHIPPED_PREFIX = "shipped/"
_LOADED = ModelCache(size=4)  # loaded files and their copies on the UNet's device and dtype


@dataclass(frozen=True)
class ControlHandle:
    """MD_CONTROL: a ControlNet or T2I-Adapter (CPU, float32, as loaded) made for `unet_name`, and its file."""

    model: object
    name: str
    path: str

    def for_unet(self, unet):
        """The model on the UNet's device and dtype, on the fast path (cached per device/dtype)."""
        from ..mobilediffusion.fast import optimize

        p = next(unet.parameters())
        key = (id(self.model), str(p.device), p.dtype)
        return _LOADED.get(("run", *key), lambda: optimize(copy.deepcopy(self.model).to(p.device), dtype=p.dtype))


def control_choices() -> list[str]:
    """The shipped plugins (shipped/<name>), then ControlNets and T2I-Adapters in models/controlnet."""
    from ..mobilediffusion.control.load import shipped_controls

    return [f"{SHIPPED_PREFIX}{n}" for n in shipped_controls()] + [f"controlnet/{f}" for f in list_files("controlnet")]


def resolve_control_choice(choice: str) -> str:
    from ..mobilediffusion.control.load import resolve_control

    if choice.startswith(SHIPPED_PREFIX):
        return str(resolve_control(choice[len(SHIPPED_PREFIX):]))
    return resolve(choice)


class LoadMobileDiffusionControl:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "unet": ("MD_UNET", {"tooltip": "The UNet the control model steers (its layout is checked, and LDM "
                                                "ControlNets take their attention heads from it)."}),
                "control_name": (control_choices(), {"tooltip": "shipped/md-shapes-scribble: the default model's "
                                 "scribble / edge plugin. Or a ControlNet / T2I-Adapter from models/controlnet "
                                 "(SD 1.x/2.x; LDM, diffusers and TencentARC layouts)."}),
            },
        }

    RETURN_TYPES = ("MD_CONTROL",)
    RETURN_NAMES = ("control",)
    OUTPUT_TOOLTIPS = ("The control model, for Apply MobileDiffusion Control and Export TFLite Bundle.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads a ControlNet, T2I-Adapter or the default model's shipped control plugin."

    def load(self, unet, control_name):
        from ..mobilediffusion.control.load import load_control

        path = resolve_control_choice(control_name)
        key = ("file", file_key(path), id(unet.unet))
        with memory_guard(f"the control model {control_name!r}", "cpu"):
            model = _LOADED.get(key, lambda: load_control(path, base=unet.unet))
        return (ControlHandle(model, control_name, path),)


class MobileDiffusionApplyControl:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "control": ("MD_CONTROL", {"tooltip": "From Load MobileDiffusion Control."}),
                "image": ("IMAGE", {"tooltip": "The control image: an edge map (Canny), scribble (white strokes on "
                                               "black), depth map, ... as the control model expects. Cropped to the "
                                               "picture's aspect ratio and resized, as ControlNetApply does."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01,
                                       "tooltip": "How strongly the control steers (0: off)."}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                            "tooltip": "Where in the schedule the control starts (0: first step)."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                          "tooltip": "Where it ends (1: last step)."}),
            },
        }

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Adds a control (model + image) to both CONDITIONINGs for the MobileDiffusion Sampler; several "
                   "chain and add up.")

    def apply(self, positive, negative, control, image, strength, start_percent, end_percent):
        from ..mobilediffusion.errors import ConfigError

        if not 0.0 <= start_percent <= end_percent <= 1.0:
            raise ConfigError(f"start_percent must not be after end_percent (got {start_percent}, {end_percent})")
        if not hasattr(image, "dim") or image.dim() != 4 or image.shape[-1] not in (1, 3, 4):
            raise ConfigError("the control image is not an IMAGE (B, H, W, C); connect Load Image or a preprocessor")
        if strength == 0:
            return (positive, negative)
        hint = image[..., :3].permute(0, 3, 1, 2).float().cpu()  # (B, C, H, W) in [0, 1]
        item = (control, hint, float(strength), float(start_percent), float(end_percent))
        return (_with(positive, item), _with(negative, item))


def _with(conditioning, item):
    out = []
    for context, d in conditioning:
        d = dict(d)
        d[KEY] = (*d.get(KEY, ()), item)
        out.append([context, d])
    return out


def md_chain(conditioning) -> tuple:
    """The "md_control" items of a CONDITIONING side (of its first entry; md_controls checks they agree)."""
    return next((d.get(KEY, ()) for _, d in conditioning), ())


def md_controls(conditioning, what: str, unet) -> list:
    """control.apply.Control items of one CONDITIONING side's "md_control" chain (its entries must agree)."""
    from ..mobilediffusion.control.apply import Control
    from ..mobilediffusion.errors import ConfigError

    chains = {tuple(id(x) for x in d.get(KEY, ())): d.get(KEY, ()) for _, d in conditioning}
    if len(chains) > 1:
        raise ConfigError(f"the {what} CONDITIONING combines entries with different MobileDiffusion controls; apply "
                          "the control after Conditioning (Combine) so every entry carries the same one")
    chain = next(iter(chains.values()), ())
    return [Control(handle.for_unet(unet), hint, strength, start, end) for handle, hint, strength, start, end in chain]
