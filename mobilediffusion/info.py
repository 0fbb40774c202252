"""Describe a model config (family, parameter counts per component, latent space, sampling defaults) or an
exported bundle (export/report.py)."""
from __future__ import annotations

from pathlib import Path

from .config import ModelConfig


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters per component, counted on the meta device (no memory, no initialisation)."""
    import torch

    from .decoder import build_decoder
    from .text_encoder import TextEncoder
    from .unet import UNet

    with torch.device("meta"):
        modules = {
            "unet": UNet(cfg.unet),
            "text_encoder": TextEncoder(cfg.text).model,
            "decoder": build_decoder(cfg.decoder),
        }
    return {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}


def describe(cfg: ModelConfig, source: str) -> str:
    counts = parameter_counts(cfg)
    total = sum(counts.values())
    lines = [
        f"source:           {source}",
        f"family:           {cfg.family}",
        f"prediction type:  {cfg.prediction_type}",
        f"latent channels:  {cfg.latent_channels}",
        f"resolution:       {cfg.resolution}x{cfg.resolution}",
        f"decoder:          {cfg.decoder.kind} (scaling factor {cfg.decoder.scaling_factor})",
        f"sampling default: {cfg.default_sampler}, {cfg.default_steps} steps, guidance {cfg.default_guidance}",
        "parameters:",
    ]
    lines += [f"  {name:<14} {n / 1e6:10.2f} M" for name, n in counts.items()]
    lines.append(f"  {'total':<14} {total / 1e6:10.2f} M")
    return "\n".join(lines)


def is_bundle(path) -> bool:
    """A folder holding a bundle manifest (as opposed to a checkpoint)."""
    from .runtime.manifest import MANIFEST

    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def describe_bundle(path) -> str:
    """The bundle at `path` after the manifest and file checks (BundleError if it fails them)."""
    from .export.report import describe
    from .runtime.manifest import read_manifest

    return describe(path, read_manifest(path))
