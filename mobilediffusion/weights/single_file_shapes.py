"""An SD 1.x / 2.x single file's ModelConfig from its tensor names and shapes (weights/single_file.py reads
the file; this module reads only {key: shape}).

What the tensors cannot say:
- heads: from the matching preset, else SD's conventions: 64-wide heads with linear projections
  (SD 2.x), 8 heads with 1x1-conv projections (SD 1.x); the text encoder's heads are 64 wide.
- prediction type: epsilon unless the file carries a hint: a `v_pred` marker tensor (the
  convention ComfyUI and trainers use) or SAI ModelSpec metadata (`modelspec.prediction_type` "v",
  an architecture ending in "-v"). SD 2.x-768-v files without a hint load as epsilon: the caller
  overrides it (the ComfyUI loader node's preset override; `dataclasses.replace` on the config).
- sampling defaults and schedule: from the preset whose UNet matches (sd21-base before sd-turbo:
  the two share a UNet), else SD's multi-step defaults; GroupNorm groups 32 and the VAE scaling
  factor 0.18215, as in every SD release.
"""
from __future__ import annotations

import dataclasses
import logging
import re

from ..config import DecoderConfig, ModelConfig, TextEncoderConfig, UNetConfig
from ..errors import CheckpointError
from ..presets import LEADING, OPENCLIP_H_TEXT, PRESETS, SD_KL_DECODER, SD_TEXT
from .keymap import KeyMap
from .single_file_unet import unet_config_from_ldm, with_preset_heads
from .text_keys import CLIP_SINGLE_FILE_PREFIX, OPEN_CLIP_PREFIX
from .unet_keys import LDM_PREFIX

log = logging.getLogger(__name__)

PREFIXES = {"unet": LDM_PREFIX, "text": "cond_stage_model.", "decoder": "first_stage_model."}
V_PRED_MARKER = "v_pred"  # a tensor whose presence marks a v-prediction model

# everything a single file may hold besides the three components, declared (first match wins)
TOP_LEVEL = KeyMap("SD single-file checkpoint", (
    (r"(?:model\.diffusion_model|cond_stage_model|first_stage_model)\..+", None),  # the components
    (r"model_ema\..+", None),  # an EMA copy of the UNet; the plain weights are used, as diffusers and ComfyUI do
    (r"betas|alphas_cumprod(?:_prev)?|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod|log_one_minus_alphas_cumprod"
     r"|sqrt_recip(?:m1)?_alphas_cumprod|posterior_variance|posterior_log_variance_clipped|posterior_mean_coef[12]"
     r"|logvar|lvlb_weights", None),  # LDM's training schedule buffers (the schedule is SD's: ScheduleConfig)
    (r"v_pred|ztsnr", None),  # trainer markers: v-prediction (read), zero terminal SNR (logged, not supported)
))


def _under(shapes: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------- text encoder
def text_layout(keys) -> str | None:
    """"clip" (cond_stage_model.transformer.*), "open_clip" (cond_stage_model.model.*) or None (none in the file)."""
    keys = [k for k in keys if k.startswith(PREFIXES["text"])]
    if not keys:
        return None
    if any(k.startswith(CLIP_SINGLE_FILE_PREFIX) for k in keys):
        return "clip"
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in keys):
        return "open_clip"
    raise CheckpointError(
        f"the text encoder keys are in an unknown layout (e.g. {', '.join(sorted(keys)[:3])}); expected "
        f"{CLIP_SINGLE_FILE_PREFIX}* (SD 1.x) or {OPEN_CLIP_PREFIX}* (SD 2.x)"
    )


