"""Samplers against diffusers' schedulers (SD1.5's scheduler_config), img2img, seeds and errors.

A deterministic stand-in model (a smooth function of x and t) replaces the UNet; every step of
our sigma-space loop is compared with the diffusers scheduler loop run on the same noise and
the same seeded generator.
"""
from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from mobilediffusion.config import ScheduleConfig
from mobilediffusion.errors import ConfigError
from mobilediffusion.sampling import (
    LINEAR_SAMPLERS,
    SAMPLERS,
    alphas_cumprod,
    cfg_model,
    img2img_start,
    input_scale,
    make_schedule,
    randn,
    sample,
    step_coefficients,
)
from mobilediffusion.sampling.schedules import SCHEDULE_SAMPLERS

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5
SD15 = dict(  # SD1.5's scheduler_config.json (a PNDMScheduler config, read by every scheduler below)
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    set_alpha_to_one=False, steps_offset=1, clip_sample=False, trained_betas=None,
)
SCHEDULERS = {
    "ddim": diffusers.DDIMScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "euler_ancestral": diffusers.EulerAncestralDiscreteScheduler,
    "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
    "lcm": diffusers.LCMScheduler,
}
SIGMA_SPACE = {"euler", "euler_ancestral"}  # diffusers keeps these latents in sigma space, the rest in x_t
PREDICTIONS = ("epsilon", "v_prediction", "sample")
SHAPE = (2, 4, 8, 8)


def stand_in(x, t):
    """A plausible, deterministic model output: bounded in x, varying smoothly with t."""
    t = t.float()
    return torch.tanh(x) * (0.8 + 0.2 * torch.cos(t / 100)) + 0.1 * x.roll(1, -1) * torch.sin(t / 300)


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def noise_and_init(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g).clamp(-2, 2)


def diffusers_scheduler(sampler, prediction_type, **overrides):
    return SCHEDULERS[sampler].from_config({**SD15, **overrides}, prediction_type=prediction_type)


def run_diffusers(sch, x, timesteps, seed, generator=None):
    """The diffusers denoising loop -> list of latents after each step."""
    g = generator or torch.Generator().manual_seed(seed)
    out = []
    for t in timesteps:
        x = sch.step(stand_in(sch.scale_model_input(x, t), t), t, x, generator=g).prev_sample
        out.append(x)
    return out


def run_ours(sampler, steps, cfg, prediction, noise, seed, generator=None, **kw):
    """sample() -> (schedule, final latents, latents after each step in diffusers' space for `sampler`)."""
    schedule = make_schedule(sampler, steps, cfg, denoise=kw.get("denoise", 1.0))
    n, traj = len(schedule), []

    def record(i, total, x):
        assert total == n
        level = schedule.sigmas[i + 1] if i + 1 < n else schedule.sigmas_next[-1]
        traj.append(x.clone() if sampler in SIGMA_SPACE else x * input_scale(level))

    final = sample(
        stand_in, noise, sampler=sampler, steps=steps, schedule_config=cfg, prediction_type=prediction,
        generator=generator or torch.Generator().manual_seed(seed), callback=record, **kw,
    )
    return schedule, final, traj


def parity(sampler, spacing, steps, prediction, **cfg_overrides) -> float:
    """Max relative error over all steps vs diffusers (timesteps and generator use must match exactly)."""
    noise, _ = noise_and_init()
    cfg = ScheduleConfig(timestep_spacing=spacing, **cfg_overrides)
    sch = diffusers_scheduler(sampler, prediction, timestep_spacing=spacing, **cfg_overrides)
    sch.set_timesteps(steps)
    g_ref, g_ours = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    ref = run_diffusers(sch, noise * sch.init_noise_sigma, sch.timesteps, seed=7, generator=g_ref)
    schedule, final, traj = run_ours(sampler, steps, cfg, prediction, noise, seed=7, generator=g_ours)
    assert schedule.timesteps == tuple(sch.timesteps.double().tolist())
    assert torch.equal(g_ref.get_state(), g_ours.get_state())  # the same number of draws
    assert len(traj) == len(ref) == steps
    assert torch.equal(final, traj[-1]) or sampler not in SIGMA_SPACE
    return max([rel(a, b) for a, b in zip(traj, ref)] + [rel(final, ref[-1])])


