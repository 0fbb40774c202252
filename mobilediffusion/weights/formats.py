"""What a path holds: detect the checkpoint layout from files, configs and tensor names.

Layouts:
- "native": one .safetensors written by `save_native` (all components, config in metadata)
- "diffusers": a diffusers pipeline folder (model_index.json, unet/, text_encoder/, tokenizer/, vae/, scheduler/)
- "diffusers_unet" / "diffusers_vae" / "clip_text": a single diffusers/transformers component folder
  (config.json + weights)
- "taesd": a TAESD decoder or encoder file (.pth or .safetensors, as ComfyUI keeps them in models/vae_approx)
- "vae_file": a standalone SD VAE file without config (ComfyUI's models/vae; ldm or diffusers names), or
  the encoder half of one
- "single_file": an SD 1.x/2.x single-file checkpoint (model.diffusion_model.*, ...)
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError
from .io import PICKLE_SUFFIXES, check_exists, read_json, read_keys, read_metadata

NATIVE_CONFIG_KEY = "mobilediffusion.config"  # safetensors metadata entry holding ModelConfig JSON

# component weight file names, preferred first (diffusers, transformers, fp16 variants, pickles last)
WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)


# files that are not a diffusion model this package runs, recognised by a key (first match wins),
# so the error can say what the file is and what to do instead
FOREIGN_LAYOUTS = (
    (r"conditioner\.embedders\..+|model\.diffusion_model\.label_emb\..+",
     "an SDXL-family checkpoint (conditioner.embedders / label_emb)", "SDXL is not supported"),
    (r"(?:model\.diffusion_model\.)?(?:joint_blocks|double_blocks|single_blocks)\..+",
     "a diffusion transformer (SD3 / FLUX style)", "only UNet models are supported"),
    (r"control_model\..+|(?:.+\.)?input_hint_block\..+|controlnet_cond_embedding\..+",
     "a ControlNet", "load it with a ControlNet loader, next to a base model"),
    (r"lora_(?:unet|te\d?)_.+|.+\.lora_(?:up|down|A|B)\.weight",
     "a LoRA", "apply it with a LoRA loader to a base model"),
    (r"string_to_param\..+|emb_params|clip_[lg]", "a textual-inversion embedding", "put it in models/embeddings"),
)
EXPECTED = ("expected a MobileDiffusion .safetensors, an SD 1.x/2.x (incl. BK-SDM, SDXS) single-file checkpoint "
            "(model.diffusion_model.*, cond_stage_model.*, first_stage_model.*), a TAESD decoder or encoder, "
            "or a diffusers folder")


def foreign_layout(keys) -> str | None:
    """"<what the file is>; <what to do>" for a known non-model layout (LoRA, ControlNet, SDXL...), else None."""
    for pattern, what, fix in FOREIGN_LAYOUTS:
        rx = re.compile(pattern)
        if any(rx.fullmatch(k) for k in keys):
            return f"{what}; {fix}"
    return None


@dataclass(frozen=True)
class Source:
    kind: str  # one of the layouts above
    path: Path

    def component(self, name: str) -> "Source":
        """A diffusers pipeline folder's component (`unet`, `vae`, `text_encoder`) as its own Source."""
        if self.kind != "diffusers":
            raise CheckpointError(f"{self.path} is a {self.kind} checkpoint, not a diffusers pipeline folder")
        sub = self.path / name
        if not (sub / "config.json").is_file():
            raise CheckpointError(f"the diffusers folder {self.path} has no {name}/config.json; it is incomplete")
        return detect(sub)


def detect(path) -> Source:
    """The layout at `path`; an unknown layout is a CheckpointError naming what was found."""
    p = check_exists(path)
    if p.is_dir():
        return _detect_folder(p)
    return _detect_file(p)


def _detect_folder(p: Path) -> Source:
    if (p / "model_index.json").is_file():
        return Source("diffusers", p)
    if (p / "config.json").is_file():
        cfg = read_json(p / "config.json")
        cls = cfg.get("_class_name", "")
        if cls == "UNet2DConditionModel":
            return Source("diffusers_unet", p)
        if cls in ("AutoencoderKL", "AutoencoderTiny"):
            return Source("diffusers_vae", p)
        if cfg.get("model_type") in ("clip_text_model", "clip") or "CLIPTextModel" in cfg.get("architectures", []):
            return Source("clip_text", p)
        raise CheckpointError(
            f"{p}/config.json describes {cls or cfg.get('model_type') or 'an unknown model'}, which is not a "
            "supported component (UNet2DConditionModel, AutoencoderKL, AutoencoderTiny, CLIPTextModel)"
        )
    found = sorted(x.name for x in p.iterdir())[:12]
    raise CheckpointError(
        f"{p} is a folder of unknown layout (found: {', '.join(found) or 'nothing'}); expected a diffusers "
        "pipeline folder (model_index.json) or a component folder (config.json + weights)"
    )


def _detect_file(p: Path) -> Source:
    suffix = p.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        from .io import pickle_shapes

        keys = list(pickle_shapes(p))
    elif suffix == ".safetensors":
        if NATIVE_CONFIG_KEY in read_metadata(p):
            return Source("native", p)
        keys = read_keys(p)
    else:
        raise CheckpointError(f"{p}: unsupported file type {suffix!r}; expected .safetensors (or a TAESD .pth)")
    first = ", ".join(sorted(keys)[:5]) or "none"
    foreign = foreign_layout(keys)
    if foreign:
        raise CheckpointError(f"{p} is {foreign} (first keys: {first}), not a diffusion model; {EXPECTED}")
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return Source("single_file", p)
    from .encoder_keys import encoder_layout_from_keys
    from .vae_keys import vae_layout_from_keys

    layout = vae_layout_from_keys(keys) or encoder_layout_from_keys(keys)
    if layout is not None:
        return Source("taesd" if layout[1] == "taesd" else "vae_file", p)
    raise CheckpointError(f"{p} is not a checkpoint this package reads (first keys: {first}); {EXPECTED}")


def component_weights(folder: Path) -> Path:
    """The weights file of a component folder (config.json + weights)."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(
        f"{folder} has a config.json but no weights file (expected one of {', '.join(WEIGHT_FILES[:2])})"
    )