def text_config_from_ldm(shapes: dict) -> TextEncoderConfig | None:
    """TextEncoderConfig of a single file's text encoder from its shapes (full key names), or None."""
    layout = text_layout(shapes)
    if layout is None:
        return None
    if layout == "clip":
        s = {re.sub(r"^text_model\.", "", k): v for k, v in _under(shapes, CLIP_SINGLE_FILE_PREFIX).items()}
        names = ("embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
                 r"encoder\.layers\.(\d+)\.mlp\.fc1\.weight")
        base, skipped = SD_TEXT, 0
    else:
        s = _under(shapes, OPEN_CLIP_PREFIX)
        names = ("token_embedding.weight", "positional_embedding", r"transformer\.resblocks\.(\d+)\.mlp\.c_fc\.weight")
        base, skipped = OPENCLIP_H_TEXT, 1  # SD 2.x reads the penultimate layer
    tok, pos, fc = names
    layers = {int(m.group(1)): v for k, v in s.items() if (m := re.fullmatch(fc, k))}
    if tok not in s or pos not in s or len(layers) <= skipped:
        raise CheckpointError(f"the {layout} text encoder in this file is incomplete (token/position embeddings or "
                              "layers missing); the file is damaged")
    vocab, width = s[tok]
    return dataclasses.replace(
        base, vocab_size=vocab, hidden_size=width, intermediate_size=layers[min(layers)][0],
        num_hidden_layers=len(layers) - skipped, num_attention_heads=max(1, width // 64),
        max_position_embeddings=s[pos][0],
    )


# --------------------------------------------------------------------------- decoder
LDM_LEVELS = 4  # the LDM_KL table's levels (every SD 1.x/2.x VAE)


def decoder_config_from_ldm(shapes: dict) -> DecoderConfig | None:
    """DecoderConfig of the SD VAE in `first_stage_model.*` from its shapes, or None if it has no decoder."""
    s = _under(shapes, PREFIXES["decoder"])
    if "decoder.conv_in.weight" not in s:
        return None
    widths, counts = [], []
    for k in range(LDM_LEVELS):
        blocks = {m.group(1) for key in s if (m := re.match(rf"decoder\.up\.{k}\.block\.(\d+)\.conv1\.weight$", key))}
        if not blocks:
            raise CheckpointError(f"the VAE decoder has no level {k} (decoder.up.{k}); SD VAEs have {LDM_LEVELS}")
        widths.append(s[f"decoder.up.{k}.block.0.conv1.weight"][0])
        counts.append(len(blocks))
    if len(set(counts)) != 1 or any(f"decoder.up.{LDM_LEVELS}." in key for key in s):
        raise CheckpointError(f"the VAE decoder's levels are not an SD VAE's ({counts} blocks per level)")
    return dataclasses.replace(
        SD_KL_DECODER, latent_channels=s["decoder.conv_in.weight"][1], block_out_channels=tuple(widths),
        layers_per_block=counts[0] - 1, mid_attention="decoder.mid.attn_1.q.weight" in s,
        post_quant_conv="post_quant_conv.weight" in s,
    )


# --------------------------------------------------------------------------- whole model
def config_from_shapes(shapes: dict, metadata: dict | None = None) -> ModelConfig:
    """The ModelConfig implied by a single file's {key: shape} (and safetensors metadata hints).

    Raises CheckpointError for keys that are not part of such a file and for UNet layouts this
    package does not run (inpainting, unknown blocks), naming what was found.
    """
    # 1. nothing unknown at the top level
    _, unknown = TOP_LEVEL.rename(shapes)
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} keys are not part of an SD 1.x/2.x single-file checkpoint: "
            f"{', '.join(sorted(unknown)[:6])}; expected model.diffusion_model.*, cond_stage_model.*, "
            "first_stage_model.* (and LDM's schedule buffers)"
        )
    if "ztsnr" in shapes:
        log.warning("the checkpoint is marked ztsnr (zero terminal SNR); that schedule is not supported, SD's is used")
    # 2. components
    unet, preset = with_preset_heads(unet_config_from_ldm(_under(shapes, LDM_PREFIX)))
    text = text_config_from_ldm(shapes)
    if text is None:  # no text encoder in the file: the one its context width implies (load it separately)
        text = OPENCLIP_H_TEXT if unet.cross_attention_dim == OPENCLIP_H_TEXT.hidden_size else SD_TEXT
    decoder = decoder_config_from_ldm(shapes) or SD_KL_DECODER
    # 3. what the weights do not say: prediction type and resolution (hints), sampling (preset)
    meta = metadata or {}
    base = PRESETS[preset] if preset else None
    resolution = _resolution_hint(meta) or (base.resolution if base else 512)
    unet = dataclasses.replace(unet, prediction_type=_prediction_hint(shapes, meta),
                               sample_size=resolution // decoder.upscale)
    return ModelConfig(
        family=base.family if base else family_of(unet, text_layout(shapes)),
        unet=unet, text=text, decoder=decoder,
        schedule=base.schedule if base else LEADING,
        resolution=resolution,
        default_steps=base.default_steps if base else 20,
        default_guidance=base.default_guidance if base else 7.5,
        default_sampler=base.default_sampler if base else "dpmpp_2m",
    )


def family_of(unet: UNetConfig, layout: str | None) -> str:
    """Family of a layout no preset matches: full SD (mid block, >= 2 blocks per level), else a
    block-removed one: SDXS without attention at the outer level, BK-SDM with it."""
    if unet.mid_block and min(unet.layers_per_block) >= 2:
        open_clip = layout == "open_clip" or (layout is None and unet.cross_attention_dim == 1024)
        return "sd2" if open_clip else "sd1"
    return "sdxs" if unet.attention[0] == "none" else "bk-sdm"


def _prediction_hint(shapes: dict, meta: dict) -> str:
    spec = meta.get("modelspec.prediction_type", "").lower()
    arch = meta.get("modelspec.architecture", "")
    if V_PRED_MARKER in shapes or spec in ("v", "v_prediction") or arch.endswith("-v"):
        return "v_prediction"
    return "epsilon"


def _resolution_hint(meta: dict) -> int | None:
    m = re.fullmatch(r"(\d+)x(\d+)", meta.get("modelspec.resolution", "").strip())
    return int(m.group(1)) if m and m.group(1) == m.group(2) and int(m.group(1)) % 64 == 0 else None


__all__ = ["PREFIXES", "TOP_LEVEL", "V_PRED_MARKER", "LDM_LEVELS", "text_layout", "text_config_from_ldm",
           "decoder_config_from_ldm", "config_from_shapes", "family_of"]
