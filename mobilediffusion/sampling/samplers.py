"""Samplers: plain functions with one signature, in sigma space (k-diffusion style).

    x = sample_xxx(denoiser, x, schedule, *, generator=None, callback=None)

- denoiser(x, sigma, t) -> x0 estimate (see denoiser.py; it wraps the raw model)
- x: (B, C, h, w) sigma-space latent at noise level schedule.sigmas[0]: x = x0 + sigma * eps
- returns the latent at schedule.sigmas_next[-1] (0 for every sampler but DDIM with
  set_alpha_to_one=False), in sigma space
- callback(step_index, total_steps, x) after each step, x the new sigma-space latent
- generator: torch.Generator for the noise of ancestral / LCM steps, drawn as diffusers draws it

Each step matches the diffusers scheduler of the same name up to float rounding; device and
dtype come from x (keep x in float32: diffusers also steps in float32).
"""
from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from .denoiser import input_scale
from .schedules import Schedule, lcm_scalings


def randn(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Standard normal noise drawn as diffusers' randn_tensor draws it (single generator).

    A CPU generator draws on the CPU and the result moves to `device`, so a seed gives the same
    noise on every device; a generator on another device must match `device`.
    """
    device = torch.device(device or "cpu")
    rand_device = device
    if generator is not None and generator.device.type != device.type:
        if generator.device.type != "cpu":
            raise ConfigError(
                f"a {generator.device.type} generator cannot make noise for {device}; use a CPU generator"
            )
        rand_device = torch.device("cpu")
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


def _noise_like(x: torch.Tensor, generator) -> torch.Tensor:
    return randn(x.shape, generator, x.device, x.dtype)


def _steps(schedule: Schedule):
    return enumerate(zip(schedule.timesteps, schedule.sigmas, schedule.sigmas_next))


@torch.no_grad()
def sample_onestep(model, x, schedule: Schedule, *, generator=None, callback=None):
    """One model call, read as x0: one-step models (DiffusionGAN, ADD / SD-Turbo, SDXS)."""
    if len(schedule) != 1:
        raise ConfigError(f"onestep runs a 1-step schedule, got {len(schedule)} steps")
    x = model(x, schedule.sigmas[0], schedule.timesteps[0])
    if callback is not None:
        callback(0, 1, x)
    return x


@torch.no_grad()
def sample_ddim(model, x, schedule: Schedule, *, generator=None, callback=None):
    """DDIM with eta = 0 (Song et al. 2021, arXiv 2010.02502): x' = x0 + sigma' * eps."""
    n = len(schedule)
    for i, (t, s, s_next) in _steps(schedule):
        x0 = model(x, s, t)
        eps = (x - x0) / s
        x = x0 + eps * s_next
        k = schedule.handoff(i)  # != 1 only where DDIM's t - T // n target is not the next timestep
        if k != 1.0:
            x = x * k
        if callback is not None:
            callback(i, n, x)
    return x


@torch.no_grad()
def sample_euler(model, x, schedule: Schedule, *, generator=None, callback=None):
    """Euler steps on the probability-flow ODE dx/dsigma = (x - x0) / sigma (Karras et al. 2022, alg. 2)."""
    n = len(schedule)
    for i, (t, s, s_next) in _steps(schedule):
        d = (x - model(x, s, t)) / s
        x = x + d * (s_next - s)
        if callback is not None:
            callback(i, n, x)
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, schedule: Schedule, *, generator=None, callback=None):
    """Ancestral Euler: an Euler step down to sigma_down, then fresh noise of std sigma_up.

    sigma_up^2 = sigma'^2 (sigma^2 - sigma'^2) / sigma^2, sigma_down^2 = sigma'^2 - sigma_up^2.
    Noise is drawn at every step, the last included, as diffusers does.
    """
    n = len(schedule)
    for i, (t, s, s_next) in _steps(schedule):
        s_up = math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)
        s_down = math.sqrt(max(s_next**2 - s_up**2, 0.0))
        d = (x - model(x, s, t)) / s
        x = x + d * (s_down - s)
        x = x + _noise_like(x, generator) * s_up
        if callback is not None:
            callback(i, n, x)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, schedule: Schedule, *, generator=None, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095), midpoint form, first order at both ends.

    With lambda = -log(sigma), h = lambda' - lambda and r = h_prev / h:
    x' = (sigma' / sigma) x + (1 - sigma' / sigma) D, where D = x0 on the first and last step,
    else D = (1 + 1 / 2r) x0 - (1 / 2r) x0_prev.
    """
    n = len(schedule)
    x0_prev = s_prev = None
    for i, (t, s, s_next) in _steps(schedule):
        x0 = model(x, s, t)
        ratio = s_next / s  # = exp(-h)
        if x0_prev is None or i == n - 1:
            d = x0
        else:
            r = math.log(s_prev / s) / math.log(s / s_next)
            d = x0 * (1.0 + 0.5 / r) - x0_prev * (0.5 / r)
        x = x * ratio + d * (1.0 - ratio)
        x0_prev, s_prev = x0, s
        if callback is not None:
            callback(i, n, x)
    return x


@torch.no_grad()
def sample_lcm(model, x, schedule: Schedule, *, generator=None, callback=None):
    """Latent Consistency Model multistep sampling (Luo et al. 2023, arXiv 2310.04378).

    Each step takes the consistency estimate c_out * x0 + c_skip * x_t and, except on the
    last step, re-noises it to the next level with fresh noise.
    """
    n = len(schedule)
    for i, (t, s, s_next) in _steps(schedule):
        c_skip, c_out = lcm_scalings(t, schedule.timestep_scaling)
        x_t = x * input_scale(s)  # the variance-preserving latent the model saw
        x = model(x, s, t) * c_out + x_t * c_skip
        if i < n - 1:
            x = x + _noise_like(x, generator) * s_next
        if callback is not None:
            callback(i, n, x)
    return x


SAMPLERS = {
    "onestep": sample_onestep,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
    "lcm": sample_lcm,
}
