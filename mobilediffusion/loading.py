"""Public loaders: `load_unet`, `load_text_encoder`, `load_decoder`, `load_encoder`, and `load_model_config`.

Each takes a file or folder of any supported layout (see weights.formats), detects what it
is, builds the module from the checkpoint's own config, and loads the weights strictly.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from .config import DecoderConfig, EncoderConfig, ModelConfig, ScheduleConfig, TextEncoderConfig, UNetConfig
from .errors import CheckpointError
from .presets import PRESETS, SD_KL_DECODER, TAESD_DECODER
from .weights.formats import Source, component_weights, detect
from .weights.io import read_json, read_tensors
from .weights.keymap import load_state
from .weights.materialize import build_on_meta, materialize_buffers

# diffusers scheduler class -> our sampler name (the default a folder's scheduler implies)
SCHEDULER_SAMPLERS = {
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "LCMScheduler": "lcm",
}


UNSUPPORTED_SCHEDULER_OPTIONS = (
    "clip_sample", "thresholding", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
    "rescale_betas_zero_snr",
)


# --------------------------------------------------------------------------- configs
def text_config_from_transformers(d: dict) -> TextEncoderConfig:
    """TextEncoderConfig from a transformers CLIPTextConfig dict (text_encoder/config.json)."""
    if d.get("model_type") == "clip":  # a full CLIP config: take its text part
        d = d.get("text_config", {})
    names = {f.name for f in dataclasses.fields(TextEncoderConfig)} - {"pad_token"}
    return TextEncoderConfig(**{k: d[k] for k in names if k in d})


def schedule_config_from_diffusers(d: dict) -> tuple[ScheduleConfig, str | None, str | None]:
    """(ScheduleConfig, prediction_type or None, default sampler or None) from scheduler_config.json.

    Options that would change results and that the samplers do not implement are refused.
    """
    unsupported = [k for k in UNSUPPORTED_SCHEDULER_OPTIONS if d.get(k)]
    if unsupported:
        raise CheckpointError(
            f"scheduler_config.json enables {', '.join(unsupported)}, which this package's samplers do not "
            "implement; set them to false (or remove them) to sample without them"
        )
    names = {f.name for f in dataclasses.fields(ScheduleConfig)}
    cfg = ScheduleConfig(**{k: d[k] for k in names if k in d})
    return cfg, d.get("prediction_type"), SCHEDULER_SAMPLERS.get(d.get("_class_name", ""))


def load_model_config(path) -> ModelConfig:
    """The whole-model config a checkpoint implies (components, schedule, sampling defaults)."""
    src = detect(path)
    if src.kind == "native":
        from .weights.native import read_native_config

        return read_native_config(src.path)
    if src.kind == "diffusers":
        return _diffusers_model_config(src)
    if src.kind == "single_file":
        from .weights.single_file import single_file_config

        return single_file_config(src.path)
    raise CheckpointError(
        f"{src.path} is a single component ({src.kind}); a whole model needs a diffusers pipeline folder, "
        "an SD single-file checkpoint or a MobileDiffusion .safetensors"
    )


def _diffusers_model_config(src: Source) -> ModelConfig:
    from .weights.unet_keys import unet_config_from_diffusers
    from .weights.vae_keys import decoder_config_from_diffusers

    # 1. components
    unet_cfg = unet_config_from_diffusers(read_json(src.component("unet").path / "config.json"))
    text_cfg = text_config_from_transformers(read_json(src.component("text_encoder").path / "config.json"))
    decoder_cfg = decoder_config_from_diffusers(read_json(src.component("vae").path / "config.json"))
    # 2. schedule and prediction type live in scheduler/
    schedule, prediction, sampler = ScheduleConfig(), None, None
    sched_file = src.path / "scheduler" / "scheduler_config.json"
    if sched_file.is_file():
        schedule, prediction, sampler = schedule_config_from_diffusers(read_json(sched_file))
    if prediction:
        unet_cfg = dataclasses.replace(unet_cfg, prediction_type=prediction)
    # 3. sampling defaults from the matching preset, if any
    preset = match_preset(unet_cfg, schedule)
    base = PRESETS[preset] if preset else None
    if decoder_cfg.kind == "kl":
        latent = dict(latent_scale=decoder_cfg.scaling_factor, latent_shift=decoder_cfg.shift_factor)
    else:  # a TAESD vae (SDXS): the latent space is the family's
        latent = dict(latent_scale=base.latent_scale, latent_shift=base.latent_shift) if base else {}
    return ModelConfig(
        **latent,
        family=base.family if base else "sd-custom",
        unet=unet_cfg,
        text=text_cfg,
        decoder=decoder_cfg,
        schedule=schedule,
        resolution=unet_cfg.sample_size * 8,
        default_steps=base.default_steps if base else 20,
        default_guidance=base.default_guidance if base else 7.5,
        default_sampler=sampler or (base.default_sampler if base else "dpmpp_2m"),
    )


def match_preset(unet_cfg: UNetConfig, schedule: ScheduleConfig | None = None) -> str | None:
    """Name of the preset whose UNet architecture equals this one (ignoring prediction type and size);
    among several (sd21-base and sd-turbo share a UNet) the one with the same timestep spacing."""
    ignore = {"prediction_type": "epsilon", "sample_size": 64}
    key = dataclasses.replace(unet_cfg, **ignore)
    names = [n for n, p in PRESETS.items() if dataclasses.replace(p.unet, **ignore) == key]
    if schedule is not None:
        names.sort(key=lambda n: PRESETS[n].schedule.timestep_spacing != schedule.timestep_spacing)
    return names[0] if names else None


# --------------------------------------------------------------------------- components
def load_unet(path, *, device="cpu", dtype=torch.float32, config: UNetConfig | None = None, compile: bool = False):
    """UNet from a native file, a diffusers pipeline folder, a diffusers unet/ folder or an SD
    single-file checkpoint. `config` replaces the detected architecture (a preset override);
    the weights must fit it. The CPU fast path is applied (see mobilediffusion.fast); `compile`
    adds torch.compile with inductor freezing (inference only; the first call compiles).

    `unet.config.prediction_type` comes from the pipeline's scheduler config when there is one
    (a bare unet/ folder does not say; epsilon is assumed; single files: see weights.single_file_shapes).
    """
    from .unet import UNet

    cfg, state, keymap = _unet_weights(path)
    cfg = config or cfg
    return _build(UNet, cfg, state, keymap and keymap(cfg), "UNet", device, dtype, compile)


def load_trainable_unet(path, *, config: UNetConfig | None = None):
    """The UNet of any checkpoint `load_unet` reads as a plain float32 module for training: every weight a parameter,
    no CPU fast path (whose fused inference layers do not train)."""
    from .unet import UNet

    cfg, state, keymap = _unet_weights(path)
    unet = UNet(config or cfg)
    load_state(unet, state, keymap and keymap(unet.config), what="UNet")
    return unet.float().train()


def _unet_weights(path):
    """(UNetConfig, state dict as stored, key map factory or None) of a checkpoint's UNet."""
    from .weights.unet_keys import ldm_unet_keymap, unet_config_from_diffusers, unet_keymap

    src = detect(path)
    if src.kind == "native":
        from .weights.native import read_native_component, read_native_config

        cfg, state, keymap = read_native_config(src.path).unet, read_native_component(src.path, "unet"), None
    elif src.kind == "single_file":
        from .weights.single_file import read_component, single_file_config

        cfg, state, keymap = single_file_config(src.path).unet, read_component(src.path, "unet"), ldm_unet_keymap
    else:
        if src.kind == "diffusers":
            cfg = _diffusers_model_config(src).unet
            src = src.component("unet")
        elif src.kind == "diffusers_unet":
            cfg = unet_config_from_diffusers(read_json(src.path / "config.json"))
        else:
            raise _wrong_kind(src, "a UNet")
        state, keymap = read_tensors(component_weights(src.path)), unet_keymap
    return cfg, state, keymap


