"""Timestep schedules and samplers, numerically equal to diffusers' schedulers.

    latents = sample(model, noise, sampler="euler", steps=20, schedule_config=cfg.schedule,
                     prediction_type="epsilon", generator=gen)

Pieces: `make_schedule` (schedules.py) gives the per-step timesteps and noise levels,
`Denoiser` (denoiser.py) turns the raw model into an x0 estimator, and the functions in
`SAMPLERS` (samplers.py) run the loop in sigma space; `step_coefficients` (coefficients.py)
gives the same loop as per-step scalars for torch-free runners.
"""
from __future__ import annotations

import torch

from ..config import ScheduleConfig
from ..errors import ConfigError
from .coefficients import LINEAR_SAMPLERS, step_coefficients
from .denoiser import Denoiser, KeepKnown, cfg_model, input_scale, output_to_x0
from .samplers import (
    SAMPLERS,
    randn,
    sample_ddim,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sample_lcm,
    sample_onestep,
)
from .schedules import Schedule, alphas_cumprod, img2img_start, make_schedule

__all__ = [
    "SAMPLERS", "LINEAR_SAMPLERS", "Schedule", "Denoiser", "sample", "make_schedule", "img2img_start",
    "alphas_cumprod", "step_coefficients", "cfg_model", "randn", "input_scale", "output_to_x0",
    "sample_onestep", "sample_ddim", "sample_euler", "sample_euler_ancestral", "sample_dpmpp_2m", "sample_lcm",
]


@torch.no_grad()
def sample(
    model, noise: torch.Tensor, *, sampler: str, steps: int, schedule_config: ScheduleConfig,
    prediction_type: str, generator=None, callback=None, init_latents=None, denoise: float = 1.0, keep=None,
) -> torch.Tensor:
    """Sample latents: noise (B, C, h, w) -> latents (B, C, h, w) in the model's latent space.

    model(x_t, t) -> raw output in `prediction_type` ("epsilon" | "v_prediction" | "sample"),
    where x_t (B, C, h, w) = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps (input scaling done)
    and t is a 0-dim float32 tensor (the training timestep). Guidance belongs in `model`
    (see cfg_model). `noise` is unit-variance; text-to-image starts from it as diffusers does.
    img2img: `init_latents` (B, C, h, w) noised to the first kept step; `denoise` in (0, 1] picks
    that step as diffusers' img2img pipelines do with `strength`. `callback(i, total, x)` runs
    after each step; `generator` feeds the noise of euler_ancestral and lcm steps.
    `keep` (mask (B or 1, 1 or C, h, w) in [0, 1], 1 = repaint): inpainting with an ordinary UNet as ComfyUI's
    KSampler does with a LATENT noise_mask: at every model call the kept region (1 - mask) of the input is
    `init_latents` noised to that call's sigma with this run's noise, and of the x0 estimate `init_latents`.
    """
    # 1. validate
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    denoiser = Denoiser(model, prediction_type)
    if init_latents is None and denoise != 1.0:
        raise ConfigError(f"denoise={denoise!r} needs init_latents (img2img); use denoise=1.0 for text-to-image")
    if init_latents is not None and tuple(init_latents.shape) != tuple(noise.shape):
        raise ConfigError(
            f"init_latents have shape {tuple(init_latents.shape)} but the noise has {tuple(noise.shape)}; "
            "encode the image at the requested size and batch"
        )
    if keep is not None:
        if init_latents is None:
            raise ConfigError("an inpainting mask needs the image's latents (init_latents)")
        denoiser = KeepKnown(denoiser, init_latents.to(noise), keep.to(noise), noise)
    # 2. schedule
    schedule = make_schedule(sampler, steps, schedule_config, denoise=denoise)
    # 3. starting latent in sigma space
    if init_latents is None:
        x = noise * schedule.init_noise_sigma
    else:
        x = init_latents.to(noise) + noise * schedule.sigmas[0]
    # 4. the loop
    x = SAMPLERS[sampler](denoiser, x, schedule, generator=generator, callback=callback)
    # 5. back to the model's (variance-preserving) latent space; identity when the last level is 0
    s_final = schedule.sigmas_next[-1]
    return x if s_final == 0.0 else x * input_scale(s_final)
