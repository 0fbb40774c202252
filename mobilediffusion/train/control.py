"""Stage (d): a control plugin for a trained one-step model: a small T2I-style adapter (MediaPipe's diffusion
plugins) that reads an edge map or scribble of the scene once and steers where the one-step UNet puts the objects.

The model stays frozen; only the adapter trains. The hint is the edge map of the rendered scene (this package's
Canny, as ComfyUI's Canny node draws it), sometimes thickened so that drawn scribbles (thicker strokes) read the
same. Half of the captions drop their position words, so the hint alone must place the object. The loss is the
one-step generator's own: the reconstruction of x0 from x_t at t = T - 1 (where one-step sampling starts; other
timesteps sometimes, so multi-step sampling follows the hint too).

    plugin = train_control(cfg, "default.safetensors", "runs/control")     # out/control.safetensors
    iou = control_iou(pipe, adapter, SceneConfig(), n=128)                  # object-mask IoU, with and without

Output: a native control file (`control.load.save_native_control`), which `load_control` reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..control.adapter import Adapter, AdapterConfig, adapter_skips
from ..control.preprocess import canny
from ..sampling import alphas_cumprod
from ..unet import UNet
from . import loop
from .config import ControlConfig
from .data import POSITIONS, Scene, SceneConfig, SyntheticScenes
from .diffusion import encode_pool, noised, predicted_x0
from .evaluate import object_mask
from .gan import text_contexts

CONTROL_FILE = "control.safetensors"


def unplaced_caption(scene: Scene) -> str:
    """The scene's caption without where the object is: 'a red circle on a white background'."""
    return f"a {scene.colour} {scene.shape} on a {scene.background} background"


def edge_hint(image: np.ndarray, thickness: int = 0) -> np.ndarray:
    """uint8 (H, W, 3) -> the edge map (H, W) float32 in {0, 1}, each stroke widened by `thickness` pixels."""
    return thicken(canny(image), thickness)


def thicken(edges: np.ndarray, thickness: int) -> np.ndarray:
    """An edge map (H, W) in {0, 1} with each stroke widened by `thickness` pixels on every side."""
    if not thickness:
        return edges.astype(np.float32)
    return F.max_pool2d(torch.from_numpy(edges.astype(np.float32))[None, None], 2 * thickness + 1, 1,
                        thickness)[0, 0].numpy()


def adapter_config(model_cfg) -> AdapterConfig:
    """The plugin's layout for a model: one level per UNet level, one 3x3 resnet each, RGB hints at image size."""
    return AdapterConfig("full", 3, tuple(model_cfg.unet.block_out_channels), 1, 3, False, model_cfg.decoder.upscale)


@dataclass
class Pool:
    latents: torch.Tensor  # (N, C, h, w) sampler space
    contexts: torch.Tensor  # (2, N, T, D): captions with and without their position words
    hints: torch.Tensor  # (2, N, H, W) uint8 in {0, 1}: the edge map, thin and thickened (1 byte a pixel: 128 MB
    #                      for 4096 scenes at 128 px, where float RGB would take 1.6 GB)


def build_pool(cfg: ControlConfig, encoder, text) -> Pool:
    scenes = SyntheticScenes(cfg.data, "train", length=cfg.pool_size)
    images, placed, unplaced, thin, thick = [], [], [], [], []
    for i in range(len(scenes)):
        image, caption, scene = scenes[i]
        images.append(image)
        placed.append(caption)
        unplaced.append(unplaced_caption(scene))
        thin.append(edge_hint(image))
        thick.append(thicken(thin[-1], 1))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, H, W)
    contexts = torch.stack([text_contexts(text, text.tokenize(c)) for c in (placed, unplaced)])
    hints = torch.from_numpy(np.stack([np.stack(thin), np.stack(thick)])).to(torch.uint8)
    return Pool(encode_pool(encoder, x), contexts, hints)


class ControlStage:
    def __init__(self, cfg: ControlConfig, model_cfg, unet: UNet, pool: Pool, acc=None):
        self.cfg, self.model_cfg, self.acc, self.pool = cfg, model_cfg, acc, pool
        self.abar = alphas_cumprod(model_cfg.schedule)
        self.unet = unet.eval().requires_grad_(False)
        torch.manual_seed(cfg.seed)
        self.adapter = Adapter(adapter_config(model_cfg))
        self.levels, self.skips = adapter_skips(unet), unet.skip_count
        self.opt = loop.adam(self.adapter.parameters(), cfg.lr)
        self.A = self.adapter
        if acc is not None:
            self.A, self.opt = acc.prepare(self.adapter, self.opt)
            self.unet.to(acc.device)
            self.pool = Pool(pool.latents.to(acc.device), pool.contexts.to(acc.device), pool.hints.to(acc.device))
            self.abar = self.abar.to(acc.device)
        self.ema = loop.EMA(self.adapter, cfg.ema_decay)
        self.modules = {"adapter": self.adapter, "ema_adapter": self.ema.module}
        self.optimizers = {"adapter": self.opt}

    def step(self, step: int, index: torch.Tensor, gen: torch.Generator) -> dict[str, float]:
        cfg, N, T, p = self.cfg, len(index), len(self.abar), self.pool
        mine = loop.Rows(self.acc, N)  # this process's rows; every draw is made for the whole batch
        dev = p.latents.device
        draw = lambda x: mine(x).to(dev)  # noqa: E731
        idx = draw(index)
        x0 = p.latents[idx]
        which = draw((torch.rand(N, generator=gen) < cfg.unplaced_prob).long())  # 1: caption without position
        thick = draw((torch.rand(N, generator=gen) < cfg.thick_prob).long())
        last = torch.rand(N, generator=gen) < cfg.last_step_prob
        t = draw(torch.where(last, T - 1, torch.randint(T, (N,), generator=gen)))
        noise = draw(torch.randn(N, *x0.shape[1:], generator=gen))
        context = p.contexts[which, idx]
        hint = p.hints[thick, idx][:, None].float().expand(-1, 3, -1, -1)  # (N, 3, H, W): RGB as a user's hint
        x_t = noised(x0, t, noise, self.abar)
        residuals = self.A(hint, self.levels, self.skips)
        x0_hat = predicted_x0(x_t, t, self.unet(x_t, t, context, control=residuals), self.abar,
                              self.model_cfg.prediction_type)
        loss = (x0_hat - x0).pow(2).mean()
        loop.backward(self.acc, loss * mine.weight)
        loop.clip_and_step(self.acc, self.opt, list(self.adapter.parameters()), cfg.grad_clip)
        self.ema.update(self.adapter, step)
        return {"loss": loss.item()}