def load_text_encoder(path, *, device="cpu", dtype=torch.float32, config: TextEncoderConfig | None = None):
    """TextEncoder (tokenizer + CLIP text model) from a native file, a diffusers pipeline folder
    (its tokenizer/ is used when present), a transformers CLIPTextModel folder or an SD single-file
    checkpoint (CLIP or OpenCLIP layout; the packaged tokenizer). `config` replaces the detected one."""
    from .text_encoder import load_tokenizer
    from .weights.text_keys import clip_text_keymap

    src = detect(path)
    tokenizer_dir = None
    keymap_for = clip_text_keymap  # module prefix -> key map
    if src.kind == "native":
        from .weights.native import read_native_component, read_native_config

        cfg = read_native_config(src.path).text
        state = read_native_component(src.path, "text")
    elif src.kind == "single_file":
        from .weights.single_file import read_component, single_file_config, text_keymap

        cfg = single_file_config(src.path).text
        state = read_component(src.path, "text")
        keymap_for = functools.partial(text_keymap, state, cfg)  # the file's keys decide CLIP or OpenCLIP
    else:
        if src.kind == "diffusers":
            tok = src.path / "tokenizer"
            tokenizer_dir = tok if (tok / "vocab.json").is_file() else None
            src = src.component("text_encoder")
        elif src.kind != "clip_text":
            raise _wrong_kind(src, "a CLIP text encoder")
        cfg = text_config_from_transformers(read_json(src.path / "config.json"))
        state = read_tensors(component_weights(src.path))
    cfg = config or cfg
    tokenizer = load_tokenizer(tokenizer_dir, pad_token=None if tokenizer_dir else cfg.pad_token)
    return build_text_encoder(cfg, state, keymap_for, tokenizer, device=device, dtype=dtype)


