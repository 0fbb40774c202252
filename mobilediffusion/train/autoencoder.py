"""Stage (a): the lite autoencoder, an Encoder (mobilediffusion.encoder) and the lite Decoder of the preset.

Loss on images in [-1, 1]: L1 + mse_weight * MSE between the image and the decoding of a latent
sampled from q(z | x), per pixel weighted up where the object is (`pixel_weights`: the scenes are
~95% flat background), plus kl_weight * KL(q(z | x) || N(0, I)). The decoder is trained on its raw
output (before the [0, 1] clamp), so saturated pixels still get gradients. After training, the
latents' scaling factor is set to 1 / std of the posterior means over the pool (SD's recipe), so
the diffusion stage sees unit-variance latents; it is stored in the decoder config of the output.

Output: out_dir/autoencoder.safetensors with `encoder.*` and `decoder.*` tensors and the scaled
DecoderConfig as JSON in the metadata (AUTOENCODER_CONFIG_KEY).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..atomic import atomic_file
from ..config import DecoderConfig, ModelConfig
from ..decoder import Decoder
from ..encoder import Encoder, lite_encoder_config
from ..errors import CheckpointError
from ..presets import get_preset
from . import loop
from .config import AutoencoderConfig

AUTOENCODER_FILE = "autoencoder.safetensors"
AUTOENCODER_CONFIG_KEY = "mobilediffusion.autoencoder"


class Autoencoder(torch.nn.Module):
    """Encoder + decoder as one module: forward(x (B, 3, H, W) in [0, 1], noise (B, C, h, w)) -> (raw decoder output
    (B, 3, H, W) about [-1, 1], posterior mean, logvar). One forward through it is what DDP needs to average the
    gradients of both."""

    def __init__(self, encoder: Encoder, decoder: Decoder):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, x, noise):
        mean, logvar = self.encoder.moments(x)
        return self.decoder.layers(mean + torch.exp(0.5 * logvar) * noise.to(mean)), mean, logvar


class AutoencoderStage:
    def __init__(self, cfg: AutoencoderConfig, model_cfg: ModelConfig, images: torch.Tensor, acc=None):
        self.cfg, self.acc, self.images = cfg, acc, images
        torch.manual_seed(cfg.seed)
        self.encoder, self.decoder = Encoder(lite_encoder_config(model_cfg.decoder)), Decoder(model_cfg.decoder)
        self.params = [*self.encoder.parameters(), *self.decoder.parameters()]
        self.opt = loop.adam(self.params, cfg.lr)
        self.modules = {"encoder": self.encoder, "decoder": self.decoder}
        self.optimizers = {"adam": self.opt}
        self.model = Autoencoder(self.encoder, self.decoder)
        if acc is not None:  # moves the modules to acc.device; DDP-wraps them across processes
            self.model, self.opt = acc.prepare(self.model, self.opt)
            self.images = images.to(acc.device)

    def step(self, step: int, index: torch.Tensor, gen: torch.Generator) -> dict[str, float]:
        mine = loop.Rows(self.acc, len(index))
        x = self.images[mine(index).to(self.images.device)]  # (b, 3, H, W) in [0, 1]: this process's rows
        loss, parts = autoencoder_loss(self.model, x, gen, self.cfg, mine, len(index))
        loop.backward(self.acc, loss * mine.weight)
        loop.clip_and_step(self.acc, self.opt, self.params, self.cfg.grad_clip)
        return parts


def autoencoder_loss(model, x, gen, cfg: AutoencoderConfig, mine=None, n: int | None = None):
    """(loss, {"loss", "l1", "mse", "kl"}) for images x (b, 3, H, W) in [0, 1] through `model` (an Autoencoder, or
    its DDP wrapper): this process's rows `mine` (loop.Rows) of a batch of n (the noise is drawn for all n; default:
    x is the whole batch)."""
    core = model.module if hasattr(model, "module") else model
    h, w = x.shape[-2] // core.decoder.upscale, x.shape[-1] // core.decoder.upscale
    noise = torch.randn(n or len(x), core.decoder.config.latent_channels, h, w, generator=gen)  # on the CPU
    y, mean, logvar = model(x, noise if mine is None else mine(noise))
    target = x * 2 - 1
    w = pixel_weights(target, cfg.foreground_weight)  # (B, 1, H, W), mean 1 per image
    l1, mse = (w * (y - target).abs()).mean(), (w * (y - target).pow(2)).mean()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
    loss = l1 + cfg.mse_weight * mse + cfg.kl_weight * kl
    return loss, {"loss": loss.item(), "l1": l1.item(), "mse": mse.item(), "kl": kl.item()}


@torch.no_grad()
def pixel_weights(target: torch.Tensor, foreground_weight: float, threshold: float = 0.1) -> torch.Tensor:
    """Loss weights (B, 1, H, W) for images (B, 3, H, W) in [-1, 1]: 1 + foreground_weight on pixels whose
    colour differs (max over channels > threshold) from the image's per-channel median, normalised to mean 1."""
    median = target.flatten(2).median(dim=2).values[:, :, None, None]  # (B, 3, 1, 1): the background colour
    fg = ((target - median).abs().amax(dim=1, keepdim=True) > threshold).to(target.dtype)  # (B, 1, H, W)
    w = 1 + foreground_weight * fg
    return w / w.mean(dim=(2, 3), keepdim=True)


