"""Encoder checkpoints: key maps onto mobilediffusion.encoder.Encoder, and configs from files or tensors.

Formats ("fmt" in `encoder_keymap`), the encoder halves of the layouts in vae_keys.py:
- "diffusers": AutoencoderKL or AutoencoderTiny folders (vae/diffusion_pytorch_model.safetensors).
- "taesd": madebyollin's taesd_encoder.pth / .safetensors as ComfyUI keeps them in models/vae_approx
  (keys are the encoder's stage indices: `0.weight`, `1.conv.0.weight`), also with an `encoder.`
  prefix (a whole TAESD module's state dict) or ComfyUI's `taesd_encoder.` prefix (its TAESD VAE state).
- "ldm": the original SD VAE layout: `first_stage_model.*` in single-file checkpoints, or bare in
  standalone VAE files and in ComfyUI's `VAE.get_sd()`.
- "native": this package's own module names (`layers.*`), as native files store the lite encoder.
Only the encoder half is used; decoder keys are ignored by name (target None).
"""
from __future__ import annotations

import re

from ..config import EncoderConfig
from ..errors import CheckpointError, ConfigError
from ..presets import SD_KL_ENCODER
from .keymap import KeyMap
from .vae_keys import _KL_DEFAULTS, _RES, _TINY_DEFAULTS, _WB, _require

DIFFUSERS_KL_ENC = KeyMap("diffusers AutoencoderKL (encoder)", (
    (r"(?:decoder|post_quant_conv)\..*", None),  # the decoder half: not needed to encode
    (rf"encoder\.conv_in\.{_WB}", r"layers.conv_in.\1"),
    (rf"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.{_RES}\.{_WB}", r"layers.down\1.res\2.\3.\4"),
    (rf"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.{_WB}", r"layers.down\1.downsample.\2"),
    (rf"encoder\.mid_block\.resnets\.(\d+)\.{_RES}\.{_WB}", r"layers.mid.res\1.\2.\3"),
    (rf"encoder\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v)\.{_WB}", r"layers.mid.attn.\1.\2"),
    (rf"encoder\.mid_block\.attentions\.0\.to_out\.0\.{_WB}", r"layers.mid.attn.to_out.\1"),
    # attention names of diffusers < 0.14, still read by diffusers (ModelMixin._fix_state_dict_keys_on_load)
    (rf"encoder\.mid_block\.attentions\.0\.query\.{_WB}", r"layers.mid.attn.to_q.\1"),
    (rf"encoder\.mid_block\.attentions\.0\.key\.{_WB}", r"layers.mid.attn.to_k.\1"),
    (rf"encoder\.mid_block\.attentions\.0\.value\.{_WB}", r"layers.mid.attn.to_v.\1"),
    (rf"encoder\.mid_block\.attentions\.0\.proj_attn\.{_WB}", r"layers.mid.attn.to_out.\1"),
    (rf"encoder\.conv_norm_out\.{_WB}", r"layers.norm_out.\1"),
    (rf"encoder\.conv_out\.{_WB}", r"layers.conv_out.\1"),
    (rf"quant_conv\.{_WB}", r"layers.quant_conv.\1"),
))

# diffusers' EncoderTiny keeps TAESD's stages in taesd.py's order: its layer i is our stage i
DIFFUSERS_TINY_ENC = KeyMap("diffusers AutoencoderTiny (encoder)", (
    (r"decoder\..*", None),  # the decoder half: not needed to encode
    (r"encoder\.layers\.(\d+)\.(.+)", r"layers.\1.\2"),
))

TAESD_ENC = KeyMap("TAESD encoder", (
    (r"(?:decoder|taesd_decoder)\..*", None),  # the decoder of a whole TAESD / ComfyUI TAESD VAE file
    # ComfyUI's latent space for TAESD (raw = taesd_encoder(x) / scale + shift): the caller's to read;
    # this encoder's output is the sampler-space latents themselves
    (r"vae_(?:scale|shift)", None),
    (r"(?:encoder\.|taesd_encoder\.)?(\d+)\.(.+)", r"layers.\1.\2"),
))

