"""Shared by test_export.py and test_runtime.py: a micro model (all three stages convert in well under a
minute) and its fp32 bundle, exported once per test session."""
import importlib.util
import os

import numpy as np
import pytest
import torch

from mobilediffusion.config import DecoderConfig, ModelConfig, ScheduleConfig, TextEncoderConfig, UNetConfig

HAVE_LITERT = all(importlib.util.find_spec(m) is not None for m in ("litert_torch", "ai_edge_litert"))
needs_litert = pytest.mark.skipif(
    not HAVE_LITERT, reason="the export extra is not installed: pip install litert-torch==0.10.0 ai-edge-litert==2.3.0")

# 2-level UNet with self+cross attention at the inner level, 1-layer CLIP, 2-level KL decoder (upscale 2)
MICRO = ModelConfig(
    family="tiny",
    unet=UNetConfig(in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=(1, 1),
                    attention=("none", "full"), transformer_depth=(1, 1), num_attention_heads=(1, 2),
                    mid_block=False, cross_attention_dim=32, norm_num_groups=8, prediction_type="v_prediction",
                    sample_size=8),
    text=TextEncoderConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
    decoder=DecoderConfig(latent_channels=4, scaling_factor=0.5, block_out_channels=(8, 16), layers_per_block=0,
                          mid_attention=False, norm_num_groups=4),
    schedule=ScheduleConfig(timestep_spacing="trailing"), resolution=32, latent_scale=0.5,
    default_steps=1, default_guidance=0.0, default_sampler="onestep",
)
# what the session bundle bakes in: a stochastic multi-step sampler with guidance (UNet batch 2B), two sizes (the
# first the default) and prompts of up to two chunks (UNet signatures for 77 and 154 context tokens at each size)
SIZES = [(32, 24), (24, 32)]  # (height, width)
BUNDLE_OPTIONS = dict(precision="fp32", sizes=SIZES, prompt_chunks=2, batch_size=1, steps=2, sampler="euler_ancestral",
                      guidance=2.5, make_zip=True)
PROMPT = "a red circle, on blue!"

_CACHE = {}


def micro_pipeline():
    """The micro model, its norms' scales and shifts drawn like a trained model's (not 1 and 0): the converter
    folds a LayerNorm's affine into the Linear after it only then, which LoRA packs must follow."""
    from mobilediffusion.pipeline import build_pipeline

    if "pipe" not in _CACHE:
        pipe = build_pipeline(MICRO, seed=3)
        with_trained_norms(pipe.unet, pipe.text_encoder, pipe.decoder)
        _CACHE["pipe"] = pipe
    return _CACHE["pipe"]


def with_trained_norms(*modules, seed=5):
    """Every LayerNorm / GroupNorm affine drawn around (1, 0) and every zero-initialised bias (transformers' CLIP)
    made small but not zero, in place (seeded): what a trained model has, and what decides the converter's folds."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for m in module.modules():
                if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and m.weight is not None:
                    m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                elif isinstance(m, torch.nn.Linear) and m.bias is not None and not m.bias.any():
                    m.bias.copy_(0.02 * torch.randn(m.bias.shape, generator=g))


def session_bundle(tmp_path_factory):
    """The micro model's fp32 bundle folder, exported on first use: once per test run, also with several pytest-xdist
    workers (the first exports into the run's shared temporary folder under a lock, the others wait and reuse it)."""
    from filelock import FileLock

    from mobilediffusion.export import export_bundle

    if "bundle" not in _CACHE:
        base = tmp_path_factory.getbasetemp()
        shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the run's, not the worker's
        out = shared / "session-bundle" / "micro"
        with FileLock(str(shared / "session-bundle.lock")):
            if not (out / "manifest.json").is_file():
                out.parent.mkdir(exist_ok=True)
                export_bundle(micro_pipeline(), out, **BUNDLE_OPTIONS)
        _CACHE["bundle"] = out
    return _CACHE["bundle"]


DEFAULT_BUNDLE_ARGS = ["--precision", "int8_dynamic", "--control", "md-shapes-scribble", "--inpaint",
                       "--prompt-chunks", "1", "--web", "--budget", "1GB", "-q"]


def default_bundle(tmp_path_factory):
    """The shipped default exported as a user types it (`mobilediffusion export` with DEFAULT_BUNDLE_ARGS: int8
    weights, its scribble plugin, the image encoder, the web player, a 1 GB budget): once per test run, shared by
    the device and web player tests as session_bundle is (one prompt chunk: one UNet signature)."""
    from filelock import FileLock

    from mobilediffusion.cli import main

    if "default" not in _CACHE:
        base = tmp_path_factory.getbasetemp()
        shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
        out = shared / "session-bundle" / "default"
        with FileLock(str(shared / "session-bundle-default.lock")):
            if not (out / "manifest.json").is_file():
                out.parent.mkdir(exist_ok=True)
                assert main(["export", "-o", str(out), *DEFAULT_BUNDLE_ARGS]) == 0
        _CACHE["default"] = out
    return _CACHE["default"]


def torch_noise(seed):
    """Noise in the torch pipeline's order (start noise, then each stochastic step) as numpy arrays."""
    gen = torch.Generator().manual_seed(seed)
    return lambda shape: torch.randn(tuple(shape), generator=gen).numpy()


def torch_image(pipe, prompt, seed, *, negative="", size=SIZES[0]):
    """The torch pipeline's image for the bundle's settings: (B, H, W, 3) float in [0, 1]."""
    from mobilediffusion.pipeline import sample_latents

    o = BUNDLE_OPTIONS
    with torch.no_grad():
        cond = pipe.encode_prompt([prompt] * o["batch_size"])
        uncond = pipe.encode_prompt([negative] * o["batch_size"])
        latents = sample_latents(pipe.unet, pipe.config, cond, uncond, steps=o["steps"], guidance=o["guidance"],
                                 seed=seed, height=size[0], width=size[1], sampler=o["sampler"],
                                 batch_size=o["batch_size"])
        return pipe.decode(latents).permute(0, 2, 3, 1).numpy()


def psnr(a, b):
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return 10 * np.log10(1.0 / mse) if mse > 0 else float("inf")


# SD1.5's UNet layout (4 levels, 2 blocks each, attention on the outer 3, mid block) at 64/128 widths: the
# graph of a real SD1.5 UNet with 12.7M parameters, so weights outweigh the graph's own bytes as they do at
# full size (int8 / fp32 < 0.3); a 1-layer CLIP and a small 4-level KL decoder
def sd15_tiny_config():
    import dataclasses

    from mobilediffusion.presets import PRESETS

    return dataclasses.replace(
        PRESETS["sd15"],
        unet=UNetConfig(block_out_channels=(64, 128, 128, 128), num_attention_heads=(2, 2, 2, 2), cross_attention_dim=32,
                        norm_num_groups=8, sample_size=8),
        text=TextEncoderConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        decoder=DecoderConfig(latent_channels=4, scaling_factor=0.18215, block_out_channels=(8, 8, 16, 16),
                              layers_per_block=1, norm_num_groups=4),
        resolution=64,
    )
