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
from pathlib import Path

import torch

from ..errors import ConfigError
from ..sampling import alphas_cumprod
from ..unet import set_gradient_checkpointing
from . import loop
from .batches import BucketBatches
from .config import FinetuneConfig, GanDataConfig
from .diffusion import MODEL_FILE, noised, target
from .heldout import heldout_logger
from .pools import BucketPool, MemoryPool
from .prepare import open_data

LORA_FILE = "lora.safetensors"


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
    est = estimate(unet_cfg, kind=kind, batch=batch, latent_hw=tuple(biggest.shape[-2:]), **kw)  # (per process)
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


__all__ = ["train_on_data", "train_lora_in_memory", "trainable_copy", "FinetuneStage", "check_memory", "LORA_FILE"]