def build_text_encoder(cfg: TextEncoderConfig, state: dict, keymap_for, tokenizer=None, *, device="cpu",
                       dtype=torch.float32):
    """A TextEncoder holding `state` (built on meta: no init, the tensors become the weights), with the CPU
    fast path. keymap_for: module key prefix -> KeyMap."""
    from .fast import float_dtype, optimize
    from .text_encoder import TextEncoder

    enc = build_on_meta(TextEncoder, cfg, tokenizer, dtype=float_dtype(dtype, device))  # int8: bf16 here
    load_state(enc.model, state, keymap_for(enc.key_prefix), what="text encoder", assign=True)
    materialize_buffers(enc.model).to(device)
    optimize(enc.model)  # packed linear weights
    return enc.eval()


def load_decoder(path, *, device="cpu", dtype=torch.float32, config: DecoderConfig | None = None,
                 compile: bool = False):
    """Decoder from a native file, a diffusers pipeline folder (vae/), an AutoencoderKL or
    AutoencoderTiny folder, a TAESD decoder file (.pth / .safetensors) or the SD VAE of a
    single-file checkpoint (first_stage_model.*). `config` replaces the detected one.
    Fast path and `compile` as in load_unet."""
    from .decoder import build_decoder
    from .weights.vae_keys import (
        decoder_config_from_diffusers, decoder_config_from_taesd, decoder_keymap, vae_layout_from_keys,
    )

    src = detect(path)
    if src.kind == "native":
        from .weights.native import read_native_component, read_native_config

        cfg, state, fmt = read_native_config(src.path).decoder, read_native_component(src.path, "decoder"), None
    elif src.kind == "single_file":
        from .weights.single_file import read_component, single_file_config

        cfg, state, fmt = single_file_config(src.path).decoder, read_component(src.path, "decoder"), "ldm"
    elif src.kind in ("taesd", "vae_file"):  # no config beside the weights: judged from the tensors
        state = read_tensors(src.path)
        layout = vae_layout_from_keys(state)
        if layout is None:
            raise CheckpointError(f"{src.path} holds an image encoder but no decoder; use it with load_encoder "
                                  "(Load Lite Encoder) and pick the matching decoder file (e.g. *_decoder)")
        kind, fmt = layout
        if fmt == "taesd":
            cfg = decoder_config_from_taesd(state)
        else:  # the standard SD VAE / TAESD shapes; a mismatch is reported key by key
            cfg = TAESD_DECODER if kind == "tiny" else SD_KL_DECODER
    else:
        if src.kind == "diffusers":
            src = src.component("vae")
        elif src.kind != "diffusers_vae":
            raise _wrong_kind(src, "a decoder (VAE)")
        cfg = decoder_config_from_diffusers(read_json(src.path / "config.json"))
        state, fmt = read_tensors(component_weights(src.path)), "diffusers"
    cfg = config or cfg
    return _build(build_decoder, cfg, state, fmt and decoder_keymap(cfg, fmt), "decoder", device, dtype, compile)


