"""GPU-delegate readiness of a .tflite file: LiteRT's model analyzer, and every operator checked against
the ops the LiteRT GPU delegate takes. Nothing is refused for it; the verdict goes into the manifest.

The analyzer ai-edge-litert ships (`ModelAnalyzer(model, input_is_path, check_gpu_compatibility)`)
prints, with the GPU check on, "Your model looks compatible with GPU delegate on TFLite runtime
version ..." or, per subgraph, "GPU COMPATIBILITY WARNING: Subgraph#i has GPU delegate compatibility
issues at nodes 3, 7 ...". In LiteRT's own build (ai-edge-litert 2.x) the per-op check behind it is
not compiled in: tflite/python/analyzer_wrapper/model_analyzer.cc never fills its list of
incompatible nodes, so the analyzer calls any model compatible (seen here with RELU_0_TO_1, CUMSUM and
STABLEHLO_SORT). Its verdict is recorded as it is, and the verdict that counts comes from
`unsupported_ops`: each operator against LiteRT's GPU compatibility rules
(tflite/tools/versioning/gpu_compatibility.cc, the check the analyzer used to call): a builtin it has
no case for, a StableHLO composite the GPU accelerator does not fuse, integer (quantized) activations,
which the delegate does not compute (it dequantizes constant int8/fp16 weights only), or an embedding
table that is not a constant.

Checked against the delegate itself: LiteRT's GPU accelerator (ML Drift over WebGPU) in ai-edge-litert
2.3, run on a software Vulkan device (SwiftShader), reported as not supported exactly RELU_0_TO_1, a
float16 embedding table behind DEQUANTIZE ("Empty quantization params") and int16 tensors, and took
the fp32, int8 and fixed fp16 text encoders whole. It crashed on that device after partitioning graphs
with odml composites, so it cannot serve as the check here.
"""
from __future__ import annotations

import re
from collections import Counter

from .flatbuffer import composite_name, is_constant, mapped

# builtin ops LiteRT's GPU compatibility check has a case for (gpu_compatibility.cc); per-op shape
# limits there are not repeated here
GPU_BUILTINS = frozenset("""
    ABS ADD ADD_N ATAN2 AVERAGE_POOL_2D BATCH_MATMUL BITCAST CAST CEIL CONCATENATION CONV_2D COS CUMSUM
    DENSIFY DEPTHWISE_CONV_2D DEPTH_TO_SPACE DEQUANTIZE DIV DYNAMIC_UPDATE_SLICE ELU EMBEDDING_LOOKUP EQUAL
    EXP FLOOR FLOOR_DIV FLOOR_MOD FULLY_CONNECTED GATHER GELU GREATER GREATER_EQUAL HARD_SWISH LEAKY_RELU
    LESS LESS_EQUAL LOG LOGICAL_AND LOGICAL_NOT LOGICAL_OR LOGISTIC LSTM MAXIMUM MAX_POOL_2D MEAN MINIMUM
    MIRROR_PAD MUL NEG NOT_EQUAL ONE_HOT PACK PAD PADV2 POW PRELU QUANTIZE REDUCE_ANY REDUCE_ALL REDUCE_MAX
    REDUCE_MIN REDUCE_PROD RELU RELU6 RELU_N1_TO_1 RESHAPE RESIZE_BILINEAR RESIZE_NEAREST_NEIGHBOR
    REVERSE_V2 RIGHT_SHIFT ROUND RSQRT SELECT SELECT_V2 SIGN SIN SLICE SOFTMAX SPACE_TO_DEPTH SPLIT SPLIT_V
    SQRT SQUARE SQUARED_DIFFERENCE STABLEHLO_BROADCAST_IN_DIM STABLEHLO_CBRT STABLEHLO_CLAMP
    STABLEHLO_REMAINDER STABLEHLO_SHIFT_LEFT STRIDED_SLICE SUB SUM TANH TILE TOPK_V2 TRANSPOSE TRANSPOSE_CONV
""".split())
# StableHLO composites LiteRT's GPU accelerator runs as one fused kernel (the ops' export path emits them)
GPU_COMPOSITES = frozenset({"odml.group_norm", "odml.scaled_dot_product_attention", "odml.rms_norm"})
# tensor types the delegate computes activations in; constant weights may also be int8 / fp16
FLOAT_ACTIVATIONS = frozenset({"FLOAT32", "FLOAT16", "BOOL", "INT32"})
_ANALYZER_VERDICT = re.compile(r"^(Your model looks compatible with GPU delegate.*|GPU COMPATIBILITY WARNING:.*)$",
                               re.M)


