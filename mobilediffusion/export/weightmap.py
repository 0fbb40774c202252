"""Where each torch parameter of a converted component lives in its .tflite file, for LoRA packs.

The converter keeps every weight a parameter holds as a constant tensor, in TFLite's layout: a Linear's
[out, in] as it is, a Conv2d's [out, in, kh, kw] as [out, kh, kw, in], a depthwise one's [C, 1, kh, kw] as
[1, kh, kw, C]; it may fold a constant factor into it (attention's 1/sqrt(d) goes into the query and key
projections as d^-1/4 each). Each parameter is found among the fp32 file's constants of the shape one of
those layouts gives, as the tensor equal to it times a factor (1 for most); the map names the tensor, which
keeps its name and subgraph when a precision is applied afterwards (ai-edge-quantizer rewrites the buffers,
not the graph), with the layout and the factor a LoRA's update must take too. A parameter the converter
folded away (a zero bias), one of constant value (a fresh norm's ones) or one several tensors match is left out:
a LoRA that needs it is refused by name when its pack is made.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from .flatbuffer import buffer_span, mapped

# layout name -> the permutation from the torch parameter to the TFLite tensor (None: the same)
LAYOUTS = {"same": None, "ohwi": (0, 2, 3, 1), "depthwise": (1, 2, 3, 0), "transposed": (1, 0)}


def to_file_layout(array: np.ndarray, layout: str) -> np.ndarray:
    """A parameter-shaped array in the file's layout."""
    perm = LAYOUTS[layout]
    return array if perm is None else np.ascontiguousarray(array.transpose(perm))


def weight_map(module, path, prefix: str) -> dict[str, dict]:
    """{parameter name without `prefix`: {"tensor": name, "subgraph": index, "layout": LAYOUTS key, "scale":
    factor}} for the parameters of `module` under `prefix`, found in the fp32 flatbuffer at `path` (see the module
    docstring)."""
    from ai_edge_litert import schema_py_generated as schema

    params = [(n[len(prefix):], p) for n, p in module.named_parameters() if n.startswith(prefix)]
    out = {}
    with mapped(path) as data:
        flat = schema.Model.GetRootAs(data, 0)
        # 1. every float32 constant, by shape (each buffer once: signatures share them)
        by_shape, seen = {}, set()
        for g in range(flat.SubgraphsLength()):
            graph = flat.Subgraphs(g)
            for t in range(graph.TensorsLength()):
                tensor = graph.Tensors(t)
                buf = tensor.Buffer()
                span = buffer_span(flat, buf) if tensor.Type() == schema.TensorType.FLOAT32 else None
                if span is None or buf in seen:
                    continue
                seen.add(buf)
                shape = tuple(int(d) for d in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ()
                by_shape.setdefault(shape, []).append((span, tensor.Name().decode(), g))
        # 2. each parameter in each layout its rank allows: the tensor of that shape equal to it times a factor
        for name, p in params:
            array = p.detach().float().cpu().numpy()
            if array.size == 0 or array.min() == array.max():
                continue  # constant-valued (a fresh norm's ones): no different from other such constants
            hits = {}
            for layout, perm in LAYOUTS.items():
                if perm is not None and len(perm) != array.ndim:
                    continue
                want = to_file_layout(array, layout).ravel()
                shape = tuple(array.shape[i] for i in perm) if perm else array.shape
                for span, tensor, g in by_shape.get(shape, ()):
                    scale = _factor(np.frombuffer(data, np.float32, want.size, span[0]), want)
                    if scale is not None:
                        hits[span[0]] = {"tensor": tensor, "subgraph": g, "layout": layout, "scale": scale}
            if len(hits) == 1:
                out[name] = next(iter(hits.items()))
    # 3. a tensor two parameters lead to (equal constants the converter shares, e.g. norms of ones) is neither's
    claims = Counter(start for start, _ in out.values())
    return {name: where for name, (start, where) in out.items() if claims[start] == 1}


SAMPLE = 256  # elements compared first, before the whole tensor


def _factor(stored: np.ndarray, param: np.ndarray) -> float | None:
    """c when stored == c * param to float32 rounding (c = 1.0 when they are equal), else None."""
    head = param[:SAMPLE].astype(np.float64)
    norm = float(head @ head)
    if norm == 0.0:
        return None  # a zero (start of a) parameter cannot be told apart from other zeros
    c = float(stored[:SAMPLE].astype(np.float64) @ head) / norm
    if abs(c) < 1e-6:  # a zero tensor (e.g. a folded-away constant) is no parameter's image
        return None
    for a, b in ((stored[:SAMPLE], head), (stored, param)):
        expected = c * np.asarray(b, np.float64)
        limit = 2e-7 * max(float(np.abs(expected).max()), 1e-30)
        if not float(np.abs(a - expected).max()) <= limit:
            return None
    return 1.0 if abs(c - 1.0) <= 1e-7 else c
