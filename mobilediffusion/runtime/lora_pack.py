"""LoRA packs: a LoRA's updates keyed to one bundle's weight tensors, patched into the .tflite bytes at load
with a strength (numpy only: the runtime, and in JavaScript the web player, apply them the same way).

A pack is a safetensors file (`<name>.lorapack`, written by `mobilediffusion export-lora`) whose metadata
key "mobilediffusion_lora_pack" holds JSON:

    format, version, name (the LoRA file), lora_sha256, naming (its key layouts), strength (what it is meant at:
                the web player's slider starts there)
    bundle      {component: {file, sha256}} of the files it patches: a pack for another bundle is refused
    targets     [{key, component, param, tensor, dtype (float32 | float16 | int8), shape (the tensor's, in the
                file's layout), offset (byte offset of its data in the file), scale_offset / axis (int8: the
                float32 per-channel scales and their dimension), form (lowrank | dense)}]

and whose tensors are, per target, `<key>.a` (rows, r) and `<key>.b` (r, cols) float32 with
update = (a @ b).reshape(shape), or `<key>.delta` (shape): every factor a LoRA applies (alpha / rank, the
factor the converter folded into the tensor) is already in `a` / `delta`. At strength s a weight W becomes
W + s * update, computed in float32 and stored in the tensor's type: float16 rounded once, int8 re-quantized
per channel (symmetric, narrow range: scale = max |W'| / 127 over each channel).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .manifest import BundleError, sha256_file

FORMAT = "mobilediffusion-lora-pack"
VERSION = 1
METADATA_KEY = "mobilediffusion_lora_pack"
SUFFIX = ".lorapack"
FOLDER = "loras"  # <bundle>/loras/: packs made for the bundle, listed in index.json for the web player
INDEX = "index.json"
DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8}
TARGET_KEYS = ("key", "component", "param", "tensor", "dtype", "shape", "offset", "scale_offset", "axis", "form")


@dataclass(frozen=True)
class LoraPack:
    path: Path
    info: dict  # the metadata JSON (see the module docstring)
    tensors: dict  # name -> float32 array

    @property
    def name(self) -> str:
        return self.info["name"]

    def update(self, target: dict) -> np.ndarray:
        """The target's update in the file's layout, float32 (strength 1)."""
        key = target["key"]
        if target["form"] == "dense":
            return self.tensors[f"{key}.delta"]
        return (self.tensors[f"{key}.a"] @ self.tensors[f"{key}.b"]).reshape(target["shape"])


def read_pack(path) -> LoraPack:
    """A pack file, its metadata and tensors checked for consistency; BundleError naming what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"LoRA pack {path} does not exist; make one with `mobilediffusion export-lora LORA "
                          "--bundle DIR`")
    try:
        from safetensors import safe_open
    except ImportError:
        raise BundleError("LoRA packs need the safetensors package: pip install safetensors") from None
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = (f.metadata() or {}).get(METADATA_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        info = json.loads(meta) if meta else None
    except Exception as e:  # safetensors raises several kinds for a damaged file
        raise BundleError(f"{path} is not a readable LoRA pack ({type(e).__name__}: {e}); make it again with "
                          "`mobilediffusion export-lora`") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise BundleError(f"{path} is not a LoRA pack for a bundle (a LoRA file? make a pack from it with "
                          "`mobilediffusion export-lora LORA --bundle DIR`)")
    if info.get("version") != VERSION:
        raise BundleError(f"{path} is a LoRA pack of version {info.get('version')!r}; this runtime reads version "
                          f"{VERSION}: make it again with this mobilediffusion")
    for target in info.get("targets", []):
        _check_target(path, target, tensors)
    return LoraPack(path, info, tensors)


def _check_target(path, t: dict, tensors: dict) -> None:
    bad = f"{path} is damaged (target {t.get('key')!r}"
    if sorted(t) != sorted(TARGET_KEYS) or t["dtype"] not in DTYPES or t["form"] not in ("lowrank", "dense"):
        raise BundleError(f"{bad}: unexpected fields); make the pack again")
    shape = tuple(t["shape"])
    if t["form"] == "dense":
        delta = tensors.get(f"{t['key']}.delta")
        ok = delta is not None and delta.shape == shape
    else:
        a, b = tensors.get(f"{t['key']}.a"), tensors.get(f"{t['key']}.b")
        ok = a is not None and b is not None and a.ndim == b.ndim == 2 and a.shape[1] == b.shape[0] \
            and a.shape[0] == shape[0] and a.shape[0] * b.shape[1] == math.prod(shape)
    if not ok:
        raise BundleError(f"{bad}: its tensors do not give a {list(shape)} update); make the pack again")
    if not all(np.isfinite(v).all() for k, v in tensors.items() if k.startswith(f"{t['key']}.")):
        raise BundleError(f"{bad}: NaN or infinite values); make the pack again")


def check_for(pack: LoraPack, manifest: dict) -> None:
    """BundleError unless every file the pack patches is this bundle's (same sha256)."""
    own = manifest["components"]
    for component, f in pack.info["bundle"].items():
        entry = own.get(component)
        if entry is None or entry.get("sha256") != f.get("sha256"):
            raise BundleError(
                f"LoRA pack {pack.path.name} was made for another bundle: its {component} file has sha256 "
                f"{str(f.get('sha256'))[:12]}..., this bundle's {str(entry and entry.get('sha256'))[:12]}...; make the "
                f"pack for this bundle: mobilediffusion export-lora {pack.name} --bundle <this bundle>")
        if entry["precision"] == "int8_a16":
            raise BundleError(f"LoRA packs cannot patch int8_a16 bundles: their int16 activation ranges were "
                              f"calibrated without the LoRA; bake it in (export --lora {pack.name}) or export "
                              "fp16 / int8_weight_only")


def patched(data, component: str, packs: list[tuple[LoraPack, float]]) -> bytes | None:
    """The component file's bytes (`data`: the bytes, or the file's path, read once) with every pack's updates at
    its strength, or None when nothing changes (no target in this component, or all strengths 0: the file as it
    is, bit for bit)."""
    updates = {}  # offset -> (target, summed float32 update)
    for pack, strength in packs:
        if strength == 0.0:
            continue
        for t in pack.info["targets"]:
            if t["component"] != component:
                continue
            delta = np.float32(strength) * pack.update(t)
            if t["offset"] in updates:
                delta = updates[t["offset"]][1] + delta
            updates[t["offset"]] = (t, delta)
    if not updates:
        return None
    if isinstance(data, (str, Path)):
        buf = bytearray(Path(data).stat().st_size)
        with open(data, "rb") as f:
            f.readinto(buf)
    else:
        buf = bytearray(data)
    for t, delta in updates.values():
        _apply(buf, t, delta.astype(np.float32))
    return bytes(buf)


def _apply(buf: bytearray, t: dict, delta: np.ndarray) -> None:
    shape = tuple(t["shape"])
    count = math.prod(shape)
    view = np.frombuffer(buf, DTYPES[t["dtype"]], count, t["offset"]).reshape(shape)
    if t["dtype"] == "float32":
        view += delta
    elif t["dtype"] == "float16":
        view[...] = (view.astype(np.float32) + delta).astype(np.float16)
    else:  # int8 per channel along `axis`: dequantize, add, re-quantize the channels
        axis = t["axis"]
        scales = np.frombuffer(buf, np.float32, shape[axis], t["scale_offset"])
        at = [1] * len(shape)
        at[axis] = shape[axis]
        w = view.astype(np.float32) * scales.reshape(at) + delta
        others = tuple(i for i in range(len(shape)) if i != axis)
        peak = np.abs(w).max(axis=others)
        new = np.where(peak > 0, peak / np.float32(127.0), scales).astype(np.float32)
        view[...] = np.clip(np.rint(w / new.reshape(at)), -127, 127).astype(np.int8)
        scales[...] = new


def write_index(bundle: Path) -> Path:
    """<bundle>/loras/index.json: the packs there made for this bundle [{file, name, sha256}], for the web player
    (a static page cannot list a folder); rewritten from the folder's contents."""
    from ..atomic import atomic_file
    from .manifest import read_manifest

    folder = Path(bundle) / FOLDER
    manifest = read_manifest(bundle)
    folder.mkdir(exist_ok=True)
    packs = []
    for path in sorted(folder.glob(f"*{SUFFIX}")):
        try:
            pack = read_pack(path)
            check_for(pack, manifest)
        except BundleError:
            continue  # another bundle's or a damaged pack: not offered
        packs.append({"file": path.name, "name": pack.name, "sha256": sha256_file(path)})
    with atomic_file(folder / INDEX) as tmp:
        tmp.write_text(json.dumps({"format": FORMAT, "packs": packs}, indent=1) + "\n", encoding="utf-8")
    return folder / INDEX
