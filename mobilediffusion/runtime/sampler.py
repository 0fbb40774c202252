"""The sampler loop in numpy, from the per-step coefficients stored in the manifest.

For every supported sampler (see export/schedule.py for how the coefficients are made):

    x = noise * init_noise_sigma
    for i in range(N):
        out = model(c_in[i] * x, timesteps[i])
        x0 = x0_p[i] * x + x0_q[i] * out                      (kept for the next step: DPM-Solver++ 2M)
        x = a[i] * x + b[i] * out + c[i] * noise_i + d[i] * x0_prev
    latents = final_scale * x

The state stays float32, as in the torch samplers.

Keeping a known region (inpainting with an ordinary UNet; ComfyUI's noise mask, sampling.KeepKnown): with
`known` = (latents L, mask m, 1 = repaint) the run starts at L + sigma_start z (z the start noise), the model
sees x m + (L + sigma_i z) (1 - m), and its x0 estimate is replaced by L outside the mask; the step then runs on
the output that gives that estimate (x0 = x0_p x + x0_q out, from the section's per-step lists).
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


def sample(model, shape, sampler: dict, noise, callback=None, known=None) -> np.ndarray:
    """model(x_t (N, C, h, w) float32, t float) -> output; noise(shape) -> float32 array; returns latents.
    `known`: (latents (B, C, h, w), mask broadcastable to them, 1 = repaint) to keep outside the mask."""
    z = np.asarray(noise(shape), dtype=np.float32)
    n = len(sampler["timesteps"])
    if known is None:
        x = z * np.float32(sampler["init_noise_sigma"])
    else:
        if "sigmas" not in sampler:
            raise ValueError("keeping a known region needs the section's sigmas and x0_p/x0_q: re-export the bundle")
        L, m = (np.asarray(a, dtype=np.float32) for a in known)
        x = L + z * np.float32(sampler["sigma_start"])
    x0_prev = None
    d = sampler.get("d") or [0.0] * n
    for i in range(n):
        seen = x
        if known is not None:
            one = np.float32(1.0)
            seen = x * m + (L + z * np.float32(sampler["sigmas"][i])) * (one - m)
        out = np.asarray(model(seen * np.float32(sampler["c_in"][i]), sampler["timesteps"][i]), dtype=np.float32)
        if known is not None:  # the output whose x0 estimate, read at x, is the blended one
            p, q = np.float32(sampler["x0_p"][i]), np.float32(sampler["x0_q"][i])
            x0 = (seen * p + out * q) * m + L * (one - m)
            out = (x0 - x * p) / q
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
