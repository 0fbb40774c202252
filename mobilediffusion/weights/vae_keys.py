"""Decoder checkpoints: key maps onto mobilediffusion.decoder.Decoder, and config conversion.

Formats ("fmt" in `decoder_keymap`):
- "diffusers": AutoencoderKL or AutoencoderTiny folders (vae/diffusion_pytorch_model.safetensors).
- "taesd": madebyollin's taesd_decoder.pth / .safetensors as ComfyUI keeps them in models/vae_approx
  (keys are the decoder's stage indices: `1.weight`, `3.conv.0.weight`), also with a `decoder.`
  prefix (a whole TAESD module's state dict) or ComfyUI's `taesd_decoder.` prefix (its VAE state).
- "ldm": the original SD VAE layout: `first_stage_model.*` in single-file checkpoints, or bare in
  standalone VAE files (models/vae). Four levels, as in every SD 1.x/2.x VAE.
Only the decoder half is used; encoder keys are ignored by name (target None).
"""
from __future__ import annotations

from ..config import DecoderConfig
from ..errors import CheckpointError, ConfigError
from .keymap import KeyMap

_WB = r"(weight|bias)"
_RES = r"(norm1|conv1|norm2|conv2|conv_shortcut)"  # ResBlock parameters (diffusers names = ours)

DIFFUSERS_KL = KeyMap("diffusers AutoencoderKL", (
    (r"(?:encoder|quant_conv)\..*", None),  # the encoder half: not needed to decode
    (rf"post_quant_conv\.{_WB}", r"layers.post_quant_conv.\1"),
    (rf"decoder\.conv_in\.{_WB}", r"layers.conv_in.\1"),
    (rf"decoder\.mid_block\.resnets\.(\d+)\.{_RES}\.{_WB}", r"layers.mid.res\1.\2.\3"),
    (rf"decoder\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v)\.{_WB}", r"layers.mid.attn.\1.\2"),
    (rf"decoder\.mid_block\.attentions\.0\.to_out\.0\.{_WB}", r"layers.mid.attn.to_out.\1"),
    # attention names of diffusers < 0.14, still read by diffusers (ModelMixin._fix_state_dict_keys_on_load)
    (rf"decoder\.mid_block\.attentions\.0\.query\.{_WB}", r"layers.mid.attn.to_q.\1"),
    (rf"decoder\.mid_block\.attentions\.0\.key\.{_WB}", r"layers.mid.attn.to_k.\1"),
    (rf"decoder\.mid_block\.attentions\.0\.value\.{_WB}", r"layers.mid.attn.to_v.\1"),
    (rf"decoder\.mid_block\.attentions\.0\.proj_attn\.{_WB}", r"layers.mid.attn.to_out.\1"),
    (rf"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.{_RES}\.{_WB}", r"layers.up\1.res\2.\3.\4"),
    (rf"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.{_WB}", r"layers.up\1.upsample.1.\2"),
    (rf"decoder\.conv_norm_out\.{_WB}", r"layers.norm_out.\1"),
    (rf"decoder\.conv_out\.{_WB}", r"layers.conv_out.\1"),
))

# diffusers' DecoderTiny keeps TAESD's stages but leaves the input clamp out of its list, so its
# layer i is our (and taesd.py's) stage i + 1. Regexes cannot add, hence one rule per index.
_MAX_TINY_STAGES = 128  # TAESD has 19
DIFFUSERS_TINY = KeyMap("diffusers AutoencoderTiny", (
    (r"encoder\..*", None),  # the encoder half: not needed to decode
    *((rf"decoder\.layers\.{i}\.(.+)", rf"layers.{i + 1}.\1") for i in range(_MAX_TINY_STAGES)),
))

TAESD = KeyMap("TAESD decoder", (
    (r"(?:encoder|taesd_encoder)\..*", None),  # the encoder of a whole TAESD / ComfyUI TAESD VAE file
    # ComfyUI's latent scale for TAESD (taesd_decoder((x - shift) * scale) with x raw latents): exactly
    # the sampler-space latents this decoder takes, so there is nothing to undo
    (r"vae_(?:scale|shift)", None),
    (r"(?:decoder\.|taesd_decoder\.)?(\d+)\.(.+)", r"layers.\1.\2"),
))

