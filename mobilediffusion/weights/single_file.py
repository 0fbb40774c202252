"""SD 1.x / 2.x single-file checkpoints: the layout ComfyUI users keep in models/checkpoints.

One .safetensors (or, read with weights_only=True, .ckpt) holding
- `model.diffusion_model.*`  the UNet in the original LDM layout (weights/unet_keys.ldm_unet_keymap)
- `cond_stage_model.*`       the text encoder: `transformer.*` (CLIP ViT-L/14 in transformers names,
                             SD 1.x) or `model.*` (OpenCLIP-H, SD 2.x) (weights/text_keys)
- `first_stage_model.*`      the SD VAE (weights/vae_keys.LDM_KL; only the decoder half is used)
There is no config in the file: the architecture is read from tensor names and shapes
(`single_file_config`). What the tensors cannot say:
- heads: from the matching preset, else SD's conventions: 64-wide heads with linear projections
  (SD 2.x), 8 heads with 1x1-conv projections (SD 1.x); the text encoder's heads are 64 wide.
- prediction type: epsilon unless the file carries a hint: a `v_pred` marker tensor (the
  convention ComfyUI and trainers use) or SAI ModelSpec metadata (`modelspec.prediction_type` "v",
  an architecture ending in "-v"). SD 2.x-768-v files without a hint load as epsilon: the caller
  overrides it (the ComfyUI loader node's preset override; `dataclasses.replace` on the config).
- sampling defaults and schedule: from the preset whose UNet matches (sd21-base before sd-turbo:
  the two share a UNet), else SD's multi-step defaults; GroupNorm groups 32 and the VAE scaling
  factor 0.18215, as in every SD release.
`save_single_file` writes our modules in this layout (tests, the ComfyUI integration test).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import tempfile
from pathlib import Path

from ..config import DecoderConfig, ModelConfig, TextEncoderConfig, UNetConfig
from ..errors import CheckpointError, ConfigError
from ..presets import LEADING, OPENCLIP_H_TEXT, PRESETS, SD_KL_DECODER, SD_TEXT
from .io import SAFETENSORS_SUFFIXES, cached_per_file, check_exists, pickle_shapes, read_metadata, read_tensors
from .keymap import KeyMap
from .text_keys import CLIP_SINGLE_FILE_PREFIX, OPEN_CLIP_PREFIX, clip_text_keymap, open_clip_keymap
from .unet_keys import LDM_PREFIX, ldm_unet_keymap
from .vae_keys import LDM_KL

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


# --------------------------------------------------------------------------- reading shapes
def read_shapes(path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes by name: from the safetensors header alone (no tensor data is read);
    a pickle is loaded with weights_only=True. Errors name the file and the fix."""
    p = check_exists(path)
    if p.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return pickle_shapes(p)
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError for bad headers
        raise CheckpointError(
            f"{p} ({os.path.getsize(p)} bytes) is not a complete safetensors file ({e}); it may be truncated: "
            "re-download or re-save it"
        ) from e


