"""Lite Encode: MD_ENCODER + IMAGE (B, H, W, C) in [0, 1] -> LATENT (raw latents, as ComfyUI's VAEEncode)."""
from __future__ import annotations

from ._common import CATEGORY, memory_guard


class MobileDiffusionLiteEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "encoder": ("MD_ENCODER", {"tooltip": "An encoder from Load MobileDiffusion Model or Load Lite "
                                                     "Encoder (TAESD also encodes for ComfyUI's own SD1.5 models)."}),
                "pixels": ("IMAGE", {"tooltip": "Images, e.g. from Load Image; height and width must be "
                                                "multiples of the encoder's downscale (8 for SD and for the "
                                                "embedded default)."}),
            }
        }

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("Raw VAE latents, as ComfyUI's VAEEncode outputs them: feed a sampler's latent_image "
                       "(img2img with denoise < 1) or a decoder.",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = "Encodes images to latents with a lite encoder (TAESD, the MobileDiffusion lite encoder, SD's VAE)."

    def encode(self, encoder, pixels):
        import torch

        from ..mobilediffusion.errors import ConfigError

        module = encoder.require()
        if pixels.ndim != 4 or pixels.shape[-1] not in (3, 4):
            raise ConfigError(f"the IMAGE must be (batch, height, width, 3) in [0, 1], got shape {tuple(pixels.shape)}")
        images = pixels[..., :3].permute(0, 3, 1, 2)  # (B, 3, H, W); an alpha channel is dropped, as VAEEncode does
        p = next(module.parameters())
        with torch.no_grad(), memory_guard(f"encoding {images.shape[0]}x{images.shape[3]}x{images.shape[2]}",
                                           p.device):
            latents = module(images.float().clamp(0, 1).to(p.device))  # sampler space, float32
        return ({"samples": encoder.to_raw(latents.float().cpu())},)