# ldm numbers its up levels by resolution (up.3 runs first); ours run in order (up0 first)
_LDM = r"(?:first_stage_model\.|vae\.)?"  # prefix inside single-file checkpoints, none in standalone VAEs
_LDM_LEVELS = 4
LDM_KL = KeyMap("SD VAE (ldm / single-file)", (
    (rf"{_LDM}(?:encoder|quant_conv|loss)\..*", None),  # encoder half, training loss
    (rf"{_LDM}post_quant_conv\.{_WB}", r"layers.post_quant_conv.\1"),
    (rf"{_LDM}decoder\.conv_in\.{_WB}", r"layers.conv_in.\1"),
    (rf"{_LDM}decoder\.mid\.block_1\.(norm1|conv1|norm2|conv2)\.{_WB}", r"layers.mid.res0.\1.\2"),
    (rf"{_LDM}decoder\.mid\.block_2\.(norm1|conv1|norm2|conv2)\.{_WB}", r"layers.mid.res1.\1.\2"),
    (rf"{_LDM}decoder\.mid\.attn_1\.norm\.{_WB}", r"layers.mid.attn.group_norm.\1"),
    (rf"{_LDM}decoder\.mid\.attn_1\.(q|k|v)\.{_WB}", r"layers.mid.attn.to_\1.\2"),  # 1x1 convs: reshaped on load
    (rf"{_LDM}decoder\.mid\.attn_1\.proj_out\.{_WB}", r"layers.mid.attn.to_out.\1"),
    *((rf"{_LDM}decoder\.up\.{k}\.block\.(\d+)\.(norm1|conv1|norm2|conv2)\.{_WB}",
       rf"layers.up{_LDM_LEVELS - 1 - k}.res\1.\2.\3") for k in range(_LDM_LEVELS)),
    *((rf"{_LDM}decoder\.up\.{k}\.block\.(\d+)\.nin_shortcut\.{_WB}",
       rf"layers.up{_LDM_LEVELS - 1 - k}.res\1.conv_shortcut.\2") for k in range(_LDM_LEVELS)),
    *((rf"{_LDM}decoder\.up\.{k}\.upsample\.conv\.{_WB}",
       rf"layers.up{_LDM_LEVELS - 1 - k}.upsample.1.\1") for k in range(_LDM_LEVELS)),
    (rf"{_LDM}decoder\.norm_out\.{_WB}", r"layers.norm_out.\1"),
    (rf"{_LDM}decoder\.conv_out\.{_WB}", r"layers.conv_out.\1"),
))

_KEYMAPS = {("kl", "diffusers"): DIFFUSERS_KL, ("tiny", "diffusers"): DIFFUSERS_TINY,
            ("tiny", "taesd"): TAESD, ("kl", "ldm"): LDM_KL}


def decoder_keymap(cfg: DecoderConfig, fmt: str) -> KeyMap:
    """The key map reading a `fmt` checkpoint ("diffusers", "taesd", "ldm") into a Decoder(cfg)."""
    try:
        return _KEYMAPS[(cfg.kind, fmt)]
    except KeyError:
        known = ", ".join(f"{f} for kind {k!r}" for k, f in _KEYMAPS)
        raise ConfigError(f"no {fmt!r} checkpoint layout for a {cfg.kind!r} decoder; known: {known}") from None


def vae_layout_from_keys(keys) -> tuple[str, str] | None:
    """(decoder kind, fmt) of a VAE / TAESD state dict judged by its key names, or None if unknown.

    For files without a config: standalone VAEs in ComfyUI's models/vae (ldm or diffusers names),
    the `first_stage_model.*` part of a single-file checkpoint, TAESD files.
    """
    keys = list(keys)
    if any(k.endswith("decoder.mid.block_1.conv1.weight") for k in keys):
        return "kl", "ldm"
    if "decoder.mid_block.resnets.0.conv1.weight" in keys:
        return "kl", "diffusers"
    if any(k.startswith("decoder.layers.") for k in keys):
        return "tiny", "diffusers"
    mapped, unmatched = TAESD.rename(keys)
    if keys and not unmatched and "layers.1.weight" in mapped.values():
        return "tiny", "taesd"
    return None


# --------------------------------------------------------------------------- configs
_KL_DEFAULTS = {  # AutoencoderKL.__init__ defaults, for keys a config.json leaves out
    "out_channels": 3, "up_block_types": ("UpDecoderBlock2D",), "block_out_channels": (64,),
    "layers_per_block": 1, "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32,
    "scaling_factor": 0.18215, "shift_factor": None, "latents_mean": None, "latents_std": None,
    "use_post_quant_conv": True, "mid_block_add_attention": True,
}
_TINY_DEFAULTS = {  # AutoencoderTiny.__init__ defaults
    "out_channels": 3, "decoder_block_out_channels": (64, 64, 64, 64), "num_decoder_blocks": (3, 3, 3, 1),
    "act_fn": "relu", "upsample_fn": "nearest", "latent_channels": 4, "upsampling_scaling_factor": 2,
    "scaling_factor": 1.0, "shift_factor": 0.0,
}


