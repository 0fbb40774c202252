"""The package's own checkpoint: one .safetensors holding every component and the ModelConfig.

Keys are `unet.*`, `text_encoder.*`, `decoder.*` (and optionally `encoder.*`, the lite encoder
for img2img and training) in this package's module names; the ModelConfig JSON sits in the
safetensors metadata under NATIVE_CONFIG_KEY.
"""
from __future__ import annotations

from pathlib import Path

from ..atomic import atomic_file
from ..config import ModelConfig
from ..errors import CheckpointError
from .formats import NATIVE_CONFIG_KEY
from .io import read_metadata, read_tensors

PREFIXES = {"unet": "unet.", "text": "text_encoder.", "decoder": "decoder.", "encoder": "encoder."}


def read_native_config(path) -> ModelConfig:
    meta = read_metadata(path)
    try:
        return ModelConfig.from_json(meta[NATIVE_CONFIG_KEY])
    except KeyError:
        raise CheckpointError(f"{path} has no {NATIVE_CONFIG_KEY} metadata; it is not a MobileDiffusion file") from None
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: its stored config cannot be read ({e}); re-save it with this version") from e


def read_native_component(path, component: str) -> dict:
    """State dict of one component ("unet", "text", "decoder") with its prefix removed."""
    prefix = PREFIXES[component]
    state = {k[len(prefix):]: v for k, v in read_tensors(path, prefix).items()}
    if not state:
        raise CheckpointError(f"{path} holds no {component} weights (no keys starting with {prefix!r})")
    return state


def save_native(path, config: ModelConfig, unet, text_encoder, decoder, encoder=None, *, dtype=None) -> Path:
    """Write all three components (and the encoder, if given) and the config to `path` (.safetensors),
    atomically. `dtype` (e.g. torch.float16) stores floating-point tensors in that type; loaders cast back."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"save to a .safetensors file, got {path.name!r}")
    tensors = {}
    modules = [("unet.", unet), ("text_encoder.", text_encoder.model), ("decoder.", decoder)]
    if encoder is not None:
        modules.append(("encoder.", encoder))
    for prefix, module in modules:
        for k, v in module.state_dict().items():
            v = v.detach().cpu()
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
            tensors[prefix + k] = v.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata={NATIVE_CONFIG_KEY: config.to_json(), "format": "pt"})
    return path
