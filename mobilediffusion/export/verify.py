"""Verification of converted components: each file run in the LiteRT interpreter against its torch module's
outputs on the same inputs (the torch outputs are computed before conversion, so the module can be freed)."""
from __future__ import annotations

import math

import numpy as np

# relative error per component against the torch model in fp32; int8 precisions are reported only
LIMITS = {"fp32": 1e-4, "fp16": 1e-2}


def rel_error(out: np.ndarray, ref: np.ndarray) -> float:
    """||out - ref|| / ||ref|| in float64."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two images in [0, 1] (capped at 150 dB for identical images)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return 150.0 if mse <= 1e-15 else min(150.0, 10.0 * math.log10(1.0 / mse))


def signature_io(path, signature: str) -> tuple[list[dict], list[dict]]:
    """The signature's inputs and outputs as [{"name", "shape", "dtype"}] in signature order; an
    integer-quantized tensor also gets "quantization": {"scale", "zero_point"} (manifest schema 2)."""
    from ..runtime.interpreter import interpreter_class

    runner = interpreter_class()(model_path=str(path)).get_signature_runner(signature)

    def entries(details):
        out = []
        for name, d in sorted(details.items(), key=lambda kv: kv[1]["index"]):
            entry = {"name": name, "shape": [int(s) for s in d["shape"]], "dtype": np.dtype(d["dtype"]).name}
            scale, zero = d.get("quantization", (0.0, 0))
            if scale and np.issubdtype(np.dtype(d["dtype"]), np.integer):
                entry["quantization"] = {"scale": float(scale), "zero_point": int(zero)}
            out.append(entry)
        return out

    return entries(runner.get_input_details()), entries(runner.get_output_details())


def torch_outputs(module, inputs: dict) -> dict:
    """{output name: float32 array} of a wrapped component (export/components.py) on its sample inputs."""
    import torch

    with torch.no_grad():
        return {k: v.float().numpy() for k, v in module(**inputs).items()}


def as_feed(inputs: dict) -> dict:
    """Sample inputs (torch) -> numpy arrays the interpreter takes (int64 ids -> int32)."""
    import torch

    return {k: v.numpy().astype(np.int32) if v.dtype == torch.int64 else v.numpy() for k, v in inputs.items()}


def check_component(component, feed: dict, reference: dict, precision: str) -> dict:
    """A runtime Component (runtime/interpreter.py) run on `feed` against the torch `reference` outputs
    -> {"rel_error" (worst output), "limit", "passed"}."""
    got = component.run(**feed)
    err = max(rel_error(got[k], reference[k]) for k in reference)
    limit = LIMITS.get(precision)
    return {"rel_error": err, "limit": limit, "passed": limit is None or err <= limit}
