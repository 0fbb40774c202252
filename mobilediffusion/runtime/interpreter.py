"""A TFLite interpreter for one bundle component: ai_edge_litert, or tflite_runtime when only that is installed."""
from __future__ import annotations

import importlib

import numpy as np

from .manifest import BundleError

INSTALL = "pip install ai-edge-litert"


def interpreter_class():
    """The Interpreter class of ai_edge_litert (preferred) or tflite_runtime; BundleError if neither exists."""
    for module in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter"):
        try:
            return importlib.import_module(module).Interpreter
        except ImportError:
            continue
    raise BundleError(f"running a bundle needs a TFLite interpreter; install it with: {INSTALL}")


class Component:
    """One .tflite model called through its named signature with the manifest's input/output names.

    `run(**inputs)` checks every input's shape against the manifest (the models have fixed shapes) and
    returns {output name: array}. Inputs and outputs whose manifest entry has "quantization" (schema 2)
    are integer tensors: float inputs are quantized, outputs come back as float32 (see manifest.py).
    """

    def __init__(self, path, entry: dict, *, num_threads: int | None = None):
        self.entry = entry
        self.interpreter = interpreter_class()(model_path=str(path), num_threads=num_threads)
        signatures = self.interpreter.get_signature_list()
        if entry["signature"] not in signatures:
            raise BundleError(f"{path} has no signature {entry['signature']!r} (it has {sorted(signatures)}); "
                              "the file does not belong to this manifest, re-export the bundle")
        self.runner = self.interpreter.get_signature_runner(entry["signature"])
        self.inputs = {i["name"]: i for i in entry["inputs"]}
        self.outputs = {o["name"]: o for o in entry["outputs"]}

    def run(self, **inputs) -> dict:
        if set(inputs) != set(self.inputs):
            raise BundleError(f"{self.entry['file']} takes inputs {sorted(self.inputs)}, got {sorted(inputs)}")
        feed = {}
        for name, value in inputs.items():
            spec = self.inputs[name]
            value = quantize(value, spec) if "quantization" in spec else np.asarray(value, dtype=spec["dtype"])
            if list(value.shape) != list(spec["shape"]):
                raise BundleError(f"{self.entry['file']}: input {name!r} must have shape {spec['shape']} (fixed at "
                                  f"export), got {list(value.shape)}")
            feed[name] = value
        out = self.runner(**feed)
        return {k: dequantize(v, self.outputs[k]) if "quantization" in self.outputs.get(k, {}) else v
                for k, v in out.items()}


def quantize(value, spec: dict) -> np.ndarray:
    """Float array -> the integer tensor of `spec` ({"dtype", "quantization": {"scale", "zero_point"}})."""
    q, kind = spec["quantization"], np.dtype(spec["dtype"])
    limits = np.iinfo(kind)
    scaled = np.round(np.asarray(value, np.float64) / q["scale"]) + q["zero_point"]
    return np.clip(scaled, limits.min, limits.max).astype(kind)


def dequantize(value, spec: dict) -> np.ndarray:
    """An integer output tensor -> float32 values: (q - zero_point) * scale."""
    q = spec["quantization"]
    return ((np.asarray(value, np.float64) - q["zero_point"]) * q["scale"]).astype(np.float32)
