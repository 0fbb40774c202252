"""What a converter or quantizer error says: the op (or layer) it failed at, and its first line."""
from __future__ import annotations

import re

_OP_PATTERN = re.compile(r"(aten\.[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?|'?(?:tfl|stablehlo|mhlo|chlo)\.[A-Za-z0-9_]+'?)")
_TENSOR_PATTERN = re.compile(r"for tensor: (\S+?)[.;]? Error")


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


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


__all__ = ["failed_op", "first_line"]
