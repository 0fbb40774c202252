"""What a .tflite flatbuffer holds: its operators (builtin or custom), composites and signatures.

Bundles must hold builtin TFLite operators only: no custom ops, hence no Flex (select TensorFlow) ops,
which a phone app could not run without linking TensorFlow.
"""
from __future__ import annotations

from collections import Counter

from ..errors import MobileDiffusionError


class ExportError(MobileDiffusionError):
    """A conversion, check or verification that failed; the message names the component and the cause."""


def operator_counts(model: bytes) -> tuple[Counter, list[str]]:
    """(Counter of builtin operator names over all subgraphs, list of custom op names in use)."""
    from ai_edge_litert import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    flat = schema.ModelT.InitFromPackedBuf(model, 0)
    codes = flat.operatorCodes or []
    builtin, custom = Counter(), []
    for graph in flat.subgraphs or []:
        for op in graph.operators or []:
            code = codes[op.opcodeIndex]
            value = max(code.builtinCode, code.deprecatedBuiltinCode)
            if value == schema.BuiltinOperator.CUSTOM:
                custom.append((code.customCode or b"?").decode())
            else:
                builtin[names.get(value, f"BUILTIN_{value}")] += 1
    return builtin, custom


def composite_counts(model: bytes) -> Counter:
    """Counter of StableHLO composite names (e.g. odml.group_norm) in the flatbuffer."""
    from ai_edge_litert import schema_py_generated as schema

    flat = schema.ModelT.InitFromPackedBuf(model, 0)
    return Counter(
        op.builtinOptions2.name.decode()
        for graph in flat.subgraphs or [] for op in graph.operators or []
        if isinstance(op.builtinOptions2, schema.StableHLOCompositeOptionsT)
    )


def check_builtin_only(model: bytes, what: str) -> Counter:
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
