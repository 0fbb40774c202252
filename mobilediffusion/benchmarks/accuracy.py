"""Image error of our speed modes on the shipped model (`--int8`): PSNR and SSIM of each mode's images against fp32.

The bench's UNets have random weights, whose decoded images mean nothing; the embedded default model
(md-shapes-128, trained) makes real images, so each mode (bf16, int8 layers, compiled) generates the same
prompts and seeds and its 8-bit images are compared with the fp32 eager ones. SSIM is kornia's (11x11 Gaussian
window, 'valid' padding, mean over the images' pixels and channels); without kornia it is left out with a note.
"""
from __future__ import annotations

PROMPTS = ("a red circle in the top left on a white background", "a blue square in the center on a white background",
           "a green triangle in the bottom right on a white background", "a yellow circle in the top right on a white "
           "background", "a red circle left of a blue square on a white background")


CALIBRATION_PROMPTS = ("a green square in the bottom left on a white background",
                       "a blue circle right of a yellow triangle on a white background")


def images(precision: str, mode: str, model=None, prompts=PROMPTS):
    """A model's (default: the shipped one's) images for `prompts` (seed i for prompt i), at its default steps and
    sampler, as a uint8 array (N, H, W, 3)."""
    import numpy as np

    from ..fast import PRECISIONS
    from ..pipeline import load_pipeline

    pipe = load_pipeline(model, dtype=PRECISIONS[precision], compile=mode == "compile")
    if mode.startswith("int8"):  # as the bench times it: the UNet's and decoder's convolutions and linears
        from ..int8_calibration import calibrate_int8
        from ..ops.int8 import quantize_int8

        quantize_int8(pipe.unet)
        quantize_int8(pipe.decoder)
        if mode == "int8-static":  # calibrated on other prompts than the ones compared
            calibrate_int8(pipe, CALIBRATION_PROMPTS, cache=False)
    return np.stack([np.asarray(pipe(p, seed=i)[0]) for i, p in enumerate(prompts)])


def psnr_uint8(a, b) -> float:
    import math

    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def ssim_uint8(a, b) -> float | None:
    """Mean SSIM of uint8 images (N, H, W, 3), or None without kornia."""
    try:
        from kornia.metrics import ssim
    except ImportError:
        return None
    import torch

    to = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).double() / 255.0  # noqa: E731  (N, 3, H, W) in [0, 1]
    return float(ssim(to(a), to(b), window_size=11, padding="valid").mean())


def run(bench) -> dict:
    modes = [(p, m) for p in bench.precisions
             for m in ("eager", "int8", "int8-static") + (("compile",) if bench.args.compile else ())]
    modes = [pm for pm in modes if pm != ("fp32", "eager")]
    reference = images("fp32", "eager")
    psnr, ssim = {}, {}
    for precision, mode in modes:
        name = precision if mode == "eager" else f"{precision}+{mode}"
        got = images(precision, mode)
        psnr[name], ssim[name] = psnr_uint8(got, reference), ssim_uint8(got, reference)
    what = ", ".join(f"{k} {v:.1f} dB" + ("" if ssim[k] is None else f" / SSIM {ssim[k]:.4f}") for k, v in psnr.items())
    bench.print(f"images vs fp32 eager on the shipped model (md-shapes-128, {len(PROMPTS)} prompts), PSNR / SSIM: "
                + what + (" (SSIM needs kornia: pip install kornia)" if None in ssim.values() else ""))
    return {"model": "md-shapes-128 (embedded default)", "prompts": len(PROMPTS), "psnr_db": psnr, "ssim": ssim}
