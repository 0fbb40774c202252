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

    `run(**inputs)` checks every input's shape and dtype against the manifest (the models have fixed
    shapes) and returns {output name: array}.
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

    def run(self, **inputs) -> dict:
        if set(inputs) != set(self.inputs):
            raise BundleError(f"{self.entry['file']} takes inputs {sorted(self.inputs)}, got {sorted(inputs)}")
        feed = {}
        for name, value in inputs.items():
            spec = self.inputs[name]
            value = np.asarray(value, dtype=spec["dtype"])
            if list(value.shape) != list(spec["shape"]):
                raise BundleError(f"{self.entry['file']}: input {name!r} must have shape {spec['shape']} (fixed at "
                                  f"export), got {list(value.shape)}")
            feed[name] = value
        return self.runner(**feed)
