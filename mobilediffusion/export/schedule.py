"""The sampler section of a bundle manifest: per-step scalars for the runtime's numpy loop.

Linear samplers (onestep, ddim, euler, euler_ancestral, lcm) come from sampling.step_coefficients.
DPM-Solver++(2M) also mixes in the previous step's x0 estimate (x0 = x0_p * x + x0_q * out) with weight d.
Every section lists x0_p/x0_q and each step's sigma ("sigmas"), which keeping a known region needs.
"""
from __future__ import annotations

import math

from ..config import ModelConfig
from ..errors import ConfigError
from ..sampling import SAMPLERS, input_scale, make_schedule, output_to_x0, step_coefficients
from ..runtime.sampler import SAMPLERS as BUNDLE_SAMPLERS


def sampler_section(config: ModelConfig, sampler: str, steps: int, guidance: float) -> dict:
    """{"name", "steps", "guidance", "noise", "timesteps", "c_in", "a", "b", "c", ...} (see runtime/sampler.py)."""
    name = config.default_sampler if sampler == "auto" else sampler
    if name not in BUNDLE_SAMPLERS:
        known = f"; the torch samplers are {', '.join(SAMPLERS)}" if name not in SAMPLERS else ""
        raise ConfigError(f"a bundle cannot run sampler {name!r}; choose one of {', '.join(BUNDLE_SAMPLERS)}{known}")
    schedule = make_schedule(name, steps, config.schedule)
    pred = config.prediction_type
    coef = _dpmpp_2m(schedule, pred) if name == "dpmpp_2m" else step_coefficients(name, schedule, pred)
    # every sampler: each step's sigma and its x0 estimate x0 = x0_p x + x0_q out, for keeping a known region
    # (inpainting with a noise mask: runtime/inpaint.py)
    x0 = [output_to_x0(s, pred) for s in schedule.sigmas]
    coef = {"x0_p": [p for p, _ in x0], "x0_q": [q for _, q in x0], **coef, "sigmas": list(schedule.sigmas)}
    return {
        "name": name,
        "steps": steps,
        "guidance": float(guidance) if guidance > 1.0 else 0.0,
        "prediction_type": pred,
        "noise": "numpy.random.default_rng(seed).standard_normal(shape, float32): the start noise, then one "
                 "draw per step whose c is non-zero",
        **coef,
    }


def _dpmpp_2m(schedule, prediction_type: str) -> dict:
    """x' = ratio x + (1 - ratio) D with ratio = s'/s and D = x0 on the first and last step, else
    (1 + 1/2r) x0 - (1/2r) x0_prev, r = log(s_prev/s) / log(s/s'); x0 = p x + q out (sampling.samplers)."""
    n = len(schedule)
    out = {k: [] for k in ("a", "b", "c", "d", "x0_p", "x0_q")}
    for i, (s, s_next) in enumerate(zip(schedule.sigmas, schedule.sigmas_next)):
        p, q = output_to_x0(s, prediction_type)
        ratio = s_next / s
        if i == 0 or i == n - 1:
            w, d = 1.0, 0.0
        else:
            r = math.log(schedule.sigmas[i - 1] / s) / math.log(s / s_next)
            w, d = 1.0 + 0.5 / r, -(1.0 - ratio) * 0.5 / r
        for key, value in zip(("a", "b", "c", "d", "x0_p", "x0_q"),
                              (ratio + (1.0 - ratio) * w * p, (1.0 - ratio) * w * q, 0.0, d, p, q)):
            out[key].append(value)
    return {
        "timesteps": list(schedule.timesteps),
        "c_in": [input_scale(s) for s in schedule.sigmas],
        **out,
        "init_noise_sigma": schedule.init_noise_sigma,
        "sigma_start": schedule.sigmas[0],
        "final_scale": input_scale(schedule.sigmas_next[-1]),
    }
