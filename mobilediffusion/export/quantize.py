"""Precisions of a converted (fp32) flatbuffer, applied by ai-edge-quantizer (a dependency of litert-torch).

    fp16              weights stored as float16, dequantized at load (half the size; float compute)
    int8_dynamic      int8 per-channel weights, activations quantized on the fly (integer matmuls/convs)
    int8_weight_only  int8 per-channel weights dequantized before each op (float compute)
    int8_a16          int8 per-channel weights and int16 activations, static ranges from calibration
                      samples (what phone NPUs run; the CPU runs it with reference kernels, slowly)

Every weight of every quantizable op is quantized: ai-edge-quantizer 0.10 quantizes a tensor over
32 MiB in row chunks and breaks on per-channel weights of more than 2 dimensions (SD's 1280-wide 3x3
convs; google-ai-edge/ai-edge-quantizer#512, fix proposed in #513). `_large_weights_by_channel` hands
such a weight to the quantizer's own `uniform_quantize` one slice of output channels at a time, each
under the chunk size: per-channel quantization treats channels independently, so the result is the
quantizer's own, bit for bit.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..runtime.manifest import PRECISIONS
from .failure import failed_op, first_line
from .flatbuffer import ExportError

QUANTIZER_CHUNK_BYTES = 32 * 1024 * 1024  # ai-edge-quantizer quantizes tensors above this in chunks
NEEDS_CALIBRATION = ("int8_a16",)  # precisions whose recipe needs calibration samples
MASK_CONSTANT_BYTES = 4096  # constants up to this size are searched for infinities (see _mask_like_ops)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


def recipe(precision: str) -> list[dict]:
    """The ai-edge-quantizer recipe of a precision other than fp32."""
    from ai_edge_quantizer import recipe as recipes

    if precision == "fp16":
        # embedding tables stay float32: the LiteRT GPU delegate takes a constant float32 or int8 table,
        # not a float16 one behind DEQUANTIZE (it runs that lookup on the CPU: seen with LiteRT's GPU
        # accelerator on a software Vulkan device); it costs an SD text encoder 76 MB
        return [{"regex": ".*", "operation": "*", "algorithm_key": "float_casting",
                 "op_config": {"weight_tensor_config": {"num_bits": 16, "dtype": "FLOAT"},
                               "compute_precision": "FLOAT", "explicit_dequantize": True}},
                {"regex": ".*", "operation": "EMBEDDING_LOOKUP", "algorithm_key": "no_quantize"}]
    made = {"int8_dynamic": recipes.dynamic_wi8_afp32, "int8_weight_only": recipes.weight_only_wi8_afp32,
            "int8_a16": recipes.static_wi8_ai16}
    if precision not in made:
        raise ConfigError(f"no quantization recipe for precision {precision!r}; choose one of "
                          f"{', '.join(p for p in PRECISIONS if p != 'fp32')}")
    rp = list(made[precision]())
    if precision == "int8_a16":  # the static recipe leaves embedding tables float; store them int8 too
        rp.append({**recipes.weight_only_wi8_afp32()[0], "operation": "EMBEDDING_LOOKUP"})
    return rp


def quantize(model_path, out_path, precision: str, name: str, calibration: dict | list | None = None) -> None:
    """The fp32 flatbuffer at `model_path` with the weights (and for int8_a16 the activations) of
    `precision`, written to `out_path`. `calibration`: sample inputs {input name: array} per signature
    ({signature: [inputs, ...]}; a list: those of the signature `name`), required by int8_a16, for every
    signature of the file. The quantizer maps both files; nothing is held as bytes."""
    from ai_edge_quantizer import quantizer

    check_precision(precision)
    if isinstance(calibration, list):
        calibration = {name: calibration}
    if precision in NEEDS_CALIBRATION and not calibration:
        raise ValueError(f"{precision} needs calibration samples for the {name}")
    try:
        q = quantizer.Quantizer(Path(model_path))
        q.load_quantization_recipe(recipe(precision))
        # it prints a size summary and tqdm bars; errors still raise
        with _large_weights_by_channel(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            ranges = _calibrate(q, model_path, name, calibration) if q.need_calibration else None
            wide = _mask_like_ops(model_path) if ranges else []
            if wide:  # keep them float: the quantizer puts QUANTIZE / DEQUANTIZE around them
                q.load_quantization_recipe(recipe(precision) + [
                    {"regex": "^(" + "|".join(re.escape(scope) for scope in wide) + ")$", "operation": "*",
                     "algorithm_key": "no_quantize"}])
            q.quantize(ranges, serialize_to_path=Path(out_path), enable_progress_bar=False)
    except ExportError:
        raise
    except Exception as e:  # the quantizer's own errors are ValueError/RuntimeError of many kinds
        raise ExportError(f"applying {precision} to the {name} failed at {failed_op(e)}: {first_line(e)}") from e


def _calibrate(q, model_path, name: str, samples: dict[str, list[dict]]) -> dict:
    """Min/max of every tensor over the samples. The quantizer keeps every intermediate tensor of a run in
    memory for this (its profiler-based mode is lighter but gave models that abort in the interpreter
    here), so the run's tensors are added up first and a machine without that memory is told so."""
    from .budget import GB, available_memory

    need = intermediate_bytes(model_path) + 2 * Path(model_path).stat().st_size  # tensors + mapped and packed weights
    free = available_memory()
    if free is not None and need > free:
        raise ExportError(f"calibrating the {name} for int8_a16 keeps every intermediate tensor: about "
                          f"{need / GB:.1f} GB, but {free / GB:.1f} GB are available; export int8_a16 at a smaller "
                          "size or batch, or choose int8_dynamic / int8_weight_only")
    return q.calibrate(samples, num_threads=os.cpu_count() or 1)


