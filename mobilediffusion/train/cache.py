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
from .rowfile import RowWriter, read_rows

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
    share of a source may be empty). `previous`: the cache to reuse entries from (default: out_dir's).

    Streams: a bucket's images wait only until a batch of them is encoded, and its rows go to disk as they come
    (rowfile.RowWriter), so the data may be far larger than memory."""
    from ..atomic import fresh_dir, replace_dir

    if getattr(pipe, "encoder", None) is None:
        raise ConfigError("caching latents needs the model's image encoder; load it with load_pipeline(path, "
                          "encoder=True) (a checkpoint without one: give its VAE)")
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    old = _old_entries(Path(previous) if previous is not None else out_dir, spec)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_dir(out_dir.parent, f".{out_dir.name}.partial-")
    writers: dict[tuple[int, int], _Bucket] = {}
    skipped: dict[str, int] = {}
    try:
        for item in source:
            h, w = item.image.shape[:2]
            size = bucket_for(w, h, spec.buckets)
            if size is None:
                skipped["smaller than every bucket"] = skipped.get("smaller than every bucket", 0) + 1
                continue
            digest = entry_key(item, spec)
            cached = old.get(digest)
            image = None if cached is not None else fit_to_bucket(item.image, size, spec.buckets, _rng(spec, digest))
            if size not in writers:
                writers[size] = _Bucket(tmp, size, pipe, batch, progress)
            writers[size].add((item.key, item.caption, digest, list(item.order)), image, cached)
        skipped.update(getattr(source, "skipped", {}))
        if not writers and not allow_empty:
            raise ConfigError(f"the training data gave no usable image ({skipped or 'nothing found'}); check the folder")
        index = {"version": CACHE_VERSION, "spec": json.loads(spec.json()), "parts": [], "skipped": skipped}
        for size, bucket in sorted(writers.items()):
            index["parts"].append(bucket.finish())
        _write_empty(pipe, tmp)
        (tmp / INDEX).write_text(json.dumps(index, indent=1))
        replace_dir(tmp, out_dir)
    finally:
        for bucket in writers.values():
            bucket.discard()
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    encoded = sum(b.encoded for b in writers.values())
    reused = sum(b.reused for b in writers.values())
    return {"entries": encoded + reused, "encoded": encoded, "reused": reused, "skipped": skipped,
            "buckets": {f"{w}x{h}": len(b.meta) for (w, h), b in sorted(writers.items())},
            "seconds": round(time.perf_counter() - t0, 2)}


class _Bucket:
    """One bucket's entries in arrival order: those to encode wait for a full batch, then every waiting entry's row
    is written in order."""

    def __init__(self, folder: Path, size: tuple[int, int], pipe, batch: int, progress):
        self.folder, self.size, self.name = folder, size, f"bucket_{size[0]}x{size[1]}"
        self.pipe, self.batch, self.progress = pipe, batch, progress
        self.writer: RowWriter | None = None
        self.waiting: list = []  # [(meta, image or None, cached (latent, context) or None)]
        self.meta: list = []  # (key, caption, digest, order) of each written row
        self.to_encode = self.encoded = self.reused = 0

    def add(self, meta, image, cached) -> None:
        self.waiting.append((meta, image, cached))
        self.to_encode += image is not None
        if self.to_encode >= self.batch:
            self._flush()

    @torch.no_grad()
    def _flush(self) -> None:
        todo = [e for e in self.waiting if e[1] is not None]
        z = c = None
        if todo:
            x = torch.from_numpy(np.stack([e[1] for e in todo])).permute(0, 3, 1, 2).float() / 255.0
            z = self.pipe.encode(x).float().cpu()  # (n, C, h, w)
            text = self.pipe.text_encoder
            c = text.encode(text.tokenize([e[0][1] for e in todo])).float().cpu()  # (n, 77, D)
            if self.progress is not None:
                self.progress(len(todo))
        k = 0
        for meta, image, cached in self.waiting:
            if image is not None:
                latent, context = z[k], c[k]
                k += 1
                self.encoded += 1
            else:
                latent, context = cached
                self.reused += 1
            if self.writer is None:
                self.writer = RowWriter(self.folder, self.name, {"latents": tuple(latent.shape),
                                                                 "contexts": tuple(context.shape)})
            self.writer.add(latents=latent, contexts=context)
            self.meta.append(meta)
        self.waiting, self.to_encode = [], 0

    def finish(self) -> dict:
        """Encode what waits, write the file; the index entry of the part."""
        self._flush()
        file = f"{self.name}.safetensors"
        self.writer.finish(self.folder / file)
        return {"file": file, "size": list(self.size), "keys": [m[0] for m in self.meta],
                "captions": [m[1] for m in self.meta], "digests": [m[2] for m in self.meta],
                "orders": [m[3] for m in self.meta]}

    def discard(self) -> None:
        if self.writer is not None:
            self.writer.discard()


@torch.no_grad()
def _write_empty(pipe, folder: Path) -> None:
    from safetensors.torch import save_file

    text = pipe.text_encoder
    empty = text.encode(text.tokenize([""])).float().cpu()
    save_file({"context": empty.contiguous()}, str(folder / EMPTY))


def merge_caches(shares: list, out_dir) -> dict:
    """One cache from caches of shares of a source (build_cache of source.part(r, n) for each r): each bucket's entries
    in source order (what one process building the whole cache gives), skipped counts summed; written beside
    out_dir and renamed into place, row by row (the shares are read memory-mapped). {"entries", "skipped",
    "buckets"}."""
    import shutil

    from ..atomic import fresh_dir, replace_dir

    out_dir = Path(out_dir)
    indexes = [cache_index(d) for d in shares]
    if len({json.dumps(i["spec"], sort_keys=True) for i in indexes}) != 1:
        raise ConfigError("the shares to merge were cached with different settings or models")
    groups: dict[tuple, list] = {}  # size -> [(key, caption, digest, order, tensors, row)]
    skipped: dict[str, int] = {}
    for folder, index in zip(shares, indexes):
        for why, n in index.get("skipped", {}).items():
            skipped[why] = skipped.get(why, 0) + n
        for part in index["parts"]:
            t = read_rows(Path(folder) / part["file"])
            for row, entry in enumerate(zip(part["keys"], part["captions"], part["digests"], part["orders"])):
                groups.setdefault(tuple(part["size"]), []).append((*entry, t, row))
    if not groups:
        raise ConfigError(f"the training data gave no usable image ({skipped or 'nothing found'}); check the folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_dir(out_dir.parent, f".{out_dir.name}.partial-")
    try:
        index = {"version": CACHE_VERSION, "spec": indexes[0]["spec"], "parts": [], "skipped": skipped}
        for size, entries in sorted(groups.items()):
            entries.sort(key=lambda e: e[3])
            name = f"bucket_{size[0]}x{size[1]}"
            first = entries[0][4]
            writer = RowWriter(tmp, name, {k: tuple(first[k].shape[1:]) for k in ("latents", "contexts")})
            for e in entries:
                writer.add(latents=e[4]["latents"][e[5]], contexts=e[4]["contexts"][e[5]])
            writer.finish(tmp / f"{name}.safetensors")
            index["parts"].append({"file": f"{name}.safetensors", "size": list(size), "keys": [e[0] for e in entries],
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


def _old_entries(out_dir: Path, spec: CacheSpec) -> dict:
    """digest -> (latents, context) of a previous cache in out_dir, rows of its memory-mapped files (empty when there
    is none or it is another version)."""
    path = out_dir / INDEX
    if not path.is_file():
        return {}
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    if index.get("version") != CACHE_VERSION:
        return {}
    out = {}
    for part in index.get("parts", []):
        tensors = read_rows(out_dir / part["file"])
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
    """The parts of a cache written by build_cache (one per bucket), their tensors memory-mapped from the files (rows
    are read from disk as they are indexed). ConfigError when the folder holds none."""
    index = cache_index(out_dir)
    parts = []
    for part in index["parts"]:
        t = read_rows(Path(out_dir) / part["file"])
        parts.append(CachePart(tuple(part["size"]), t["latents"], t["contexts"], part["keys"], part["captions"]))
    return parts
