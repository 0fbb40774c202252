"""The training loop every stage shares: seeding, data pool, learning rate, progress, logs, checkpoints.

A stage is an object with
    modules: dict[str, nn.Module]        everything saved in a checkpoint (trained nets, EMA copies)
    optimizers: dict[str, Optimizer]     each group's "base_lr" is scaled by the schedule
    step(step int, index (B,) int64, gen torch.Generator) -> dict[str, float] of losses
`run` calls `step` for steps [start, cfg.steps) with the WHOLE batch's item indices (summed over
processes). Every random draw of step i comes from a generator seeded by (cfg.seed, i), so a run
resumed from a checkpoint continues exactly as the uninterrupted one would, and the same seed and
config give the same weights on one machine.

Several processes (`accelerate launch`): a stage makes every draw for the whole batch and keeps its
process's rows (`Rows`), weighting its loss by its share; gradients are averaged by accelerate, so
1 and n processes compute the same update. Only the main process writes files.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

from ..atomic import atomic_file
from ..errors import CheckpointError, ConfigError
from .config import StageConfig, to_json

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"  # resumable state, in the run's output folder
LOG = "log.jsonl"  # one JSON line per logged step: {"step": i, "<loss>": value, ...}


def accelerator():
    """An accelerate.Accelerator for this process (CPU when no GPU is visible)."""
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of one step: every random draw of step `step` comes from it."""
    return torch.Generator("cpu").manual_seed(seed * 1_000_003 + step + 1)


class Rows:
    """This process's rows of a batch of n: rows rank, rank + world, ... . `rows(x)` picks them from anything made
    for the whole batch (its indices, every random draw), so one process and several see the same numbers for every
    sample. `weight` scales the process's mean loss so that the average over processes (what DDP does with the
    gradients) is the mean over the whole batch: len(rows) * world / n. A process whose share is empty (n < world)
    runs row 0 with weight 0, keeping every process in step."""

    def __init__(self, acc, n: int):
        rank, world = (acc.process_index, acc.num_processes) if acc is not None else (0, 1)
        self.sel = torch.arange(rank, n, world)
        self.weight = len(self.sel) * world / n
        if len(self.sel) == 0:
            self.sel, self.weight = torch.zeros(1, dtype=torch.long), 0.0

    def __call__(self, whole: torch.Tensor) -> torch.Tensor:
        return whole[self.sel.to(whole.device)]

    def __len__(self) -> int:
        return len(self.sel)


def lr_factor(cfg: StageConfig, step: int) -> float:
    """Linear warm-up over cfg.warmup steps, then cosine decay to cfg.min_lr_ratio at the last step."""
    warm = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else 1.0
    if cfg.min_lr_ratio >= 1.0 or cfg.steps <= cfg.warmup:
        return warm
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    cos = 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return warm * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos)


def render_pool(cfg: StageConfig, split: str = "train") -> tuple[torch.Tensor, list[str]]:
    """Items 0..pool_size-1 of the synthetic split: images (N, 3, H, W) float32 in [0, 1], captions."""

    from .data import SyntheticScenes

    scenes = SyntheticScenes(cfg.data, split, length=cfg.pool_size)
    images, captions = [], []
    for i in range(len(scenes)):
        image, caption, _ = scenes[i]
        images.append(image)
        captions.append(caption)
    return _float_images(images), captions


def _float_images(pictures: list) -> torch.Tensor:
    """uint8 (H, W, 3) pictures -> float32 (N, 3, H, W) in [0, 1] (one uint8 copy, then the float tensor)."""
    import numpy as np

    x = torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).contiguous()  # uint8 (N, 3, H, W)
    return x.float().div_(255.0)


def training_pool(cfg: StageConfig, data=None, split: str = "train") -> tuple[torch.Tensor, list[str], str]:
    """(images (N, 3, H, W) float32 in [0, 1], captions, run key) the synthetic stages train on: the rendered
    scenes, or with `data` (an image folder, metadata file or tar shards: train/sources.py) every image of it
    fitted to the square of cfg.data.resolution (scaled down to cover it, centre crop). The run key is a digest
    of the pool (a resume on other data is refused)."""
    import hashlib

    if data is None:
        images, captions = render_pool(cfg, split)
        return images, captions, ""
    from .images import BucketConfig, fit_to_bucket
    from .sources import open_source

    side = cfg.data.resolution
    source, bucket = open_source(data, min_side=side), BucketConfig(resolution=side, step=side)  # centre crop
    pixels, captions, digest = [], [], hashlib.blake2b(digest_size=16)
    for item in source:
        x = fit_to_bucket(item.image, (side, side), bucket)  # uint8 (side, side, 3)
        pixels.append(x)
        captions.append(item.caption)
        digest.update(x.tobytes())
        digest.update(item.caption.encode() + b"\0")
    if not pixels:
        raise ConfigError(f"no usable images in {data} (skipped: {dict(source.skipped) or 'none'}); this stage needs "
                          f"images of at least {side}x{side} pixels with captions")
    if source.skipped:
        log.warning("skipped %s from %s", dict(source.skipped), data)
    return _float_images(pixels), captions, f"data:{digest.hexdigest()}"


