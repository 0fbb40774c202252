"""Components from state dicts already in memory, in the layouts ComfyUI's model objects hold.

    cfg, preset = unet_config_from_state(shapes)              # LDM names: input_blocks.*, out.2.* ...
    unet = build_unet(state, cfg)
    text = build_text_encoder(state, text_config_from_state(shapes, base=SD_TEXT, layers=11))
    decoder = build_decoder_from_vae_state(state)              # LDM VAE names or TAESD (taesd_decoder.*)

The names are the ones of an SD single file without its component prefix (a ComfyUI MODEL's
`diffusion_model.*` minus that prefix, a CLIP's `clip_l.transformer.*` minus that prefix, a VAE's
`vae.get_sd()`), so the single-file configs and key maps read them: every key is used, or the
leftovers are reported by name. Nothing here imports ComfyUI (the reading lives in nodes/).
"""
from __future__ import annotations

import dataclasses
import re

import torch

from .config import DecoderConfig, ModelConfig, TextEncoderConfig, UNetConfig
from .errors import CheckpointError, ConfigError
from .presets import PRESETS, SD_KL_DECODER, get_preset
from .weights.single_file_shapes import decoder_config_from_ldm, family_of
from .weights.single_file_unet import unet_config_from_ldm, with_preset_heads
from .weights.text_keys import clip_text_keymap
from .weights.unet_keys import LDM_PREFIX, ldm_unet_keymap

_LAYER = re.compile(r"(?:text_model\.)?encoder\.layers\.(\d+)\.")
_TEXT_HEADS = ("text_projection.weight", "text_projection", "logit_scale")  # pooled-output head: unused by SD


