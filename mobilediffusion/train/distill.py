"""Distillation into the MobileDiffusion layout (BK-SDM style, arXiv 2305.15798): a small student UNet learns from
an SD-family teacher's outputs and features.

    mobilediffusion train distill --teacher sd15.safetensors --model md-shapes --data my_images/ --out runs/student
    mobilediffusion train distill --teacher sd15.safetensors --model md-shapes --prompts prompts.txt --out runs/student

The student has the preset's architecture with the teacher's latent channels, context width and prediction type;
it shares the teacher's text encoder, encoder and decoder (frozen). Per step, for latents x0, their caption context c
and x_t ~ q(x_t | x0):
    task:     ||S(x_t, t, c) - target||^2                          (the denoising loss; needs real images)
    output:   ||S(x_t, t, c) - T(x_t, t, c)||^2
    feature:  sum over resolutions ||P_l(S_l) - T_l||^2 / levels   (the last block of each up level, matched by
              downsampling factor; P_l a 1x1 conv where the widths differ, trained with the student, then dropped)
Data-free (`--prompts FILE`, one prompt per line): the teacher samples latents for each prompt with its own default
sampler once (cached in OUT/teacher_latents.safetensors); the task loss is then off (those latents are the teacher's).

Output: OUT/model.safetensors (native: the student UNet (EMA) with the teacher's other parts and sampling defaults).
"""
from __future__ import annotations

import dataclasses
import hashlib
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..sampling import alphas_cumprod
from ..unet import set_gradient_checkpointing
from . import fsdp, loop
from .diffusion import MODEL_FILE, noised, target

TEACHER_LATENTS = "teacher_latents.safetensors"


class Taps:
    """Forward hooks on the last block of each up level. Inside `with taps.recording():` they keep the outputs
    (B, C_l, h_l, w_l) of the forwards run there, innermost level first (forward order); other forwards of the UNet
    (held-out evaluation, sampling) keep nothing. `take()` hands them over."""

    def __init__(self, unet):
        self.features: list[torch.Tensor] = []
        self.active = False
        self.factors = up_factors(unet.config)
        self.widths = [unet.config.block_out_channels[i] for i in reversed(range(len(unet.up)))]
        self.handles = [unet.up[u].blocks[-1].register_forward_hook(self._keep) for u in range(len(unet.up))]

    def _keep(self, module, args, output):
        if self.active:
            self.features.append(output)

    @contextmanager
    def recording(self):
        self.features, self.active = [], True
        try:
            yield self
        finally:
            self.active = False

    def take(self) -> list[torch.Tensor]:
        out, self.features = self.features, []
        return out


def up_factors(cfg) -> list[int]:
    """Downsampling factor of each up level's output (before its upsample), in forward order (innermost first)."""
    n = len(cfg.block_out_channels)
    return [2 ** sum(cfg.down_flags[:i]) for i in reversed(range(n))]


def feature_pairs(student_cfg, teacher_cfg) -> list[tuple[int, int]]:
    """(student tap, teacher tap) pairs of equal downsampling factor; a factor several teacher levels share takes the
    outermost of them (the last to run)."""
    s, t = up_factors(student_cfg), up_factors(teacher_cfg)
    by_factor = {f: j for j, f in enumerate(t)}  # later (outer) levels overwrite earlier ones
    return [(i, by_factor[f]) for i, f in enumerate(s) if f in by_factor]


def student_config(preset: str, teacher_cfg):
    """The preset's UNet with the teacher's latent channels, context width, prediction type and sample size."""
    from ..presets import get_preset

    u = get_preset(preset).unet
    t = teacher_cfg.unet
    return dataclasses.replace(u, in_channels=t.in_channels, out_channels=t.out_channels,
                               cross_attention_dim=t.cross_attention_dim, prediction_type=t.prediction_type,
                               sample_size=t.sample_size)