def passes(n: int, k: int) -> list[tuple[slice, float]]:
    """n rows in up to k contiguous passes (gradient accumulation): [(rows, their share of n)], no empty pass."""
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [(slice(a, b), (b - a) / n) for a, b in zip(bounds, bounds[1:]) if b > a]


def no_sync(acc, module, last: bool):
    """All but the last pass of an accumulated step skip the gradient all-reduce (DDP) or reduce-scatter (FSDP)."""
    import contextlib

    from .fsdp import gradient_sync_off, is_sharded

    if acc is None or last:
        return contextlib.nullcontext()
    return gradient_sync_off(module) if is_sharded(module) else acc.no_sync(module)


def autocast(cfg, device):
    """bf16 autocast for the forward passes when cfg.mixed_precision is "bf16" (float32 weights and updates)."""
    on = getattr(cfg, "mixed_precision", "no") == "bf16"
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=on)


class TensorPool:
    """Latents (N, C, h, w) and text contexts (N, 77, D) of a pool held in memory; take(rows) -> (x0, context)."""

    def __init__(self, latents: torch.Tensor, contexts: torch.Tensor):
        self.latents, self.contexts = latents, contexts

    def take(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = rows.to(self.latents.device)
        return self.latents[rows], self.contexts[rows]

    def to(self, device) -> "TensorPool":
        return TensorPool(self.latents.to(device), self.contexts.to(device))


class EMA:
    """Exponential moving average of a module's floating-point state, held in `self.module` (a copy).

    The decay warms up as min(decay, (1 + step) / (10 + step)), so early weights (and the random
    initialisation) fade out within the run instead of lingering for ~1 / (1 - decay) steps.
    """

    def __init__(self, module: torch.nn.Module, decay: float):
        import copy

        self.decay = decay
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for ema, cur in zip(self.module.state_dict().values(), module.state_dict().values()):
            if ema.dtype.is_floating_point:
                ema.lerp_(cur.detach(), 1.0 - decay)
            else:
                ema.copy_(cur)


# --------------------------------------------------------------------------- checkpoints
def stage_state(stage) -> tuple[dict, dict]:
    """(module name -> state dict, optimizer name -> state dict) of a stage, to checkpoint. A stage that shards its
    modules (FSDP) gathers them in `full_state()`: every process calls this; only the main one gets the tensors."""
    return stage.full_state() if hasattr(stage, "full_state") else local_state(stage)


def local_state(stage) -> tuple[dict, dict]:
    """The state dicts of a stage's own (unsharded) modules and optimizers."""
    return ({n: m.state_dict() for n, m in stage.modules.items()},
            {n: o.state_dict() for n, o in stage.optimizers.items()})


def load_local_state(stage, modules: dict, optimizers: dict) -> None:
    """The inverse of local_state: state dicts into the stage's own modules and optimizers."""
    from ..weights.keymap import load_state

    for name, module in stage.modules.items():
        load_state(module, modules[name], what=name)
    for name, opt in stage.optimizers.items():
        opt.load_state_dict(optimizers[name])


def save_checkpoint(path: Path, step: int, cfg: StageConfig, modules: dict, optimizers: dict,
                    run_key: str = "") -> None:
    """Module and optimizer state dicts (stage_state) at `step` to one .safetensors (atomic), the config in its
    metadata."""
    from safetensors.torch import save_file

    tensors, meta = {}, {"step": str(step), "config": to_json(cfg), "stage": cfg.stage, "run": run_key}
    for name, sd in modules.items():
        for k, v in sd.items():
            tensors[f"model.{name}.{k}"] = v.detach().contiguous().cpu()
    for name, state in optimizers.items():
        for pid, entries in state["state"].items():
            for k, v in entries.items():
                tensors[f"optim.{name}.{pid}.{k}"] = torch.as_tensor(v).detach().contiguous().cpu()
        meta[f"optim.{name}"] = json.dumps(state["param_groups"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


RESUMABLE_CHANGES = ("steps", "fsdp")  # config keys a resume may change (checkpoints hold unsharded state)


def load_checkpoint(path: Path, cfg: StageConfig, stage, run_key: str = "") -> int:
    """Restore what `save_checkpoint` wrote into the stage's modules and optimizers (or through its
    `load_full_state(modules, optimizers)` when it shards them); returns the step."""
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"no checkpoint to resume from at {path}; start without --resume")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    saved = json.loads(meta.get("config", "{}"))
    now = json.loads(to_json(cfg))
    changed = sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
    if changed:
        raise ConfigError(f"{path} was written with a different config ({', '.join(changed)} differ); resume with "
                          f"the same config (only {' and '.join(map(repr, RESUMABLE_CHANGES))} may change) or start "
                          "a new output folder")
    if meta.get("run", "") != run_key:
        raise ConfigError(f"{path} was trained from other data or another starting checkpoint (--data / --init); "
                          "resume with the same ones or start a new output folder")
    modules = {name: {k[len(f"model.{name}."):]: v for k, v in tensors.items() if k.startswith(f"model.{name}.")}
               for name in stage.modules}
    optimizers = {}
    for name in stage.optimizers:
        prefix, state = f"optim.{name}.", {}
        for k, v in tensors.items():
            if k.startswith(prefix):
                pid, key = k[len(prefix):].split(".", 1)
                state.setdefault(int(pid), {})[key] = v
        optimizers[name] = {"state": state, "param_groups": json.loads(meta[f"optim.{name}"])}
    if hasattr(stage, "load_full_state"):
        stage.load_full_state(modules, optimizers)
    else:
        load_local_state(stage, modules, optimizers)
    return int(meta["step"])


# --------------------------------------------------------------------------- the loop
def run(stage, cfg: StageConfig, out_dir, *, pool_size: int, acc=None, resume: bool = False,
        stop_after: int | None = None, progress: bool = True, batches=None, run_key: str = "",
        on_step=None) -> list[dict]:
    """Train `stage` for steps [start, cfg.steps); returns the loss rows of this call.

    `resume`: continue from out_dir/checkpoint.safetensors (an error if there is none); without it
    an existing checkpoint is an error, so a finished or interrupted run is never overwritten by
    accident. `stop_after`: return after this many steps (a controlled interruption; a checkpoint is written there).
    `out_dir` None: a run in memory (no files, no resume). `batches(step, gen) -> (B,) int64`: the item indices of
    a step's whole batch (default: cfg.batch_size uniform draws from the pool, made first from the step's generator).
    `run_key`: what else the run depends on (its data and starting checkpoint); a resume from another is refused.
    `on_step(step, total, losses)`: called after each step (a progress bar; raising there stops the run).
    """
    from tqdm import tqdm

    files = out_dir is not None
    out_dir = Path(out_dir) if files else None
    ckpt = out_dir / CHECKPOINT if files else None
    start = 0
    if resume:
        if not files:
            raise ConfigError("a run in memory cannot resume; give an output folder")
        start = load_checkpoint(ckpt, cfg, stage, run_key)
        log.info("resumed %s from step %d", cfg.stage, start)
    elif files and ckpt.exists():
        raise ConfigError(f"{ckpt} exists: pass --resume to continue that run, or choose a new --out folder")
    main = acc is None or acc.is_main_process
    writes = files and main
    if batches is None:
        def batches(step, gen):
            return torch.randint(pool_size, (cfg.batch_size,), generator=gen)
    if writes:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(json.loads(to_json(cfg)), indent=2) + "\n")
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    rows, t0 = [], time.time()
    logfile = open(out_dir / LOG, "a") if writes else None
    try:
        with tqdm(total=cfg.steps, initial=start, desc=cfg.stage, unit="step", disable=not (progress and main)) as bar:
            for step in range(start, end):
                # 1. this step's randomness, whole batch and learning rate
                gen = step_generator(cfg.seed, step)
                index = batches(step, gen)
                factor = lr_factor(cfg, step)
                for opt in stage.optimizers.values():
                    for group in opt.param_groups:
                        group["lr"] = group["base_lr"] * factor
                # 2. the stage's update
                losses = stage.step(step, index, gen)
                bar.update(1)
                bar.set_postfix({k: f"{v:.4f}" for k, v in losses.items()}, refresh=False)
                # 3. logs and checkpoints
                if writes and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
                    row = {"step": step + 1, **{k: round(v, 6) for k, v in losses.items()},
                           "lr": round(cfg.lr * factor, 8), "seconds": round(time.time() - t0, 1)}
                    logfile.write(json.dumps(row) + "\n")
                    logfile.flush()
                rows.append({"step": step + 1, **losses})
                if files and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 in (cfg.steps, end)):
                    states = stage_state(stage)  # (gathered on every process when the stage shards)
                    if acc is not None:
                        acc.wait_for_everyone()
                    if main:
                        save_checkpoint(ckpt, step + 1, cfg, *states, run_key)
                if on_step is not None:
                    on_step(step, cfg.steps, losses)
    finally:
        if logfile is not None:
            logfile.close()
    return rows


def adam(params, lr: float, betas=(0.9, 0.999)) -> torch.optim.Adam:
    """Adam whose groups remember their peak lr as "base_lr" (the loop scales "lr" from it)."""
    opt = torch.optim.Adam(params, lr=lr, betas=betas)
    for group in opt.param_groups:
        group["base_lr"] = lr
    return opt


def clip_and_step(acc, opt, params, grad_clip: float) -> None:
    if grad_clip > 0:
        if acc is not None:
            acc.clip_grad_norm_(params, grad_clip)
        else:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def backward(acc, loss: torch.Tensor) -> None:
    if acc is not None:
        acc.backward(loss)
    else:
        loss.backward()


def check_model_fits(model_cfg, cfg: StageConfig) -> None:
    """The model config can train on cfg.data's images (sides a multiple of its size multiple)."""
    from ..pipeline import size_multiple

    m = size_multiple(model_cfg)
    if cfg.data.resolution % m:
        raise ConfigError(f"data.resolution {cfg.data.resolution} must be a multiple of {m} for this model")
    if model_cfg.decoder.kind != "kl":
        raise ConfigError("training needs a 'kl' (lite) decoder: the encoder mirrors it")
