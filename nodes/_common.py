"""What the nodes share: socket types, model handles, ComfyUI hooks with plain fallbacks, a model cache.

Inside ComfyUI the hooks use `folder_paths`, `comfy.utils.ProgressBar` and
`comfy.model_management`; outside it (tests, scripts) they fall back to plain behaviour.
"""
from __future__ import annotations

import gc
import logging
import os
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger("mobilediffusion.nodes")

CATEGORY = "MobileDiffusion"
MODEL_FOLDER = "mobilediffusion"  # models/mobilediffusion, registered by the plugin
EMBEDDED = "(embedded default)"
DTYPES = ["auto", "fp32", "fp16", "bf16", "int8"]
DEVICES = ["auto", "cpu", "cuda"]


def to_sampler_space(raw, scale: float, shift: float):
    """ComfyUI's raw LATENT -> sampler-space latents: (raw - shift) * scale."""
    return (raw - shift) * scale


def to_raw(latents, scale: float, shift: float):
    """Sampler-space latents -> ComfyUI's raw LATENT: latents / scale + shift (the inverse of to_sampler_space)."""
    return latents / scale + shift


@dataclass(frozen=True)
class UNetHandle:
    """MD_UNET: the UNet with the model config it samples by (schedule, prediction type, latent space)."""

    unet: object
    config: object  # ModelConfig
    name: str

    def to_sampler_space(self, raw):
        return to_sampler_space(raw, self.config.latent_scale, self.config.latent_shift)

    def to_raw(self, latents):
        return to_raw(latents, self.config.latent_scale, self.config.latent_shift)


@dataclass(frozen=True)
class DecoderHandle:
    """MD_DECODER: a decoder and the latent space of the LATENTs it reads (raw -> sampler latents)."""

    decoder: object
    latent_scale: float
    latent_shift: float
    name: str

    def to_sampler_space(self, raw):
        return to_sampler_space(raw, self.latent_scale, self.latent_shift)


class Missing:
    """Stands in for an output whose input was not connected: using it raises an error that says what to connect."""

    def __init__(self, what: str, fix: str):
        self._what, self._fix = what, fix

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        from ..mobilediffusion.errors import ConfigError

        raise ConfigError(f"no {self._what} here: {self._fix}")

    def __repr__(self):
        return f"Missing({self._what!r})"


@dataclass(frozen=True)
class EncoderHandle:
    """MD_ENCODER: an image encoder and the latent space of the LATENTs it writes (sampler -> raw latents).
    `encoder` is None for a checkpoint without one: using the handle then says what to load instead."""

    encoder: object  # images (B, 3, H, W) in [0, 1] -> sampler-space latents, or None
    latent_scale: float
    latent_shift: float
    name: str
    missing: str = "has no image encoder"  # why `encoder` is None, said when the handle is used

    def to_raw(self, latents):
        return to_raw(latents, self.latent_scale, self.latent_shift)

    def require(self):
        """The encoder, or a ConfigError naming what to connect instead."""
        if self.encoder is None:
            from ..mobilediffusion.errors import ConfigError

            raise ConfigError(f"the checkpoint {self.name!r} {self.missing}; load an encoder with Load Lite Encoder "
                              "(e.g. taesd_encoder from models/vae_approx for SD 1.x/2.x latents) and connect it to "
                              "Lite Encode instead")
        return self.encoder


# --------------------------------------------------------------------------- ComfyUI hooks
def _comfy(module: str):
    """A ComfyUI module, or None outside ComfyUI."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def folder_paths():
    return _comfy("folder_paths")


def register_model_folder() -> None:
    """Add models/mobilediffusion to ComfyUI's model folders (idempotent)."""
    fp = folder_paths()
    if fp is None or MODEL_FOLDER in fp.folder_names_and_paths:
        return
    fp.add_model_folder_path(MODEL_FOLDER, os.path.join(fp.models_dir, MODEL_FOLDER), is_default=True)
    fp.folder_names_and_paths[MODEL_FOLDER] = (fp.folder_names_and_paths[MODEL_FOLDER][0], {".safetensors"})


def list_files(folder: str) -> list[str]:
    fp = folder_paths()
    if fp is None or folder not in fp.folder_names_and_paths:
        return []
    return sorted(fp.get_filename_list(folder))