class DistillStage:
    def __init__(self, cfg, teacher_cfg, teacher, student, pool, acc=None, *, task: bool = True):
        self.cfg, self.teacher_cfg, self.acc, self.pool, self.task = cfg, teacher_cfg, acc, pool, task
        self.abar = alphas_cumprod(teacher_cfg.schedule)
        torch.manual_seed(cfg.seed)
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student.train()
        set_gradient_checkpointing(student, cfg.gradient_checkpointing)
        self.ema = loop.EMA(self.student, cfg.ema_decay)  # (before the taps: the copy carries no hooks)
        self.t_taps, self.s_taps = Taps(self.teacher), Taps(self.student)
        self.pairs = feature_pairs(student.config, teacher.config)
        if cfg.feature_weight and not self.pairs:
            raise ConfigError("the student and the teacher share no feature resolution; set feature_weight 0")
        self.proj = nn.ModuleList(
            nn.Conv2d(self.s_taps.widths[i], self.t_taps.widths[j], 1) for i, j in self.pairs)
        self.trained = nn.ModuleDict({"student": self.student, "projections": self.proj})
        self.sharded = fsdp.wanted(cfg, acc)
        if cfg.fsdp and not self.sharded:
            import sys

            print("fsdp: one process, nothing to shard; training unsharded (launch several processes with "
                  "`accelerate launch --num_processes N` to shard)", file=sys.stderr)
        if self.sharded:  # FSDP: every UNet and the projections sharded over the processes (train/fsdp.py)
            mesh = fsdp.device_mesh(acc)
            for unet in (self.student, self.ema.module, self.teacher):
                fsdp.shard_unet(unet.to(acc.device), mesh)
            fsdp.shard_each(self.proj.to(acc.device), mesh)
            if acc.is_main_process:
                print(fsdp.summary([self.student, self.proj, self.ema.module, self.teacher]))
            self.pool, self.abar = pool.to(acc.device), self.abar.to(acc.device)
        self.params = list(self.trained.parameters())  # (student, then projections: the optimizer's numbering)
        self.opt = loop.adam(self.params, cfg.lr)
        self.S, self.P, self.sync = self.student, self.proj, self.trained
        if acc is not None and not self.sharded:  # to acc.device; DDP-wraps the trained modules across processes
            self.S, self.P, self.opt = acc.prepare(self.student, self.proj, self.opt)
            self.teacher.to(acc.device)
            self.pool, self.abar, self.sync = pool.to(acc.device), self.abar.to(acc.device), self.S
        self.modules = {"student": self.student, "projections": self.proj, "ema_student": self.ema.module}
        self.optimizers = {"adam": self.opt}

    def full_state(self) -> tuple[dict, dict]:
        """(module states, optimizer states) for loop.stage_state: gathered from the shards under FSDP."""
        if not self.sharded:
            return loop.local_state(self)
        trained = fsdp.full_model_state(self.trained)
        modules = {n: {k[len(n) + 1:]: v for k, v in trained.items() if k.startswith(n + ".")}
                   for n in ("student", "projections")}
        modules["ema_student"] = fsdp.full_model_state(self.ema.module)
        return modules, {"adam": fsdp.full_optimizer_state(self.trained, self.opt)}

    def load_full_state(self, modules: dict, optimizers: dict) -> None:
        """Resume from a checkpoint's unsharded state (written with or without FSDP)."""
        if not self.sharded:
            return loop.load_local_state(self, modules, optimizers)
        fsdp.load_full_model_state(self.trained, {f"{n}.{k}": v for n in ("student", "projections")
                                                  for k, v in modules[n].items()})
        fsdp.load_full_model_state(self.ema.module, modules["ema_student"])
        fsdp.load_full_optimizer_state(self.trained, self.opt, optimizers["adam"])

    def final_student(self, s_cfg):
        """The EMA student as a plain UNet on the main process (gathered from the shards under FSDP; every process
        calls this), None elsewhere."""
        if not self.sharded:
            return self.ema.module
        state = fsdp.full_model_state(self.ema.module)
        if not self.acc.is_main_process:
            return None
        from ..unet import UNet

        student = UNet(s_cfg)
        student.load_state_dict(state)
        return student.eval()

    def step(self, step: int, index: torch.Tensor, gen: torch.Generator) -> dict[str, float]:
        cfg, B = self.cfg, len(index)
        mine = loop.Rows(self.acc, B)  # this process's rows; every draw is made for the whole batch
        x0, context = self.pool.take(mine(index))
        dev = x0.device
        t = mine(torch.randint(len(self.abar), (B,), generator=gen)).to(dev)
        noise = mine(torch.randn(B, *x0.shape[1:], generator=gen)).to(dev)
        x_t = noised(x0, t, noise, self.abar)
        want = target(x0, t, noise, self.abar, self.teacher_cfg.unet.prediction_type)
        k = cfg.grad_accum
        if self.sharded:  # FSDP's gathers are collectives: every process runs as many passes (none of them empty)
            k = max(1, min(k, B // self.acc.num_processes))
        parts, sums = loop.passes(len(x0), k), {}
        for k, (rows, share) in enumerate(parts):  # grad_accum passes over this process's rows
            with loop.no_sync(self.acc, self.sync, k == len(parts) - 1):
                with loop.autocast(cfg, dev):
                    with torch.no_grad(), self.t_taps.recording():
                        t_out = self.teacher(x_t[rows], t[rows], context[rows]).float()
                    t_feats = self.t_taps.take()
                    with self.s_taps.recording():
                        s_out = self.S(x_t[rows], t[rows], context[rows]).float()
                    s_feats = self.s_taps.take()
                    feats = [p(s_feats[i]).float() for p, (i, _) in zip(self.P, self.pairs)]
                terms = {"output": (s_out - t_out).pow(2).mean()}
                terms["feature"] = sum(F.mse_loss(f, t_feats[j].float()) for f, (_, j) in zip(
                    feats, self.pairs)) / max(1, len(self.pairs))
                loss = cfg.output_weight * terms["output"] + cfg.feature_weight * terms["feature"]
                if self.task and cfg.task_weight:
                    terms["task"] = (s_out - want[rows]).pow(2).mean()
                    loss = loss + cfg.task_weight * terms["task"]
                loop.backward(self.acc, loss * share * mine.weight)
            for name, v in {"loss": loss, **terms}.items():
                sums[name] = sums.get(name, 0.0) + (v.item() if torch.is_tensor(v) else float(v)) * share
        loop.clip_and_step(None if self.sharded else self.acc, self.opt, self.params, cfg.grad_clip)
        self.ema.update(self.student, step)
        return sums


def read_prompts(path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--prompts {path} does not exist; give a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"--prompts {path} holds no prompt; write one prompt per line")
    return prompts


@torch.no_grad()
def teacher_pool(teacher_path, prompts: list[str], out_dir, *, per_prompt: int, seed: int, acc=None, progress=True):
    """(MemoryPool of latents the teacher samples for each prompt (per_prompt seeds each), run key); cached in
    out_dir/teacher_latents.safetensors, keyed by the teacher, the prompts and the seeds."""
    from safetensors.torch import load_file, save_file

    from ..atomic import atomic_file
    from ..pipeline import load_pipeline
    from .pools import MemoryPool
    from .prepare import init_key

    key = hashlib.sha256("\0".join([init_key(teacher_path), str(per_prompt), str(seed), *prompts]).encode()).hexdigest()
    path = Path(out_dir) / TEACHER_LATENTS
    pipe = load_pipeline(teacher_path)
    cached = None
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                cached = load_file(str(path))
    if cached is None and (acc is None or acc.is_main_process):
        from tqdm import tqdm

        c = pipe.config  # the teacher's own sampler, steps, guidance and resolution
        uncond = pipe.encode_prompt([""]) if c.default_guidance > 1 else None
        latents, contexts = [], []
        for i, prompt in enumerate(tqdm(prompts, desc="teacher samples", unit="prompt", disable=not progress)):
            ctx = pipe.encode_prompt([prompt])
            for k in range(per_prompt):
                latents.append(pipe.sample_latents(
                    ctx, uncond, steps=c.default_steps, guidance=c.default_guidance, seed=seed + i * per_prompt + k,
                    height=c.resolution, width=c.resolution, sampler=c.default_sampler)[0])
                contexts.append(ctx[0])
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            save_file({"latents": torch.stack(latents).contiguous(), "contexts": torch.stack(contexts).contiguous()},
                      tmp, metadata={"key": key})
    if acc is not None:
        acc.wait_for_everyone()
    cached = cached or load_file(str(path))
    return MemoryPool(cached["latents"].float(), list(cached["contexts"].float())), key


def train_distill(cfg, teacher_path, out_dir, *, data=None, prompts=None, resume=False, stop_after=None,
                  progress=True, acc=None, heldout=None) -> Path | None:
    """Distil the teacher checkpoint into cfg.model's layout on `data` (images) or `prompts` (a text file, data-free);
    returns out_dir/model.safetensors (None when stopped early or on a non-main process)."""
    from ..loading import has_encoder, load_decoder, load_encoder, load_model_config, load_text_encoder
    from ..loading import load_trainable_unet
    from ..unet import UNet
    from ..weights.native import save_native
    from .batches import BucketBatches
    from .finetune import check_memory
    from .heldout import heldout_logger
    from .prepare import open_data

    if (data is None) == (prompts is None):
        raise ConfigError("distillation needs either --data IMAGES or --prompts FILE (data-free)")
    torch.set_num_threads(cfg.threads)
    teacher_cfg = load_model_config(teacher_path)  # 1. the teacher, the student and the data, before training
    s_cfg = student_config(cfg.model, teacher_cfg)
    if data is not None:
        pool, run_key = open_data(data, teacher_path, cfg, out_dir, acc=acc, progress=progress)
        order = pool.order
    else:
        pool, run_key = teacher_pool(teacher_path, read_prompts(prompts), out_dir, per_prompt=cfg.samples_per_prompt,
                                     seed=cfg.seed, acc=acc, progress=progress)
        order = BucketBatches([len(pool.latents)], cfg.batch_size, cfg.seed)
    teacher = load_trainable_unet(teacher_path)
    torch.manual_seed(cfg.seed)
    student = UNet(s_cfg)
    stage = DistillStage(cfg, teacher_cfg, teacher, student, pool, acc, task=data is not None)  # 2. train
    check_memory(cfg, s_cfg, pool, "distill", ema=True, teacher_cfg=teacher_cfg.unet,
                 shards=acc.num_processes if stage.sharded else 1)
    on_step = None
    if heldout is not None:  # the student's held-out denoising losses at every checkpoint
        held, _ = open_data(heldout, teacher_path, cfg, Path(out_dir) / "heldout", acc=acc, progress=progress)
        on_step = heldout_logger(student, held, stage.abar.cpu(), s_cfg.prediction_type, out_dir,
                                 cfg.checkpoint_every, acc, everyone=stage.sharded)
    rows = loop.run(stage, cfg, out_dir, pool_size=0, acc=acc, resume=resume, stop_after=stop_after, progress=progress,
                    batches=lambda step, gen: order.batch(step), run_key=run_key, on_step=on_step)
    if not rows or rows[-1]["step"] != cfg.steps:
        return None
    final = stage.final_student(s_cfg)  # (gathers the shards under FSDP: every process)
    if acc is not None and not acc.is_main_process:
        return None
    model_cfg = dataclasses.replace(teacher_cfg, unet=s_cfg, family="mobilediffusion")  # 3. the student's file
    encoder = load_encoder(teacher_path) if has_encoder(teacher_path) else None
    return save_native(Path(out_dir) / MODEL_FILE, model_cfg, final, load_text_encoder(teacher_path),
                       load_decoder(teacher_path), encoder)


__all__ = ["train_distill", "DistillStage", "Taps", "feature_pairs", "student_config", "up_factors"]
