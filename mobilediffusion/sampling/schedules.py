"""Noise schedules: the training alpha_bar table and, per sampler, the inference steps.

Samplers work in sigma space (Karras et al. 2022, arXiv 2206.00364): a latent at noise
level sigma is x = x0 + sigma * eps with sigma = sqrt((1 - alpha_bar) / alpha_bar). The
UNet sees the variance-preserving latent x_t = x / sqrt(1 + sigma^2)
= sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps, the `x_t` of DDPM/DDIM.

The timestep rules reproduce diffusers' schedulers, which differ from each other:
DDIM and Euler space n steps over the training range, DPM-Solver spaces n + 1 points and
drops the last, LCM picks n of its `original_inference_steps` distillation timesteps, and
DDIM moves each step to t - T // n rather than to the next timestep in its list.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..config import ScheduleConfig
from ..errors import ConfigError

SIGMA_DATA = 0.5  # LCM's consistency-model data scale (Song et al. 2023)


@dataclass(frozen=True)
class Schedule:
    """The per-step noise levels of one sampling run (Python floats, float64).

    Step i calls the model at `timesteps[i]` on a latent at noise level `sigmas[i]` and moves
    it to `sigmas_next[i]` (0: clean). `sigmas_next[i] == sigmas[i + 1]` for every sampler
    except DDIM with trailing/linspace spacing.
    """

    timesteps: tuple[float, ...]  # (N,) model timestep per step, in [0, num_train_timesteps)
    sigmas: tuple[float, ...]  # (N,) noise level of the latent entering each step
    sigmas_next: tuple[float, ...]  # (N,) noise level each step moves the latent to
    init_noise_sigma: float  # text-to-image start: x = noise * init_noise_sigma
    timestep_scaling: float = 10.0  # LCM only: boundary-condition scale of the timestep

    def __post_init__(self):
        n = len(self.timesteps)
        if n < 1 or len(self.sigmas) != n or len(self.sigmas_next) != n:
            raise ConfigError(
                f"a schedule needs N >= 1 timesteps, sigmas and sigmas_next of equal length, got "
                f"{n}, {len(self.sigmas)}, {len(self.sigmas_next)}"
            )

    def __len__(self) -> int:
        return len(self.timesteps)

    def handoff(self, i: int) -> float:
        """Factor on the sigma-space latent between step i and i + 1 (1.0 when the levels agree).

        diffusers carries x_t unchanged from step to step, so a latent left at sigmas_next[i]
        enters step i + 1 read at sigmas[i + 1]: x *= c_in(sigmas_next[i]) / c_in(sigmas[i + 1]).
        """
        if i + 1 >= len(self.timesteps) or self.sigmas_next[i] == self.sigmas[i + 1]:
            return 1.0
        a, b = self.sigmas_next[i], self.sigmas[i + 1]
        return math.sqrt((1.0 + b * b) / (1.0 + a * a))


# --------------------------------------------------------------------------- training schedule
def alphas_cumprod(cfg: ScheduleConfig) -> torch.Tensor:
    """alpha_bar[t] for t = 0..T-1, float32 (T,), computed in the same float32 steps as diffusers."""
    T = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float32)
    else:  # "scaled_linear": linear in sqrt(beta) (the LDM / SD schedule)
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, T, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def sigma_of(alpha_bar: float) -> float:
    """Noise level of a latent at alpha_bar: sqrt((1 - a) / a); 0 for a = 1."""
    return math.sqrt((1.0 - alpha_bar) / alpha_bar)


def sigma_table(cfg: ScheduleConfig) -> np.ndarray:
    """sigma[t] for t = 0..T-1, float64 (T,), ascending."""
    a = alphas_cumprod(cfg).double().numpy()
    return np.sqrt((1.0 - a) / a)


# --------------------------------------------------------------------------- timestep rules
def _spaced(n: int, cfg: ScheduleConfig, *, round_linspace: bool) -> np.ndarray:
    """n descending timesteps over [0, T) by cfg.timestep_spacing (DDIM and Euler rules)."""
    T = cfg.num_train_timesteps
    if cfg.timestep_spacing == "leading":  # 0, T//n, 2T//n, ... shifted by steps_offset
        return np.arange(n)[::-1] * (T // n) + float(cfg.steps_offset)
    if cfg.timestep_spacing == "trailing":  # T-1, T-1-T/n, ... (rounded); always starts at T-1
        return np.round(T - np.arange(n) * (T / n)) - 1.0
    t = np.linspace(0, T - 1, n)[::-1]  # "linspace": both ends included
    return np.round(t) if round_linspace else t.astype(np.float32).astype(np.float64)


def _dpm_spaced(n: int, cfg: ScheduleConfig) -> np.ndarray:
    """DPM-Solver's rule: leading and linspace place n + 1 points and drop the one at 0."""
    T = cfg.num_train_timesteps
    if cfg.timestep_spacing == "leading":
        return np.arange(n, 0, -1) * (T // (n + 1)) + float(cfg.steps_offset)
    if cfg.timestep_spacing == "linspace":
        return np.round(np.linspace(0, T - 1, n + 1))[::-1][:-1]
    return _spaced(n, cfg, round_linspace=True)


def lcm_timesteps(n: int, cfg: ScheduleConfig, strength: float = 1.0) -> np.ndarray:
    """LCM's n steps: evenly picked from its distillation grid k-1, 2k-1, ... (k = T // original steps).

    `strength` < 1 (img2img) keeps only the first original_steps * strength grid points, as
    diffusers' LCM img2img pipeline does. Spacing and steps_offset do not apply.
    """
    orig = cfg.original_inference_steps
    grid = np.arange(1, int(orig * strength) + 1) * (cfg.num_train_timesteps // orig) - 1  # ascending
    if n > orig or len(grid) < n:
        raise ConfigError(
            f"lcm picks its {n} steps from {len(grid)} distillation timesteps "
            f"(original_inference_steps={orig} x denoise={strength:g}); use at most {len(grid)} steps"
            + (" or a higher denoise" if strength < 1 else "")
        )
    picks = np.floor(np.linspace(0, len(grid), n, endpoint=False)).astype(np.int64)
    return grid[::-1][picks].astype(np.float64)


# --------------------------------------------------------------------------- per-sampler schedules
def _vp_start(sigma: float) -> float:
    """init_noise_sigma for samplers whose x_T is unit-variance noise in x_t space (diffusers: 1.0)."""
    return math.sqrt(1.0 + sigma * sigma)


def _at(sig: np.ndarray, t: np.ndarray) -> np.ndarray:
    """sig at integer timesteps t; a timestep outside the table is a ConfigError, not an IndexError."""
    idx = t.astype(np.int64)
    if idx.min() < 0 or idx.max() >= len(sig):
        raise ConfigError(
            f"timesteps {idx.tolist()} leave the training range [0, {len(sig) - 1}]; use fewer steps "
            "or steps_offset=0"
        )
    return sig[idx]


def _then_zero(sigmas) -> tuple[float, ...]:
    return tuple(float(s) for s in sigmas[1:]) + (0.0,)


def _ddim(n, cfg, sig):
    t = _spaced(n, cfg, round_linspace=True)
    T = cfg.num_train_timesteps
    final = 0.0 if cfg.set_alpha_to_one else sig[0]
    prev = t - T // n  # DDIM's target: t - T // n, not the next listed timestep
    s = _at(sig, t)
    s_next = tuple(float(sig[int(p)]) if p >= 0 else float(final) for p in prev)
    return t, s, s_next, _vp_start(s[0])


def _euler(n, cfg, sig):
    t = _spaced(n, cfg, round_linspace=False)
    s = np.interp(t, np.arange(len(sig)), sig).astype(np.float32).astype(np.float64)  # fractional t: linear
    top = float(s.max())
    # diffusers' Euler starts trailing/linspace runs at sigma_max (k-diffusion), leading ones at x_t = noise
    init = top if cfg.timestep_spacing in ("trailing", "linspace") else _vp_start(top)
    return t, s, _then_zero(s), init


def _dpm(n, cfg, sig):
    t = _dpm_spaced(n, cfg)
    s = _at(sig, t)
    return t, s, _then_zero(s), _vp_start(s[0])


def _lcm(n, cfg, sig, strength=1.0):
    t = lcm_timesteps(n, cfg, strength)
    s = _at(sig, t)
    return t, s, _then_zero(s), _vp_start(s[0])


def _onestep(n, cfg, sig, strength=1.0):
    if n != 1:
        raise ConfigError(f"the onestep sampler makes exactly one model call; use steps=1, got steps={n}")
    T = cfg.num_train_timesteps
    t = np.array([max(round(T * strength) - 1, 0)], dtype=np.float64)  # T-1, or trailing-style for img2img
    s = _at(sig, t)
    return t, s, (0.0,), _vp_start(s[0])


# sampler name -> (rule, whether img2img passes `denoise` into the rule instead of skipping steps)
_RULES = {
    "onestep": (_onestep, True),
    "ddim": (_ddim, False),
    "euler": (_euler, False),
    "euler_ancestral": (_euler, False),
    "dpmpp_2m": (_dpm, False),
    "lcm": (_lcm, True),
}
SCHEDULE_SAMPLERS = tuple(_RULES)


def img2img_start(steps: int, denoise: float) -> int:
    """Index of the first step img2img runs: diffusers' get_timesteps (keeps int(steps * denoise) steps)."""
    return steps - min(int(steps * denoise), steps)


def make_schedule(sampler: str, steps: int, cfg: ScheduleConfig, *, denoise: float = 1.0) -> Schedule:
    """The schedule `sampler` runs for `steps` steps, as diffusers' matching scheduler sets it.

    denoise < 1 (img2img) starts part-way: the last int(steps * denoise) steps of the full
    schedule (diffusers' img2img pipelines); LCM instead picks all `steps` from the first
    `denoise` part of its grid (diffusers' LCM img2img). onestep ignores the spacing: it
    evaluates at T - 1 (img2img: round(T * denoise) - 1, where a trailing schedule would).
    """
    if sampler not in _RULES:
        raise ConfigError(f"unknown sampler {sampler!r}; choose one of: {', '.join(_RULES)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= cfg.num_train_timesteps:
        raise ConfigError(f"steps must be an integer in [1, {cfg.num_train_timesteps}], got {steps!r}")
    if not 0.0 < denoise <= 1.0:
        raise ConfigError(f"denoise must be in (0, 1], got {denoise!r}")
    rule, takes_strength = _RULES[sampler]
    sig = sigma_table(cfg)
    # 1. the full schedule (or the strength-limited one for LCM / onestep)
    t, s, s_next, init = rule(steps, cfg, sig, denoise) if takes_strength else rule(steps, cfg, sig)
    t, s, s_next = [float(v) for v in t], [float(v) for v in s], list(s_next)
    if any(a <= b for a, b in zip(t, t[1:])) or t[-1] < 0 or t[0] > cfg.num_train_timesteps - 1:
        raise ConfigError(
            f"{steps} steps with {cfg.timestep_spacing!r} spacing give repeated or out-of-range timesteps "
            f"for {sampler}; use fewer steps"
        )
    # 2. img2img skips the first steps
    start = 0 if takes_strength else img2img_start(steps, denoise)
    if start >= steps:
        raise ConfigError(
            f"denoise={denoise:g} with steps={steps} leaves no step to run (int(steps * denoise) = 0); "
            "raise steps or denoise"
        )
    return Schedule(
        timesteps=tuple(t[start:]),
        sigmas=tuple(s[start:]),
        sigmas_next=tuple(s_next[start:]),
        init_noise_sigma=float(init),
        timestep_scaling=float(cfg.timestep_scaling),
    )


def lcm_scalings(t: float, timestep_scaling: float) -> tuple[float, float]:
    """LCM's boundary condition at timestep t -> (c_skip, c_out); c_skip -> 1, c_out -> 0 as t -> 0."""
    ts = t * timestep_scaling
    return SIGMA_DATA**2 / (ts * ts + SIGMA_DATA**2), ts / math.sqrt(ts * ts + SIGMA_DATA**2)
