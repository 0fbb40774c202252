"""Peer `openvino`: the same UNet converted with `openvino.convert_model` and run by OpenVINO's CPU plugin,
as CPU users of ComfyUI install it for speed.

The model converted is diffusers' UNet2DConditionModel on the shared weights (what a user converts),
or ours where diffusers cannot express the architecture (the row says so). It is converted once per
preset (TorchScript trace of the fp32 module; the conversion time is reported apart) and compiled
per precision with INFERENCE_PRECISION_HINT f32 / bf16, INFERENCE_NUM_THREADS = torch's thread count
and the LATENCY hint, then timed alternating with ours eager at the same precision.

With --int8 (or --precision int8), two more rows against ours int8 (the bf16+int8 row), from the same converted
model: `int8`, NNCF's post-training quantization (`nncf.quantize`, int8 weights and activations, model type
TRANSFORMER as OpenVINO's diffusion notebooks use it, with NNCF's default SmoothQuant and bias correction),
calibrated on models.calibration_inputs (those ours' int8-static mode is calibrated on); and `int8w`, NNCF's weight compression (`nncf.compress_weights`,
int8 weights, activations in the compile precision). Both compile with the bf16 hint where the CPU has bf16 (the
layers NNCF leaves in float run as OpenVINO runs them by default there), all three timed in one alternation.
"""
from __future__ import annotations

import time
import warnings

from ..memory import release_memory
from .measure import keep_last, time_alternating
from .models import build_ours, calibration_inputs, unet_inputs
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
    from .models import unet_case

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
    if getattr(args, "int8", False):
        rows += int8_rows(shared, model, inputs, threads, convert_s)
    return rows


def int8_rows(shared, model, inputs, threads: int, convert_s: float) -> list:
    """The `int8` (nncf.quantize) and `int8w` (nncf.compress_weights) rows, timed alternating with ours int8."""
    import importlib.util

    import torch

    from .. import fast
    from .models import unet_case

    if importlib.util.find_spec("nncf") is None:
        return [peer_row(shared, "openvino", "int8", note="NNCF is not installed; install it with: pip install nncf "
                         "(or the bench extra: pip install 'comfyui-mobilediffusion[bench]')")]
    import nncf

    hint = "bf16" if fast.unsupported_precision(torch.bfloat16) is None else "fp32"
    calibration = [tuple(t.numpy() for t in inp) for inp in calibration_inputs(shared.cfg, "unet", shared.batch,
                                                                                  shared.latent)]
    start = time.perf_counter()
    quantized = nncf.quantize(model, nncf.Dataset(calibration), subset_size=len(calibration),
                              model_type=nncf.ModelType.TRANSFORMER)
    quantize_s = time.perf_counter() - start
    start = time.perf_counter()
    compressed = nncf.compress_weights(model)
    compress_s = time.perf_counter() - start
    compiled_q, compile_q = compile_converted(quantized, hint, threads)
    compiled_w, compile_w = compile_converted(compressed, hint, threads)
    del quantized, compressed
    dtype = fast.PRECISIONS[hint]
    ours = build_ours(shared.make_ours, "unet", dtype, "int8")
    case = unet_case(shared.cfg, ours, None, None, dtype, shared.batch, shared.latent)
    outs = {}
    with torch.no_grad():
        ms = time_alternating({"ours": case.ours, "int8": keep_last(caller(compiled_q, inputs), outs, "int8"),
                               "int8w": keep_last(caller(compiled_w, inputs), outs, "int8w")},
                              runs=shared.runs, warmup=shared.warmup)
    ours_row = shared.modes.get((hint, "int8"))
    version = f"OpenVINO {model_version()} + NNCF {nncf.__version__}"
    rows = [
        peer_row(shared, "openvino", "int8", ms=ms["int8"], ours_ms=ms["ours"], output=outs["int8"], ours=ours_row,
                 setup_s=convert_s + quantize_s + compile_q,
                 note=f"{version}: nncf.quantize, {len(calibration)} calibration inputs, model type TRANSFORMER, "
                      f"{hint} elsewhere; vs ours int8; quantize {quantize_s:.0f} s"),
        peer_row(shared, "openvino", "int8w", ms=ms["int8w"], ours_ms=ms["ours"], output=outs["int8w"],
                 ours=ours_row, setup_s=convert_s + compress_s + compile_w,
                 note=f"{version}: nncf.compress_weights (int8 weights), {hint} activations; vs ours int8"),
    ]
    del compiled_q, compiled_w, ours, case, outs
    release_memory()
    return rows


def model_version() -> str:
    import openvino as ov

    return ov.__version__.split("-")[0]
