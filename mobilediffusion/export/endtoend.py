"""The bounded end-to-end check: the bundle, run by the torch-free runtime, against the torch pipeline on the
same prompt and noise, for the first `steps` steps of the baked schedule, with the bundle's own shapes;
and the sampler's coefficients over every step against the torch sampler with a stand-in model.

Why a few steps show a wrong bundle as well as all of them: a bundle goes wrong through (1) a component
that computes something else (the component checks, and the first step here), (2) the wiring between
components - tokenizer, [uncond, cond] batch order, guidance, timestep values, input scaling, the
decoder's latent space - which every step exercises the same way, so the first steps show it, or (3) the
sampler's per-step coefficients, which `sampler_check` compares over all N steps with the torch sampler,
using a cheap stand-in for the UNet. The shapes cannot shrink (they are fixed in the files); running the
first k steps of the real schedule keeps every coefficient of those steps the bundle's own, and two
steps also carry DPM++'s state (the previous x0) from one step to the next.

Both sides run the same numpy sampler loop (runtime/sampler.py; `sampler_check` proves it equals torch's
sampler) with the runtime's seeded numpy noise; torch computes the text encoder, the guided UNet and the
decoder in the caller's pipeline as loaded. After k < N steps the latent still holds noise at sigma_k;
both sides decode c_in[k] x_k (unit variance, like finished latents).
"""
from __future__ import annotations

import numpy as np

DEFAULT_STEPS = 2  # UNet steps the check runs by default (0 turns it off)
PROMPT = "a photo of a red fox in the snow, highly detailed"
SEED = 0
SAMPLER_LIMIT = 1e-5  # relative error of the numpy loop with the manifest's coefficients vs the torch sampler


def truncated(section: dict, steps: int) -> dict:
    """The sampler section cut to its first `steps` steps, ending on c_in[steps] x (see the module docstring)."""
    n = len(section["timesteps"])
    if steps >= n:
        return section
    out = dict(section)
    for key in ("timesteps", "c_in", "a", "b", "c", "d", "x0_p", "x0_q", "sigmas"):
        if key in section:
            out[key] = list(section[key][:steps])
    out["final_scale"] = section["c_in"][steps]
    return out


def torch_reference(pipe, section: dict, *, batch: int, latent_shape, decoder_space=None, callback=None,
                    prompt: str = PROMPT, negative: str = "", seed: int = SEED) -> np.ndarray:
    """The torch pipeline's image (B, H, W, 3) for the (truncated) sampler section, on the runtime's numpy noise
    from `seed`."""
    import torch

    from ..guidance import guided_model
    from ..runtime.sampler import numpy_noise, sample

    g = section["guidance"]
    with torch.no_grad():
        cond = pipe.text_encoder.encode_prompts([prompt] * batch)
        uncond = [(pipe.text_encoder.encode_prompts([negative] * batch), 1.0)] if g > 1.0 else None
        model = guided_model(pipe.unet, [(cond, 1.0)], uncond, g)

        def step(x, t):
            return model(torch.from_numpy(np.ascontiguousarray(x)), torch.tensor(t, dtype=torch.float32)).cpu().numpy()

        latents = sample(step, tuple(latent_shape), section, numpy_noise(seed), callback)
        scale, shift = decoder_space or (1.0, 0.0)
        p = next(pipe.decoder.parameters())
        z = torch.from_numpy(latents) * scale + shift
        return pipe.decoder(z.to(p.device, p.dtype)).float().permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)


def bundle_image(bundle, section: dict, *, callback=None) -> np.ndarray:
    """The same run by a runtime BundlePipeline (its own text encoder, UNet, guidance and decoder files)."""
    from ..runtime.sampler import numpy_noise

    batch = bundle.batch_size
    context = bundle.encode([PROMPT] * batch)
    uncond = bundle.encode([""] * batch) if bundle.guidance > 1.0 else None
    latents = bundle.sample(context, uncond, noise=numpy_noise(SEED), callback=callback, sampler=section)
    return bundle.decode(latents)


class StandIn:
    """A fixed nonlinear stand-in for the UNet, the same in torch and numpy: out = tanh(W x + t / 1000)."""

    def __init__(self, channels: int):
        import torch

        g = torch.Generator().manual_seed(1)
        self.w = torch.randn(channels, channels, generator=g) / channels**0.5

    def torch(self, x, t):
        import torch

        return torch.tanh(torch.einsum("oc,bchw->bohw", self.w, x) + t / 1000.0)

    def numpy(self, x, t):
        w = self.w.numpy()
        return np.tanh(np.einsum("oc,bchw->bohw", w, x) + np.float32(t / 1000.0)).astype(np.float32)


def sampler_check(config, section: dict, latent_shape) -> float:
    """Relative error of the numpy loop with the manifest's coefficients against sampling.sample in torch,
    over all steps, same noise, with the StandIn model."""
    import torch

    from ..runtime.sampler import sample as numpy_sample
    from ..sampling import sample as torch_sample
    from .verify import rel_error

    shape = tuple(latent_shape)
    model = StandIn(shape[1])
    gen = torch.Generator().manual_seed(SEED)
    draws = torch.Generator().manual_seed(SEED)
    got = numpy_sample(model.numpy, shape, section, lambda s: torch.randn(tuple(s), generator=draws).numpy())
    noise = torch.randn(shape, generator=gen)
    ref = torch_sample(model.torch, noise, sampler=section["name"], steps=section["steps"],
                       schedule_config=config.schedule, prediction_type=section["prediction_type"], generator=gen)
    return rel_error(got, ref.numpy())
