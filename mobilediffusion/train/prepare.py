"""`--data` to a training pool: the data encoded once into the latent cache (or a cache given as it is), read back
as a BucketPool with its bucket epochs, and the run key a resume must match.

    pool, run_key = open_data("my_images/", "sd15.safetensors", cfg, "runs/ft")

Several processes each encode their share of the data (tar shards split by shard) and the main process merges the
shares in source order, so every process count gives the cache one process writes.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from ..errors import ConfigError
from .batches import BucketBatches
from .pools import BucketPool

CACHE_DIR = "cache"  # under the run's folder, when --data is not a cache already


def init_key(init) -> str:
    """The identity of a starting checkpoint (its files and config), as the cache keys models."""
    from ..loading import load_model_config
    from .cache import model_key

    return model_key(init, load_model_config(init).to_json())


def open_data(data, init, cfg, out_dir, *, acc=None, progress: bool = True) -> tuple[BucketPool, str]:
    """(pool, run key) of `data` encoded by the checkpoint `init`: a cache is read as it is (it must be of this model
    and these bucket settings), anything else is cached under out_dir/cache first (reusing what is there)."""
    from .cache import CacheSpec, cache_index, is_cache, read_cache, read_empty_context
    from .images import BucketConfig

    key = init_key(init)
    buckets = BucketConfig(resolution=cfg.resolution, crop=cfg.crop, flip=cfg.flip)
    spec = CacheSpec(model=key, buckets=buckets, seed=cfg.seed)
    if is_cache(data):
        folder = Path(data)
        have = cache_index(folder)["spec"]
        if have["model"] != key:
            raise ConfigError(f"the cache {folder} was encoded by another model than --init {init}; write it again "
                              f"with `mobilediffusion train cache --data IMAGES --init {init} --out {folder}`")
        want = {"buckets": dataclasses.asdict(buckets), "seed": cfg.seed}
        if {k: have[k] for k in want} != want:
            raise ConfigError(f"the cache {folder} was made with {_settings(have)}, this run asks for "
                              f"{_settings(want)}; pass the same --resolution / crop / flip / seed, or give the images")
    else:
        folder = Path(out_dir) / CACHE_DIR
        _build(data, init, folder, spec, progress, acc)
    parts = read_cache(folder)
    order = BucketBatches([len(p.keys) for p in parts], cfg.batch_size, cfg.seed)
    digests = hashlib.sha256(key.encode())
    for p in cache_index(folder)["parts"]:
        digests.update("".join(p["digests"]).encode())
    return BucketPool(parts, read_empty_context(folder), order), digests.hexdigest()


def _settings(d: dict) -> str:
    b = d["buckets"]
    return f"resolution {b['resolution']}, crop {b['crop']}, flip {b['flip']}, seed {d['seed']}"


def _build(data, init, folder: Path, spec, progress: bool, acc=None) -> None:
    """Encode `data` into the cache `folder` (reusing what is there). Several processes each encode their share of the
    data (tar shards split by shard, other sources item by item) and the main process merges the shares in source
    order, so the cache is the one a single process writes."""
    import logging
    import shutil

    from tqdm import tqdm

    from ..pipeline import load_pipeline
    from .cache import build_cache, cache_index, merge_caches
    from .sources import open_source

    rank, world = (acc.process_index, acc.num_processes) if acc is not None else (0, 1)
    source = open_source(data)
    pipe = load_pipeline(init, encoder=True)
    share = folder if world == 1 else folder.parent / f".{folder.name}.share{rank}"
    with tqdm(desc="encoding", unit="image", disable=not progress or rank != 0) as bar:
        summary = build_cache(source.part(rank, world), pipe, share, spec, progress=bar.update, previous=folder,
                              allow_empty=world > 1)
    if world > 1:
        acc.wait_for_everyone()
        shares = [folder.parent / f".{folder.name}.share{r}" for r in range(world)]
        if not any(part["keys"] for d in shares for part in cache_index(d)["parts"]):  # every process says so
            raise ConfigError(f"the training data gave no usable image ({summary['skipped'] or 'nothing found'} in "
                              "this share); check the folder")
        acc.wait_for_everyone()  # (every process has read the shares before they are merged and removed)
        if acc.is_main_process:
            summary = merge_caches(shares, folder)
            for d in shares:
                shutil.rmtree(d, ignore_errors=True)
        acc.wait_for_everyone()
    skipped = ", ".join(f"{n} {why}" for why, n in summary["skipped"].items())
    if skipped and rank == 0:
        logging.getLogger(__name__).warning("training data: skipped %s", skipped)


__all__ = ["open_data", "init_key", "CACHE_DIR"]
