"""TFLite export: each stage to its own .tflite through litert-torch, bundled with a manifest, the
tokenizer and the sampler's coefficients, verified in the LiteRT interpreter. Needs the `export`
extra (litert-torch); importing this package does not import torch or litert-torch.

    from mobilediffusion.export import export_bundle
    export_bundle(pipe, "out/my-bundle", precision="fp16")
"""

from ..runtime.manifest import PRECISIONS

_LAZY = {"export_bundle": "bundle", "ExportError": "flatbuffer"}

__all__ = sorted(_LAZY) + ["PRECISIONS"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