def shapes_of(state: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


# --------------------------------------------------------------------------- UNet
def unet_config_from_state(shapes: dict, *, preset: str | None = None, prediction_type: str = "epsilon",
                           num_heads: int | None = None, head_channels: int | None = None
                           ) -> tuple[UNetConfig, str | None]:
    """(UNetConfig, matching preset name or None) of an LDM UNet state dict's {name: shape}.

    Heads are not in the weights: `num_heads` (a count per site, SD 1.x: 8) or `head_channels` (a width per
    head, SD 2.x: 64) as the model that holds the weights says (ComfyUI's unet_config), else SD's conventions.
    `preset` forces that preset's architecture (e.g. "sd-turbo", whose weights look like SD 2.1-base's);
    it must describe the same layers, else a ConfigError says which preset the weights look like.
    """
    found = unet_config_from_ldm(shapes)
    widths = found.block_out_channels
    if num_heads and num_heads > 0:
        found = dataclasses.replace(found, num_attention_heads=(num_heads,) * len(widths))
    elif head_channels and head_channels > 0:
        found = dataclasses.replace(found, num_attention_heads=tuple(max(1, w // head_channels) for w in widths))
    found, name = with_preset_heads(found) if not (num_heads or head_channels) else (found, _preset_of(found))
    if preset is not None:
        forced = get_preset(preset).unet
        free = {"prediction_type": "epsilon", "sample_size": 64}
        if dataclasses.replace(forced, **free) != dataclasses.replace(found, **free):
            looks = f"the {name} preset" if name else "no preset (a custom layout)"
            raise ConfigError(f"preset {preset!r} does not fit this UNet (its layers match {looks}); "
                              "choose auto or the matching preset")
        found, name = forced, preset
    return dataclasses.replace(found, prediction_type=prediction_type), name


def _preset_of(cfg: UNetConfig) -> str | None:
    """The preset whose UNet has this architecture (heads included), ignoring prediction type and size."""
    free = {"prediction_type": "epsilon", "sample_size": 64}
    key = dataclasses.replace(cfg, **free)
    return next((n for n, p in PRESETS.items() if dataclasses.replace(p.unet, **free) == key), None)


def build_unet(state: dict, cfg: UNetConfig, *, device="cpu", dtype=torch.float32):
    """Our UNet from an LDM state dict (names without `model.diffusion_model.`), strictly."""
    from .loading import _build
    from .unet import UNet

    state = {LDM_PREFIX + k: v for k, v in state.items()}
    return _build(UNet, cfg, state, ldm_unet_keymap(cfg), "UNet", device, dtype)


# --------------------------------------------------------------------------- text encoder
def text_layer_count(shapes: dict) -> int:
    """How many transformer layers a CLIP text state dict holds."""
    layers = {int(m.group(1)) for k in shapes if (m := _LAYER.match(k))}
    if not layers or sorted(layers) != list(range(len(layers))):
        raise CheckpointError(f"the text encoder's layers are missing or not numbered 0.. ({sorted(layers)[:6]})")
    return len(layers)


def layers_used(total: int, layer_idx: int | None) -> int:
    """Layers a CLIP runs to give the hidden state of `layer_idx` (ComfyUI's CLIPSetLastLayer value:
    -1 the last layer, -2 the one before, ...; 0.. counted from the first; None the last)."""
    if layer_idx is None or abs(layer_idx) > total:
        return total
    used = total + layer_idx + 1 if layer_idx < 0 else layer_idx + 1
    if not 1 <= used <= total:
        raise ConfigError(f"CLIP layer {layer_idx} does not exist in a {total}-layer text encoder")
    return used


def text_config_from_state(shapes: dict, *, base: TextEncoderConfig, layers: int, hidden_act: str | None = None,
                           heads: int | None = None) -> TextEncoderConfig:
    """TextEncoderConfig of a transformers-named CLIP text state dict, keeping the first `layers` layers
    (the context is their output after the final layer norm, as SD and ComfyUI use it)."""
    def shape(name):
        for key in (f"text_model.{name}", name):
            if key in shapes:
                return shapes[key]
        raise CheckpointError(f"the text encoder has no {name}; it is not a CLIP text model")

    vocab, width = shape("embeddings.token_embedding.weight")
    return dataclasses.replace(
        base, vocab_size=vocab, hidden_size=width, intermediate_size=shape("encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=layers, num_attention_heads=heads or max(1, width // 64),
        max_position_embeddings=shape("embeddings.position_embedding.weight")[0], hidden_act=hidden_act or base.hidden_act,
    )


def build_text_encoder(state: dict, cfg: TextEncoderConfig, *, device="cpu", dtype=torch.float32):
    """Our TextEncoder (packaged CLIP tokenizer) from a transformers-named CLIP text state dict; layers past
    `cfg.num_hidden_layers` and the pooled-output head are left out by name."""
    from .loading import build_text_encoder as build

    kept = {}
    for k, v in state.items():
        m = _LAYER.match(k)
        if k in _TEXT_HEADS or (m and int(m.group(1)) >= cfg.num_hidden_layers):
            continue
        kept[k] = v
    return build(cfg, kept, clip_text_keymap, device=device, dtype=dtype)


# --------------------------------------------------------------------------- decoder
def vae_kind(shapes: dict) -> str:
    """"kl" (an SD VAE in LDM names) or "taesd" (ComfyUI's TAESD VAE: taesd_encoder.* / taesd_decoder.*)."""
    if "decoder.conv_in.weight" in shapes and "decoder.mid.block_1.conv1.weight" in shapes:
        return "kl"
    if any(k.startswith("taesd_decoder.") for k in shapes):
        return "taesd"
    raise CheckpointError(f"the VAE is neither an SD VAE nor TAESD (keys like {', '.join(sorted(shapes)[:3])}); "
                          "only SD 1.x/2.x VAEs and TAESD can be carried over")


def decoder_config_from_state(shapes: dict) -> DecoderConfig:
    if vae_kind(shapes) == "kl":
        return decoder_config_from_ldm({"first_stage_model." + k: v for k, v in shapes.items()}) or SD_KL_DECODER
    from .weights.vae_keys import decoder_config_from_taesd

    return decoder_config_from_taesd({k: torch.empty(v, device="meta") for k, v in shapes.items()})


def build_decoder_from_state(state: dict, cfg: DecoderConfig, *, device="cpu", dtype=torch.float32):
    """Our decoder from a VAE state dict (LDM names or ComfyUI's TAESD names); encoder keys are ignored."""
    from .decoder import build_decoder
    from .loading import _build
    from .weights.vae_keys import decoder_keymap

    fmt = "ldm" if cfg.kind == "kl" else "taesd"
    return _build(build_decoder, cfg, state, decoder_keymap(cfg, fmt), "decoder", device, dtype)


# --------------------------------------------------------------------------- the whole model
def model_config(unet: UNetConfig, preset: str | None, *, text: TextEncoderConfig | None = None,
                 decoder: DecoderConfig | None = None, latent_scale: float | None = None,
                 latent_shift: float = 0.0, **defaults) -> ModelConfig:
    """A ModelConfig around bridged components: sampling defaults and schedule from `preset` (else SD's
    multi-step defaults) unless `defaults` (default_steps, default_guidance, default_sampler) say otherwise, the
    latent space as given (else the preset's / SD's)."""
    base = PRESETS[preset] if preset else None
    text = text or (base.text if base else None) or TextEncoderConfig()
    decoder = decoder or (base.decoder if base else SD_KL_DECODER)
    if latent_scale is None:
        latent_scale = base.latent_scale if base else 0.18215
    if decoder.kind == "kl":  # a KL decoder's own factors are the latent space
        decoder = dataclasses.replace(decoder, scaling_factor=latent_scale, shift_factor=latent_shift)
    return ModelConfig(
        family=base.family if base else family_of(unet, "open_clip" if text.hidden_size == 1024 else "clip"),
        unet=unet, text=text, decoder=decoder,
        schedule=base.schedule if base else PRESETS["sd15"].schedule,
        resolution=base.resolution if base else unet.sample_size * decoder.upscale,
        latent_scale=latent_scale, latent_shift=latent_shift,
        **{"default_steps": base.default_steps if base else 20,
           "default_guidance": base.default_guidance if base else 7.5,
           "default_sampler": base.default_sampler if base else "dpmpp_2m", **defaults},
    )


__all__ = ["shapes_of", "unet_config_from_state", "build_unet", "text_layer_count", "layers_used",
           "text_config_from_state", "build_text_encoder", "vae_kind", "decoder_config_from_state",
           "build_decoder_from_state", "model_config"]
