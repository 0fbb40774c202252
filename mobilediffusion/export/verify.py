"""Verification: a converted component run in the LiteRT interpreter against its torch module, and the
whole bundle (torch-free runtime) against the torch pipeline."""
from __future__ import annotations

import math

import numpy as np

LIMITS = {"fp32": 1e-4, "fp16": 1e-2}  # relative error per component; int8 precisions are reported only


def rel_error(out: np.ndarray, ref: np.ndarray) -> float:
    """||out - ref|| / ||ref|| in float64."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two images in [0, 1] (capped at 150 dB for identical images)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return 150.0 if mse <= 1e-15 else min(150.0, 10.0 * math.log10(1.0 / mse))


def interpreter(model: bytes, num_threads: int | None = None):
    from ..runtime.interpreter import interpreter_class

    return interpreter_class()(model_content=model, num_threads=num_threads)


def signature_io(model: bytes, signature: str) -> tuple[list[dict], list[dict]]:
    """The signature's inputs and outputs as [{"name", "shape", "dtype"}], in signature order."""
    runner = interpreter(model).get_signature_runner(signature)

    def entries(details):
        items = sorted(details.items(), key=lambda kv: kv[1]["index"])
        return [{"name": k, "shape": [int(s) for s in d["shape"]], "dtype": np.dtype(d["dtype"]).name}
                for k, d in items]

    return entries(runner.get_input_details()), entries(runner.get_output_details())


def verify_component(model: bytes, signature: str, module, inputs: dict, precision: str) -> dict:
    """Run the flatbuffer and `module` on the same inputs -> {"rel_error", "limit", "passed"} (worst output)."""
    import torch

    runner = interpreter(model).get_signature_runner(signature)
    feed = {k: v.numpy().astype(np.int32) if v.dtype == torch.int64 else v.numpy() for k, v in inputs.items()}
    got = runner(**feed)
    with torch.no_grad():
        ref = module(**inputs)
    err = max(rel_error(got[k], ref[k].numpy()) for k in ref)
    limit = LIMITS.get(precision)
    return {"rel_error": err, "limit": limit, "passed": limit is None or err <= limit}
