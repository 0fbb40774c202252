"""SD 1.x / 2.x single-file checkpoints: the layout ComfyUI users keep in models/checkpoints.

One .safetensors (or, read with weights_only=True, .ckpt) holding
- `model.diffusion_model.*`  the UNet in the original LDM layout (weights/unet_keys.ldm_unet_keymap)
- `cond_stage_model.*`       the text encoder: `transformer.*` (CLIP ViT-L/14 in transformers names,
                             SD 1.x) or `model.*` (OpenCLIP-H, SD 2.x) (weights/text_keys)
- `first_stage_model.*`      the SD VAE (weights/vae_keys.LDM_KL; only the decoder half is used)
There is no config in the file: the architecture is read from tensor names and shapes
(`single_file_config`; the reading of shapes and what they cannot say: weights/single_file_shapes.py).
`save_single_file` writes our modules in this layout (tests, the ComfyUI integration test).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..atomic import atomic_file
from ..config import ModelConfig, TextEncoderConfig
from ..errors import CheckpointError, ConfigError
from .io import SAFETENSORS_SUFFIXES, cached_per_file, check_exists, pickle_shapes, read_metadata, read_tensors
from .keymap import KeyMap
from .single_file_shapes import LDM_LEVELS, PREFIXES, V_PRED_MARKER, config_from_shapes, text_layout
from .text_keys import CLIP_SINGLE_FILE_PREFIX, OPEN_CLIP_PREFIX, clip_text_keymap, open_clip_keymap
from .unet_keys import ldm_unet_keymap
from .vae_keys import LDM_KL


# --------------------------------------------------------------------------- reading
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


def text_keymap(keys, cfg: TextEncoderConfig, module_prefix: str) -> KeyMap:
    """The key map from a single file's text encoder (its keys decide the layout) to TextEncoder.model."""
    if text_layout(keys) == "open_clip":
        return open_clip_keymap(module_prefix, cfg.num_hidden_layers)
    return clip_text_keymap(module_prefix, CLIP_SINGLE_FILE_PREFIX)


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
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"save to a .safetensors file, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    return path


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
        if dec.config.kind != "kl" or len(dec.config.block_out_channels) != LDM_LEVELS:
            raise ConfigError(
                f"a single file holds an SD VAE ({LDM_LEVELS}-level KL decoder); this decoder is "
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


__all__ = ["read_shapes", "single_file_config", "read_component", "text_keymap", "save_single_file",
           "single_file_tensors"]
