"""Where each torch parameter of a converted component lives in its .tflite file, for LoRA packs.

The converter keeps every weight a parameter holds as a constant tensor, in TFLite's layout: a Linear's
[out, in] as it is, a Conv2d's [out, in, kh, kw] as [out, kh, kw, in], a depthwise one's [C, 1, kh, kw] as
[1, kh, kw, C]. It may fold constants into it: attention's 1/sqrt(d) goes into the query and key projections
(d^-1/4 each: a factor c), and a LayerNorm's affine goes into the Linear that reads it (W' = c W diag(gamma),
b' = c (b + W beta): the "norm" of the entry, whose gamma and beta the bundle keeps beside the file, as a LoRA
changing W changes both). Each parameter is found among the fp32 file's constants of the shape one of those
layouts gives, as the tensor equal to it (folded with its norm, when a LayerNorm feeds it) times a factor; the
map names the tensor, which keeps its name and subgraph when a precision is applied afterwards
(ai-edge-quantizer rewrites the buffers, not the graph), with the layout, the factor and the norm. A parameter
the converter folded away (a zero bias), one of constant value (a fresh norm's ones) or one several tensors match
is left out: a LoRA that needs it is refused by name when its pack is made.
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


def norm_feeds(module, inputs: dict, prefix: str) -> dict[str, str]:
    """{Linear name: LayerNorm name} (without `prefix`) for every Linear whose input is a LayerNorm's output
    itself, seen in one forward pass of `module` on `inputs` (the folds the converter makes)."""
    import torch
    from torch import nn

    outputs, feeds, hooks = [], {}, []

    def after_norm(name):
        return lambda mod, args, out: outputs.append((out, name))

    def before_linear(name):
        return lambda mod, args: feeds.update({name: next((n for o, n in outputs if o is args[0]), None)})

    for name, m in module.named_modules():
        if not name.startswith(prefix):
            continue
        if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            hooks.append(m.register_forward_hook(after_norm(name[len(prefix):])))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_pre_hook(before_linear(name[len(prefix):])))
    try:
        with torch.no_grad():
            module(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return {linear: norm for linear, norm in feeds.items() if norm is not None}


def weight_map(module, path, prefix: str, inputs: dict) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """({parameter name without `prefix`: {"tensor": name, "subgraph": index, "layout": LAYOUTS key, "scale":
    factor[, "norm": LayerNorm name]}}, {"<norm>.weight" / "<norm>.bias": gamma / beta of the norms folded in})
    for the parameters of `module` under `prefix`, found in the fp32 flatbuffer at `path` (see the module
    docstring); `inputs`: example inputs of `module`, to see which Linears read a LayerNorm. A folded Linear's
    bias is mapped as "<linear>.bias" also when the Linear had none (the converter made one from beta)."""
    from ai_edge_litert import schema_py_generated as schema

    params = {n[len(prefix):]: p.detach().float().cpu().numpy() for n, p in module.named_parameters()
              if n.startswith(prefix)}
    feeds = norm_feeds(module, inputs, prefix)
    folds = {}
    for norm in set(feeds.values()):
        folds[f"{norm}.weight"], folds[f"{norm}.bias"] = params[f"{norm}.weight"], params[f"{norm}.bias"]
    wanted = {}  # name -> [(layout, array in the file's layout, extra entry fields, tolerance)]
    for name, array in params.items():
        if array.size and array.min() != array.max():  # constant-valued (a fresh norm's ones): like other constants
            wanted[name] = [(layout, to_file_layout(array, layout), {}, EXACT) for layout, perm in LAYOUTS.items()
                            if perm is None or len(perm) == array.ndim]
    for linear, norm in feeds.items():  # W diag(gamma) and b + W beta, as the converter folds them
        w, gamma, beta = params[f"{linear}.weight"], folds[f"{norm}.weight"], folds[f"{norm}.bias"]
        b = params.get(f"{linear}.bias", np.zeros(w.shape[0], np.float32))
        wanted.setdefault(f"{linear}.weight", []).append(("same", w.astype(np.float64) * gamma, {"norm": norm}, EXACT))
        wanted[f"{linear}.bias"] = [("same", b + w.astype(np.float64) @ beta, {"norm": norm}, SUMMED)]
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
        # 2. each parameter in each of its forms: the tensor of that shape equal to it times a factor
        for name, forms in wanted.items():
            hits = {}
            for layout, want, extra, tolerance in forms:
                for span, tensor, g in by_shape.get(want.shape, ()):
                    scale = _factor(np.frombuffer(data, np.float32, want.size, span[0]), want.ravel(), tolerance)
                    if scale is not None:
                        hits[span[0]] = {"tensor": tensor, "subgraph": g, "layout": layout, "scale": scale, **extra}
            if len(hits) == 1:
                out[name] = next(iter(hits.items()))
    # 3. a tensor two parameters lead to (equal constants the converter shares, e.g. norms of ones) is neither's
    claims = Counter(start for start, _ in out.values())
    mapped_ = {name: where for name, (start, where) in out.items() if claims[start] == 1}
    used = {w["norm"] for w in mapped_.values() if "norm" in w}
    return mapped_, {k: v for k, v in folds.items() if k.rsplit(".", 1)[0] in used}


EXACT = 2e-7  # the largest difference from the expected tensor, relative to its largest value: rounding only
SUMMED = 1e-5  # the same for a folded bias, a sum over the norm's width the converter rounds in float32
SAMPLE = 256  # elements compared first, before the whole tensor


def _factor(stored: np.ndarray, param: np.ndarray, tolerance: float = EXACT) -> float | None:
    """c when stored == c * param to `tolerance` of its largest value (c = 1.0 when they are equal), else None."""
    head = param[:SAMPLE].astype(np.float64)
    norm = float(head @ head)
    if norm == 0.0:
        return None  # a zero (start of a) parameter cannot be told apart from other zeros
    c = float(stored[:SAMPLE].astype(np.float64) @ head) / norm
    if abs(c) < 1e-6:  # a zero tensor (e.g. a folded-away constant) is no parameter's image
        return None
    for a, b in ((stored[:SAMPLE], head), (stored, param)):
        expected = c * np.asarray(b, np.float64)
        limit = tolerance * max(float(np.abs(expected).max()), 1e-30)
        if not float(np.abs(a - expected).max()) <= limit:
            return None
    return 1.0 if abs(c - 1.0) <= 1e-7 else c
