"""Load Lite Encoder: TAESD encoders (models/vae_approx), diffusers VAEs, MobileDiffusion lite encoders."""
from __future__ import annotations

import os

from ._common import (
    CACHE, CATEGORY, DEVICES, DTYPES, MODEL_FOLDER, EncoderHandle, file_key, list_diffusers_folders, list_files,
    resolve, torch_device, torch_dtype,
)
from .decoder_loader import taesd_latent_space


def encoder_choices() -> list[str]:
    taesd = [f for f in list_files("vae_approx") if "encoder" in os.path.basename(f)]
    return (
        [f"vae_approx/{f}" for f in taesd]
        + [f"{MODEL_FOLDER}/{f}" for f in list_files(MODEL_FOLDER)]
        + [f"diffusers/{d}" for d in list_diffusers_folders()]
    )


class LoadLiteEncoder:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "encoder_name": (encoder_choices(), {"tooltip": "A TAESD encoder from models/vae_approx "
                                 "(taesd_encoder.pth / .safetensors), a diffusers folder (its VAE's encoder), or a "
                                 "MobileDiffusion checkpoint that carries its lite encoder."}),
                "dtype": (DTYPES, {"default": "auto"}),
                "device": (DEVICES, {"default": "auto"}),
            }
        }

    RETURN_TYPES = ("MD_ENCODER",)
    RETURN_NAMES = ("encoder",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads an image encoder (TAESD, the MobileDiffusion lite encoder or an SD VAE's) for Lite Encode."

    def load(self, encoder_name, dtype="auto", device="auto"):
        from ..mobilediffusion.loading import load_encoder, load_model_config
        from ..mobilediffusion.weights.formats import detect

        dev = torch_device(device)
        dt = torch_dtype(dtype, dev)
        path = resolve(encoder_name)
        encoder = CACHE.get((file_key(path), "encoder", str(dt), str(dev)),
                            lambda: load_encoder(path, device=dev, dtype=dt))
        cfg = encoder.config
        # 1. the LATENT's raw space: a KL encoder's raw latents are its posterior means; TAESD's are its
        # family's (ComfyUI: raw = taesd_encoder(x) / scale + shift), from the model or the file name
        kind = detect(path).kind
        if cfg.kind == "kl":
            scale, shift = cfg.scaling_factor, cfg.shift_factor
        elif kind in ("native", "diffusers"):
            model = load_model_config(path)
            scale, shift = model.latent_scale, model.latent_shift
        else:
            scale, shift = taesd_latent_space(path)
        return (EncoderHandle(encoder, scale, shift, encoder_name),)
