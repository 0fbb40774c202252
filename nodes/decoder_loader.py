"""Load Lite Decoder: TAESD files (models/vae_approx), AutoencoderTiny folders, MobileDiffusion decoders."""
from __future__ import annotations

import os
import re

from ._common import (
    CACHE, CATEGORY, DEVICES, DTYPES, MODEL_FOLDER, DecoderHandle, file_key, list_diffusers_folders, list_files,
    resolve, torch_device, torch_dtype,
)

# latent space of each TAESD flavour, by file-name prefix, as ComfyUI's own VAELoader sets it:
# sampler latents = (raw - shift) * scale
TAESD_LATENT_SPACES = {"taesd": (0.18215, 0.0), "taesdxl": (0.13025, 0.0), "taesd3": (1.5305, 0.0609),
                       "taef1": (0.3611, 0.1159)}


def decoder_choices() -> list[str]:
    taesd = [f for f in list_files("vae_approx") if "decoder" in os.path.basename(f)]
    return (
        [f"vae_approx/{f}" for f in taesd]
        + [f"{MODEL_FOLDER}/{f}" for f in list_files(MODEL_FOLDER)]
        + [f"diffusers/{d}" for d in list_diffusers_folders()]
    )


def taesd_latent_space(filename: str) -> tuple[float, float]:
    """(scale, shift) of a TAESD file from its name (taesd_decoder, taesd_encoder -> SD 1.x/2.x latents)."""
    prefix = re.split(r"_(?:de|en)coder", os.path.basename(filename))[0].split(".")[0]
    return TAESD_LATENT_SPACES.get(prefix, TAESD_LATENT_SPACES["taesd"])


class LoadLiteDecoder:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "decoder_name": (decoder_choices(), {"tooltip": "A TAESD decoder from models/vae_approx "
                                 "(taesd_decoder.pth / .safetensors), a diffusers folder, or a MobileDiffusion "
                                 "checkpoint (its lite decoder)."}),
                "dtype": (DTYPES, {"default": "auto"}),
                "device": (DEVICES, {"default": "auto"}),
            }
        }

    RETURN_TYPES = ("MD_DECODER",)
    RETURN_NAMES = ("decoder",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads a small latent decoder (TAESD or the MobileDiffusion lite decoder)."

    def load(self, decoder_name, dtype="auto", device="auto"):
        from ..mobilediffusion.loading import load_decoder, load_model_config
        from ..mobilediffusion.weights.formats import detect

        dev = torch_device(device)
        dt = torch_dtype(dtype, dev)
        path = resolve(decoder_name)
        kind = detect(path).kind
        if kind in ("taesd", "vae_file"):
            scale, shift = taesd_latent_space(path) if kind == "taesd" else (0.18215, 0.0)
        else:
            cfg = load_model_config(path)
            scale, shift = cfg.latent_scale, cfg.latent_shift
        decoder = CACHE.get((file_key(path), "decoder", str(dt), str(dev)),
                            lambda: load_decoder(path, device=dev, dtype=dt))
        return (DecoderHandle(decoder, scale, shift, decoder_name),)
