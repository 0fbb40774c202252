"""One component -> a .tflite flatbuffer: litert-torch conversion, then the precision recipe, then the
builtin-ops check.

Precisions (weights; activations stay float32 unless said):
    fp32              as converted
    fp16              weights stored as float16, dequantized at load (half the size; float compute)
    int8_dynamic      int8 channelwise weights, activations quantized on the fly (integer matmuls/convs)
    int8_weight_only  int8 channelwise weights dequantized before each op (float compute)
The quantized variants come from ai-edge-quantizer (a dependency of litert-torch) on the fp32 model.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import re

from ..errors import ConfigError
from ..ops.backend import EXPORT_INSTALL
from ..runtime.manifest import PRECISIONS
from .flatbuffer import ExportError, check_builtin_only

log = logging.getLogger(__name__)

_OP_PATTERN = re.compile(r"(aten\.[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?|'?(?:tfl|stablehlo|mhlo|chlo)\.[A-Za-z0-9_]+'?)")
_TENSOR_PATTERN = re.compile(r"for tensor: (\S+?)[.;]? Error")
# ai-edge-quantizer 0.10 quantizes int weights over 32 MiB in chunks and fails on conv (>= 3-D) ones
# ("input operand has more dimensions than allowed by the axis remapping"); such layers stay float
_QUANTIZER_CHUNK_BYTES = 32 * 1024 * 1024


def require_litert():
    """The litert_torch module, or ConfigError with the exact install command."""
    try:
        return importlib.import_module("litert_torch")
    except ImportError:
        raise ConfigError(f"TFLite export needs litert-torch (no TensorFlow needed); install it with: "
                          f"{EXPORT_INSTALL}") from None


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


@contextlib.contextmanager
def _quiet_litert():
    """litert-torch prints a progress tree per conversion; the exporter reports its own stages."""
    old = os.environ.get("LITERT_TORCH_SHOW_PROGRESS")
    os.environ["LITERT_TORCH_SHOW_PROGRESS"] = "n"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LITERT_TORCH_SHOW_PROGRESS", None)
        else:
            os.environ["LITERT_TORCH_SHOW_PROGRESS"] = old


def convert(name: str, module, inputs: dict, precision: str) -> tuple[bytes, dict]:
    """(flatbuffer bytes, {"ops": builtin op counts, "kept_float": layers}) for `module(**inputs)` under
    signature `name`. `kept_float` names layers a quantized precision leaves in float (see quantize).

    Raises ExportError naming the component and the op that failed to convert, or the non-builtin ops.
    """
    import torch

    litert_torch = require_litert()
    check_precision(precision)
    # 1. trace and convert (int64 inputs become int32)
    try:
        with _quiet_litert(), torch.no_grad():
            model = bytes(litert_torch.signature(name, module, sample_kwargs=inputs).convert().model_content())
    except Exception as e:  # any converter failure: report which op, keep the cause chained
        raise ExportError(f"converting the {name} failed at {failed_op(e)}: {_first_line(e)}") from e
    # 2. precision
    kept_float = []
    if precision != "fp32":
        model, kept_float = quantize(model, precision, name)
    # 3. builtin ops only
    ops = check_builtin_only(model, name)
    return model, {"ops": dict(sorted(ops.items())), "kept_float": kept_float}


def failed_op(error: BaseException) -> str:
    """The op an exception chain names (aten.xxx / tfl.xxx / stablehlo.xxx), or a generic phrase."""
    e = error
    while e is not None:
        found = _OP_PATTERN.findall(str(e))
        if found:
            return "op " + found[0].strip("'")
        found = _TENSOR_PATTERN.findall(str(e))
        if found:
            return "layer " + found[0]
        e = e.__cause__ or e.__context__
    return "an unnamed op (the error names none; see the cause below)"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def oversized_weight_layers(model: bytes) -> list[str]:
    """Output tensor names of the ops whose constant >= 3-D weight exceeds the quantizer's 32 MiB chunk."""
    from ai_edge_litert import schema_py_generated as schema

    flat = schema.ModelT.InitFromPackedBuf(model, 0)
    found = []
    for graph in flat.subgraphs or []:
        for op in graph.operators or []:
            for i in op.inputs if op.inputs is not None else []:
                t = graph.tensors[i] if i >= 0 else None
                data = flat.buffers[t.buffer].data if t is not None else None
                if data is not None and len(t.shape) >= 3 and len(data) > _QUANTIZER_CHUNK_BYTES:
                    found.append(graph.tensors[op.outputs[0]].name.decode())
                    break
    return found


def quantize(model: bytes, precision: str, name: str) -> tuple[bytes, list[str]]:
    """The fp32 flatbuffer with the weights of `precision` (see the module docstring), and the layers
    (op output names) left float: int8 skips convs too big for the quantizer (_QUANTIZER_CHUNK_BYTES)."""
    from ai_edge_quantizer import quantizer, recipe

    if precision == "fp16":
        rp = [{"regex": ".*", "operation": "*", "algorithm_key": "float_casting",
               "op_config": {"weight_tensor_config": {"num_bits": 16, "dtype": "FLOAT"},
                             "compute_precision": "FLOAT", "explicit_dequantize": True}}]
    elif precision == "int8_dynamic":
        rp = recipe.dynamic_wi8_afp32()
    else:
        rp = recipe.weight_only_wi8_afp32()
    skip = oversized_weight_layers(model) if precision.startswith("int8") else []
    # an op's scope is its output names joined and ended by ";" (ai_edge_quantizer get_op_scope)
    rp = list(rp) + [{"regex": f"^{re.escape(layer)};$", "operation": "*", "algorithm_key": "no_quantize"}
                     for layer in skip]
    try:
        q = quantizer.Quantizer(model)
        q.load_quantization_recipe(rp)
        # it prints a size summary and tqdm bars; errors still raise
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return bytes(q.quantize().quantized_model), skip
    except Exception as e:  # the quantizer's own errors are ValueError/RuntimeError of many kinds
        raise ExportError(f"applying {precision} to the {name} failed at {failed_op(e)}: {_first_line(e)}") from e