def load_encoder(path, *, device="cpu", dtype=torch.float32, config: EncoderConfig | None = None,
                 compile: bool = False):
    """Encoder: images (B, 3, H, W) in [0, 1] -> sampler-space latents (B, C, H / f, W / f), the space
    load_decoder's decoders take (KL: the posterior mean, then (mean - shift) * scaling_factor; TAESD:
    its output as is). From a native file that carries the lite encoder (`encoder.*`), a diffusers
    pipeline folder (vae/), an AutoencoderKL or AutoencoderTiny folder, a TAESD encoder file
    (taesd_encoder.pth / .safetensors; also a whole TAESD or ComfyUI TAESD VAE state), the SD VAE of a
    single-file checkpoint (first_stage_model.encoder.* + quant_conv) or a standalone SD VAE file.
    `config` replaces the detected one. Fast path and `compile` as in load_decoder."""
    from .encoder import lite_encoder_config
    from .weights.encoder_keys import encoder_config_from_diffusers, encoder_config_from_state, encoder_layout_from_keys

    src = detect(path)
    if src.kind == "native":
        from .weights.native import read_native_component, read_native_config

        if not has_encoder(src.path):
            raise _no_encoder(src, "it was saved without its lite encoder (no encoder.* keys)")
        state = read_native_component(src.path, "encoder")
        cfg, fmt = lite_encoder_config(read_native_config(src.path).decoder), "native"
    elif src.kind == "single_file":
        from .weights.single_file import read_component, single_file_config

        state = read_component(src.path, "decoder")  # first_stage_model.*: both halves of the VAE
        if encoder_layout_from_keys(state) is None:
            raise _no_encoder(src, "its VAE (first_stage_model.*) has no encoder half")
        model = single_file_config(src.path)
        cfg, fmt = encoder_config_from_state(state, "ldm", scaling_factor=model.latent_scale,
                                             shift_factor=model.latent_shift), "ldm"
    elif src.kind in ("taesd", "vae_file"):  # no config beside the weights: judged from the tensors
        state = read_tensors(src.path)
        layout = encoder_layout_from_keys(state)
        if layout is None:
            raise _no_encoder(src, "it is a TAESD decoder: pick the *_encoder file" if src.kind == "taesd"
                              else "it has no encoder.* keys")
        cfg, fmt = encoder_config_from_state(state, layout[1]), layout[1]
    else:
        if src.kind == "diffusers":
            src = src.component("vae")
        elif src.kind != "diffusers_vae":
            raise _wrong_kind(src, "an image encoder (VAE)")
        cfg = encoder_config_from_diffusers(read_json(src.path / "config.json"))
        state, fmt = read_tensors(component_weights(src.path)), "diffusers"
    return encoder_from_state(state, fmt, config or cfg, device=device, dtype=dtype, compile=compile)


