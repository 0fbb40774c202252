"""Training on your own images from any checkpoint the loaders read (`--data`, `--init`).

    mobilediffusion train diffusion --data my_images/ --init sd15.safetensors --out runs/ft          (full UNet)
    mobilediffusion train lora --data my_images/ --init sd15.safetensors --out runs/lora             (kohya LoRA)
    mobilediffusion train gan --data my_images/ --init sd15.safetensors --lora-rank 16 --out runs/one-step

The data (an image folder, a metadata.jsonl / .csv, tar shards, or a cache `train cache` wrote) is encoded once into
the latent cache (train/cache.py; under OUT/cache unless --data is a cache already): training reads latents and
text-encoder outputs from there, bucket by bucket (train/batches.py), so training from the images and from their
cache is the same run. The text encoder, encoder and decoder stay frozen; the UNet trains in full or through a LoRA
(train/lora.py), with the checkpoint's own noise schedule and prediction type.

Results in --out: model.safetensors (a native file: the trained UNet with the checkpoint's text encoder, decoder and
encoder; after `gan`, set to sample in one step) or lora.safetensors (kohya keys: ComfyUI's LoraLoader, our loader,
the bridge and bundle packs read it), and log.jsonl with the losses.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch

from ..errors import ConfigError
from ..sampling import alphas_cumprod
from ..unet import set_gradient_checkpointing
from . import loop
from .batches import BucketBatches
from .config import FinetuneConfig, GanDataConfig
from .diffusion import MODEL_FILE, noised, target

LORA_FILE = "lora.safetensors"
CACHE_DIR = "cache"  # under --out, when --data is not a cache already


class BucketPool:
    """Cached latents and contexts of several buckets (one image size each); take(rows) reads rows of one bucket,
    numbered over the buckets laid end to end (batches.BucketBatches's numbering)."""

    def __init__(self, parts, empty: torch.Tensor, order: BucketBatches):
        self.latents = [p.latents.float() for p in parts]  # [(N_b, C, h_b, w_b)]
        self.contexts = [p.contexts.float() for p in parts]  # [(N_b, 77, D)]
        self.empty, self.order = empty.float(), order  # (1, 77, D): the empty prompt's context

    def take(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.order.bucket_of(int(rows[0]))
        local = rows - int(self.order.offsets[b])
        return self.latents[b][local], self.contexts[b][local]

    def to(self, device) -> "BucketPool":
        pool = BucketPool([], self.empty.to(device), self.order)
        pool.latents, pool.contexts = [x.to(device) for x in self.latents], [x.to(device) for x in self.contexts]
        return pool


class MemoryPool:
    """Latents (N, C, h, w) and a context per item ((T_i, D), lengths may differ: long prompts) held in memory, as
    ComfyUI's nodes hand them over; take(rows) stacks a batch (its contexts must be of one length)."""

    def __init__(self, latents: torch.Tensor, contexts: list, empty: torch.Tensor | None = None):
        self.latents, self.contexts, self.empty = latents, list(contexts), empty

    def take(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = [self.contexts[int(i)] for i in rows]
        if len({c.shape[0] for c in ctx}) > 1:
            raise ConfigError(f"a batch mixes captions of {sorted({c.shape[0] for c in ctx})} tokens (prompts over 75 "
                              "tokens come in chunks of 77); use batch size 1 or captions of one chunk")
        return self.latents[rows.to(self.latents.device)], torch.stack(ctx)

    def to(self, device) -> "MemoryPool":
        return MemoryPool(self.latents.to(device), [c.to(device) for c in self.contexts],
                          None if self.empty is None else self.empty.to(device))


def trainable_copy(unet):
    """A plain float32 UNet (every weight a parameter, no CPU fast path) with the weights of `unet` (any of ours,
    e.g. an MD_UNET's or the bridge's)."""
    from ..unet import UNet

    copy = UNet(unet.config)
    copy.load_state_dict({k: v.float() for k, v in unet.state_dict().items()})
    return copy.train()


def train_lora_in_memory(unet, model_cfg, latents: torch.Tensor, contexts: list, *, objective: str = "onestep",
                         steps: int, batch_size: int, rank: int, lr: float, seed: int = 0, on_step=None):
    """A LoRA trained on latents (N, C, h, w) in sampler space and their contexts, nothing written: (network,
    [{"step", losses...}]). objective "onestep": DiffusionGAN (the gan-data recipe), "denoising": the finetune one.
    `unet` is copied (the caller's is not changed); `on_step(step, total, losses)` runs after each step."""
    from .config import default_config_path, load_stage_config

    if objective not in ("onestep", "denoising"):
        raise ConfigError(f"objective must be 'onestep' or 'denoising', got {objective!r}")
    if len(latents) != len(contexts) or len(latents) == 0:
        raise ConfigError(f"{len(latents)} latents and {len(contexts)} captions: give one caption per image")
    name = "gan-data" if objective == "onestep" else "finetune"
    base = load_stage_config(default_config_path(name))
    over = dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed, lora_rank=rank, lora_alpha=float(rank),
                threads=torch.get_num_threads(), checkpoint_every=steps, log_every=1)
    if objective == "onestep":
        over["d_lr"] = lr
    cfg = dataclasses.replace(base, **over)
    pool = MemoryPool(latents.detach().float(), [c.detach().float() for c in contexts])
    order = BucketBatches([len(latents)], cfg.batch_size, cfg.seed)
    unet = trainable_copy(unet)
    if objective == "onestep":
        from .gan import GanStage

        stage = GanStage(cfg, model_cfg, unet, pool, lora=lora_settings(cfg))
    else:
        if pool.empty is None:
            cfg = dataclasses.replace(cfg, caption_dropout=0.0)  # (no empty prompt given to drop captions to)
        stage = FinetuneStage(cfg, model_cfg, unet, pool)
    rows = loop.run(stage, cfg, None, pool_size=0, progress=False, batches=lambda step, gen: order.batch(step),
                    on_step=on_step)
    result = stage.ema.module if objective == "onestep" else stage.result
    return result, rows


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


class FinetuneStage:
    """The denoising loss of the checkpoint's schedule and prediction type on cached latents; caption dropout to the
    cached empty prompt. `trained`: the UNet, or a LoraNetwork on it (cfg.lora_rank > 0)."""

    def __init__(self, cfg: FinetuneConfig, model_cfg, unet, pool: BucketPool, acc=None):
        from .lora import LoraNetwork

        self.cfg, self.model_cfg, self.acc, self.pool = cfg, model_cfg, acc, pool
        self.abar = alphas_cumprod(model_cfg.schedule)
        torch.manual_seed(cfg.seed)
        self.unet = unet.train()
        set_gradient_checkpointing(unet, cfg.gradient_checkpointing)
        self.lora = LoraNetwork(unet, **lora_settings(cfg)) if cfg.lora_rank else None
        self.trained = self.lora if self.lora is not None else unet
        self.params = [p for p in self.trained.parameters() if p.requires_grad]
        self.opt = loop.adam(self.params, cfg.lr)
        self.U = unet
        if acc is not None:  # moves the modules to acc.device; DDP-wraps them across processes
            self.U, self.opt = acc.prepare(unet, self.opt)
            self.pool, self.abar = pool.to(acc.device), self.abar.to(acc.device)
        self.ema = loop.EMA(self.trained, cfg.ema_decay) if cfg.ema_decay else None
        self.modules = {"trained": self.trained, **({"ema": self.ema.module} if self.ema else {})}
        self.optimizers = {"adam": self.opt}

    @property
    def result(self):
        """What is written: the EMA when there is one, else the trained module."""
        return self.ema.module if self.ema is not None else self.trained

    def step(self, step: int, index: torch.Tensor, gen: torch.Generator) -> dict[str, float]:
        cfg, B = self.cfg, len(index)
        mine = loop.Rows(self.acc, B)  # this process's rows; every draw is made for the whole batch
        x0, context = self.pool.take(mine(index))
        dev = x0.device
        # 1. caption dropout, timesteps and noise from this step's generator (on the CPU: any device agrees)
        drop = mine(torch.rand(B, generator=gen) < cfg.caption_dropout).to(dev)
        context = torch.where(drop[:, None, None], self.pool.empty.to(dev), context)
        t = mine(torch.randint(len(self.abar), (B,), generator=gen)).to(dev)
        noise = mine(torch.randn(B, *x0.shape[1:], generator=gen)).to(dev)
        # 2. the denoising loss, in grad_accum passes over this process's rows
        want = target(x0, t, noise, self.abar, self.model_cfg.prediction_type)
        parts, total = loop.passes(len(x0), cfg.grad_accum), 0.0
        for k, (rows, share) in enumerate(parts):
            with loop.no_sync(self.acc, self.U, k == len(parts) - 1):
                with loop.autocast(cfg, dev):
                    out = self.U(noised(x0[rows], t[rows], noise[rows], self.abar), t[rows], context[rows])
                loss = (out.float() - want[rows]).pow(2).mean() * share
                loop.backward(self.acc, loss * mine.weight)
            total += loss.item()
        loop.clip_and_step(self.acc, self.opt, self.params, cfg.grad_clip)
        if self.ema is not None:
            self.ema.update(self.trained, step)
        return {"loss": total}


@torch.no_grad()
def heldout_losses(unet, pool: BucketPool, abar: torch.Tensor, prediction_type: str, *, seed: int = 0,
                   levels: int = 8) -> dict[str, float]:
    """The denoising loss on held-out latents at fixed noise levels (t = 0, T/levels, ..., T-1 for every item, the
    same noise each time), and the one-step error: x0 read from the output at t = T-1 vs x0 (MSE)."""
    from .diffusion import predicted_x0

    was = unet.training
    unet.eval()
    T = len(abar)
    steps = torch.linspace(0, T - 1, levels).round().long()
    total = last = count = 0.0
    for b, (latents, contexts) in enumerate(zip(pool.latents, pool.contexts)):
        g = torch.Generator().manual_seed(seed * 1000 + b)
        for t0 in steps.tolist():
            noise = torch.randn(latents.shape, generator=g)
            t = torch.full((len(latents),), t0, dtype=torch.long)
            out = unet(noised(latents, t, noise, abar), t, contexts)
            total += (out - target(latents, t, noise, abar, prediction_type)).pow(2).mean(dim=(1, 2, 3)).sum().item()
            if t0 == T - 1:
                x0 = predicted_x0(noised(latents, t, noise, abar), t, out, abar, prediction_type)
                last += (x0 - latents).pow(2).mean(dim=(1, 2, 3)).sum().item()
            count += len(latents)
    unet.train(was)
    n = sum(len(x) for x in pool.latents)
    return {"heldout_loss": round(total / count, 6), "heldout_x0_last": round(last / n, 6)}


def heldout_logger(unet, pool, abar, prediction_type, out_dir, every: int, acc=None):
    """on_step for loop.run: every `every` steps (and at the end), the held-out losses of `unet` as a log.jsonl row
    {"step", "heldout_loss", "heldout_x0_last"} (main process)."""
    import json

    def on_step(step, total, losses):
        if ((step + 1) % every and step + 1 != total) or (acc is not None and not acc.is_main_process):
            return
        row = {"step": step + 1, **heldout_losses(unet, pool, abar, prediction_type)}
        with open(Path(out_dir) / loop.LOG, "a") as f:
            f.write(json.dumps(row) + "\n")
    return on_step


def lora_settings(cfg) -> dict:
    return {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha or None, "targets": cfg.lora_targets}


def train_on_data(cfg: FinetuneConfig | GanDataConfig, data, init, out_dir, *, resume=False, stop_after=None,
                  progress=True, acc=None, heldout=None) -> Path | None:
    """Train on `data` from the checkpoint `init` (see the module docstring); returns the result file (None when
    stopped early or on a non-main process). `heldout`: images (any --data form) whose denoising losses are logged
    at every checkpoint (heldout_losses)."""
    from ..loading import load_model_config, load_trainable_unet
    from .gan import GanStage

    torch.set_num_threads(cfg.threads)
    model_cfg = load_model_config(init)  # 1. the checkpoint and the data, checked before any training
    pool, run_key = open_data(data, init, cfg, out_dir, acc=acc, progress=progress)
    unet = load_trainable_unet(init)
    if isinstance(cfg, GanDataConfig):  # 2. train
        stage = GanStage(cfg, model_cfg, unet, pool, acc, lora=lora_settings(cfg) if cfg.lora_rank else None)
        result = stage.ema.module
    else:
        stage = FinetuneStage(cfg, model_cfg, unet, pool, acc)
        result = stage.result
    check_memory(cfg, model_cfg.unet, pool, "gan" if isinstance(cfg, GanDataConfig) else "finetune",
                 trained=stage.lora and sum(p.numel() for p in stage.lora.parameters()), ema=cfg.ema_decay > 0)
    on_step = None
    if heldout is not None:
        held, _ = open_data(heldout, init, cfg, Path(out_dir) / "heldout", acc=acc, progress=progress)
        on_step = heldout_logger(unet, held, stage.abar.cpu(), model_cfg.prediction_type, out_dir, cfg.checkpoint_every,
                                 acc)
    rows = loop.run(stage, cfg, out_dir, pool_size=0, acc=acc, resume=resume, stop_after=stop_after,
                    progress=progress, batches=lambda step, gen: pool.order.batch(step), run_key=run_key,
                    on_step=on_step)
    if not rows or rows[-1]["step"] != cfg.steps or (acc is not None and not acc.is_main_process):
        return None
    return write_result(cfg, model_cfg, init, result, out_dir)  # 3. the result file


def check_memory(cfg, unet_cfg, pool, kind: str, **kw) -> None:
    """Refuse (ConfigError with the estimate) a run whose batch does not fit the memory available now."""
    from .memory import check_fits, estimate

    biggest = max(pool.latents, key=lambda x: x.shape[-2] * x.shape[-1]) if isinstance(pool.latents, list) \
        else pool.latents
    batch = min(cfg.batch_size, max(len(x) for x in pool.latents) if isinstance(pool.latents, list) else
                len(pool.latents))
    est = estimate(unet_cfg, kind=kind, batch=batch, latent_hw=tuple(biggest.shape[-2:]), **kw)
    check_fits(est, what=f"training ({kind}, batch {batch} at {biggest.shape[-1]}x{biggest.shape[-2]} latents)")


def write_result(cfg, model_cfg, init, result, out_dir) -> Path:
    """out_dir/lora.safetensors (a LoraNetwork) or out_dir/model.safetensors (a UNet, with init's other parts)."""
    from ..presets import ONE_STEP
    from .lora import LoraNetwork, save_kohya

    one_step = isinstance(cfg, GanDataConfig)
    if isinstance(result, LoraNetwork):
        meta = {"ss_training_comment": f"mobilediffusion train {cfg.stage} from {Path(init).name}",
                "ss_steps": cfg.steps, "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
                "ss_base_model_version": f"{model_cfg.unet.cross_attention_dim}-dim context"}
        if one_step:
            meta["mobilediffusion_sampling"] = "onestep"  # a DiffusionGAN LoRA: sample in one step
        return save_kohya(result, Path(out_dir) / LORA_FILE, metadata=meta)
    from ..loading import has_encoder, load_decoder, load_encoder, load_text_encoder
    from ..weights.native import save_native

    if one_step:
        model_cfg = dataclasses.replace(model_cfg, **ONE_STEP)
    encoder = load_encoder(init) if has_encoder(init) else None
    return save_native(Path(out_dir) / MODEL_FILE, model_cfg, result, load_text_encoder(init), load_decoder(init),
                       encoder)


__all__ = ["train_on_data", "train_lora_in_memory", "open_data", "trainable_copy", "BucketPool", "MemoryPool",
           "FinetuneStage", "LORA_FILE"]
