"""Text-to-image pipeline: prompt -> context -> sampled latents -> image.

    pipe = load_pipeline(None)                     # the embedded default model
    images = pipe("a red circle", steps=1, seed=0)  # list of PIL images
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import ConfigError
from .guidance import SAME
from .presets import get_preset

log = logging.getLogger(__name__)

DEFAULT_PRESET = "md-shapes-128"  # the embedded default model's architecture
DEFAULT_WEIGHTS = Path(__file__).parent / "assets" / "default.safetensors"  # its trained weights (fp16 storage)
DEFAULT_INIT_SEED = 0  # deterministic initialisation of untrained presets (build_pipeline)


@dataclass
class Pipeline:
    """The three stages of a model and its config. `trained` is False for randomly initialised weights."""

    config: ModelConfig
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    decoder: torch.nn.Module
    trained: bool = True
    encoder: torch.nn.Module | None = None  # image -> latents, for img2img and inpainting (load_pipeline(encoder=True))

    def __post_init__(self):
        if self.decoder.config.latent_channels != self.unet.config.out_channels:
            raise ConfigError(
                f"the decoder takes {self.decoder.config.latent_channels}-channel latents but the UNet makes "
                f"{self.unet.config.out_channels}; load a decoder of the same latent space"
            )

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the decoder's upscale (8) times the UNet's latent multiple."""
        return size_multiple(self.config)

    def check_request(self, **kw) -> str:
        """Validate a request before any heavy work; see `check_request`."""
        return check_request(self.config, **kw)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> context (B, 77, D)."""
        return self.text_encoder.encode_prompts(prompts)

    def sample_latents(self, cond, uncond=None, **kw) -> torch.Tensor:
        """Text condition -> sampler-space latents; see `sample_latents`."""
        return sample_latents(self.unet, self.config, cond, uncond, **kw)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> sampler-space latents (the encoder's posterior mean, scaled)."""
        if self.encoder is None:
            raise ConfigError("this pipeline has no image encoder: load it with load_pipeline(path, encoder=True) "
                              "(or --image on the command line, which does)")
        p = next(self.encoder.parameters())
        return self.encoder(images.to(p.device, p.dtype)).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Sampler-space latents -> images (B, 3, H, W) float in [0, 1]."""
        p = next(self.decoder.parameters())
        return self.decoder(latents.to(p.device, p.dtype)).float().clamp(0, 1)

    def __call__(
        self, prompt, negative_prompt="", steps=None, guidance=None, seed=0, height=None, width=None,
        sampler="auto", batch_size=1, callback=None, control=(), image=None, mask=None, denoise=1.0,
    ):
        """Prompt(s) -> list of PIL images. None means the model's own default: its steps and guidance
        (`config.default_steps`, `default_guidance`) and its native resolution. `callback(step, total,
        latents)` runs after each step. `control`: [(control model, image, strength=1, start=0, end=1)] or
        control.Control items (load_control; the image a path, PIL image or (B, C, H, W) tensor in [0, 1]),
        summed. `image` (+ `denoise` < 1): img2img from it (its size unless height/width say otherwise: centre
        cropped and resized to them); with `mask` (white = repaint): inpainting, the rest kept (an ordinary UNet
        repaints as ComfyUI's KSampler with a noise mask; a 9-channel inpainting UNet gets the mask and the
        masked image's latents, as diffusers' StableDiffusionInpaintPipeline gives them)."""
        cfg = self.config
        steps = cfg.default_steps if steps is None else steps
        guidance = cfg.default_guidance if guidance is None else guidance
        from .control.apply import as_hint

        picture = None if image is None else as_hint(image)
        if picture is not None and height is None and width is None:
            height, width = picture.shape[-2:]
        height = cfg.resolution if height is None else height
        width = cfg.resolution if width is None else width
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(batch_size)]
        name = self.check_request(steps=steps, height=height, width=width, sampler=sampler, batch_size=batch_size)
        controls = controls_of(control)  # bad controls fail before any work
        source = self._source(picture, mask, denoise, height, width)
        # 1. text
        context = self.encode_prompt(prompts)
        uncond = self.encode_prompt([negative_prompt] * len(prompts)) if guidance > 1.0 else None
        # 2. latents
        latents = self.sample_latents(
            context, uncond, steps=steps, guidance=guidance, seed=seed, height=height, width=width,
            sampler=name, callback=callback, control=controls, denoise=denoise, **source,
        )
        # 3. image
        return to_pil(self.decode(latents))


    def _source(self, picture, mask, denoise: float, height: int, width: int) -> dict:
        """sample_latents' image keywords (init_latents, mask, concat) for img2img / inpainting, checked."""
        from .control.apply import as_hint, fit_hint

        inpainting_unet = getattr(self.unet, "concat_channels", 0) > 0
        if picture is None:
            if mask is not None or denoise != 1.0:
                raise ConfigError("a mask or denoise < 1 needs an image to start from: give image=...")
            return {}
        if not 0.0 < denoise <= 1.0:
            raise ConfigError(f"denoise is a fraction in (0, 1], got {denoise}")
        f = self.config.decoder.upscale
        picture = fit_hint(picture.expand(-1, 3, -1, -1) if picture.shape[1] == 1 else picture, height, width)
        latents = self.encode(picture)
        if mask is None:
            if inpainting_unet:
                raise ConfigError("this is an inpainting UNet: give a mask (white = repaint) with the image")
            if denoise == 1.0:
                raise ConfigError("an image without a mask is img2img: give denoise < 1 (how much to change)")
            return {"init_latents": latents}
        m = fit_hint(as_hint(mask).mean(dim=1, keepdim=True), height, width).clamp(0, 1)  # (B, 1, H, W)
        if m.max() < 0.5:
            raise ConfigError("the mask is empty (all black): nothing to repaint; white marks what to repaint")
        if m.min() >= 0.5 and not inpainting_unet:
            raise ConfigError("the mask covers the whole image (all white): that is text-to-image; leave out the "
                              "image and mask")
        h, w = height // f, width // f
        if not inpainting_unet:  # ComfyUI: the noise mask resized bilinearly to the latent
            small = torch.nn.functional.interpolate(m, size=(h, w), mode="bilinear")
            return {"init_latents": latents, "mask": small}
        hard = (m >= 0.5).float()  # diffusers: binarised; the masked pixels grey, the mask nearest-resized
        masked = self.encode(picture * (1.0 - hard) + 0.5 * hard)
        concat = torch.cat([torch.nn.functional.interpolate(hard, size=(h, w)), masked], dim=1)
        return {"concat": concat, **({"init_latents": latents} if denoise < 1.0 else {})}