def encoder_from_state(state: dict, fmt: str, config: EncoderConfig | None = None, *, device="cpu",
                       dtype=torch.float32, compile: bool = False):
    """An Encoder (see load_encoder) from an in-memory state dict of layout `fmt`: "ldm" (single-file
    `first_stage_model.*` or bare names, as ComfyUI's `VAE.get_sd()` gives them for SD VAEs), "taesd"
    (taesd_encoder.pth keys, or prefixed `encoder.` / ComfyUI's `taesd_encoder.`), "diffusers" or
    "native". Decoder halves and ComfyUI's vae_scale / vae_shift are skipped by name; any other key
    that is not the encoder's is an error. `config` None: read from the tensors (see
    weights.encoder_keys.encoder_config_from_state: a KL encoder gets SD's latent space and 32
    GroupNorm groups, TAESD its own space); "native" needs `config` (encoder.lite_encoder_config)."""
    from .encoder import build_encoder
    from .fast import float_dtype
    from .weights.encoder_keys import FORMATS, encoder_config_from_state, encoder_keymap

    dtype = float_dtype(dtype, device)  # precision int8: the encoder stays bf16

    if fmt not in FORMATS:
        raise CheckpointError(f"unknown encoder state layout {fmt!r}; expected one of {', '.join(FORMATS)}")
    if config is None:
        if fmt == "native":
            raise CheckpointError("a native encoder state needs its config: lite_encoder_config(model.decoder)")
        config = encoder_config_from_state(state, fmt)
    return _build(build_encoder, config, state, encoder_keymap(config.kind, fmt), "encoder", device, dtype, compile)


def has_encoder(path) -> bool:
    """Whether the checkpoint at `path` carries an image encoder load_encoder can read (only key names
    are read; a pickle is loaded once)."""
    from .weights.encoder_keys import encoder_layout_from_keys
    from .weights.io import read_keys

    src = detect(path)
    if src.kind in ("diffusers", "diffusers_vae"):
        return True  # AutoencoderKL / AutoencoderTiny always hold both halves
    if src.kind == "native":
        return any(k.startswith("encoder.") for k in read_keys(src.path))
    if src.kind in ("single_file", "taesd", "vae_file"):
        from .weights.single_file import read_shapes

        return encoder_layout_from_keys(read_shapes(src.path)) is not None
    return False


def _no_encoder(src: Source, why: str) -> CheckpointError:
    return CheckpointError(f"{src.path} has no image encoder: {why}. Load an encoder from another file: a TAESD "
                           "encoder (taesd_encoder.safetensors) for SD-family latents, or the model's own VAE")


def _build(factory, cfg, state, keymap, what, device, dtype, compile=False):
    from .fast import int8_plan, optimize, weight_memory_format
    from .layers import model_backend

    dtype, int8 = int8_plan(dtype, device, compile=compile)  # "int8": a bf16 model with int8 convs and linears
    module = build_on_meta(factory, cfg, dtype=dtype)  # no init: the checkpoint's tensors become the weights
    # cast once, straight into the layout the fast path keeps (one copy; optimize() copies nothing again)
    load_state(module, state, keymap, what=what, assign=True,
               memory_format=weight_memory_format(module, device, compile=compile))
    module = materialize_buffers(module).to(device)
    if torch.device(device).type != "cpu":  # built for the CPU's ops backend: choose anew
        module.ops_backend = model_backend(module, device)
    module = optimize(module.eval(), compile=compile)  # the CPU fast path (mobilediffusion.fast)
    if int8:
        from .ops.int8 import quantize_int8

        quantize_int8(module)
    return module


def _wrong_kind(src: Source, wanted: str) -> CheckpointError:
    return CheckpointError(f"{src.path} is a {src.kind} checkpoint, not {wanted}; pick the matching file or folder")


__all__ = ["load_unet", "load_text_encoder", "load_decoder", "load_encoder", "encoder_from_state", "has_encoder",
           "load_model_config", "match_preset"]