def _under(shapes: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------- UNet
def _site(shapes: dict, site: str) -> tuple[int, bool, int | None] | None:
    """(transformer depth, linear projections, context width) of the attention site `site`, or None."""
    proj = shapes.get(f"{site}.proj_in.weight")
    if proj is None:
        return None
    block = re.compile(rf"{re.escape(site)}\.transformer_blocks\.(\d+)\.")
    blocks = {m.group(1) for k in shapes if (m := block.match(k))}
    ctx = shapes.get(f"{site}.transformer_blocks.0.attn2.to_k.weight")
    return len(blocks), len(proj) == 2, ctx[1] if ctx else None


def _indices(shapes: dict, group: str) -> list[int]:
    """Block numbers of `group` (input_blocks, output_blocks): 0, 1, ... without gaps."""
    index = re.compile(rf"{group}\.(\d+)\.")
    found = sorted({int(m.group(1)) for k in shapes if (m := index.match(k))})
    if found != list(range(len(found))):
        raise CheckpointError(f"the UNet's {group} are not numbered 0, 1, ... ({found}); the file is damaged")
    return found


def unet_config_from_ldm(shapes: dict) -> UNetConfig:
    """UNetConfig of an LDM UNet from its tensor shapes (names without `model.diffusion_model.`).

    Levels are split at the downsample blocks (`input_blocks.n.0.op`); each level's width, block
    count, attention and transformer depth come from its blocks, the up path is read the same way
    (mirrored fields stay None). Heads follow SD's conventions (see module docstring).
    """
    if "input_blocks.0.0.weight" not in shapes or "out.2.weight" not in shapes:
        raise CheckpointError("the model.diffusion_model.* keys hold no SD UNet (no input_blocks.0.0 / out.2 conv)")
    in_ch = shapes["input_blocks.0.0.weight"][1]
    out_ch = shapes["out.2.weight"][0]
    if in_ch != out_ch:
        raise CheckpointError(
            f"this UNet takes {in_ch} input channels but makes {out_ch} (an inpainting or instruct-pix2pix "
            "model); only text-to-image checkpoints are supported"
        )
    sites = []  # (depth, linear, context) of every attention site, to check they agree
    # 1. input blocks -> down levels (a level ends at its downsample block)
    levels, current = [], []
    for n in _indices(shapes, "input_blocks")[1:]:
        if f"input_blocks.{n}.0.op.weight" in shapes:
            if not current:
                raise CheckpointError(f"input block {n} downsamples a level without blocks; unsupported layout")
            levels.append(current)
            current = []
            continue
        res = shapes.get(f"input_blocks.{n}.0.in_layers.2.weight")
        if res is None:
            raise CheckpointError(f"input block {n} is neither a resnet nor a downsample; not an SD UNet")
        site = _site(shapes, f"input_blocks.{n}.1")
        sites += [site] if site else []
        current.append((res[0], site[0] if site else None))
    if not current:
        raise CheckpointError("the UNet's last input block is a downsample; unsupported layout")
    levels.append(current)
    widths, layers, attention, depth = [], [], [], []
    for i, blocks in enumerate(levels):
        kinds = {d for _, d in blocks}
        if len({w for w, _ in blocks}) != 1 or len(kinds) != 1:
            raise CheckpointError(f"down level {i} mixes widths or attention between its blocks: {blocks}")
        widths.append(blocks[0][0])
        layers.append(len(blocks))
        attention.append("none" if blocks[0][1] is None else "full")
        depth.append(blocks[0][1] or 1)
    # 2. output blocks -> up levels, innermost first, layers + 1 blocks each
    outputs = _indices(shapes, "output_blocks")
    if len(outputs) != sum(layers) + len(layers):
        raise CheckpointError(
            f"the UNet has {len(outputs)} output blocks but its input blocks imply {sum(layers) + len(layers)}; "
            "unsupported layout"
        )
    up_attention, up_depth, n = [], [], 0
    for i in reversed(range(len(levels))):
        found = []
        for _ in range(layers[i] + 1):
            site = _site(shapes, f"output_blocks.{n}.1")
            sites += [site] if site else []
            found.append(site[0] if site else None)
            n += 1
        if len(set(found)) != 1:
            raise CheckpointError(f"up level {len(up_attention)} mixes attention between its blocks")
        up_attention.append("none" if found[0] is None else "full")
        up_depth.append(found[0] or 1)
    # 3. mid block
    mid = "middle_block.0.in_layers.2.weight" in shapes
    mid_site = _site(shapes, "middle_block.1") if mid else None
    if mid and mid_site is None:
        raise CheckpointError("the UNet's middle block has no transformer (middle_block.1); unsupported layout")
    sites += [mid_site] if mid_site else []
    # 4. attention details shared by every site
    linear = {s[1] for s in sites}
    contexts = {s[2] for s in sites if s[2] is not None}
    if len(linear) > 1 or len(contexts) > 1:
        raise CheckpointError(f"the UNet's attention sites disagree (projections {linear}, context widths {contexts})")
    linear = linear.pop() if linear else False
    fields = dict(
        in_channels=in_ch,
        out_channels=out_ch,
        block_out_channels=tuple(widths),
        layers_per_block=tuple(layers),
        attention=tuple(attention),
        up_attention=None if up_attention == attention[::-1] else tuple(up_attention),
        transformer_depth=tuple(depth),
        up_transformer_depth=None if up_depth == depth[::-1] else tuple(up_depth),
        num_attention_heads=tuple(max(1, w // 64) if linear else 8 for w in widths),  # SD 2.x / SD 1.x convention
        mid_block=mid,
        mid_transformer_depth=None if not mid or mid_site[0] == depth[-1] else mid_site[0],
        cross_attention_dim=contexts.pop() if contexts else 768,
        use_linear_projection=linear,
    )
    try:
        return UNetConfig(**fields)
    except ConfigError as e:  # e.g. widths that are not multiples of SD's 32 GroupNorm groups
        raise CheckpointError(f"the UNet in this file has a layout this package cannot build: {e}") from None


def _with_preset_heads(cfg: UNetConfig) -> tuple[UNetConfig, str | None]:
    """(cfg with the heads of the preset it matches, preset name) or (cfg, None). Heads, prediction
    type and sample size are not in the weights, so they are left out of the comparison."""
    free = {"prediction_type": "epsilon", "sample_size": 64}
    for name, preset in PRESETS.items():
        if preset.unet.block_out_channels != cfg.block_out_channels:
            continue
        heads = {"num_attention_heads": preset.unet.num_attention_heads,
                 "mid_num_attention_heads": preset.unet.mid_num_attention_heads}
        if dataclasses.replace(cfg, **free, **heads) == dataclasses.replace(preset.unet, **free):
            return dataclasses.replace(cfg, **heads), name
    return cfg, None


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


def text_keymap(keys, cfg: TextEncoderConfig, module_prefix: str) -> KeyMap:
    """The key map from a single file's text encoder (its keys decide the layout) to TextEncoder.model."""
    if text_layout(keys) == "open_clip":
        return open_clip_keymap(module_prefix, cfg.num_hidden_layers)
    return clip_text_keymap(module_prefix, CLIP_SINGLE_FILE_PREFIX)


# --------------------------------------------------------------------------- decoder
_LDM_LEVELS = 4  # the LDM_KL table's levels (every SD 1.x/2.x VAE)


def decoder_config_from_ldm(shapes: dict) -> DecoderConfig | None:
    """DecoderConfig of the SD VAE in `first_stage_model.*` from its shapes, or None if it has no decoder."""
    s = _under(shapes, PREFIXES["decoder"])
    if "decoder.conv_in.weight" not in s:
        return None
    widths, counts = [], []
    for k in range(_LDM_LEVELS):
        blocks = {m.group(1) for key in s if (m := re.match(rf"decoder\.up\.{k}\.block\.(\d+)\.conv1\.weight$", key))}
        if not blocks:
            raise CheckpointError(f"the VAE decoder has no level {k} (decoder.up.{k}); SD VAEs have {_LDM_LEVELS}")
        widths.append(s[f"decoder.up.{k}.block.0.conv1.weight"][0])
        counts.append(len(blocks))
    if len(set(counts)) != 1 or any(f"decoder.up.{_LDM_LEVELS}." in key for key in s):
        raise CheckpointError(f"the VAE decoder's levels are not an SD VAE's ({counts} blocks per level)")
    return dataclasses.replace(
        SD_KL_DECODER, latent_channels=s["decoder.conv_in.weight"][1], block_out_channels=tuple(widths),
        layers_per_block=counts[0] - 1, mid_attention="decoder.mid.attn_1.q.weight" in s,
        post_quant_conv="post_quant_conv.weight" in s,
    )


# --------------------------------------------------------------------------- whole model
@cached_per_file  # loading a pipeline asks once per component; a ModelConfig is frozen, safe to share
def single_file_config(p: Path) -> ModelConfig:
    """The ModelConfig of an SD single-file checkpoint, from its tensor names and shapes (only the
    safetensors header is read) and its ModelSpec metadata hints (see `config_from_shapes`)."""
    shapes = read_shapes(p)
    meta = read_metadata(p) if p.suffix.lower() in SAFETENSORS_SUFFIXES else {}
    try:
        return config_from_shapes(shapes, meta)
    except (CheckpointError, ConfigError) as e:  # a config the shapes imply but cannot be built is the file's fault
        raise CheckpointError(f"{p}: {e}") from None


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
    unet, preset = _with_preset_heads(unet_config_from_ldm(_under(shapes, LDM_PREFIX)))
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
        family=base.family if base else _family(unet, text_layout(shapes)),
        unet=unet, text=text, decoder=decoder,
        schedule=base.schedule if base else LEADING,
        resolution=resolution,
        default_steps=base.default_steps if base else 20,
        default_guidance=base.default_guidance if base else 7.5,
        default_sampler=base.default_sampler if base else "dpmpp_2m",
    )


def _family(unet: UNetConfig, layout: str | None) -> str:
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


def read_component(path, component: str) -> dict:
    """The tensors of one component ("unet", "text", "decoder"), full key names, only that prefix read."""
    prefix = PREFIXES[component]
    state = read_tensors(path, prefix)
    if not state:
        what = {"unet": "UNet", "text": "text encoder", "decoder": "VAE"}[component]
        raise CheckpointError(
            f"{path} holds no {what} ({prefix}* keys); load the {what} from a separate file "
            "(a VAE or TAESD file for the decoder)"
        )
    return state


# --------------------------------------------------------------------------- writing
# weights that are Linear in our modules and 1x1 convs in the LDM layout
_VAE_CONV_1X1 = re.compile(r"first_stage_model\.decoder\.mid\.attn_1\.(?:q|k|v|proj_out)\.weight")
_UNET_CONV_1X1 = re.compile(r"model\.diffusion_model\..*\.proj_(?:in|out)\.weight")  # SD 1.x (conv projections)


def save_single_file(model, path, *, dtype=None, text_layout: str = "auto") -> Path:
    """Write a Pipeline, or a dict with any of "unet", "text_encoder", "decoder", as an SD
    single-file .safetensors (atomically). Returns the path.

    dtype: floating tensors are cast to it (e.g. torch.float16); None keeps the modules' dtype.
    text_layout: see `single_file_tensors`.
    """
    from safetensors.torch import save_file

    tensors = {}
    for k, t in single_file_tensors(model, text_layout=text_layout).items():
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[k] = t.contiguous().cpu()
    return _atomic_save(save_file, tensors, Path(path))


def single_file_tensors(model, *, text_layout: str = "auto") -> dict:
    """Our modules' tensors under SD single-file names and shapes (works on the meta device too).

    model: a Pipeline, or a dict with any of "unet", "text_encoder", "decoder".
    text_layout: "clip" (cond_stage_model.transformer.*), "open_clip" (cond_stage_model.model.*, the
    SD 2.x layout) or "auto": OpenCLIP for a gelu text encoder, CLIP (quick_gelu) otherwise.
    The OpenCLIP layout also gets the last resblock SD 2.x skips; our encoder has no weights for it,
    so it is written as an identity block (zero output projections): a reader that runs every layer
    sees the same features. first_stage_model holds the decoder half only (this package has no
    encoder). A v-prediction UNet gets the `v_pred` marker.
    Raises ConfigError for modules the layout cannot hold (MobileDiffusion UNets, TAESD decoders).
    """
    import torch

    parts = model if isinstance(model, dict) else {
        "unet": model.unet, "text_encoder": model.text_encoder, "decoder": model.decoder}
    unknown = set(parts) - {"unet", "text_encoder", "decoder"}
    if unknown:
        raise ConfigError(f"unknown components {sorted(unknown)}; give unet, text_encoder and/or decoder")
    tensors = {}
    # 1. UNet
    unet = parts.get("unet")
    if unet is not None:
        if unet.config.prediction_type == "sample":
            raise ConfigError("single files have no marker for x0 (sample) prediction; save it with save_native")
        written = ldm_unet_keymap(unet.config).reverse(unet.state_dict())
        tensors.update(_as_conv(written, None if unet.config.use_linear_projection else _UNET_CONV_1X1))
        if unet.config.prediction_type == "v_prediction":
            tensors[V_PRED_MARKER] = torch.zeros(0)
    # 2. text encoder
    enc = parts.get("text_encoder")
    if enc is not None:
        tensors.update(_text_tensors(enc, text_layout))
    # 3. decoder
    dec = parts.get("decoder")
    if dec is not None:
        if dec.config.kind != "kl" or len(dec.config.block_out_channels) != _LDM_LEVELS:
            raise ConfigError(
                f"a single file holds an SD VAE ({_LDM_LEVELS}-level KL decoder); this decoder is "
                f"{dec.config.kind!r} with {dec.upscale}x upscale: save it separately or leave it out"
            )
        tensors.update(_as_conv(LDM_KL.reverse(dec.state_dict()), _VAE_CONV_1X1))
    if not tensors:
        raise ConfigError("nothing to save: give at least one of unet, text_encoder, decoder")
    return tensors


def _as_conv(tensors: dict, pattern) -> dict:
    """Linear weights (out, in) whose names match `pattern` as 1x1 conv weights (out, in, 1, 1)."""
    if pattern is None:
        return tensors
    return {k: t[:, :, None, None] if pattern.fullmatch(k) and t.ndim == 2 else t for k, t in tensors.items()}


def _text_tensors(enc, layout: str) -> dict:
    import torch

    cfg = enc.config
    layout = ("open_clip" if cfg.hidden_act == "gelu" else "clip") if layout == "auto" else layout
    state = enc.model.state_dict()
    if layout == "clip":
        return clip_text_keymap(enc.key_prefix, CLIP_SINGLE_FILE_PREFIX).reverse(state)
    if layout != "open_clip":
        raise ConfigError(f"unknown text layout {layout!r}; expected 'auto', 'clip' or 'open_clip'")
    out = open_clip_keymap(enc.key_prefix, cfg.num_hidden_layers).reverse(state)
    # the skipped last layer as an identity block: LayerNorms at (1, 0), every projection zero
    D, inner, dd = cfg.hidden_size, cfg.intermediate_size, {"dtype": next(enc.model.parameters()).dtype}
    last = f"{OPEN_CLIP_PREFIX}transformer.resblocks.{cfg.num_hidden_layers}."
    for ln in ("ln_1", "ln_2"):
        out[f"{last}{ln}.weight"], out[f"{last}{ln}.bias"] = torch.ones(D, **dd), torch.zeros(D, **dd)
    shapes = {"attn.in_proj_weight": (3 * D, D), "attn.in_proj_bias": (3 * D,), "attn.out_proj.weight": (D, D),
              "attn.out_proj.bias": (D,), "mlp.c_fc.weight": (inner, D), "mlp.c_fc.bias": (inner,),
              "mlp.c_proj.weight": (D, inner), "mlp.c_proj.bias": (D,)}
    out.update({last + k: torch.zeros(s, **dd) for k, s in shapes.items()})
    return out


def _atomic_save(save_file, tensors: dict, path: Path) -> Path:
    if path.suffix != ".safetensors":
        raise ConfigError(f"save to a .safetensors file, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


__all__ = ["PREFIXES", "TOP_LEVEL", "read_shapes", "unet_config_from_ldm", "text_layout", "text_config_from_ldm",
           "text_keymap", "decoder_config_from_ldm", "config_from_shapes", "single_file_config", "read_component",
           "save_single_file", "single_file_tensors"]
