"""MobileDiffusion: efficient text-to-image models (UNet, text encoder, lite decoder, samplers).

`import mobilediffusion` is light: torch-heavy modules load on first use of a public name.
"""
__version__ = "0.1.0"

_LAZY = {
    "load_unet": "loading",
    "load_text_encoder": "loading",
    "load_decoder": "loading",
    "load_encoder": "loading",
    "load_pipeline": "pipeline",
    "Pipeline": "pipeline",
    "export_bundle": "export",
    "apply_lora": "lora",
    "remove_lora": "lora",
    "with_lora": "lora",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'mobilediffusion' has no attribute {name!r}")
