"""A TFLite interpreter for one bundle component: ai_edge_litert, or tflite_runtime when only that is installed."""
from __future__ import annotations

import importlib

import numpy as np

from .manifest import BundleError, signatures_of

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
    """One .tflite model called through its named signatures with the manifest's input/output names.

    `run(**inputs)` takes the signature whose input shapes the inputs have (one per image size and context
    length: the models have fixed shapes) and returns {output name: array}. Inputs and outputs whose manifest
    entry has "quantization" (schema 2) are integer tensors: float inputs are quantized, outputs come back as
    float32 (see manifest.py). `content`: the file's bytes (e.g. with LoRA weights patched in) instead of `path`.
    """

    def __init__(self, path, entry: dict, *, num_threads: int | None = None, content: bytes | None = None):
        self.entry = entry
        cls = interpreter_class()
        self.interpreter = cls(model_path=str(path), num_threads=num_threads) if content is None else \
            cls(model_content=content, num_threads=num_threads)
        available = self.interpreter.get_signature_list()
        self.signatures = []
        for spec in signatures_of(entry):
            if spec["signature"] not in available:
                raise BundleError(f"{path} has no signature {spec['signature']!r} (it has {sorted(available)}); the "
                                  "file does not belong to this manifest, re-export the bundle")
            self.signatures.append((spec, self.interpreter.get_signature_runner(spec["signature"])))
        self.inputs = {i["name"]: i for i in entry["inputs"]}
        self.outputs = {o["name"]: o for o in entry["outputs"]}

    def signature_for(self, **shapes) -> tuple[dict, object]:
        """(signature spec, runner) of the first signature whose inputs have these shapes ({name: shape}, a subset
        of the inputs); BundleError listing what the file takes."""
        for spec, runner in self.signatures:
            specs = {i["name"]: i for i in spec["inputs"]}
            if all(k in specs and list(v) == list(specs[k]["shape"]) for k, v in shapes.items()):
                return spec, runner
        takes = " or ".join(", ".join(f"{i['name']} {i['shape']}" for i in s["inputs"]) for s, _ in self.signatures)
        raise BundleError(f"{self.entry['file']}: inputs of shapes {shapes} match none of its signatures (fixed "
                          f"at export): it takes {takes}")

    def input_shape(self, name: str, **shapes) -> list:
        """The shape of input `name` in the signature whose other inputs have these shapes."""
        spec, _ = self.signature_for(**shapes)
        return next(list(i["shape"]) for i in spec["inputs"] if i["name"] == name)

    def run(self, **inputs) -> dict:
        if set(inputs) != set(self.inputs):
            raise BundleError(f"{self.entry['file']} takes inputs {sorted(self.inputs)}, got {sorted(inputs)}")
        spec, runner = self.signature_for(**{k: np.shape(v) for k, v in inputs.items()})
        specs = {i["name"]: i for i in spec["inputs"]}
        feed = {k: quantize(v, specs[k]) if "quantization" in specs[k] else np.asarray(v, dtype=specs[k]["dtype"])
                for k, v in inputs.items()}
        outputs = {o["name"]: o for o in spec["outputs"]}
        out = runner(**feed)
        return {k: dequantize(v, outputs[k]) if "quantization" in outputs.get(k, {}) else v for k, v in out.items()}


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
