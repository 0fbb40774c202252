"""MobileDiffusion LoRA: MD_UNET + MD_CLIP + a LoRA from models/loras -> LoRA'd copies (inputs unchanged)."""
from __future__ import annotations

import os

from ._common import CACHE, CATEGORY, UNetHandle, file_key, folder_paths, list_files, memory_guard

STRENGTH = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}


def resolve_lora(name: str) -> str:
    """A name from ComfyUI's loras list -> its path (outside ComfyUI: the name as a path)."""
    from ..mobilediffusion.errors import CheckpointError

    fp = folder_paths()
    if fp is not None and "loras" in fp.folder_names_and_paths:
        path = fp.get_full_path("loras", name)
        if path:
            return path
    if os.path.isfile(name):
        return name
    raise CheckpointError(f"LoRA {name!r} was not found; put it in ComfyUI's models/loras folder and refresh")


class MobileDiffusionLoRA:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "unet": ("MD_UNET", {"tooltip": "The UNet from Load MobileDiffusion Model (or another LoRA node)."}),
                "clip": ("MD_CLIP", {"tooltip": "The text encoder from the same model."}),
                "lora_name": (list_files("loras"), {"tooltip": "A LoRA from models/loras: kohya/A1111, LoCon, LoHa, "
                              "LoKr, DoRA, diffusers or PEFT files for this model family (SD 1.x LoRAs on SD 1.x)."}),
                "strength_model": ("FLOAT", {**STRENGTH, "tooltip": "How strongly to change the UNet; 0 leaves it "
                                   "as it is, negative values subtract the LoRA."}),
                "strength_clip": ("FLOAT", {**STRENGTH, "tooltip": "How strongly to change the text encoder; 0 leaves "
                                  "it as it is."}),
            },
        }

    RETURN_TYPES = ("MD_UNET", "MD_CLIP")
    RETURN_NAMES = ("unet", "clip")
    OUTPUT_TOOLTIPS = ("The UNet with the LoRA merged (a new model; the input stays as it was).",
                       "The text encoder with the LoRA merged.")
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Merges a LoRA into copies of the UNet and text encoder (weights shared where the LoRA does not "
                   "change them). For an LCM-LoRA pick the lcm sampler, 4-8 steps and cfg 1-2.")

    def apply(self, unet, clip, lora_name, strength_model=1.0, strength_clip=1.0):
        from ..mobilediffusion.lora import check_strength, lora_components, read_lora, with_lora

        sm, sc = check_strength(strength_model), check_strength(strength_clip)
        if sm == 0 and sc == 0:
            return unet, clip
        path = resolve_lora(lora_name)
        # the entry holds the inputs, so their ids cannot be reused by other objects while it lives
        key = ("lora", id(unet.unet), id(clip), file_key(os.path.abspath(path)), sm, sc)

        def load():
            lora = read_lora(path)
            has = lora_components(lora)
            new_unet = with_lora(unet.unet, lora, sm) if sm != 0 and "unet" in has else unet.unet
            new_clip = with_lora(clip, lora, sc) if sc != 0 and "text_encoder" in has else clip
            return unet.unet, clip, new_unet, new_clip

        device = next(unet.unet.parameters()).device
        with memory_guard(f"the LoRA {lora_name!r}", device):
            _, _, new_unet, new_clip = CACHE.get(key, load)
        out = unet if new_unet is unet.unet else UNetHandle(new_unet, unet.config, unet.name)
        return out, new_clip