@torch.no_grad()
def sample_latents(
    unet, config: ModelConfig, cond, uncond=None, *, steps, guidance, seed, height, width, sampler,
    batch_size=None, init_latents=None, denoise=1.0, callback=None, control=(), mask=None, concat=None,
    uncond_control=SAME,
) -> torch.Tensor:
    """Text condition -> sampler-space latents (B, C, height/f, width/f), f the decoder's upscale (8).

    `cond`/`uncond`: a context (B, T, D) or a list of (context, weight) entries (see guidance.py).
    Classifier-free guidance runs when guidance > 1 and uncond is given. `init_latents`
    (sampler space) + `denoise` < 1 is img2img. Noise is drawn on the CPU from `seed`, so the
    same seed gives the same image on any device; the sampler state stays float32. `control`: control.Control
    items (or their tuples) whose residuals the UNet gets at every step of their window, on both guidance sides
    unless `uncond_control` gives the unconditional side its own (e.g. [] for none).
    Inpainting: `mask` (B or 1, 1, h, w) at the latent size, 1 = repaint, keeps the rest of `init_latents` (an
    ordinary UNet: sampling.KeepKnown); `concat` (B or 1, k, h, w) is what an inpainting UNet takes beside the
    latent (mask and masked-image latents), given at every call.
    """
    from .guidance import as_cond, guided_model
    from .sampling import sample

    cond = as_cond(cond)
    B = batch_size or max(c.shape[0] for c, _ in cond)
    f = config.decoder.upscale
    shape = (B, unet.config.out_channels, height // f, width // f)  # (an inpainting UNet takes more in)
    gen = torch.Generator("cpu").manual_seed(int(seed))
    device = next(unet.parameters()).device
    noise = torch.randn(shape, generator=gen).to(device)
    keywords = {}  # UNet keyword -> fn(x, t, context) giving it for that call
    if concat is not None:
        from .control.apply import to_batch

        concat = concat.to(device, torch.float32)
        keywords["concat"] = lambda x, t, context: to_batch(concat, x.shape[0])
    elif getattr(unet, "concat_channels", 0):
        raise ConfigError(f"this is an inpainting UNet ({unet.config.in_channels} channels in): give an image and "
                          "a mask to repaint")
    steps_scale = config.schedule.num_train_timesteps
    cond_kw = {**keywords, **_control_keyword(control, unet, steps_scale)}
    uncond_kw = cond_kw if uncond_control is SAME else {**keywords, **_control_keyword(uncond_control, unet,
                                                                                       steps_scale)}
    extra = _keywords_fn(cond_kw)
    model = guided_model(unet, cond, as_cond(uncond) if uncond is not None else None, guidance, extra=extra,
                         uncond_extra=extra if uncond_kw is cond_kw else _keywords_fn(uncond_kw))
    if init_latents is not None:
        init_latents = init_latents.to(device, torch.float32)
    return sample(
        model, noise, sampler=sampler, steps=steps, schedule_config=config.schedule,
        prediction_type=unet.config.prediction_type, generator=gen, callback=callback,
        init_latents=init_latents, denoise=denoise, keep=mask,
    )


def _control_keyword(control, unet, num_train_timesteps: int) -> dict:
    if not control:
        return {}
    from .control.apply import ControlStack

    return {"control": ControlStack(controls_of(control), unet, num_train_timesteps=num_train_timesteps)}


def _keywords_fn(keywords: dict):
    """{UNet keyword: fn(x, t, context)} -> extra(x, t, context) -> {keyword: value} for guided_model, or None."""
    if not keywords:
        return None
    return lambda x, t, context: {k: fn(x, t, context) for k, fn in keywords.items()}


def controls_of(items) -> list:
    """[control.Control] from Control items or (model, image, strength=1, start=0, end=1) tuples, images read
    (as_hint); ConfigError for anything else."""
    if not items:
        return []
    from .control.apply import Control, as_hint

    out = []
    for item in items:
        if isinstance(item, Control):
            out.append(item)
            continue
        try:
            model, image, *rest = item
        except (TypeError, ValueError):
            raise ConfigError(f"a control is (model, image[, strength, start, end]) or a Control, got {item!r}") from None
        out.append(Control(model, as_hint(image), *map(float, rest)))
    return out


def to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) in [0, 1] -> list of PIL RGB images."""
    from PIL import Image

    arr = (images.permute(0, 2, 3, 1).cpu().numpy() * 255.0).round().clip(0, 255).astype("uint8")  # (B, H, W, 3)
    return [Image.fromarray(a) for a in arr]


def size_multiple(config: ModelConfig) -> int:
    """Image sides must be multiples of this: the decoder's upscale (8) times the UNet's latent multiple."""
    return config.decoder.upscale * config.unet.size_multiple


def check_request(config: ModelConfig, *, steps: int, height: int, width: int, sampler: str, batch_size: int = 1) -> str:
    """Validate a request; returns the resolved sampler name. Raises ConfigError saying what to change."""
    from .sampling import SAMPLERS

    m = size_multiple(config)
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or v < m or v % m:
            raise ConfigError(f"expected a multiple of {m} for {name} (at least {m}), got {v}")
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be an integer >= 1, got {steps!r}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    name = config.default_sampler if sampler == "auto" else sampler
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; choose one of: auto, {', '.join(SAMPLERS)}")
    return name


def load_pipeline(path=None, *, preset: str | None = None, device="cpu", dtype=torch.float32,
                  compile: bool = False, loras=(), encoder: bool = False, calibration=None) -> Pipeline:
    """A Pipeline from a checkpoint (file or folder of any supported layout); None = embedded default.
    `compile`: torch.compile the UNet with inductor freezing (see mobilediffusion.fast; the first
    generation compiles).

    `preset` forces an architecture and sampling setup instead of detecting it (e.g. a v-prediction
    SD 2.x single file, or SD-Turbo whose UNet equals SD 2.1-base's); the weights must fit it.
    `loras`: [(lora file, strength), ...] (or bare paths, strength 1.0) merged into the UNet and text
    encoder in order, before compiling (see mobilediffusion.lora); each pipe.unet.applied_loras lists them.
    `encoder`: also load the image encoder (img2img, inpainting; CheckpointError when the checkpoint has none).
    `dtype`: a torch dtype or a precision name ("fp32", "bf16", "fp16"), or "int8": the UNet's and decoder's
    convolutions and linears int8 in a bf16 model (mobilediffusion.ops.int8; bf16 where int8 cannot run).
    `calibration`: with dtype "int8", prompts whose generation fixes each int8 layer's activation range (static
    scales, cached; see mobilediffusion.int8_calibration); without, each layer takes its input's range per call.
    """
    if calibration is not None:
        from .fast import INT8
        from .int8_calibration import calibrate_int8, check_prompts

        if dtype != INT8:
            raise ConfigError(f"calibration prompts are for dtype 'int8', not {dtype!r}: leave them out, or load "
                              "with dtype='int8'")
        prompts = check_prompts(calibration)  # before any loading
        pipe = load_pipeline(path, preset=preset, device=device, dtype=dtype, compile=compile, loras=loras,
                             encoder=encoder)
        calibrate_int8(pipe, prompts, source=path, loras=lora_specs(loras))
        return pipe
    if encoder:
        from .loading import load_encoder

        pipe = load_pipeline(path, preset=preset, device=device, dtype=dtype, compile=compile, loras=loras)
        pipe.encoder = load_encoder(DEFAULT_WEIGHTS if path is None else path, device=device, dtype=dtype)
        return pipe
    loras = lora_specs(loras)  # bad specs fail before any loading
    if loras:
        from .fast import compile_module, int8_plan
        from .lora import apply_lora

        dtype, int8 = int8_plan(dtype, device, compile=compile)  # int8: the LoRAs merge into float weights first
        pipe = load_pipeline(path, preset=preset, device=device, dtype=dtype)
        for lora, strength in loras:
            apply_lora(pipe, lora, strength)
        if int8:
            from .ops.int8 import quantize_int8

            quantize_int8(pipe.unet)
            quantize_int8(pipe.decoder)
        if compile:
            compile_module(pipe.unet)
        return pipe
    if path is None:
        if preset is not None:
            raise ConfigError("a preset override needs a checkpoint; the embedded default has its own config")
        return default_pipeline(device=device, dtype=dtype, compile=compile)
    from .loading import load_decoder, load_model_config, load_text_encoder, load_unet

    cfg = load_model_config(path) if preset is None else get_preset(preset)
    return Pipeline(
        config=cfg,
        unet=load_unet(path, device=device, dtype=dtype, config=cfg.unet, compile=compile),
        text_encoder=load_text_encoder(path, device=device, dtype=dtype, config=cfg.text),
        decoder=load_decoder(path, device=device, dtype=dtype, config=cfg.decoder),
    )


def lora_specs(loras) -> list[tuple[str, float]]:
    """[(path, strength)] from (path, strength) pairs or bare paths; ConfigError / CheckpointError for a bad
    strength or a missing file, before anything is loaded."""
    from .lora import check_strength
    from .weights.io import check_exists

    out = []
    for item in loras or ():
        try:
            path, strength = (item, 1.0) if isinstance(item, (str, Path)) else tuple(item)
        except (TypeError, ValueError):
            raise ConfigError(f"each LoRA is a (path, strength) pair or a path, got {item!r}") from None
        out.append((str(check_exists(path)), check_strength(strength)))
    return out


def build_pipeline(cfg: ModelConfig, *, seed: int = DEFAULT_INIT_SEED, device="cpu", dtype=torch.float32,
                   compile: bool = False) -> Pipeline:
    """Randomly initialised (untrained) model of `cfg`, the same for the same seed. `dtype` as load_pipeline's
    (precision "int8": int8 convolutions and linears in the UNet and decoder of a bf16 model)."""
    from .decoder import build_decoder
    from .fast import int8_plan, optimize
    from .layers import model_backend
    from .text_encoder import TextEncoder
    from .unet import UNet

    dtype, int8 = int8_plan(dtype, device, compile=compile)
    with torch.random.fork_rng(devices=[]):  # leaves the caller's global RNG untouched
        torch.manual_seed(seed)
        unet = UNet(cfg.unet, dtype=dtype)
        text = TextEncoder(cfg.text, dtype=dtype)
        decoder = build_decoder(cfg.decoder, dtype=dtype)
    unet, text, decoder = unet.to(device).eval(), text.to(device).eval(), decoder.to(device).eval()
    if torch.device(device).type != "cpu":  # built on the CPU (same init everywhere): choose the ops anew
        unet.ops_backend, decoder.ops_backend = model_backend(unet, device), model_backend(decoder, device)
    optimize(unet, compile=compile)  # the CPU fast path (mobilediffusion.fast)
    for module in (text.model, decoder):
        optimize(module)
    if int8:
        from .ops.int8 import quantize_int8

        quantize_int8(unet)
        quantize_int8(decoder)
    return Pipeline(cfg, unet, text, decoder, trained=False)


def default_pipeline(*, device="cpu", dtype=torch.float32, compile: bool = False) -> Pipeline:
    """The embedded default: `md-shapes-128` trained on the synthetic scenes by `mobilediffusion train` (lite
    autoencoder, UNet + CLIP text encoder, DiffusionGAN one-step fine-tune): 128x128, one object or two in a
    relation; it knows simple shapes only."""
    with torch.random.fork_rng(devices=[]):  # module construction draws random inits: keep the caller's RNG
        return load_pipeline(DEFAULT_WEIGHTS, device=device, dtype=dtype, compile=compile)
