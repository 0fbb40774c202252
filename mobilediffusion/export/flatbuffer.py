"""What a .tflite flatbuffer holds: its operators (builtin or custom), composites, signatures and where its
weights live. Functions take the flatbuffer as bytes or a file path (mapped, not read into memory).

Bundles must hold builtin TFLite operators only: no custom ops, hence no Flex (select TensorFlow) ops,
which a phone app could not run without linking TensorFlow.

Large-model form: a flatbuffer addresses at most 2 GB, so LiteRT stores the weights of bigger models
after the flatbuffer in the same file (Buffer.offset / Buffer.size). litert-torch writes it when a model
needs it, ai-edge-quantizer always writes its output so, and the LiteRT interpreter reads it (a 3.2 GiB
fp32 SD1.5 UNet was converted, read and run here). `large_model_form` says whether a file uses it.
"""
from __future__ import annotations

import contextlib
import mmap
from collections import Counter
from pathlib import Path

from ..errors import MobileDiffusionError

FLATBUFFER_LIMIT = 2**31  # bytes a flatbuffer can address (32-bit signed offsets)


class ExportError(MobileDiffusionError):
    """A conversion, check or verification that failed; the message names the component and the cause."""


@contextlib.contextmanager
def mapped(model):
    """The flatbuffer as a bytes-like object: bytes as given, a path mapped read-only for the block."""
    if isinstance(model, (bytes, bytearray, memoryview)):
        yield model
        return
    with open(Path(model), "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
        yield view


def _root(data):
    from ai_edge_litert import schema_py_generated as schema

    return schema.Model.GetRootAs(data, 0)


def _op_names():
    from ai_edge_litert import schema_py_generated as schema

    return {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


def operator_counts(model) -> tuple[Counter, list[str]]:
    """(Counter of builtin operator names over all subgraphs, list of custom op names in use)."""
    from ai_edge_litert import schema_py_generated as schema

    names = _op_names()
    builtin, custom = Counter(), []
    with mapped(model) as data:
        flat = _root(data)
        for g in range(flat.SubgraphsLength()):
            graph = flat.Subgraphs(g)
            for i in range(graph.OperatorsLength()):
                op = graph.Operators(i)
                value = _code(flat, op)
                if value == schema.BuiltinOperator.CUSTOM:
                    custom.append((flat.OperatorCodes(op.OpcodeIndex()).CustomCode() or b"?").decode())
                else:
                    builtin[names.get(value, f"BUILTIN_{value}")] += 1
    return builtin, custom


def composite_counts(model) -> Counter:
    """Counter of StableHLO composite names (e.g. odml.group_norm) in the flatbuffer."""
    found = Counter()
    with mapped(model) as data:
        flat = _root(data)
        for g in range(flat.SubgraphsLength()):
            graph = flat.Subgraphs(g)
            for i in range(graph.OperatorsLength()):
                name = composite_name(graph.Operators(i))
                if name is not None:
                    found[name] += 1
    return found


def composite_name(op) -> str | None:
    """The composite name of a STABLEHLO_COMPOSITE operator, None for any other operator."""
    from ai_edge_litert import schema_py_generated as schema

    table = op.BuiltinOptions2()
    if table is None or op.BuiltinOptions2Type() != schema.BuiltinOptions2.StableHLOCompositeOptions:
        return None
    options = schema.StableHLOCompositeOptions()
    options.Init(table.Bytes, table.Pos)
    return (options.Name() or b"?").decode()


def large_model_form(model) -> bool:
    """Whether the file keeps weights after the flatbuffer (Buffer.offset > 1; see the module docstring)."""
    with mapped(model) as data:
        flat = _root(data)
        return any(flat.Buffers(i).Offset() > 1 for i in range(flat.BuffersLength()))


def weight_storage(model) -> dict[str, str]:
    """{layer (op output name): storage type of its constant weight} for every CONV_2D,
    DEPTHWISE_CONV_2D, TRANSPOSE_CONV and FULLY_CONNECTED op, e.g. "FLOAT32", "FLOAT16" or "INT8";
    a weight made by a DEQUANTIZE op (fp16 and weight-only int8) is traced to the constant it reads."""
    from ai_edge_litert import schema_py_generated as schema

    types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    op = schema.BuiltinOperator
    weighted = {op.CONV_2D, op.DEPTHWISE_CONV_2D, op.FULLY_CONNECTED, op.TRANSPOSE_CONV}  # weight: input 1
    found = {}
    with mapped(model) as data:
        flat = _root(data)
        for g in range(flat.SubgraphsLength()):
            graph = flat.Subgraphs(g)
            ops = [graph.Operators(i) for i in range(graph.OperatorsLength())]
            codes = [_code(flat, o) for o in ops]
            made_by = {o.Outputs(0): i for i, o in enumerate(ops) if o.OutputsLength()}
            for o, code in zip(ops, codes):
                if code not in weighted:
                    continue
                t = o.Inputs(1)
                while t in made_by and codes[made_by[t]] == op.DEQUANTIZE:
                    t = ops[made_by[t]].Inputs(0)
                if t >= 0 and t not in made_by and is_constant(flat, graph, t):
                    found[graph.Tensors(o.Outputs(0)).Name().decode()] = types[graph.Tensors(t).Type()]
    return found


def _code(flat, op) -> int:
    code = flat.OperatorCodes(op.OpcodeIndex())
    return max(code.BuiltinCode(), code.DeprecatedBuiltinCode())


def buffer_span(flat, index: int) -> tuple[int, int] | None:
    """(start, size) in bytes of buffer `index`'s data in the file: inside the flatbuffer, or after it in the
    large-model form (Buffer.offset from the file's start); None for a buffer without data."""
    b = flat.Buffers(index)
    if b is None:
        return None
    if b.Offset() > 1:
        return int(b.Offset()), int(b.Size())
    n = b.DataLength()
    return (int(b._tab.Vector(b._tab.Offset(4))), int(n)) if n else None  # Buffer.data is field 0 (vtable slot 4)


def constant_bytes(model) -> int:
    """Bytes of all constant data (weights) in the file, each buffer once however many subgraphs use it."""
    with mapped(model) as data:
        flat = _root(data)
        spans = (buffer_span(flat, i) for i in range(flat.BuffersLength()))
        return sum(span[1] for span in spans if span is not None)


def scale_span(tensor) -> tuple[int, int] | None:
    """(start, count) of a quantized tensor's float32 per-channel scales in the file, None when it has none
    (QuantizationParameters.scale is field 2: vtable slot 8)."""
    q = tensor.Quantization()
    if q is None or not q.ScaleLength():
        return None
    return int(q._tab.Vector(q._tab.Offset(8))), int(q.ScaleLength())


def is_constant(flat, graph, t: int) -> bool:
    """Tensor t of the graph has data: inside the flatbuffer, or after it (large-model form: offset > 1)."""
    b = flat.Buffers(graph.Tensors(t).Buffer())
    return b is not None and (b.DataLength() > 0 or b.Offset() > 1)


def check_builtin_only(model, what: str) -> Counter:
    """The builtin operator counts; ExportError if any custom (e.g. Flex / select-TF) op is present."""
    builtin, custom = operator_counts(model)
    if custom:
        flex = sorted({c for c in custom if c.startswith("Flex")})
        raise ExportError(
            f"{what}: the converted model needs non-builtin ops {sorted(set(custom))}"
            + (f" (Flex ops {flex} need TensorFlow on the device)" if flex else "")
            + "; bundles must hold builtin TFLite ops only. Rewrite the layer that produces them, or export "
              "with ops backend 'reference'"
        )
    return builtin
