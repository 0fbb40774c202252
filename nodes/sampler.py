"""MobileDiffusion Sampler: MD_UNET + CONDITIONING -> LATENT (one-step or multi-step, optional img2img), honouring
what ComfyUI's own nodes put in the graph: ControlNets / T2I-Adapters in the CONDITIONING, a LATENT noise mask,
inpainting models' concat conditioning (nodes/control.py), and the controls of Apply MobileDiffusion Control
(nodes/control_nodes.py)."""
from __future__ import annotations

from ..mobilediffusion.sampling import SAMPLERS
from ._common import CATEGORY, Progress, memory_guard

SAMPLER_NAMES = ["auto", *SAMPLERS]


def _entries(conditioning, what: str):
    """ComfyUI CONDITIONING [[context (B,T,D), {...}], ...] -> [(context, weight)]."""
    import torch

    from ..mobilediffusion.errors import ConfigError

    out = []
    for item in conditioning or []:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], torch.Tensor)):
            raise ConfigError(f"the {what} input is not a CONDITIONING; connect a Text Encode node")
        out.append((item[0], float(item[1].get("strength", 1.0))))
    if not out:
        raise ConfigError(f"the {what} CONDITIONING is empty; connect a Text Encode node")
    return out


class MobileDiffusionSampler:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "unet": ("MD_UNET", {"tooltip": "The UNet from Load MobileDiffusion Model."}),
                "positive": ("CONDITIONING", {"tooltip": "What to draw."}),
                "negative": ("CONDITIONING", {"tooltip": "What to steer away from (used when cfg > 1)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Noise seed; the same seed gives the same image on any device."}),
                "steps": ("INT", {"default": 0, "min": 0, "max": 1000,
                                  "tooltip": "Denoising steps. 0 uses the model's default: 1 for one-step models "
                                             "(MobileDiffusion, SD-Turbo, SDXS), 20-25 for SD."}),
                "cfg": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Classifier-free guidance. 0 uses the model's default (1.0 = off for "
                                             "one-step models, 7.5 for SD); values up to 1 run without guidance."}),
                "sampler_name": (SAMPLER_NAMES, {"default": "auto", "tooltip": "auto uses the model's default."}),
                "width": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 8,
                                  "tooltip": "Image width in pixels; 0 uses the model's native resolution. A "
                                             "multiple of 8 times the UNet's downsampling."}),
                "height": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 8,
                                   "tooltip": "Image height in pixels; 0 uses the model's native resolution."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
            },
            "optional": {
                "latent_image": ("LATENT", {"tooltip": "img2img: start from this LATENT (its size wins over "
                                                       "width/height)."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                      "tooltip": "img2img strength: 1.0 ignores the input latent."}),
            },
        }

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("Raw VAE latents, as ComfyUI's own samplers output them.",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY
    DESCRIPTION = "Samples latents with one-step or multi-step samplers."

    def sample(self, unet, positive, negative, seed, steps, cfg, sampler_name, width, height, batch_size,
               latent_image=None, denoise=1.0):
        from ..mobilediffusion.errors import ConfigError
        from ..mobilediffusion.guidance import SAME
        from ..mobilediffusion.pipeline import check_request, sample_latents
        from .control import controls_for_sides, inpaint_inputs, to_controls
        from .control_nodes import md_chain, md_controls

        config = unet.config
        steps = steps or config.default_steps
        width, height = width or config.resolution, height or config.resolution
        guidance = cfg or max(config.default_guidance, 1.0)
        init = None
        masked = latent_image is not None and latent_image.get("noise_mask") is not None
        # 1. img2img / inpainting input: its size and batch win; raw LATENT -> sampler space
        if latent_image is not None and (denoise < 1.0 or masked or getattr(unet.unet, "concat_channels", 0)):
            raw = latent_image["samples"]
            if raw.ndim != 4 or raw.shape[1] != config.latent_channels:
                raise ConfigError(
                    f"the LATENT has {raw.shape[1] if raw.ndim == 4 else raw.ndim}-channel latents but this UNet "
                    f"expects {config.latent_channels}; encode the image with a VAE of this model's latent space"
                )
            f = config.decoder.upscale
            batch_size, height, width = raw.shape[0], raw.shape[2] * f, raw.shape[3] * f
            init = unet.to_sampler_space(raw.float())
        # 2. checks before any work; ComfyUI's controls, noise mask and inpainting conditioning read
        name = check_request(config, steps=steps, height=height, width=width, sampler=sampler_name,
                             batch_size=batch_size)
        cond, uncond = _entries(positive, "positive"), _entries(negative, "negative")  # (checked first)
        pos_facts, neg_facts, shared = controls_for_sides(positive, negative)
        f = config.decoder.upscale
        image_inputs = inpaint_inputs(latent_image, positive, unet,
                                      (batch_size, config.latent_channels, height // f, width // f))
        if "mask" in image_inputs and init is None:
            raise ConfigError("the LATENT has a noise mask but no image latents to keep; encode the image (VAE Encode) "
                              "and set its mask (Set Latent Noise Mask)")
        # 3. sample
        with memory_guard(f"sampling {batch_size}x{width}x{height}", next(unet.unet.parameters()).device):
            # ComfyUI's controls (ControlNetApply*) and ours (Apply MobileDiffusion Control), per side
            controls = to_controls(pos_facts, unet.unet) + md_controls(positive, "positive", unet.unet)
            same_md = [id(x) for x in md_chain(positive)] == [id(x) for x in md_chain(negative)]
            uncond_controls = SAME if shared and same_md else \
                to_controls(neg_facts, unet.unet) + md_controls(negative, "negative", unet.unet)
            latents = sample_latents(
                unet.unet, config, cond, uncond, steps=steps,
                guidance=guidance, seed=seed, height=height, width=width, sampler=name, batch_size=batch_size,
                init_latents=init, denoise=denoise if init is not None else 1.0, callback=Progress(steps),
                control=controls, uncond_control=uncond_controls, **image_inputs,
            )
        return ({"samples": unet.to_raw(latents.float().cpu())},)