def gpu_report(path) -> dict:
    """{"compatible": bool, "unsupported_ops": {op: reason}, "analyzer": [its verdict lines],
    "checked_by": how}. `compatible` is True when no operator was found the GPU delegate cannot take."""
    unsupported = unsupported_ops(path)
    return {
        "compatible": not unsupported,
        "unsupported_ops": unsupported,
        "analyzer": analyzer_verdict(path),
        "checked_by": "LiteRT GPU compatibility rules per operator (gpu_compatibility.cc) + LiteRT model analyzer",
    }


def analyzer_verdict(path) -> list[str]:
    """The GPU lines LiteRT's model analyzer prints for the file (see the module docstring)."""
    from ai_edge_litert import _pywrap_analyzer_wrapper as analyzer

    return _ANALYZER_VERDICT.findall(analyzer.ModelAnalyzer(str(path), True, True))


def unsupported_ops(model_or_path) -> dict[str, str]:
    """{op: why the GPU delegate cannot take it (with a count)} for every operator of the model (a path or
    flatbuffer bytes) outside the GPU delegate's support; {} when all are supported."""
    from ai_edge_litert import schema_py_generated as schema

    with mapped(model_or_path) as data:
        found = Counter(_problems(schema.Model.GetRootAs(data, 0)))
    ops = sorted({op for op, _ in found})
    return {op: "; ".join(f"{reason} (x{n})" for (o, reason), n in sorted(found.items()) if o == op) for op in ops}


def _problems(flat):
    """(op name, reason) for each operator of the signature graphs the GPU delegate cannot take."""
    from ai_edge_litert import schema_py_generated as schema

    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    for g in range(flat.SubgraphsLength()):
        if not _is_signature_graph(flat, g):
            continue  # composite decompositions and other callees: the composite itself is judged
        graph = flat.Subgraphs(g)
        for i in range(graph.OperatorsLength()):
            op = graph.Operators(i)
            code = flat.OperatorCodes(op.OpcodeIndex())
            value = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            name = op_names.get(value, f"BUILTIN_{value}")
            if value == schema.BuiltinOperator.CUSTOM:
                yield (code.CustomCode() or b"?").decode(), "custom op"
            elif value == schema.BuiltinOperator.STABLEHLO_COMPOSITE:
                composite = composite_name(op)
                if composite not in GPU_COMPOSITES:
                    yield f"STABLEHLO_COMPOSITE {composite}", "a composite the GPU accelerator does not fuse"
            elif name not in GPU_BUILTINS:
                yield name, "not supported op"
            elif name == "EMBEDDING_LOOKUP" and not is_constant(flat, graph, op.Inputs(1)):
                yield name, "a table computed at run time (the delegate takes a constant float32 or int8 table)"
            else:
                kinds = {type_names.get(graph.Tensors(t).Type(), "?") for t in _runtime_tensors(flat, graph, op)}
                if kinds - FLOAT_ACTIVATIONS:
                    yield name, f"{'/'.join(sorted(kinds - FLOAT_ACTIVATIONS))} activations (the delegate computes float)"


def summary_line(report: dict | None) -> str:
    """One line for the export summary / info: 'GPU delegate: all ops supported', or the ops that are not,
    grouped by reason ('not supported op: RELU_0_TO_1 (x1); INT16 activations ...: ADD (x42), ...')."""
    if not report:
        return "GPU delegate: not checked (bundle exported before the check existed)"
    if report["compatible"]:
        return "GPU delegate: all ops supported"
    by_reason: dict[str, list[str]] = {}
    for op, why in report["unsupported_ops"].items():
        for part in why.split("; "):
            reason, _, count = part.rpartition(" (x")
            by_reason.setdefault(reason, []).append(f"{op} (x{count}")
    groups = [f"{reason}: {', '.join(ops[:5])}{f' and {len(ops) - 5} more' if len(ops) > 5 else ''}"
              for reason, ops in by_reason.items()]
    return "GPU delegate: NOT all ops supported - " + "; ".join(groups)


def _is_signature_graph(flat, g: int) -> bool:
    """Subgraph g is a signature's entry graph (subgraph 0 when the file has no signatures)."""
    if flat.SignatureDefsLength() == 0:
        return g == 0
    return any(flat.SignatureDefs(s).SubgraphIndex() == g for s in range(flat.SignatureDefsLength()))


def _runtime_tensors(flat, graph, op):
    """The op's inputs and outputs that are computed at run time (not constants)."""
    for t in [*(op.Inputs(k) for k in range(op.InputsLength())), *(op.Outputs(k) for k in range(op.OutputsLength()))]:
        if t >= 0 and not is_constant(flat, graph, t):
            yield t
