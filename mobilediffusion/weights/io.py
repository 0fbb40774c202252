"""Reading tensors from files, with errors that name the file and the fix.

safetensors is the format; `.pth`/`.pt`/`.ckpt` files are read only through
`torch.load(weights_only=True)`, which never runs code from the file. Both are memory-mapped
(safetensors always, pickles in torch's zip format): a tensor is a copy-on-write view of the file's
pages, so reading copies nothing and a loader that keeps the tensors (weights/materialize.py) never does.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from ..errors import CheckpointError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")


def check_exists(path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"no such file or folder: {p}; check the path")
    return p


def read_metadata(path) -> dict[str, str]:
    """The safetensors header's __metadata__ (empty when absent), without reading tensors."""
    from safetensors import safe_open

    p = check_exists(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own SafetensorError for bad headers
        raise CheckpointError(f"{p} is not a readable safetensors file ({e}); re-download or re-save it") from e


def read_keys(path) -> list[str]:
    """Tensor names in a safetensors file, without reading the tensors."""
    from safetensors import safe_open

    p = check_exists(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            return list(f.keys())
    except Exception as e:
        raise CheckpointError(f"{p} is not a readable safetensors file ({e}); re-download or re-save it") from e


def read_tensors(path, prefix: str = "") -> dict:
    """Tensors of a .safetensors (or, safely, a pickle) file; only keys starting with prefix.

    Raises CheckpointError for a missing, truncated or non-checkpoint file.
    """
    p = check_exists(path)
    if p.is_dir():
        raise CheckpointError(f"{p} is a folder; expected a weights file (.safetensors)")
    suffix = p.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        return _read_pickle(p, prefix)
    if suffix not in SAFETENSORS_SUFFIXES:
        raise CheckpointError(f"{p}: unsupported weights file type {suffix!r}; use a .safetensors file")
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    except Exception as e:
        size = os.path.getsize(p)
        raise CheckpointError(
            f"{p} ({size} bytes) is not a complete safetensors file ({e}); it may be truncated: "
            "re-download or re-save it"
        ) from e


def cached_per_file(fn):
    """fn(path: Path) -> result, kept per (resolved file, size, mtime): asked again about an unchanged file,
    the answer is the kept one (a changed file is read anew). For small derived results (shapes, configs);
    a mutable result is shared between callers, so copy it before changing it."""
    @functools.lru_cache(maxsize=8)
    def by_stamp(p: Path, size: int, mtime_ns: int):
        return fn(p)

    @functools.wraps(fn)
    def wrapper(path):
        p = check_exists(path).resolve()
        st = p.stat()
        return by_stamp(p, st.st_size, st.st_mtime_ns)

    return wrapper


def pickle_shapes(path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes by name of a pickle checkpoint. Unlike safetensors it has no header, so the
    whole file is read; the small result is kept per (file, size, mtime) so that detecting the
    layout and each component's config read a multi-GB .ckpt once, not once per question."""
    return dict(_pickle_shapes(path))


@cached_per_file
def _pickle_shapes(p: Path) -> dict:
    return {k: tuple(v.shape) for k, v in _read_pickle(p, "").items()}


def _read_pickle(p: Path, prefix: str) -> dict:
    import zipfile

    import torch

    try:  # torch.save's zip format (since torch 1.6) is memory-mapped: tensors are read when used, not copied
        obj = torch.load(str(p), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(p))
    except Exception as e:
        raise CheckpointError(
            f"{p} cannot be read as plain tensors with torch.load(weights_only=True) ({type(e).__name__}); "
            "it may be truncated or contain code. Convert it to .safetensors"
        ) from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{p} does not hold a flat dict of tensors; convert it to .safetensors")
    return {k: v for k, v in obj.items() if k.startswith(prefix)}


def read_json(path) -> dict:
    p = check_exists(path)
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p} is not valid JSON ({e}); re-download or fix it") from e