PARITY_CASES = [
    (s, sp, n, p)
    for s, sp, n, p in itertools.product(SCHEDULERS, ("leading", "trailing", "linspace"), (1, 2, 4, 20), PREDICTIONS)
    if not (s == "euler_ancestral" and p == "sample")  # diffusers: NotImplementedError
    and not (s == "lcm" and sp == "linspace")  # LCM ignores the spacing; leading and trailing show it
]


@pytest.mark.parametrize("sampler,spacing,steps,prediction", PARITY_CASES)
def test_matches_diffusers(sampler, spacing, steps, prediction):
    assert parity(sampler, spacing, steps, prediction) <= TOL


@pytest.mark.parametrize(
    "sampler,spacing,steps,overrides",
    [
        ("ddim", "trailing", 3, {}),  # targets t - T//n (333) differ from the next timestep (332)
        ("ddim", "linspace", 7, {}),
        ("ddim", "leading", 4, dict(set_alpha_to_one=True)),
        ("ddim", "trailing", 1, dict(set_alpha_to_one=True)),
        ("ddim", "leading", 50, dict(steps_offset=0)),
        ("euler", "leading", 7, dict(steps_offset=0, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)),
        ("dpmpp_2m", "leading", 15, {}),
        ("dpmpp_2m", "trailing", 25, {}),
        ("lcm", "leading", 8, dict(original_inference_steps=100)),
        ("euler_ancestral", "linspace", 30, {}),
    ],
)
def test_matches_diffusers_other_configs(sampler, spacing, steps, overrides):
    for prediction in ("epsilon", "v_prediction"):
        assert parity(sampler, spacing, steps, prediction, **overrides) <= TOL


def test_training_schedule_is_bitwise_diffusers():
    for overrides in ({}, dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)):
        ours = alphas_cumprod(ScheduleConfig(**overrides))
        assert torch.equal(ours, diffusers_scheduler("ddim", "epsilon", **overrides).alphas_cumprod)


def test_every_sampler_has_a_schedule():
    assert tuple(SAMPLERS) == SCHEDULE_SAMPLERS


# --------------------------------------------------------------------------- one step
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_onestep_reads_x0_at_the_last_timestep(prediction, spacing):
    noise, _ = noise_and_init()
    calls = []

    def model(x, t):
        calls.append(t)
        return stand_in(x, t)

    cfg = ScheduleConfig(timestep_spacing=spacing)  # onestep always uses T - 1
    y = sample(model, noise, sampler="onestep", steps=1, schedule_config=cfg, prediction_type=prediction)
    assert len(calls) == 1 and calls[0].dtype == torch.float32 and calls[0].ndim == 0 and calls[0].item() == 999
    a = alphas_cumprod(cfg)[999].double()
    out = stand_in(noise, torch.tensor(999.0)).double()
    x = noise.double()
    expected = {
        "epsilon": (x - (1 - a).sqrt() * out) / a.sqrt(),
        "v_prediction": a.sqrt() * x - (1 - a).sqrt() * out,
        "sample": out,
    }[prediction]
    assert rel(y, expected) <= TOL


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_onestep_equals_one_trailing_ddim_step_of_diffusers(prediction):
    # (diffusers' 1-step Euler differs: with trailing spacing it starts from noise * sigma_max, not x_t = noise)
    noise, _ = noise_and_init()
    y = sample(
        stand_in, noise, sampler="onestep", steps=1, schedule_config=ScheduleConfig(), prediction_type=prediction
    )
    sch = diffusers_scheduler("ddim", prediction, timestep_spacing="trailing", set_alpha_to_one=True)
    sch.set_timesteps(1)
    ref = run_diffusers(sch, noise * sch.init_noise_sigma, sch.timesteps, seed=0)[-1]
    assert rel(y, ref) <= TOL


# --------------------------------------------------------------------------- img2img
def _get_timesteps(sch, steps, strength):
    """diffusers' StableDiffusionImg2ImgPipeline.get_timesteps on a bare scheduler."""
    pipe = SimpleNamespace(scheduler=sch)
    return diffusers.StableDiffusionImg2ImgPipeline.get_timesteps(pipe, steps, strength, "cpu")