def train_control(cfg: ControlConfig, init, out_dir, *, resume=False, stop_after=None, progress=True,
                  acc=None) -> Path | None:
    """Train a control plugin for the one-step model file `init`; returns out_dir/control.safetensors."""
    from ..control.load import save_native_control
    from ..loading import load_encoder, load_model_config, load_text_encoder
    from ..weights.keymap import load_state
    from ..weights.native import read_native_component

    torch.set_num_threads(cfg.threads)
    model_cfg = load_model_config(init)
    loop.check_model_fits(model_cfg, cfg)
    unet = UNet(model_cfg.unet)
    load_state(unet, {k: v.float() for k, v in read_native_component(init, "unet").items()}, what="UNet")
    text, encoder = load_text_encoder(init), load_encoder(init)
    text.requires_grad_(False)
    pool = build_pool(cfg, encoder, text)
    stage = ControlStage(cfg, model_cfg, unet, pool, acc)
    rows = loop.run(stage, cfg, out_dir, pool_size=len(pool.latents), acc=acc, resume=resume, stop_after=stop_after,
                    progress=progress)
    if not rows or rows[-1]["step"] != cfg.steps or (acc is not None and not acc.is_main_process):
        return None
    return save_native_control(Path(out_dir) / CONTROL_FILE, stage.ema.module, model=cfg.model,
                               hint="edges or scribbles of the scene: white strokes on black")


# --------------------------------------------------------------------------- evaluation
def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def control_iou(pipe, adapter, cfg: SceneConfig, *, n: int = 128, seed: int = 0, batch: int = 32,
                strength: float = 1.0, thickness: int = 0) -> dict:
    """Mean object-mask IoU between one-step images and their held-out scenes, with the plugin reading the scene's
    edge map and without it, for captions with and without their position words: {"placed": {"with", "without"},
    "unplaced": {...}}. Also the share of images whose object lands in the scene's grid cell ("cell").
    `thickness`: strokes widened by this many pixels (drawn scribbles are thicker than edges)."""
    scenes = SyntheticScenes(cfg, "heldout", length=n)
    items = [scenes[i] for i in range(n)]
    truth = [object_mask(it.image) for it in items]
    hints = torch.from_numpy(np.stack([edge_hint(it.image, thickness) for it in items]))[:, None].expand(-1, 3, -1, -1)
    out = {}
    for kind, captions in (("placed", [it.caption for it in items]),
                           ("unplaced", [unplaced_caption(it.scene) for it in items])):
        out[kind] = {}
        for name, use in (("with", True), ("without", False)):
            masks = []
            for k, i in enumerate(range(0, n, batch)):
                control = [(adapter, hints[i:i + batch].contiguous(), strength, 0.0, 1.0)] if use else ()
                images = pipe(captions[i:i + batch], steps=1, sampler="onestep", guidance=0.0, seed=seed + k,
                              control=control)
                masks += [object_mask(np.asarray(im)) for im in images]
            scores = [iou(m, t) for m, t in zip(masks, truth)]
            cells = [_cell(m) == it.scene.position for m, it in zip(masks, items)]
            out[kind][name] = {"iou": float(np.mean(scores)), "cell": float(np.mean(cells))}
    return out


def iou_table(results: dict) -> str:
    """control_iou's results ({hint name: result}) as a markdown table."""
    rows = ["| hint | caption | IoU with plugin | IoU without | right cell with | without |",
            "| --- | --- | --- | --- | --- | --- |"]
    for hint, r in results.items():
        for kind, words in (("placed", "with position words"), ("unplaced", "without position words")):
            w, wo = r[kind]["with"], r[kind]["without"]
            rows.append(f"| {hint} | {words} | {w['iou']:.3f} | {wo['iou']:.3f} | {w['cell']:.3f} | {wo['cell']:.3f} |")
    return "\n".join(rows)


def _cell(mask: np.ndarray) -> str | None:
    """The grid cell nearest the mask's centroid, or None for an empty mask."""
    from .evaluate import _nearest

    if not mask.any():
        return None
    ys, xs = np.nonzero(mask)
    centre = np.array([(xs.mean() + 0.5) / mask.shape[1], (ys.mean() + 0.5) / mask.shape[0]])
    names = list(POSITIONS)
    return names[_nearest(np.array([POSITIONS[p] for p in names]), centre)]
