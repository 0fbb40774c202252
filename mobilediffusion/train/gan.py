"""Stage (c): DiffusionGAN fine-tune to one step (UFOGen, arXiv 2311.09257; MobileDiffusion sec. 3.4).

Generator G and discriminator D both start from the pre-trained UNet of stage (b); the text
encoder, decoder and encoder stay frozen. Per step, for latents x0 and their caption context c:
  1. t = T - 1 for a share `last_step_prob` of the batch (where one-step sampling starts), else
     t ~ U{0..T-1}; x_t ~ q(x_t | x0); G denoises in one step: x0_hat = x0 read from G(x_t, t, c).
  2. D's level s ~ U{0..d_max_timestep}; x0 and x0_hat are noised to s with the same noise:
     x_s ~ q(x_s | x0), x_s' ~ q(x_s | x0_hat) (UFOGen's x_{t-1} from q(x_{t-1} | x0_hat)).
  3. D(x_s, s, c) -> logit: non-saturating loss softplus(-D(x_s)) + softplus(D(x_s')).
  4. G: ||x0_hat - x0||^2 (the reconstruction term of diffusion training) + adv_weight * softplus(-D(x_s')).
D is the UNet's down path and bottleneck (the up path is dropped), mean-pooled bottleneck
features and a linear head. The EMA of G is saved.

Output: out_dir/model.safetensors, a native file with the fine-tuned UNet (one-step sampling).
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..sampling import alphas_cumprod
from ..unet import UNet, set_gradient_checkpointing
from . import loop
from .config import GanConfig
from .diffusion import MODEL_FILE, encode_pool, noised, predicted_x0


class _Bottleneck(Exception):
    """Carries the bottleneck features out of the UNet forward (which then stops there)."""

    def __init__(self, features):
        super().__init__()
        self.features = features


class Discriminator(nn.Module):
    """D(x_s (B, C, h, w), s (B,), context (B, T, D)) -> logits (B,).

    A copy of a pre-trained UNet cut after its bottleneck (mid block, or the innermost down level
    when there is none): a forward hook there stops the UNet and hands over the features
    (B, C_mid, h', w'), which are normalised, mean-pooled and mapped to one logit by a linear head.
    """

    def __init__(self, unet: UNet):
        super().__init__()
        self.unet = copy.deepcopy(unet)
        # the up path and output layers never run: drop them (no dead parameters)
        self.unet.up, self.unet.norm_out, self.unet.conv_out = nn.ModuleList(), nn.Identity(), nn.Identity()
        c = unet.config.block_out_channels[-1]
        self.norm = nn.GroupNorm(unet.config.norm_num_groups, c)
        self.head = nn.Linear(c, 1)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        site = self.unet.mid if self.unet.mid is not None else self.unet.down[-1]
        site.register_forward_hook(self._stop)

    @staticmethod
    def _stop(module, args, output):
        raise _Bottleneck(output)

    def forward(self, x, s, context):
        try:
            self.unet(x, s, context)
        except _Bottleneck as cut:
            h = cut.features  # (B, C, h', w')
        else:  # the hook always fires; reaching here means the UNet changed shape
            raise RuntimeError("the discriminator's bottleneck hook did not fire")
        h = F.silu(self.norm(h)).mean(dim=(2, 3))  # (B, C)
        return self.head(h).squeeze(1)  # (B,)


class GanStage:
    """`pool.take(rows) -> (x0, context)` gives the latents and text contexts of the given item rows (loop.TensorPool,
    pools.BucketPool). `lora`: a LoraNetwork's settings (rank, alpha, targets): the generator is the frozen UNet
    plus that LoRA (the discriminator still starts from the plain UNet); None trains the whole UNet."""

    def __init__(self, cfg: GanConfig, model_cfg, unet: UNet, pool, acc=None, *, lora: dict | None = None):
        from .lora import LoraNetwork

        self.cfg, self.model_cfg, self.acc, self.pool = cfg, model_cfg, acc, pool
        self.abar = alphas_cumprod(model_cfg.schedule)
        torch.manual_seed(cfg.seed)
        self.gen_unet = unet.train().requires_grad_(True)
        self.disc = Discriminator(unet)  # from the plain UNet, before any LoRA is attached
        for net in (self.gen_unet, self.disc.unet):
            set_gradient_checkpointing(net, getattr(cfg, "gradient_checkpointing", False))
        self.lora = LoraNetwork(unet, **lora) if lora else None
        trained = self.lora if self.lora is not None else self.gen_unet
        self.g_params = [p for p in trained.parameters() if p.requires_grad]
        # GAN practice: little momentum (beta1 = 0) keeps the two-player updates stable
        self.g_opt = loop.adam(self.g_params, cfg.lr, betas=(0.0, 0.99))
        self.d_opt = loop.adam(self.disc.parameters(), cfg.d_lr, betas=(0.0, 0.99))
        self.G, self.D = self.gen_unet, self.disc
        if acc is not None:  # moves the modules to acc.device; DDP-wraps them across processes
            self.G, self.D, self.g_opt, self.d_opt = acc.prepare(self.gen_unet, self.disc, self.g_opt, self.d_opt)
            self.pool, self.abar = pool.to(acc.device), self.abar.to(acc.device)
        self.ema = loop.EMA(trained, cfg.ema_decay)
        self.trained = trained
        self.modules = {"generator": trained, "discriminator": self.disc, "ema_generator": self.ema.module}
        self.optimizers = {"generator": self.g_opt, "discriminator": self.d_opt}

    def step(self, step: int, index: torch.Tensor, gen: torch.Generator) -> dict[str, float]:
        cfg, B, T = self.cfg, len(index), len(self.abar)
        mine = loop.Rows(self.acc, B)  # this process's rows; every draw is made for the whole batch
        x0, context = self.pool.take(mine(index))
        dev = x0.device
        shape = (B, *x0.shape[1:])
        # 1. every draw on the CPU generator, then moved: the same run on any device
        last = torch.rand(B, generator=gen) < cfg.last_step_prob
        t = mine(torch.where(last, T - 1, torch.randint(T, (B,), generator=gen))).to(dev)
        x_t = noised(x0, t, mine(torch.randn(shape, generator=gen)).to(dev), self.abar)
        s = mine(torch.randint(cfg.d_max_timestep + 1, (B,), generator=gen)).to(dev)  # D's noise level
        noise = mine(torch.randn(shape, generator=gen)).to(dev)  # real and generated noised with the same noise
        parts = loop.passes(len(x0), getattr(cfg, "grad_accum", 1))
        kept = None  # one pass: G's output (with its graph) serves D's update and G's; several: recomputed

        def generate(rows):  # G denoises in one step: x0_hat read from G(x_t, t, c)
            out = self.G(x_t[rows], t[rows], context[rows]).float()
            return predicted_x0(x_t[rows], t[rows], out, self.abar, self.model_cfg.prediction_type)

        # 2. discriminator update: non-saturating loss on real and generated latents at level s
        d_total = 0.0
        for k, (rows, share) in enumerate(parts):
            with loop.no_sync(self.acc, self.D, k == len(parts) - 1):
                with loop.autocast(cfg, dev):
                    if len(parts) == 1:
                        kept = x0_hat = generate(rows)
                    else:
                        with torch.no_grad():
                            x0_hat = generate(rows)
                    real, fake = noised(x0[rows], s[rows], noise[rows], self.abar), noised(x0_hat, s[rows],
                                                                                            noise[rows], self.abar)
                    d_loss = F.softplus(-self.D(real, s[rows], context[rows]).float()).mean() + F.softplus(
                        self.D(fake.detach(), s[rows], context[rows]).float()).mean()
                loop.backward(self.acc, d_loss * share * mine.weight)
            d_total += d_loss.item() * share
        loop.clip_and_step(self.acc, self.d_opt, list(self.disc.parameters()), cfg.grad_clip)
        # 3. generator update: reconstruction + adversarial (D frozen for this pass)
        self.disc.requires_grad_(False)
        sums = {"g_loss": 0.0, "recon": 0.0, "adv": 0.0, "d_loss": d_total}
        for k, (rows, share) in enumerate(parts):
            with loop.no_sync(self.acc, self.G, k == len(parts) - 1):
                with loop.autocast(cfg, dev):
                    x0_hat = kept if kept is not None else generate(rows)
                    fake = noised(x0_hat, s[rows], noise[rows], self.abar)
                    adv = F.softplus(-self.D(fake, s[rows], context[rows]).float()).mean()
                recon = (x0_hat - x0[rows]).pow(2).mean()
                g_loss = recon + cfg.adv_weight * adv
                loop.backward(self.acc, g_loss * share * mine.weight)
            for name, v in (("g_loss", g_loss), ("recon", recon), ("adv", adv)):
                sums[name] += v.item() * share
        loop.clip_and_step(self.acc, self.g_opt, self.g_params, cfg.grad_clip)
        self.disc.requires_grad_(True)
        self.ema.update(self.trained, step)
        return sums


@torch.no_grad()
def text_contexts(text_encoder, ids: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([text_encoder.encode(ids[i:i + batch]) for i in range(0, len(ids), batch)])


def train_gan(cfg: GanConfig, init, out_dir, *, resume=False, stop_after=None, progress=True, acc=None,
              data=None) -> Path | None:
    """Fine-tune the native model file `init` (stage b) to one step; returns out_dir/model.safetensors."""
    from ..loading import load_encoder
    from ..loading import load_decoder, load_model_config, load_text_encoder
    from ..weights.keymap import load_state
    from ..weights.native import read_native_component, save_native

    torch.set_num_threads(cfg.threads)
    model_cfg = load_model_config(init)
    loop.check_model_fits(model_cfg, cfg)
    unet = UNet(model_cfg.unet)  # a plain module to train (load_unet gives the inference fast path)
    load_state(unet, read_native_component(init, "unet"), what="UNet")
    text, decoder, encoder = load_text_encoder(init), load_decoder(init), load_encoder(init)
    text.requires_grad_(False)
    images, captions, key = loop.training_pool(cfg, data)
    latents = encode_pool(encoder, images)
    del images
    contexts = text_contexts(text, text.tokenize(captions))
    stage = GanStage(cfg, model_cfg, unet, loop.TensorPool(latents, contexts), acc)
    rows = loop.run(stage, cfg, out_dir, pool_size=len(latents), acc=acc, resume=resume, stop_after=stop_after,
                    progress=progress, run_key=key)
    if not rows or rows[-1]["step"] != cfg.steps or (acc is not None and not acc.is_main_process):
        return None
    return save_native(Path(out_dir) / MODEL_FILE, model_cfg, stage.ema.module, text, decoder, encoder)
