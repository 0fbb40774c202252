"""Cached encodings for training on your own data: each item's latents (its bucketed image through the model's
encoder: the posterior mean in sampler space) and its caption's text-encoder output, in safetensors shards (one per
bucket size) with an index, so that later runs read them instead of encoding.

    summary = build_cache(open_source("data/"), pipe, "runs/cache", CacheSpec(model=model_key(path)))
    for part in read_cache("runs/cache"):     # one per bucket
        part.size, part.latents (N, C, h, w), part.contexts (N, 77, D), part.keys, part.captions

An entry is keyed by what it depends on: the decoded image's bytes and shape, the caption, the repeat, the bucket
settings and seed (crops and flips), and the model; an entry whose key is unchanged is copied from the previous
cache, any other is encoded again. The cache is written beside its folder and renamed into place, so an
interrupted run leaves the previous cache as it was.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from .images import BucketConfig, bucket_for, fit_to_bucket

CACHE_VERSION = 3  # 2: + the empty prompt's context (caption dropout); 3: + each entry's source order, skipped counts
INDEX = "index.json"
EMPTY = "empty_context.safetensors"  # the text-encoder output of "" (1, 77, D)


@dataclass(frozen=True)
class CacheSpec:
    """What the cached encodings depend on besides each item."""

    model: str  # the model's identity (model_key: its file's sha256 and config)
    buckets: BucketConfig = BucketConfig()
    seed: int = 0  # drives random crops and flips (per item and repeat)

    def json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


@dataclass
class CachePart:
    size: tuple[int, int]  # the bucket (W, H)
    latents: torch.Tensor  # (N, C, H / f, W / f) sampler space
    contexts: torch.Tensor  # (N, 77, D)
    keys: list[str]
    captions: list[str]


def model_key(path, config_json: str) -> str:
    """A model's identity for the cache: the sha256 of its file (or of each file of a folder) and of its config."""
    h = hashlib.sha256(config_json.encode())
    p = Path(path) if path is not None else None
    files = [] if p is None else ([p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()))
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def entry_key(item, spec: CacheSpec) -> str:
    h = hashlib.sha256()
    for part in (spec.json(), item.key, str(item.repeat), item.caption, str(item.image.shape)):
        h.update(part.encode())
        h.update(b"\0")
    h.update(item.image.tobytes())
    return h.hexdigest()


def _rng(spec: CacheSpec, digest: str) -> np.random.Generator:
    return np.random.default_rng([spec.seed, int(digest[:15], 16)])


def build_cache(source, pipe, out_dir, spec: CacheSpec, *, batch: int = 16, progress=None, previous=None,
                allow_empty: bool = False) -> dict:
    """Encode `source` (train/sources.py) with `pipe`'s encoder and text encoder into `out_dir`, reusing the entries
    of a previous cache there whose key is unchanged; {"entries", "encoded", "reused", "skipped", "seconds",
    "buckets"}. ConfigError when the pipeline has no encoder or the source gives nothing (unless `allow_empty`: one
    share of a source may be empty). `previous`: the cache to reuse entries from (default: out_dir's)."""
    from safetensors.torch import save_file

    from ..atomic import fresh_dir, replace_dir

    if getattr(pipe, "encoder", None) is None:
        raise ConfigError("caching latents needs the model's image encoder; load it with load_pipeline(path, "
                          "encoder=True) (a checkpoint without one: give its VAE)")
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    old = _old_entries(Path(previous) if previous is not None else out_dir, spec)
    groups: dict[tuple[int, int], list] = {}  # bucket -> [(key, caption, digest, image or cached, cached, order)]
    skipped = {}
    for item in source:
        h, w = item.image.shape[:2]
        size = bucket_for(w, h, spec.buckets)
        if size is None:
            skipped["smaller than every bucket"] = skipped.get("smaller than every bucket", 0) + 1
            continue
        digest = entry_key(item, spec)
        cached = old.get(digest)
        image = None if cached is not None else fit_to_bucket(item.image, size, spec.buckets, _rng(spec, digest))
        groups.setdefault(size, []).append((item.key, item.caption, digest, image, cached, list(item.order)))
    skipped.update(getattr(source, "skipped", {}))
    if not groups and not allow_empty:
        raise ConfigError(f"the training data gave no usable image ({skipped or 'nothing found'}); check the folder")
    encoded = reused = 0
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_dir(out_dir.parent, f".{out_dir.name}.partial-")
    try:
        index = {"version": CACHE_VERSION, "spec": json.loads(spec.json()), "parts": [], "skipped": skipped}
        for n, (size, entries) in enumerate(sorted(groups.items())):
            latents, contexts = _encode_group(pipe, entries, batch, progress)
            encoded += sum(e[3] is not None for e in entries)
            reused += sum(e[4] is not None for e in entries)
            name = f"bucket_{size[0]}x{size[1]}.safetensors"
            save_file({"latents": latents.contiguous(), "contexts": contexts.contiguous()}, str(tmp / name))
            index["parts"].append({"file": name, "size": list(size), "keys": [e[0] for e in entries],
                                   "captions": [e[1] for e in entries], "digests": [e[2] for e in entries],
                                   "orders": [e[5] for e in entries]})
        text = pipe.text_encoder
        with torch.no_grad():
            empty = text.encode(text.tokenize([""])).float().cpu()
        save_file({"context": empty.contiguous()}, str(tmp / EMPTY))
        (tmp / INDEX).write_text(json.dumps(index, indent=1))
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    entries = encoded + reused
    return {"entries": entries, "encoded": encoded, "reused": reused, "skipped": skipped,
            "buckets": {f"{w}x{h}": len(e) for (w, h), e in sorted(groups.items())},
            "seconds": round(time.perf_counter() - t0, 2)}