@torch.no_grad()
def latent_scale(encoder: Encoder, images: torch.Tensor, batch: int = 256) -> float:
    """1 / std of the raw posterior means over `images` (N, 3, H, W) in [0, 1]."""
    means = torch.cat([encoder.moments(images[i:i + batch])[0] for i in range(0, len(images), batch)])
    return float(1.0 / means.float().std())


def train_autoencoder(cfg: AutoencoderConfig, out_dir, *, model_cfg: ModelConfig | None = None, resume=False,
                      stop_after=None, progress=True, acc=None, data=None) -> Path | None:
    """Train stage (a) on the rendered scenes or on `data` (an image folder, metadata file or shards: see
    loop.training_pool); returns the path of autoencoder.safetensors (None if stopped early)."""
    model_cfg = model_cfg or get_preset(cfg.model)
    loop.check_model_fits(model_cfg, cfg)
    torch.set_num_threads(cfg.threads)
    images, _, key = loop.training_pool(cfg, data)
    stage = AutoencoderStage(cfg, model_cfg, images, acc)
    rows = loop.run(stage, cfg, out_dir, pool_size=len(images), acc=acc, resume=resume, stop_after=stop_after,
                    progress=progress, run_key=key)
    if not _finished(out_dir, cfg, rows):
        return None
    scale = latent_scale(stage.encoder.eval(), stage.images[:4096])  # (a sample of the pool is enough)
    if acc is not None and not acc.is_main_process:
        return None
    return save_autoencoder(Path(out_dir) / AUTOENCODER_FILE, stage.encoder, stage.decoder, scale)


def _finished(out_dir, cfg, rows) -> bool:
    return bool(rows) and rows[-1]["step"] == cfg.steps


def save_autoencoder(path: Path, encoder: Encoder, decoder: Decoder, scaling_factor: float) -> Path:
    """Encoder + decoder weights and the DecoderConfig with `scaling_factor` (atomic write)."""
    from safetensors.torch import save_file

    dec_cfg = dataclasses.replace(decoder.config, scaling_factor=scaling_factor)
    tensors = {f"encoder.{k}": v.contiguous().cpu() for k, v in encoder.state_dict().items()}
    tensors.update({f"decoder.{k}": v.contiguous().cpu() for k, v in decoder.state_dict().items()})
    meta = {AUTOENCODER_CONFIG_KEY: json.dumps(dataclasses.asdict(dec_cfg))}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return path


def load_autoencoder(path) -> tuple[Encoder, Decoder]:
    """(encoder, decoder) from a file written by `save_autoencoder`, both with the scaled config."""
    from ..config import _from_dict
    from ..weights.io import read_metadata, read_tensors
    from ..weights.keymap import load_state

    meta = read_metadata(path)
    if AUTOENCODER_CONFIG_KEY not in meta:
        raise CheckpointError(f"{path} is not an autoencoder of `mobilediffusion train autoencoder` "
                              f"(no {AUTOENCODER_CONFIG_KEY} metadata)")
    cfg = _from_dict(DecoderConfig, json.loads(meta[AUTOENCODER_CONFIG_KEY]))
    encoder, decoder = Encoder(lite_encoder_config(cfg)), Decoder(cfg)
    for prefix, module in (("encoder.", encoder), ("decoder.", decoder)):
        state = {k[len(prefix):]: v for k, v in read_tensors(path, prefix).items()}
        load_state(module, state, what=prefix[:-1])
    return encoder.eval(), decoder.eval()