def decoder_config_from_diffusers(d: dict) -> DecoderConfig:
    """DecoderConfig from a diffusers AutoencoderKL / AutoencoderTiny config.json dict."""
    cls = d.get("_class_name")
    if cls == "AutoencoderKL":
        c = {**_KL_DEFAULTS, **d}
        _require(cls, c, act_fn="silu", out_channels=3, latents_mean=None, latents_std=None)
        if tuple(c["up_block_types"]) != ("UpDecoderBlock2D",) * len(c["block_out_channels"]):
            raise ConfigError(f"AutoencoderKL up_block_types {c['up_block_types']!r}: only one UpDecoderBlock2D "
                              "per entry of block_out_channels is supported")
        return DecoderConfig(
            kind="kl", latent_channels=c["latent_channels"], scaling_factor=c["scaling_factor"],
            shift_factor=c["shift_factor"] or 0.0, block_out_channels=tuple(c["block_out_channels"]),
            layers_per_block=c["layers_per_block"], mid_attention=c["mid_block_add_attention"],
            post_quant_conv=c["use_post_quant_conv"], norm_num_groups=c["norm_num_groups"],
        )
    if cls == "AutoencoderTiny":
        c = {**_TINY_DEFAULTS, **d}
        _require(cls, c, act_fn="relu", upsample_fn="nearest", upsampling_scaling_factor=2, out_channels=3)
        return DecoderConfig(
            kind="tiny", latent_channels=c["latent_channels"], scaling_factor=c["scaling_factor"],
            shift_factor=c["shift_factor"] or 0.0, tiny_channels=tuple(c["decoder_block_out_channels"]),
            tiny_blocks=tuple(c["num_decoder_blocks"]),
        )
    raise ConfigError(f"a decoder config must be an AutoencoderKL or AutoencoderTiny config.json, got {cls!r}")


def _require(cls: str, c: dict, **expected) -> None:
    for k, v in expected.items():
        if c[k] != v:
            raise ConfigError(f"{cls} with {k}={c[k]!r} is not supported (only {v!r})")


def decoder_config_to_diffusers(cfg: DecoderConfig) -> tuple[str, dict]:
    """(diffusers class name, constructor kwargs) of the autoencoder whose decoder equals Decoder(cfg)."""
    if cfg.kind == "kl":
        n = len(cfg.block_out_channels)
        return "AutoencoderKL", {
            "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * n,
            "up_block_types": ("UpDecoderBlock2D",) * n, "block_out_channels": cfg.block_out_channels,
            "layers_per_block": cfg.layers_per_block, "act_fn": "silu", "latent_channels": cfg.latent_channels,
            "norm_num_groups": cfg.norm_num_groups, "scaling_factor": cfg.scaling_factor,
            "shift_factor": cfg.shift_factor or None, "use_post_quant_conv": cfg.post_quant_conv,
            "mid_block_add_attention": cfg.mid_attention,
        }
    return "AutoencoderTiny", {
        "out_channels": 3, "latent_channels": cfg.latent_channels,
        "decoder_block_out_channels": cfg.tiny_channels, "num_decoder_blocks": cfg.tiny_blocks,
        "act_fn": "relu", "upsample_fn": "nearest", "upsampling_scaling_factor": 2,
        "scaling_factor": cfg.scaling_factor, "shift_factor": cfg.shift_factor,
    }


def decoder_config_from_taesd(state: dict) -> DecoderConfig:
    """DecoderConfig of a TAESD decoder state dict (any prefix the TAESD map reads), from its tensors.

    The latent channel count comes from the first conv (4: SD/SDXL, 16: SD3/FLUX); the stage
    layout is TAESD's (blocks 3, 3, 3, 1). A TAESD *encoder* file is refused by name.
    """
    mapped, _ = TAESD.rename(state)
    source_of = {dst: src for src, dst in mapped.items()}
    if "layers.1.weight" not in source_of:
        hint = " (it looks like a TAESD encoder: pick the *_decoder file)" if "layers.0.weight" in source_of else ""
        raise CheckpointError(f"no TAESD decoder stage 1 (`1.weight`) among the keys{hint}")
    w = state[source_of["layers.1.weight"]]  # first conv: (width, latent_channels, 3, 3)
    return DecoderConfig(kind="tiny", latent_channels=int(w.shape[1]), scaling_factor=1.0,
                         tiny_channels=(int(w.shape[0]),) * 4)


__all__ = ["DIFFUSERS_KL", "DIFFUSERS_TINY", "TAESD", "LDM_KL", "decoder_keymap", "decoder_config_from_diffusers",
           "decoder_config_to_diffusers", "decoder_config_from_taesd", "vae_layout_from_keys"]
