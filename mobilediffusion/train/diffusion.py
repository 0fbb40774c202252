"""Stage (b): the diffusion UNet (MobileDiffusion layout, scaled down) and its CLIP-architecture text encoder.

Both train from scratch on latents of the stage (a) autoencoder (posterior means, scaled to unit
variance) and captions tokenized by the packaged CLIP tokenizer. Standard DDPM training with the
preset's noise schedule and prediction type (v-prediction for md-shapes, Salimans & Ho 2022):
t ~ U{0..T-1}, x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, MSE between the UNet output and its target.
A share of captions is replaced by the empty prompt (classifier-free guidance). The EMA weights
are saved.

Output: out_dir/model.safetensors, a native MobileDiffusion file (`load_pipeline` reads it) that
also carries the encoder.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..config import ModelConfig
from ..presets import get_preset
from ..sampling import alphas_cumprod
from ..text_encoder import TextEncoder
from ..unet import UNet
from . import loop
from .autoencoder import load_autoencoder
from .config import DiffusionConfig

MODEL_FILE = "model.safetensors"


def noised(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """q(x_t | x0): sqrt(a_t) x0 + sqrt(1 - a_t) noise, for x0 (B, C, h, w) and timesteps t (B,)."""
    a = abar[t].to(x0.dtype)[:, None, None, None]  # (B, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def target(x0, t, noise, abar, prediction_type: str) -> torch.Tensor:
    """The training target of the UNet output: eps, v = sqrt(a) eps - sqrt(1 - a) x0, or x0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    a = abar[t].to(x0.dtype)[:, None, None, None]
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def predicted_x0(x_t, t, output, abar, prediction_type: str) -> torch.Tensor:
    """x0 read from the UNet output at x_t (inverse of `target`)."""
    a = abar[t].to(x_t.dtype)[:, None, None, None]
    if prediction_type == "epsilon":
        return (x_t - (1 - a).sqrt() * output) / a.sqrt()
    if prediction_type == "sample":
        return output
    return a.sqrt() * x_t - (1 - a).sqrt() * output


@torch.no_grad()
def encode_pool(encoder, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Sampler-space latents (posterior means, scaled) of images (N, 3, H, W) in [0, 1]."""
    return torch.cat([encoder(images[i:i + batch]) for i in range(0, len(images), batch)])


class DiffusionStage:
    def __init__(self, cfg: DiffusionConfig, model_cfg: ModelConfig, latents, ids, empty_ids, acc=None):
        self.cfg, self.model_cfg, self.acc = cfg, model_cfg, acc
        self.latents, self.ids, self.empty_ids = latents, ids, empty_ids
        self.abar = alphas_cumprod(model_cfg.schedule)
        torch.manual_seed(cfg.seed)
        self.unet = UNet(model_cfg.unet)
        self.text = TextEncoder(model_cfg.text)
        self.params = [*self.unet.parameters(), *self.text.parameters()]
        self.opt = torch.optim.Adam([
            {"params": list(self.unet.parameters()), "lr": cfg.lr, "base_lr": cfg.lr},
            {"params": list(self.text.parameters()), "lr": cfg.lr * cfg.text_lr_ratio,
             "base_lr": cfg.lr * cfg.text_lr_ratio},
        ])
        self.train_unet, self.train_text = self.unet, self.text
        if acc is not None:  # moves the modules to acc.device; DDP-wraps them across processes
            self.train_unet, self.train_text, self.opt = acc.prepare(self.unet, self.text, self.opt)
            self.latents, self.ids, self.abar = latents.to(acc.device), ids.to(acc.device), self.abar.to(acc.device)
            self.empty_ids = empty_ids.to(acc.device)
        self.ema_unet, self.ema_text = loop.EMA(self.unet, cfg.ema_decay), loop.EMA(self.text, cfg.ema_decay)
        self.modules = {"unet": self.unet, "text": self.text, "ema_unet": self.ema_unet.module,
                        "ema_text": self.ema_text.module}
        self.optimizers = {"adam": self.opt}

    def step(self, step: int, index: torch.Tensor, gen: torch.Generator) -> dict[str, float]:
        cfg, B = self.cfg, len(index)
        mine = loop.Rows(self.acc, B)  # this process's rows; every draw is made for the whole batch
        dev = self.latents.device
        rows = mine(index).to(dev)
        x0, ids = self.latents[rows], self.ids[rows].clone()
        # 1. caption dropout, timesteps and noise, all from this step's generator (on the CPU: any device agrees)
        drop = mine(torch.rand(B, generator=gen) < cfg.caption_dropout).to(dev)
        ids[drop] = self.empty_ids
        t = mine(torch.randint(len(self.abar), (B,), generator=gen)).to(dev)
        noise = mine(torch.randn(B, *x0.shape[1:], generator=gen)).to(dev)
        # 2. the denoising loss
        context = self.train_text(ids)
        out = self.train_unet(noised(x0, t, noise, self.abar), t, context)
        loss = (out - target(x0, t, noise, self.abar, self.model_cfg.prediction_type)).pow(2).mean()
        loop.backward(self.acc, loss * mine.weight)
        loop.clip_and_step(self.acc, self.opt, self.params, cfg.grad_clip)
        self.ema_unet.update(self.unet, step)
        self.ema_text.update(self.text, step)
        return {"loss": loss.item()}


def prepare_data(cfg, encoder, tokenizer_owner: TextEncoder, data=None):
    """(latents (N, C, h, w), ids (N, 77), empty-prompt ids (77,), run key) of the training pool (the rendered
    scenes, or `data`: loop.training_pool)."""
    images, captions, key = loop.training_pool(cfg, data)
    latents = encode_pool(encoder, images)
    del images
    ids = tokenizer_owner.tokenize(captions)
    return latents, ids, tokenizer_owner.tokenize([""])[0], key


def train_diffusion(cfg: DiffusionConfig, init, out_dir, *, model_cfg: ModelConfig | None = None, resume=False,
                    stop_after=None, progress=True, acc=None, data=None) -> Path | None:
    """Train stage (b) on the autoencoder file `init`, on the rendered scenes or `data`; returns
    out_dir/model.safetensors (None if stopped early)."""
    from ..weights.native import save_native

    encoder, decoder = load_autoencoder(init)
    base = model_cfg or get_preset(cfg.model)
    model_cfg = dataclasses.replace(base, decoder=decoder.config, latent_scale=decoder.config.scaling_factor,
                                    latent_shift=decoder.config.shift_factor)
    loop.check_model_fits(model_cfg, cfg)
    torch.set_num_threads(cfg.threads)
    latents, ids, empty, key = prepare_data(cfg, encoder, TextEncoder(model_cfg.text), data)
    stage = DiffusionStage(cfg, model_cfg, latents, ids, empty, acc)
    rows = loop.run(stage, cfg, out_dir, pool_size=len(latents), acc=acc, resume=resume, stop_after=stop_after,
                    progress=progress, run_key=key)
    if not rows or rows[-1]["step"] != cfg.steps or (acc is not None and not acc.is_main_process):
        return None
    return save_native(Path(out_dir) / MODEL_FILE, model_cfg, stage.ema_unet.module, stage.ema_text.module,
                       decoder, encoder)
