"""Image error of our speed modes on the shipped model (`--int8`): PSNR of each mode's images against fp32.

The bench's UNets have random weights, whose decoded images mean nothing; the embedded default model
(md-shapes-128, trained) makes real images, so each mode (bf16, int8 layers, compiled) generates the same
prompts and seeds and its 8-bit images are compared with the fp32 eager ones.
"""
from __future__ import annotations

PROMPTS = ("a red circle in the top left on a white background", "a blue square in the center on a white background",
           "a green triangle in the bottom right on a white background", "a yellow circle in the top right on a white "
           "background", "a red circle left of a blue square on a white background")


def images(precision: str, mode: str):
    """The shipped model's images for PROMPTS (seed i for prompt i) as a uint8 array (N, H, W, 3)."""
    import numpy as np

    from ..fast import PRECISIONS
    from ..pipeline import load_pipeline

    pipe = load_pipeline(None, dtype=PRECISIONS[precision], compile=mode == "compile")
    if mode == "int8":  # as the bench times it: the UNet's and decoder's convolutions and linears
        from ..ops.int8 import quantize_int8

        quantize_int8(pipe.unet)
        quantize_int8(pipe.decoder)
    return np.stack([np.asarray(pipe(p, seed=i)[0]) for i, p in enumerate(PROMPTS)])


def psnr_uint8(a, b) -> float:
    import math

    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def run(bench) -> dict:
    modes = [(p, m) for p in bench.precisions for m in ("eager", "int8") + (("compile",) if bench.args.compile else ())]
    modes = [pm for pm in modes if pm != ("fp32", "eager")]
    reference = images("fp32", "eager")
    out = {}
    for precision, mode in modes:
        name = precision if mode == "eager" else f"{precision}+{mode}"
        out[name] = psnr_uint8(images(precision, mode), reference)
    bench.print("image PSNR vs fp32 eager on the shipped model (md-shapes-128, %d prompts): %s" % (
        len(PROMPTS), ", ".join(f"{k} {v:.1f} dB" for k, v in out.items())))
    return {"model": "md-shapes-128 (embedded default)", "prompts": len(PROMPTS), "psnr_db": out}