# ldm numbers its down levels from full resolution (down.0 runs first), as ours do
_LDM = r"(?:first_stage_model\.|vae\.)?"  # prefix inside single-file checkpoints, none in standalone VAEs
LDM_KL_ENC = KeyMap("SD VAE encoder (ldm / single-file)", (
    (rf"{_LDM}(?:decoder|post_quant_conv|loss)\..*", None),  # decoder half, training loss
    (rf"{_LDM}encoder\.conv_in\.{_WB}", r"layers.conv_in.\1"),
    (rf"{_LDM}encoder\.down\.(\d+)\.block\.(\d+)\.(norm1|conv1|norm2|conv2)\.{_WB}", r"layers.down\1.res\2.\3.\4"),
    (rf"{_LDM}encoder\.down\.(\d+)\.block\.(\d+)\.nin_shortcut\.{_WB}", r"layers.down\1.res\2.conv_shortcut.\3"),
    (rf"{_LDM}encoder\.down\.(\d+)\.downsample\.conv\.{_WB}", r"layers.down\1.downsample.\2"),
    (rf"{_LDM}encoder\.mid\.block_1\.(norm1|conv1|norm2|conv2)\.{_WB}", r"layers.mid.res0.\1.\2"),
    (rf"{_LDM}encoder\.mid\.block_2\.(norm1|conv1|norm2|conv2)\.{_WB}", r"layers.mid.res1.\1.\2"),
    (rf"{_LDM}encoder\.mid\.attn_1\.norm\.{_WB}", r"layers.mid.attn.group_norm.\1"),
    (rf"{_LDM}encoder\.mid\.attn_1\.(q|k|v)\.{_WB}", r"layers.mid.attn.to_\1.\2"),  # 1x1 convs: reshaped on load
    (rf"{_LDM}encoder\.mid\.attn_1\.proj_out\.{_WB}", r"layers.mid.attn.to_out.\1"),
    (rf"{_LDM}encoder\.norm_out\.{_WB}", r"layers.norm_out.\1"),
    (rf"{_LDM}encoder\.conv_out\.{_WB}", r"layers.conv_out.\1"),
    (rf"{_LDM}quant_conv\.{_WB}", r"layers.quant_conv.\1"),
))

_KEYMAPS = {("kl", "diffusers"): DIFFUSERS_KL_ENC, ("tiny", "diffusers"): DIFFUSERS_TINY_ENC,
            ("tiny", "taesd"): TAESD_ENC, ("kl", "ldm"): LDM_KL_ENC}
FORMATS = ("ldm", "diffusers", "taesd", "native")


def encoder_keymap(kind: str, fmt: str) -> KeyMap | None:
    """The key map reading a `fmt` checkpoint into an Encoder of `kind` ("kl", "tiny"); None for "native"
    (the module's own names)."""
    if fmt == "native":
        return None
    try:
        return _KEYMAPS[(kind, fmt)]
    except KeyError:
        known = ", ".join(f"{f} for kind {k!r}" for k, f in _KEYMAPS)
        raise ConfigError(f"no {fmt!r} checkpoint layout for a {kind!r} encoder; known: {known}, and native") from None


_LDM_MID = re.compile(rf"{_LDM}encoder\.mid\.block_1\.conv1\.weight")


def encoder_layout_from_keys(keys) -> tuple[str, str] | None:
    """(encoder kind, fmt) of the image encoder in a VAE / TAESD state dict, judged by its key names,
    or None if it holds none (e.g. a taesd_decoder file, or a VAE saved without its encoder half).

    For files without a config: standalone VAEs (ldm or diffusers names), the `first_stage_model.*`
    part of a single-file checkpoint, TAESD files, ComfyUI's `VAE.get_sd()` (ldm, or taesd_encoder.*).
    """
    keys = list(keys)
    if any(_LDM_MID.fullmatch(k) for k in keys):
        return "kl", "ldm"
    if "encoder.mid_block.resnets.0.conv1.weight" in keys:
        return "kl", "diffusers"
    if any(k.startswith("encoder.layers.") for k in keys):
        return "tiny", "diffusers"
    mapped, unmatched = TAESD_ENC.rename(keys)
    if keys and not unmatched and "layers.0.weight" in mapped.values():  # a TAESD decoder's stage 0 is its clamp
        return "tiny", "taesd"
    return None


