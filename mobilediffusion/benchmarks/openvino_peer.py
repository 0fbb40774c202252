"""Peer `openvino`: the same UNet converted with `openvino.convert_model` and run by OpenVINO's CPU plugin,
as CPU users of ComfyUI install it for speed.

The model converted is diffusers' UNet2DConditionModel on the shared weights (what a user converts),
or ours where diffusers cannot express the architecture (the row says so). It is converted once per
preset (TorchScript trace of the fp32 module; the conversion time is reported apart) and compiled
per precision with INFERENCE_PRECISION_HINT f32 / bf16, INFERENCE_NUM_THREADS = torch's thread count
and the LATENCY hint, then timed alternating with ours eager at the same precision.
"""
from __future__ import annotations

import time
import warnings

from ..memory import release_memory
from .measure import keep_last, time_alternating
from .models import build_ours
from .rows import peer_row

HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}  # our precision -> INFERENCE_PRECISION_HINT


def compile_converted(model, precision: str, threads: int):
    """(compiled model, seconds) of a converted model on the CPU plugin at `precision` on `threads`."""
    import openvino as ov

    start = time.perf_counter()
    compiled = ov.Core().compile_model(model, "CPU", {
        "INFERENCE_PRECISION_HINT": HINTS[precision], "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
    return compiled, time.perf_counter() - start


def caller(compiled, inputs):
    """() -> the first output as a torch tensor, for fixed torch inputs (shared with OpenVINO, not copied)."""
    import torch

    request = compiled.create_infer_request()
    arrays = [t.contiguous().numpy() for t in inputs]

    def call():
        request.infer(arrays, share_inputs=True)
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    return call


def _returning_sample(unet):
    """diffusers' UNet returning the sample tensor (convert_model needs tensors out)."""
    import torch

    class Sample(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, x, t, ctx):
            return self.unet(x, t, ctx, return_dict=False)[0]

    return Sample()


def run(shared, precisions, args) -> list:
    import openvino as ov
    import torch

    from .. import fast
    from .models import unet_case, unet_inputs

    inputs = unet_inputs(shared.cfg, shared.batch, shared.latent)
    threads = torch.get_num_threads()
    # 1. convert once: diffusers' UNet where it can express the model, else ours (plain modules)
    if shared.ref_base is not None:
        source, what = _returning_sample(shared.ref_base), "converted from diffusers' UNet"
    else:
        from ..layers import set_ops_backend
        from ..ops import Backend

        # plain torch ops for the trace: the cpu backend's attention is a custom op OpenVINO cannot read
        source = set_ops_backend(shared.make_ours(), Backend.REFERENCE)
        what = "converted from our UNet (diffusers cannot express it)"
    start = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():  # the trace is for these shapes: its shape checks are constants
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        model = ov.convert_model(source, example_input=inputs)
    convert_s = time.perf_counter() - start
    del source
    release_memory()
    rows = []
    for precision in precisions:
        compiled, compile_s = compile_converted(model, precision, threads)
        ours = build_ours(shared.make_ours, "unet", fast.PRECISIONS[precision], "eager")
        case = unet_case(shared.cfg, ours, None, None, fast.PRECISIONS[precision], shared.batch, shared.latent)
        outs = {}
        with torch.no_grad():
            ms = time_alternating({"ours": case.ours, "openvino": keep_last(caller(compiled, inputs), outs, "ov")},
                                  runs=shared.runs, warmup=shared.warmup)
        actual = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        note = (f"OpenVINO {ov.__version__.split('-')[0]}, {what}, inference precision {actual}, {threads} threads; "
                f"convert {convert_s:.1f} s + compile {compile_s:.1f} s")
        rows.append(peer_row(shared, "openvino", precision, ms=ms["openvino"], ours_ms=ms["ours"], output=outs["ov"],
                             setup_s=convert_s + compile_s, note=note))
        del compiled, ours, case, outs
        release_memory()
    return rows