def _mask_like_ops(model_path) -> list[str]:
    """Scopes of the ops that read a tensor which may hold +-inf: attention masks built from -inf (CLIP's
    causal mask) and everything computed from them up to the softmax that consumes them. Calibration
    ranges skip infinities, so quantizing these tensors turns -inf into an ordinary value and the mask
    vanishes; those ops stay float. An op's scope is its output names, each followed by ";"
    (ai-edge-quantizer's get_op_scope)."""
    from ai_edge_litert import schema_py_generated as schema

    from .flatbuffer import is_constant, mapped

    floats = {schema.TensorType.FLOAT32: np.float32, schema.TensorType.FLOAT16: np.float16}
    scopes = []
    with mapped(model_path) as data:
        flat = schema.Model.GetRootAs(data, 0)
        for g in range(flat.SubgraphsLength()):
            graph = flat.Subgraphs(g)
            infinite = set()
            for t in range(graph.TensorsLength()):
                tensor = graph.Tensors(t)
                if tensor.Type() in floats and is_constant(flat, graph, t):
                    b = flat.Buffers(tensor.Buffer())
                    size = b.DataLength() if b.DataLength() else b.Size()
                    if size <= MASK_CONSTANT_BYTES:
                        raw = b.DataAsNumpy().tobytes() if b.DataLength() else data[b.Offset():b.Offset() + size]
                        if not np.all(np.isfinite(np.frombuffer(raw, floats[tensor.Type()]))):
                            infinite.add(t)
            for i in range(graph.OperatorsLength()):
                op = graph.Operators(i)
                if not infinite & {op.Inputs(k) for k in range(op.InputsLength())}:
                    continue
                outs = [op.Outputs(k) for k in range(op.OutputsLength()) if op.Outputs(k) >= 0]
                scopes.append("".join(graph.Tensors(t).Name().decode() + ";" for t in outs))
                code = flat.OperatorCodes(op.OpcodeIndex())
                if max(code.BuiltinCode(), code.DeprecatedBuiltinCode()) != schema.BuiltinOperator.SOFTMAX:
                    infinite.update(outs)  # -inf passes through selects, adds, reshapes ... up to the softmax
    return scopes


def intermediate_bytes(model) -> int:
    """Bytes of all non-constant tensors of all subgraphs: what a run keeps when every tensor is preserved."""
    from ai_edge_litert import schema_py_generated as schema

    from .flatbuffer import is_constant, mapped

    sizes = {schema.TensorType.FLOAT32: 4, schema.TensorType.INT32: 4, schema.TensorType.INT64: 8,
             schema.TensorType.FLOAT16: 2, schema.TensorType.INT16: 2, schema.TensorType.BOOL: 1,
             schema.TensorType.INT8: 1}
    total = 0
    with mapped(model) as data:
        flat = schema.Model.GetRootAs(data, 0)
        for g in range(flat.SubgraphsLength()):
            graph = flat.Subgraphs(g)
            for t in range(graph.TensorsLength()):
                if not is_constant(flat, graph, t):
                    tensor = graph.Tensors(t)
                    total += int(np.prod(tensor.ShapeAsNumpy() if tensor.ShapeLength() else [1])) * \
                        sizes.get(tensor.Type(), 4)
    return total


@contextlib.contextmanager
def _large_weights_by_channel():
    """While active, ai-edge-quantizer's uniform_quantize takes a per-channel tensor over its chunk size
    in slices of whole output channels (see the module docstring); every other call passes through."""
    from ai_edge_quantizer.algorithms.uniform_quantize import uniform_quantize_tensor as uqt

    original = uqt.uniform_quantize

    def by_channel(tensor_data, quantization_params, is_blockwise_quant=False):
        dim = quantization_params.quantized_dimension
        scale = np.asarray(quantization_params.scale)
        if (is_blockwise_quant or tensor_data.ndim <= 2 or tensor_data.nbytes <= QUANTIZER_CHUNK_BYTES
                or dim is None or scale.size != tensor_data.shape[dim] or scale.size < 2):
            return original(tensor_data, quantization_params, is_blockwise_quant)
        n = tensor_data.shape[dim]
        step = max(1, n * QUANTIZER_CHUNK_BYTES // tensor_data.nbytes)  # channels per slice, each under the chunk
        zero = np.asarray(quantization_params.zero_point).reshape(-1)
        parts = []
        for start in range(0, n, step):
            part = slice(start, min(n, start + step))
            index = (slice(None),) * dim + (part,)
            params = dataclasses.replace(quantization_params, scale=scale.reshape(-1)[part],
                                         zero_point=zero[part] if zero.size == n else zero)
            parts.append(original(tensor_data[index], params, False))
        return np.concatenate(parts, axis=dim)

    uqt.uniform_quantize = by_channel
    try:
        yield
    finally:
        uqt.uniform_quantize = original
