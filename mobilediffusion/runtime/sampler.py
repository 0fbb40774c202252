"""The sampler loop in numpy, from the per-step coefficients stored in the manifest.

For every supported sampler (see export/schedule.py for how the coefficients are made):

    x = noise * init_noise_sigma
    for i in range(N):
        out = model(c_in[i] * x, timesteps[i])
        x0 = x0_p[i] * x + x0_q[i] * out                      (kept for the next step: DPM-Solver++ 2M)
        x = a[i] * x + b[i] * out + c[i] * noise_i + d[i] * x0_prev
    latents = final_scale * x

The state stays float32, as in the torch samplers.
"""
from __future__ import annotations

import numpy as np

# the samplers a bundle can bake in (their per-step coefficients are made by export/schedule.py)
SAMPLERS = ("onestep", "ddim", "euler", "euler_ancestral", "lcm", "dpmpp_2m")


def numpy_noise(seed: int):
    """The bundle's noise: standard normal float32 from numpy's PCG64 generator seeded with `seed`,
    drawn in call order (the starting noise, then one draw per stochastic step)."""
    rng = np.random.default_rng(int(seed))
    return lambda shape: rng.standard_normal(shape, dtype=np.float32)


def sample(model, shape, sampler: dict, noise, callback=None) -> np.ndarray:
    """model(x_t (N, C, h, w) float32, t float) -> output; noise(shape) -> float32 array; returns latents."""
    x = np.asarray(noise(shape), dtype=np.float32) * np.float32(sampler["init_noise_sigma"])
    n = len(sampler["timesteps"])
    x0_prev = None
    d = sampler.get("d") or [0.0] * n
    for i in range(n):
        out = np.asarray(model(x * np.float32(sampler["c_in"][i]), sampler["timesteps"][i]), dtype=np.float32)
        new = x * np.float32(sampler["a"][i]) + out * np.float32(sampler["b"][i])
        if sampler["c"][i]:
            new += np.asarray(noise(shape), dtype=np.float32) * np.float32(sampler["c"][i])
        if d[i]:
            new += x0_prev * np.float32(d[i])
        if "x0_p" in sampler:
            x0_prev = x * np.float32(sampler["x0_p"][i]) + out * np.float32(sampler["x0_q"][i])
        x = new
        if callback is not None:
            callback(i, n, x)
    return x * np.float32(sampler["final_scale"])