def merge_caches(shares: list, out_dir) -> dict:
    """One cache from caches of shares of a source (build_cache of source.part(r, n) for each r): each bucket's entries
    in source order (what one process building the whole cache gives), skipped counts summed; written beside
    out_dir and renamed into place. {"entries", "skipped", "buckets"}."""
    import shutil

    from safetensors.torch import load_file, save_file

    from ..atomic import fresh_dir, replace_dir

    out_dir = Path(out_dir)
    indexes = [cache_index(d) for d in shares]
    if len({json.dumps(i["spec"], sort_keys=True) for i in indexes}) != 1:
        raise ConfigError("the shares to merge were cached with different settings or models")
    groups: dict[tuple, list] = {}
    skipped: dict[str, int] = {}
    for folder, index in zip(shares, indexes):
        for why, n in index.get("skipped", {}).items():
            skipped[why] = skipped.get(why, 0) + n
        for part in index["parts"]:
            t = load_file(str(Path(folder) / part["file"]))
            for row, entry in enumerate(zip(part["keys"], part["captions"], part["digests"], part["orders"])):
                groups.setdefault(tuple(part["size"]), []).append((*entry, t["latents"][row], t["contexts"][row]))
    if not groups:
        raise ConfigError(f"the training data gave no usable image ({skipped or 'nothing found'}); check the folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_dir(out_dir.parent, f".{out_dir.name}.partial-")
    try:
        index = {"version": CACHE_VERSION, "spec": indexes[0]["spec"], "parts": [], "skipped": skipped}
        for size, entries in sorted(groups.items()):
            entries.sort(key=lambda e: e[3])
            name = f"bucket_{size[0]}x{size[1]}.safetensors"
            save_file({"latents": torch.stack([e[4] for e in entries]).contiguous(),
                       "contexts": torch.stack([e[5] for e in entries]).contiguous()}, str(tmp / name))
            index["parts"].append({"file": name, "size": list(size), "keys": [e[0] for e in entries],
                                   "captions": [e[1] for e in entries], "digests": [e[2] for e in entries],
                                   "orders": [e[3] for e in entries]})
        shutil.copy(Path(shares[0]) / EMPTY, tmp / EMPTY)
        (tmp / INDEX).write_text(json.dumps(index, indent=1))
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return {"entries": sum(len(e) for e in groups.values()), "skipped": skipped,
            "buckets": {f"{w}x{h}": len(e) for (w, h), e in sorted(groups.items())}}


@torch.no_grad()
def _encode_group(pipe, entries, batch: int, progress) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, contexts) of one bucket's entries in order: cached ones as stored, the others encoded in batches."""
    latents, contexts = [None] * len(entries), [None] * len(entries)
    for i, e in enumerate(entries):
        if e[4] is not None:
            latents[i], contexts[i] = e[4]
    todo = [i for i, e in enumerate(entries) if e[3] is not None]
    text = pipe.text_encoder
    for start in range(0, len(todo), batch):
        rows = todo[start:start + batch]
        x = torch.from_numpy(np.stack([entries[i][3] for i in rows])).permute(0, 3, 1, 2).float() / 255.0
        z = pipe.encode(x).float().cpu()
        c = text.encode(text.tokenize([entries[i][1] for i in rows])).float().cpu()
        for k, i in enumerate(rows):
            latents[i], contexts[i] = z[k], c[k]
        if progress is not None:
            progress(len(rows))
    return torch.stack(latents), torch.stack(contexts)


def _old_entries(out_dir: Path, spec: CacheSpec) -> dict:
    """digest -> (latents, context) of a previous cache in out_dir (empty when there is none or it is another
    version)."""
    path = out_dir / INDEX
    if not path.is_file():
        return {}
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    if index.get("version") != CACHE_VERSION:
        return {}
    from safetensors.torch import load_file

    out = {}
    for part in index.get("parts", []):
        tensors = load_file(str(out_dir / part["file"]))
        for row, digest in enumerate(part["digests"]):
            out[digest] = (tensors["latents"][row], tensors["contexts"][row])
    return out


def is_cache(path) -> bool:
    return (Path(path) / INDEX).is_file()


def cache_index(out_dir) -> dict:
    """The index of a cache written by build_cache. ConfigError when the folder holds none or another version."""
    path = Path(out_dir) / INDEX
    if not path.is_file():
        raise ConfigError(f"{out_dir} is no latent cache (no {INDEX}); write one with `mobilediffusion train cache`")
    index = json.loads(path.read_text())
    if index.get("version") != CACHE_VERSION:
        raise ConfigError(f"{out_dir} is a cache of version {index.get('version')}; write it again with this "
                          "version (`mobilediffusion train cache`)")
    return index


def read_empty_context(out_dir) -> torch.Tensor:
    """The empty prompt's text-encoder output (1, 77, D) stored with a cache."""
    from safetensors.torch import load_file

    cache_index(out_dir)
    return load_file(str(Path(out_dir) / EMPTY))["context"]


def read_cache(out_dir) -> list[CachePart]:
    """The parts of a cache written by build_cache (one per bucket). ConfigError when the folder holds none."""
    from safetensors.torch import load_file

    index = cache_index(out_dir)
    parts = []
    for part in index["parts"]:
        t = load_file(str(Path(out_dir) / part["file"]))
        parts.append(CachePart(tuple(part["size"]), t["latents"], t["contexts"], part["keys"], part["captions"]))
    return parts