# --------------------------------------------------------------------------- configs
def encoder_config_from_diffusers(d: dict) -> EncoderConfig:
    """EncoderConfig from a diffusers AutoencoderKL / AutoencoderTiny config.json dict."""
    cls = d.get("_class_name")
    if cls == "AutoencoderKL":
        c = {"in_channels": 3, "down_block_types": ("DownEncoderBlock2D",), **_KL_DEFAULTS, "use_quant_conv": True, **d}
        _require(cls, c, act_fn="silu", in_channels=3, latents_mean=None, latents_std=None)
        if tuple(c["down_block_types"]) != ("DownEncoderBlock2D",) * len(c["block_out_channels"]):
            raise ConfigError(f"AutoencoderKL down_block_types {c['down_block_types']!r}: only one "
                              "DownEncoderBlock2D per entry of block_out_channels is supported")
        return EncoderConfig(
            kind="kl", latent_channels=c["latent_channels"], scaling_factor=c["scaling_factor"],
            shift_factor=c["shift_factor"] or 0.0, block_out_channels=tuple(c["block_out_channels"]),
            layers_per_block=c["layers_per_block"], mid_attention=c["mid_block_add_attention"],
            quant_conv=c["use_quant_conv"], norm_num_groups=c["norm_num_groups"], downsample_padding="asymmetric",
        )
    if cls == "AutoencoderTiny":
        c = {"in_channels": 3, "encoder_block_out_channels": (64, 64, 64, 64), "num_encoder_blocks": (1, 3, 3, 3),
             **_TINY_DEFAULTS, **d}
        _require(cls, c, act_fn="relu", in_channels=3)
        return EncoderConfig(
            kind="tiny", latent_channels=c["latent_channels"], scaling_factor=c["scaling_factor"],
            shift_factor=c["shift_factor"] or 0.0, tiny_channels=tuple(c["encoder_block_out_channels"]),
            tiny_blocks=tuple(c["num_encoder_blocks"]),
        )
    raise ConfigError(f"an encoder config must be an AutoencoderKL or AutoencoderTiny config.json, got {cls!r}")


def encoder_config_from_state(state, fmt: str, *, scaling_factor: float | None = None,
                              shift_factor: float = 0.0, norm_num_groups: int = 32) -> EncoderConfig:
    """EncoderConfig of the encoder in a state dict (or {key: shape}) of layout `fmt`, from its tensors.

    What tensors cannot say comes from the arguments: the latent space (a "kl" encoder: SD's 0.18215
    unless `scaling_factor` is given; "tiny": TAESD's own, 1.0), GroupNorm groups (SD's 32). Stride-2
    padding: asymmetric (SD's) for ldm / diffusers names, symmetric (the lite encoder's) for native ones.
    A state without an encoder is refused by name.
    """
    layout = encoder_layout_from_keys(state) if fmt != "native" else _native_kind(state)
    if layout is None or layout[1] != fmt:
        hint = " (it looks like a TAESD decoder: pick the *_encoder file)" if _is_taesd_decoder(state) else ""
        found = f"a {layout[1]} encoder" if layout else "no image encoder"
        raise CheckpointError(f"expected a {fmt} encoder state, found {found}{hint}")
    kind = layout[0]
    keymap = encoder_keymap(kind, fmt)
    names = keymap.rename(state)[0] if keymap else {k: k for k in state}
    shapes = {dst: _shape(state[src]) for src, dst in names.items()}  # our names -> shape
    if kind == "tiny":
        return _tiny_config(shapes, scaling_factor or 1.0, shift_factor)
    return _kl_config(shapes, fmt, SD_KL_ENCODER.scaling_factor if scaling_factor is None else scaling_factor,
                      shift_factor, norm_num_groups)


def _shape(value) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)  # a tensor or a shape


def _native_kind(state) -> tuple[str, str] | None:
    if "layers.conv_in.weight" in state:
        return "kl", "native"
    if "layers.0.weight" in state:
        return "tiny", "native"
    return None


def _is_taesd_decoder(state) -> bool:
    mapped, unmatched = TAESD_ENC.rename(state)
    return bool(mapped) and not unmatched and "layers.1.weight" in mapped.values()


def _levels(shapes: dict, pattern: str) -> list[int]:
    found = sorted({int(m.group(1)) for k in shapes if (m := re.match(pattern, k))})
    if found != list(range(len(found))):
        raise CheckpointError(f"the encoder's stages are not numbered 0, 1, ... ({found}); the file is damaged")
    return found


