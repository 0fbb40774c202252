"""Load MobileDiffusion Model: checkpoint -> MD_UNET, MD_CLIP, MD_DECODER, MD_ENCODER."""
from __future__ import annotations

from ._common import (
    CACHE, CATEGORY, DEVICES, DTYPES, EMBEDDED, MODEL_FOLDER, DecoderHandle, EncoderHandle, UNetHandle, file_key,
    list_diffusers_folders, list_files, log, memory_guard, resolve, torch_device, torch_dtype,
)


def model_choices() -> list[str]:
    """The embedded default, then every checkpoint in the model folders, named `folder/file`."""
    return (
        [EMBEDDED]
        + [f"{MODEL_FOLDER}/{f}" for f in list_files(MODEL_FOLDER)]
        + [f"checkpoints/{f}" for f in list_files("checkpoints")]
        + [f"diffusers/{d}" for d in list_diffusers_folders()]
    )


class LoadMobileDiffusionModel:
    @classmethod
    def INPUT_TYPES(cls):
        from ..mobilediffusion.presets import PRESETS

        return {
            "required": {
                "checkpoint": (model_choices(), {"tooltip": "Checkpoint from models/mobilediffusion (.safetensors), "
                               "models/checkpoints (SD single-file) or models/diffusers (folders). The embedded "
                               "default needs no file."}),
                "preset": (["auto", *PRESETS], {"default": "auto", "tooltip": "auto detects the architecture from "
                           "the checkpoint; a preset forces it (e.g. a v-prediction SD2 single file)."}),
                "dtype": (DTYPES, {"default": "auto", "tooltip": "Weight precision. auto: fp32 on CPU, fp16 on GPU. "
                          "bf16 is about 2x faster than fp32 on recent CPUs. int8 (CPUs with VNNI): the UNet's and "
                          "decoder's convolutions and linears in int8, about 1.5x bf16 on an SD1.5 UNet and on "
                          "the lite decoder; the shipped default's images 51.4 dB PSNR from fp32 (bf16: 55.5 dB); bf16 "
                          "where int8 cannot run."}),
                "device": (DEVICES, {"default": "auto", "tooltip": "auto follows ComfyUI's device choice."}),
            },
            "optional": {
                "compile": ("BOOLEAN", {"default": False, "tooltip": "torch.compile the UNet (inductor, frozen "
                            "weights): faster steps, most with bf16 on CPU, after a first run that compiles for "
                            "30-75 s (cached on disk for later sessions)."}),
            },
        }

    # saved workflows link outputs by slot index: new outputs go after these
    RETURN_TYPES = ("MD_UNET", "MD_CLIP", "MD_DECODER", "MD_ENCODER")
    RETURN_NAMES = ("unet", "clip", "decoder", "encoder")
    OUTPUT_TOOLTIPS = ("The denoising UNet with its sampling config.", "The text encoder.",
                       "The latent decoder of this model.",
                       "The image encoder of this model, for img2img from a picture (Lite Encode). A checkpoint "
                       "without one gives an encoder that says so when used: load one with Load Lite Encoder.")
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads a MobileDiffusion, SD 1.x/2.x, SD-Turbo, BK-SDM or SDXS model as separate stages, and its "
                   "image encoder.")

    def load(self, checkpoint, preset="auto", dtype="auto", device="auto", compile=False):
        from ..mobilediffusion.pipeline import load_pipeline

        dev = torch_device(device)
        dt = torch_dtype(dtype, dev)
        path = None if checkpoint == EMBEDDED else resolve(checkpoint)
        key = (file_key(path) if path else EMBEDDED, preset, str(dt), str(dev), bool(compile))
        with memory_guard(f"the model {checkpoint!r}", dev):
            pipe, (encoder, missing) = CACHE.get(key, lambda: (
                load_pipeline(path, preset=None if preset == "auto" else preset, device=dev, dtype=dt,
                              compile=bool(compile)),
                _encoder(path, dev, dt)))
        cfg = pipe.config
        return (
            UNetHandle(pipe.unet, cfg, checkpoint),
            pipe.text_encoder,
            DecoderHandle(pipe.decoder, cfg.latent_scale, cfg.latent_shift, checkpoint),
            EncoderHandle(encoder, cfg.latent_scale, cfg.latent_shift, checkpoint, missing),
        )


def _encoder(path, device, dtype):
    """(the checkpoint's image encoder, "") or (None, why not). An encoder that cannot be read does not stop
    the model from loading for text-to-image: the handle reports it when Lite Encode uses it."""
    from ..mobilediffusion.errors import MobileDiffusionError
    from ..mobilediffusion.loading import has_encoder, load_encoder
    from ..mobilediffusion.pipeline import DEFAULT_WEIGHTS

    path = path or DEFAULT_WEIGHTS
    if not has_encoder(path):
        return None, "has no image encoder"
    try:
        return load_encoder(path, device=device, dtype=dtype), ""
    except MobileDiffusionError as e:  # CheckpointError, ConfigError: the file's encoder half is not readable
        log.warning("%s: its image encoder cannot be read (%s); Lite Encode will say so if it is used", path, e)
        return None, f"has an image encoder that cannot be read ({e})"
