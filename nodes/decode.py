"""Lite Decode: MD_DECODER + LATENT -> IMAGE (B, H, W, C) in [0, 1]."""
from __future__ import annotations

from ._common import CATEGORY


class MobileDiffusionLiteDecode:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "decoder": ("MD_DECODER", {"tooltip": "A decoder from Load MobileDiffusion Model or Load Lite "
                                                     "Decoder (TAESD also decodes ComfyUI's own SD1.5 latents)."}),
                "samples": ("LATENT", {"tooltip": "Raw latents from a sampler."}),
            }
        }

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY
    DESCRIPTION = "Decodes latents to images with a lite decoder."

    def decode(self, decoder, samples):
        import torch

        from ..mobilediffusion.errors import ConfigError

        raw = samples["samples"]
        want = decoder.decoder.config.latent_channels
        if raw.ndim != 4 or raw.shape[1] != want:
            got = raw.shape[1] if raw.ndim == 4 else f"a {raw.ndim}-D"
            raise ConfigError(f"this decoder reads {want}-channel latents but the LATENT has {got}; "
                              "use the decoder of the model that made the latents")
        p = next(decoder.decoder.parameters())
        with torch.no_grad():
            images = decoder.decoder(decoder.to_sampler_space(raw.float()).to(p.device))  # (B, 3, H, W) in [0, 1]
        return (images.float().clamp(0, 1).permute(0, 2, 3, 1).cpu().contiguous(),)  # (B, H, W, 3)