def _kl_config(shapes: dict, fmt: str, scale: float, shift: float, groups: int) -> EncoderConfig:
    levels = _levels(shapes, r"layers\.down(\d+)\.")
    if not levels or "layers.conv_out.weight" not in shapes:
        raise CheckpointError("the encoder has no down levels or no conv_out; the file is incomplete")
    widths, counts = [], []
    for i in levels:
        res = {m.group(1) for k in shapes if (m := re.match(rf"layers\.down{i}\.res(\d+)\.conv1\.weight$", k))}
        first = shapes.get(f"layers.down{i}.res0.conv1.weight") or shapes.get(f"layers.down{i}.proj.weight")
        if first is None:
            raise CheckpointError(f"the encoder's down level {i} has no resnet; unsupported layout")
        widths.append(first[0])
        counts.append(len(res))
    if len(set(counts)) != 1:
        raise CheckpointError(f"the encoder's levels have different resnet counts ({counts}); unsupported layout")
    return EncoderConfig(
        kind="kl", latent_channels=shapes["layers.conv_out.weight"][0] // 2, scaling_factor=scale,
        shift_factor=shift, block_out_channels=tuple(widths), layers_per_block=counts[0],
        mid_attention="layers.mid.attn.to_q.weight" in shapes, quant_conv="layers.quant_conv.weight" in shapes,
        norm_num_groups=groups, downsample_padding="symmetric" if fmt == "native" else "asymmetric",
    )


def _tiny_config(shapes: dict, scale: float, shift: float) -> EncoderConfig:
    """TAESD stages in order: a conv (stage 0: 3 -> width), blocks, then per further level a stride-2
    conv and blocks, and a last conv (width -> latent channels). Blocks have `conv.0`, convs `weight`."""
    stages = _levels(shapes, r"layers\.(\d+)\.")
    convs = [i for i in stages if f"layers.{i}.weight" in shapes]
    if not convs or convs[0] != 0 or convs[-1] != stages[-1] or len(convs) < 2:
        raise CheckpointError("no TAESD encoder layout among the keys (a first conv at stage 0 and a last conv); "
                              "is this a TAESD encoder file?")
    blocks = [b - a - 1 for a, b in zip(convs, convs[1:])]  # per level: the stages between two convs
    if any(f"layers.{i}.conv.0.weight" not in shapes for i in stages if i not in convs):
        raise CheckpointError("the TAESD encoder's stages between its convs are not all residual blocks "
                              "(`<i>.conv.0.weight`); unsupported layout")
    width = shapes["layers.0.weight"][0]
    return EncoderConfig(kind="tiny", latent_channels=shapes[f"layers.{convs[-1]}.weight"][0], scaling_factor=scale,
                         shift_factor=shift, tiny_channels=(width,) * len(blocks), tiny_blocks=tuple(blocks))


def encoder_config_to_diffusers(cfg: EncoderConfig) -> tuple[str, dict]:
    """(diffusers class name, constructor kwargs) of an autoencoder whose encoder equals Encoder(cfg)
    (the decoder half is left at diffusers' defaults). The lite encoder's symmetric padding has no
    diffusers equivalent."""
    if cfg.kind == "kl":
        if cfg.downsample_padding != "asymmetric":
            raise ConfigError("diffusers' AutoencoderKL pads its stride-2 convs asymmetrically; an encoder with "
                              "symmetric padding (the lite encoder) has no diffusers equivalent")
        n = len(cfg.block_out_channels)
        return "AutoencoderKL", {
            "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * n,
            "up_block_types": ("UpDecoderBlock2D",) * n, "block_out_channels": cfg.block_out_channels,
            "layers_per_block": cfg.layers_per_block, "act_fn": "silu", "latent_channels": cfg.latent_channels,
            "norm_num_groups": cfg.norm_num_groups, "scaling_factor": cfg.scaling_factor,
            "shift_factor": cfg.shift_factor or None, "use_quant_conv": cfg.quant_conv,
            "mid_block_add_attention": cfg.mid_attention,
        }
    return "AutoencoderTiny", {
        "in_channels": 3, "latent_channels": cfg.latent_channels, "encoder_block_out_channels": cfg.tiny_channels,
        "num_encoder_blocks": cfg.tiny_blocks, "act_fn": "relu", "scaling_factor": cfg.scaling_factor,
        "shift_factor": cfg.shift_factor,
    }


__all__ = ["DIFFUSERS_KL_ENC", "DIFFUSERS_TINY_ENC", "TAESD_ENC", "LDM_KL_ENC", "FORMATS",
           "encoder_keymap", "encoder_layout_from_keys", "encoder_config_from_diffusers", "encoder_config_from_state",
           "encoder_config_to_diffusers"]