def list_diffusers_folders() -> list[str]:
    """Sub-folders of models/diffusers that hold a diffusers pipeline (model_index.json)."""
    fp = folder_paths()
    if fp is None:
        return []
    found = []
    for base in fp.get_folder_paths("diffusers"):
        if os.path.isdir(base):
            for root, _, files in os.walk(base, followlinks=True):
                if "model_index.json" in files:
                    found.append(os.path.relpath(root, base))
    return sorted(found)


def resolve(choice: str) -> str:
    """'checkpoints/x.safetensors' (a choice from the model lists) -> absolute path. Inside ComfyUI only names
    inside the model folders resolve; outside it (tests, scripts) a path is also taken as is."""
    from ..mobilediffusion.errors import CheckpointError

    folder, _, name = choice.partition("/")
    fp = folder_paths()
    if fp is not None:
        name = os.path.relpath(os.path.join("/", name), "/") if name else ""  # no '..' out of the folder
        if name and name != "." and folder == "diffusers":
            for base in fp.get_folder_paths("diffusers"):
                if os.path.isdir(os.path.join(base, name)):
                    return os.path.join(base, name)
        elif name and folder in fp.folder_names_and_paths:
            path = fp.get_full_path(folder, name)
            if path:
                return path
        raise CheckpointError(f"model {choice!r} was not found in ComfyUI's models folders; put it in "
                              "models/mobilediffusion, models/checkpoints, models/diffusers or models/vae_approx and "
                              "refresh")
    if os.path.exists(choice):
        return choice
    raise CheckpointError(f"model {choice!r} was not found; put it in ComfyUI's models folder and refresh")


def torch_device(choice: str):
    import torch

    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda":
        if not torch.cuda.is_available():
            from ..mobilediffusion.errors import ConfigError

            raise ConfigError("device 'cuda' was chosen but no CUDA GPU is available; choose 'auto' or 'cpu'")
        return torch.device("cuda")
    mm = _comfy("comfy.model_management")
    if mm is not None:
        return mm.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_dtype(choice: str, device):
    import torch

    if choice == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if choice == "int8":
        return "int8"  # a precision, not a dtype: int8 layers in a bf16 model (mobilediffusion.fast.int8_plan)
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[choice]


class Progress:
    """Progress bar + cancel check for a sampling loop: ComfyUI's when running inside it."""

    def __init__(self, total: int):
        utils = _comfy("comfy.utils")
        self.bar = utils.ProgressBar(total) if utils is not None else None
        self.mm = _comfy("comfy.model_management")

    def __call__(self, step, total, x):
        if self.mm is not None:
            self.mm.throw_exception_if_processing_interrupted()  # Cancel, honoured between steps
        if self.bar is not None:
            self.bar.update_absolute(step + 1, total)


@contextmanager
def memory_guard(what: str, device):
    """Turn running out of memory into an error that says what to change (ComfyUI shows it on the node)."""
    from ..mobilediffusion.errors import MobileDiffusionError

    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and "out of memory" not in str(e) and "not enough memory" not in str(e):
            raise
        gc.collect()
        raise MobileDiffusionError(
            f"{what} does not fit in {device} memory ({type(e).__name__}); choose fp16/bf16 weights, a smaller "
            "size or batch, or another device, or free memory by unloading other models"
        ) from e


# --------------------------------------------------------------------------- cache
class ModelCache:
    """The last few loaded models, keyed by what was loaded and how (path, mtime, options)."""

    def __init__(self, size: int = 2):
        self.size = size
        self.items: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def values(self) -> list:
        with self.lock:
            return list(self.items.values())

    def discard(self, key) -> None:
        """Forget `key` (e.g. when the ComfyUI object a cached copy was made from is gone)."""
        with self.lock:
            self.items.pop(key, None)

    def get(self, key, load):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        value = load()
        with self.lock:
            self.items[key] = value
            evicted = []
            while len(self.items) > self.size:
                evicted.append(self.items.popitem(last=False))
        if evicted:
            log.info("model cache: dropped %d model(s), holding %d", len(evicted), len(self.items))
            del evicted
            from ..mobilediffusion.memory import release_memory

            release_memory()  # glibc keeps freed heap pages otherwise: the process grows with every model switch
        return value


CACHE = ModelCache()


def file_key(path: str):
    """(path, mtime) so a replaced file is reloaded."""
    try:
        return path, os.path.getmtime(path)
    except OSError:
        return path, None
