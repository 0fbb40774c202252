"""Train MobileDiffusion LoRA: a one-step (DiffusionGAN) or denoising LoRA for a MODEL or MD_UNET, from LATENT +
CONDITIONING as ComfyUI's own training nodes give them (Load Image and Text Dataset from Folder -> VAE Encode),
saved into models/loras in kohya keys (LoraLoader reads it at once), with a LOSS_MAP for ComfyUI's Plot Loss Graph.
"""
from __future__ import annotations

import logging
import os

from ._common import CATEGORY, Progress, folder_paths, memory_guard

log = logging.getLogger("mobilediffusion.nodes")

OBJECTIVES = {"one-step (DiffusionGAN)": "onestep", "denoising": "denoising"}


class TrainMobileDiffusionLoRA:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "latents": ("LATENT", {"tooltip": "The training images as latents: Load Image and Text Dataset from "
                            "Folder -> VAE Encode (the VAE of the same model)."}),
                "positive": ("CONDITIONING", {"tooltip": "One caption per image (Load Image and Text Dataset from "
                             "Folder gives them), or one for all."}),
                "objective": (list(OBJECTIVES), {"default": "one-step (DiffusionGAN)", "tooltip": "one-step: "
                              "DiffusionGAN fine-tuning (generator = model + LoRA, discriminator from the model): the "
                              "LoRA makes the model sample in 1 step. denoising: an ordinary LoRA on your images."}),
                "steps": ("INT", {"default": 500, "min": 1, "max": 100000, "tooltip": "Optimisation steps."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 256, "tooltip": "Images per step."}),
                "rank": ("INT", {"default": 8, "min": 1, "max": 256, "tooltip": "LoRA rank (alpha = rank)."}),
                "learning_rate": ("FLOAT", {"default": 0.0001, "min": 0.0000001, "max": 0.1, "step": 0.000001,
                                            "tooltip": "Adam learning rate of the LoRA (and of the discriminator)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip": "LoRA init, batches and "
                                 "noise: the same seed gives the same LoRA."}),
                "lora_name": ("STRING", {"default": "mobilediffusion_onestep", "tooltip": "File name in models/loras "
                              "(.safetensors added; an existing file is never replaced: a number is appended)."}),
            },
            "optional": {
                "model": ("MODEL", {"tooltip": "A MODEL from Load Checkpoint (the bridge's rules: SD 1.x / 2.x, "
                          "BK-SDM, SDXS-style UNets, patches merged)."}),
                "unet": ("MD_UNET", {"tooltip": "Or a UNet from Load MobileDiffusion Model."}),
            },
        }

    RETURN_TYPES = ("LOSS_MAP", "STRING")
    RETURN_NAMES = ("loss", "lora_name")
    OUTPUT_TOOLTIPS = ("The loss per step (one-step: the reconstruction loss), for Plot Loss Graph.",
                       "The saved file's name in models/loras, for LoraLoader.")
    FUNCTION = "train"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True
    DESCRIPTION = ("Trains a LoRA for the connected model on your images and saves it into models/loras in kohya "
                   "keys, usable by LoraLoader right away. Cancel stops it; nothing is saved then.")

    def train(self, latents, positive, objective, steps, batch_size, rank, learning_rate, seed, lora_name,
              model=None, unet=None):
        import torch

        from ..mobilediffusion.errors import ConfigError
        from ..mobilediffusion.train.finetune import train_lora_in_memory
        from ..mobilediffusion.train.lora import save_kohya

        if (model is None) == (unet is None):
            raise ConfigError("connect exactly one of MODEL (Load Checkpoint) and MD_UNET (Load MobileDiffusion "
                              "Model)")
        if objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        path = _target(lora_name)  # 1. checked before any work
        handle = unet if unet is not None else _bridged(model)
        raw = latents["samples"] if isinstance(latents, dict) and "samples" in latents else None
        if not isinstance(raw, torch.Tensor) or raw.dim() != 4:
            raise ConfigError("latents must be a LATENT batch (VAE Encode of the training images)")
        progress = Progress(steps)
        # ComfyUI runs nodes in inference mode: training needs autograd, and tensors made outside inference mode
        with torch.inference_mode(False), torch.enable_grad(), memory_guard("training the LoRA", "cpu"):
            x0 = handle.to_sampler_space(raw.detach().float().cpu().clone())
            contexts = _contexts(positive, len(x0), handle.unet.config.cross_attention_dim)
            if x0.shape[1] != handle.unet.config.in_channels:
                raise ConfigError(f"the latents have {x0.shape[1]} channels, the UNet takes "
                                  f"{handle.unet.config.in_channels}: encode the images with the same model's VAE")
            net, rows = train_lora_in_memory(  # 2. train (Cancel raises between steps)
                handle.unet, handle.config, x0, contexts, objective=OBJECTIVES[objective], steps=steps,
                batch_size=min(batch_size, len(x0)), rank=rank, lr=learning_rate, seed=seed,
                on_step=lambda step, total, losses: progress(step, total, None))
        meta = {"ss_training_comment": f"ComfyUI Train MobileDiffusion LoRA ({objective}) on {handle.name}",
                "ss_steps": steps, "ss_num_train_images": len(x0)}
        if OBJECTIVES[objective] == "onestep":
            meta["mobilediffusion_sampling"] = "onestep"
        save_kohya(net, path, metadata=meta)  # 3. the file (atomic), then the graph's outputs
        key = "recon" if OBJECTIVES[objective] == "onestep" else "loss"
        name = os.path.basename(path)
        log.info("Train MobileDiffusion LoRA: wrote %s (%d steps, final %s %.4f)", path, steps, key, rows[-1][key])
        return {"ui": {"text": [f"saved {name} in models/loras"]},
                "result": ({"loss": [r[key] for r in rows]}, name)}


