"""Per-step scalars for running a one-step-memory sampler without torch (e.g. a numpy bundle runner).

For samplers whose step is linear in the latent, the model output and fresh noise:

    x = noise * init_noise_sigma            (img2img: x = init_latents + sigma_start * noise)
    for i in range(N):
        out = model(c_in[i] * x, timesteps[i])
        x = a[i] * x + b[i] * out + c[i] * noise_i    (noise_i ~ N(0, I), only where c[i] != 0)
    latents = final_scale * x

DPM-Solver++(2M) also needs the previous step's x0, so it has no such form.
"""
from __future__ import annotations

from ..errors import ConfigError
from .denoiser import input_scale, output_to_x0
from .schedules import Schedule, lcm_scalings

LINEAR_SAMPLERS = ("onestep", "ddim", "euler", "euler_ancestral", "lcm")


def step_coefficients(sampler: str, schedule: Schedule, prediction_type: str) -> dict:
    """{"timesteps", "c_in", "a", "b", "c"}: lists of N floats, plus init_noise_sigma, sigma_start, final_scale."""
    if sampler not in LINEAR_SAMPLERS:
        raise ConfigError(
            f"{sampler!r} has no per-step linear form; use one of {', '.join(LINEAR_SAMPLERS)} for a torch-free loop"
        )
    n = len(schedule)
    a, b, c = [], [], []
    for i, (t, s, s_next) in enumerate(zip(schedule.timesteps, schedule.sigmas, schedule.sigmas_next)):
        p, q = output_to_x0(s, prediction_type)  # x0 = p * x + q * out
        if sampler == "onestep":  # x' = x0
            keep, to_x0, noise = 0.0, 1.0, 0.0
        elif sampler in ("ddim", "euler"):  # x' = (s'/s) x + (1 - s'/s) x0
            keep, to_x0, noise = s_next / s, 1.0 - s_next / s, 0.0
        elif sampler == "euler_ancestral":  # the same to sigma_down, plus sigma_up * noise
            s_up = (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5
            s_down = max(s_next**2 - s_up**2, 0.0) ** 0.5
            keep, to_x0, noise = s_down / s, 1.0 - s_down / s, s_up
        else:  # lcm: x' = c_out x0 + c_skip x_t (+ sigma' * noise before the last step)
            c_skip, c_out = lcm_scalings(t, schedule.timestep_scaling)
            keep, to_x0, noise = c_skip * input_scale(s), c_out, (s_next if i < n - 1 else 0.0)
        k = schedule.handoff(i)
        a.append((keep + to_x0 * p) * k)
        b.append(to_x0 * q * k)
        c.append(noise * k)
    return {
        "timesteps": list(schedule.timesteps),
        "c_in": [input_scale(s) for s in schedule.sigmas],
        "a": a,
        "b": b,
        "c": c,
        "init_noise_sigma": schedule.init_noise_sigma,
        "sigma_start": schedule.sigmas[0],
        "final_scale": input_scale(schedule.sigmas_next[-1]),
    }