@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_ancestral", "dpmpp_2m"])
def test_img2img_start_matches_get_timesteps(sampler):
    for steps, strength in itertools.product((1, 2, 3, 4, 10, 20, 50), (0.05, 0.3, 1 / 3, 0.5, 0.7, 0.75, 0.99, 1.0)):
        sch = diffusers_scheduler(sampler, "epsilon", timestep_spacing="leading")
        sch.set_timesteps(steps)
        ref, n_ref = _get_timesteps(sch, steps, strength)
        assert steps - img2img_start(steps, strength) == n_ref
        if n_ref == 0:
            with pytest.raises(ConfigError, match="leaves no step"):
                make_schedule(sampler, steps, ScheduleConfig(), denoise=strength)
        else:
            assert make_schedule(sampler, steps, ScheduleConfig(), denoise=strength).timesteps == tuple(
                ref.double().tolist()
            )


@pytest.mark.parametrize(
    "sampler,spacing,steps,strength,prediction",
    [
        (s, sp, n, d, p)
        for s in ("ddim", "euler", "euler_ancestral", "dpmpp_2m", "lcm")
        for sp, n, d in (("leading", 20, 0.6), ("trailing", 4, 0.5), ("linspace", 10, 0.35))
        for p in ("epsilon", "v_prediction")
    ],
)
def test_img2img_matches_diffusers(sampler, spacing, steps, strength, prediction):
    noise, init = noise_and_init()
    sch = diffusers_scheduler(sampler, prediction, timestep_spacing=spacing)
    if sampler == "lcm":  # diffusers' LCM img2img: the strength narrows the grid, all steps run
        sch.set_timesteps(steps, strength=strength)
        timesteps = sch.timesteps
    else:  # StableDiffusionImg2ImgPipeline: the last int(steps * strength) steps
        sch.set_timesteps(steps)
        timesteps, _ = _get_timesteps(sch, steps, strength)
    x = sch.add_noise(init, noise, timesteps[:1])
    ref = run_diffusers(sch, x, timesteps, seed=3)
    cfg = ScheduleConfig(timestep_spacing=spacing)
    schedule, final, traj = run_ours(
        sampler, steps, cfg, prediction, noise, seed=3, init_latents=init, denoise=strength
    )
    assert schedule.timesteps == tuple(timesteps.double().tolist())
    assert max(rel(a, b) for a, b in zip(traj, ref)) <= TOL and rel(final, ref[-1]) <= TOL


def test_onestep_img2img_starts_at_denoise_fraction():
    noise, init = noise_and_init()
    cfg = ScheduleConfig()
    y = sample(stand_in, noise, sampler="onestep", steps=1, schedule_config=cfg, prediction_type="epsilon",
               init_latents=init, denoise=0.5)
    a = alphas_cumprod(cfg)[499].double()
    x_t = a.sqrt() * init.double() + (1 - a).sqrt() * noise.double()
    expected = (x_t - (1 - a).sqrt() * stand_in(x_t.float(), torch.tensor(499.0)).double()) / a.sqrt()
    assert rel(y, expected) <= TOL


# --------------------------------------------------------------------------- seeds, noise, callbacks
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_same_seed_same_bits(sampler):
    noise, _ = noise_and_init()
    steps = 1 if sampler == "onestep" else 4
    run = lambda seed: sample(  # noqa: E731
        stand_in, noise, sampler=sampler, steps=steps, schedule_config=ScheduleConfig(),
        prediction_type="epsilon", generator=torch.Generator().manual_seed(seed),
    )
    assert torch.equal(run(5), run(5))
    if sampler in ("euler_ancestral", "lcm"):  # the only samplers that draw noise
        assert not torch.equal(run(5), run(6))


def test_randn_is_diffusers_randn_tensor():
    from diffusers.utils.torch_utils import randn_tensor

    for shape, dtype in (((2, 4, 8, 8), torch.float32), ((1, 8, 16, 12), torch.float64)):
        a = randn(shape, torch.Generator().manual_seed(11), "cpu", dtype)
        b = randn_tensor(shape, generator=torch.Generator().manual_seed(11), device=torch.device("cpu"), dtype=dtype)
        assert torch.equal(a, b)


def test_callback_sees_every_step():
    seen = []
    noise, _ = noise_and_init()
    sample(stand_in, noise, sampler="dpmpp_2m", steps=5, schedule_config=ScheduleConfig(),
           prediction_type="epsilon", callback=lambda i, n, x: seen.append((i, n, tuple(x.shape))))
    assert seen == [(i, 5, SHAPE) for i in range(5)]