def _bridged(model):
    import torch

    from .bridge import bridge_components

    handle = bridge_components(model, None, None, preset=None, dtype=torch.float32, device=torch.device("cpu"))[0]
    return handle


def _contexts(positive, n: int, width: int) -> list:
    """One context (T, D) per image from a CONDITIONING list (one entry per image, or one for all)."""
    import torch

    from ..mobilediffusion.errors import ConfigError

    entries = [e for e in positive or [] if isinstance(e, (list, tuple)) and len(e) == 2 and isinstance(e[0],
                                                                                                       torch.Tensor)]
    if len(entries) != len(positive or []) or not entries:
        raise ConfigError("positive must be a CONDITIONING (one caption per image): connect Load Image and Text "
                          "Dataset from Folder, or a Text Encode; give every image a .txt caption")
    if len(entries) not in (1, n):
        raise ConfigError(f"{len(entries)} captions for {n} images: give one caption per image (every image needs "
                          "its .txt) or a single one for all")
    contexts = [e[0][0].detach().float().cpu().clone() for e in entries]  # (T, D) each
    if contexts[0].shape[-1] != width:
        raise ConfigError(f"the captions were encoded to width {contexts[0].shape[-1]} but the UNet takes {width}: "
                          "encode them with the same model's CLIP")
    return contexts * n if len(contexts) == 1 else contexts


def _target(name: str) -> str:
    """models/loras/<name>.safetensors, or <name>_00001.safetensors ... when taken (never replaced)."""
    from ..mobilediffusion.errors import ConfigError

    stem = (name or "").strip()
    if stem.endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    if not stem or os.path.basename(stem) != stem or stem.startswith("."):
        raise ConfigError(f"lora_name {name!r} must be a plain file name (no folders), e.g. my_onestep")
    fp = folder_paths()
    folder = fp.get_folder_paths("loras")[0] if fp is not None else os.path.join(os.getcwd(), "loras")
    os.makedirs(folder, exist_ok=True)
    path, n = os.path.join(folder, stem + ".safetensors"), 0
    while os.path.exists(path):
        n += 1
        path = os.path.join(folder, f"{stem}_{n:05}.safetensors")
    return path
