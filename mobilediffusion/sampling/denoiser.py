"""Model adapters: a raw UNet output (eps, v or x0) -> a denoiser in sigma space; guidance.

Samplers never see raw model outputs. They call a denoiser D(x, sigma, t) -> x0 estimate,
where x = x0 + sigma * eps is the sigma-space latent (see schedules.py). The adapter feeds
the model the variance-preserving x_t = c_in * x with c_in = 1 / sqrt(1 + sigma^2) (what
diffusers' `scale_model_input` does for Euler-type schedulers, and what the other schedulers
keep as their state) and maps its output to x0, linearly: x0 = p * x + q * output.
"""
from __future__ import annotations

import math

import torch

from ..config import PREDICTION_TYPES
from ..errors import ConfigError


def input_scale(sigma: float) -> float:
    """c_in: sigma-space latent -> the model's x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps."""
    return 1.0 / math.sqrt(1.0 + sigma * sigma)


def output_to_x0(sigma: float, prediction_type: str) -> tuple[float, float]:
    """(p, q) with x0 = p * x + q * output, for a sigma-space latent x at noise level sigma.

    epsilon: x0 = x - sigma * eps
    v_prediction (Salimans & Ho 2022): x0 = alpha * x_t - sigma_t * v, with alpha = c_in,
        sigma_t = sigma * c_in, x_t = c_in * x  ->  x0 = c_in^2 x - sigma c_in v
    sample: x0 = output
    """
    if prediction_type == "epsilon":
        return 1.0, -sigma
    if prediction_type == "v_prediction":
        c = input_scale(sigma)
        return c * c, -sigma * c
    if prediction_type == "sample":
        return 0.0, 1.0
    raise ConfigError(f"unknown prediction_type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")


class Denoiser:
    """D(x, sigma, t) -> x0 estimate, from a raw model(x_t, t) -> output in `prediction_type`.

    x: (B, C, h, w) sigma-space latent; sigma: its noise level; t: the model timestep.
    The model receives x_t (B, C, h, w) and t as a 0-dim float32 tensor on x's device.
    """

    def __init__(self, model, prediction_type: str):
        output_to_x0(1.0, prediction_type)  # validates the name
        self.model = model
        self.prediction_type = prediction_type

    def __call__(self, x: torch.Tensor, sigma: float, t: float) -> torch.Tensor:
        out = self.model(x * input_scale(sigma), torch.tensor(t, dtype=torch.float32, device=x.device))
        p, q = output_to_x0(sigma, self.prediction_type)
        return x * p + out * q


class KeepKnown:
    """A denoiser that repaints only where mask is 1 (ComfyUI's KSamplerX0Inpaint): the kept region of x is
    replaced by the known latents noised to sigma with the run's noise before the call, and its x0 estimate by
    the known latents after. latents (B, C, h, w) sigma-space x0; mask broadcastable to it, in [0, 1]."""

    def __init__(self, denoiser, latents: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor):
        try:
            torch.broadcast_shapes(mask.shape, latents.shape)
        except RuntimeError:
            raise ConfigError(f"the inpainting mask {tuple(mask.shape)} does not fit the latents "
                              f"{tuple(latents.shape)}; give one mask per image at the latent size") from None
        self.denoiser, self.latents, self.mask, self.noise = denoiser, latents, mask, noise

    def __call__(self, x: torch.Tensor, sigma: float, t: float) -> torch.Tensor:
        m = self.mask
        x = x * m + (self.latents + self.noise * sigma) * (1.0 - m)
        return self.denoiser(x, sigma, t) * m + self.latents * (1.0 - m)


def cfg_model(model_uncond_cond, guidance: float):
    """Classifier-free guidance (Ho & Salimans 2022): model(x, t) = u + guidance * (c - u).

    `model_uncond_cond(x, t)` returns the (unconditional, conditional) outputs as a pair.
    """

    def model(x, t):
        u, c = model_uncond_cond(x, t)
        return u + guidance * (c - u)

    return model