def test_cfg_model_combines_outputs():
    u, c = torch.full(SHAPE, 1.0), torch.full(SHAPE, 3.0)
    model = cfg_model(lambda x, t: (u, c), 7.5)
    assert torch.equal(model(None, None), u + 7.5 * (c - u))


# --------------------------------------------------------------------------- torch-free coefficients
@pytest.mark.parametrize("sampler", LINEAR_SAMPLERS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("img2img", [False, True])
def test_step_coefficients_reproduce_the_sampler(sampler, prediction, img2img):
    noise, init = noise_and_init()
    cfg = ScheduleConfig(timestep_spacing="trailing")
    steps, denoise = (1, 1.0) if sampler == "onestep" else (3, 0.7 if img2img else 1.0)
    kw = dict(init_latents=init, denoise=denoise if sampler != "onestep" else 0.6) if img2img else {}
    y = sample(stand_in, noise, sampler=sampler, steps=steps, schedule_config=cfg, prediction_type=prediction,
               generator=torch.Generator().manual_seed(2), **kw)
    co = step_coefficients(sampler, make_schedule(sampler, steps, cfg, denoise=kw.get("denoise", 1.0)), prediction)
    g = torch.Generator().manual_seed(2)
    x = (init + co["sigma_start"] * noise) if img2img else noise * co["init_noise_sigma"]
    x = x.double()
    for i, t in enumerate(co["timesteps"]):
        out = stand_in((co["c_in"][i] * x).float(), torch.tensor(t)).double()
        x = co["a"][i] * x + co["b"][i] * out
        if sampler == "euler_ancestral" or (sampler == "lcm" and i < len(co["timesteps"]) - 1):
            x = x + co["c"][i] * torch.randn(SHAPE, generator=g).double()
    assert rel(co["final_scale"] * x, y) <= TOL


def test_step_coefficients_refuse_multistep():
    with pytest.raises(ConfigError, match="no per-step linear form"):
        step_coefficients("dpmpp_2m", make_schedule("dpmpp_2m", 4, ScheduleConfig()), "epsilon")


# --------------------------------------------------------------------------- errors
def _sample(**kw):
    noise, _ = noise_and_init()
    args = dict(sampler="euler", steps=4, schedule_config=ScheduleConfig(), prediction_type="epsilon") | kw
    return sample(stand_in, noise, **args)


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(steps=0), r"steps must be an integer in \[1, 1000\], got 0"),
        (dict(steps=-3), "steps must be"),
        (dict(steps=2.0), "steps must be"),
        (dict(steps=1001), "steps must be"),
        (dict(sampler="plms"), "unknown sampler 'plms'; choose one of: " + ", ".join(SAMPLERS)),
        (dict(prediction_type="flow"), "unknown prediction_type 'flow'"),
        (dict(denoise=0.5), "needs init_latents"),
        (dict(sampler="onestep", steps=4), "use steps=1"),
        (dict(sampler="lcm", steps=51), "use at most 50 steps"),
        (dict(sampler="dpmpp_2m", steps=1000, schedule_config=ScheduleConfig(timestep_spacing="leading")),
         "repeated or out-of-range timesteps"),
    ],
)
def test_errors(kw, message):
    with pytest.raises(ConfigError, match=message):
        _sample(**kw)


@pytest.mark.parametrize("denoise", [0.0, -0.1, 1.5, float("nan")])
def test_denoise_out_of_range(denoise):
    _, init = noise_and_init()
    with pytest.raises(ConfigError, match=r"denoise must be in \(0, 1\]"):
        _sample(init_latents=init, denoise=denoise)


def test_img2img_errors():
    _, init = noise_and_init()
    with pytest.raises(ConfigError, match="leaves no step to run"):
        _sample(init_latents=init, denoise=0.2)  # int(4 * 0.2) = 0
    with pytest.raises(ConfigError, match="init_latents have shape"):
        _sample(init_latents=init[:1], denoise=0.5)
    with pytest.raises(ConfigError, match="or a higher denoise"):
        _sample(sampler="lcm", init_latents=init, denoise=0.05)  # 2 grid points for 4 steps
    assert math.isfinite(_sample(init_latents=init, denoise=0.5).norm().item())
