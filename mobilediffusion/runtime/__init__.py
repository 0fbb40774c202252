"""Torch-free bundle runtime: runs an exported TFLite bundle with numpy, `tokenizers` and a TFLite
interpreter (ai_edge_litert, or tflite_runtime). Nothing here imports torch.

    from mobilediffusion.runtime import BundlePipeline
    images = BundlePipeline("my-bundle")("a red circle", seed=0)  # (B, H, W, 3) float32 in [0, 1]
"""
from .manifest import SCHEMA_VERSION, BundleError, read_manifest
from .pipeline import BundlePipeline, to_pil
from .sampler import numpy_noise

__all__ = ["BundlePipeline", "BundleError", "read_manifest", "numpy_noise", "to_pil", "SCHEMA_VERSION"]
