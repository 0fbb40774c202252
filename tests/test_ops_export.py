"""The export path: eager parity with the reference, and litert-torch conversion run in LiteRT's interpreter.

Each converted model must hold what the LiteRT GPU delegate fuses: the `odml.group_norm` and
`odml.scaled_dot_product_attention` composites, or the builtins GELU, DEPTHWISE_CONV_2D and CONV_2D.
"""
import importlib.util
import math

import pytest
import torch

from mobilediffusion import ops

HAVE_LITERT = importlib.util.find_spec("litert_torch") is not None and \
    importlib.util.find_spec("ai_edge_litert") is not None
needs_litert = pytest.mark.skipif(
    not HAVE_LITERT,
    reason="litert-torch is not installed: pip install litert-torch==0.10.0 ai-edge-litert==2.3.0")


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


class GroupNormSiLU(torch.nn.Module):
    def __init__(self, channels, groups, act):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(channels))
        self.bias = torch.nn.Parameter(torch.randn(channels))
        self.groups, self.act = groups, act

    def forward(self, x, backend="export"):
        return ops.group_norm_act(x, self.groups, self.weight, self.bias, 1e-5, self.act, backend=backend)


class Attention(torch.nn.Module):
    def forward(self, q, k, v, backend="export"):
        return ops.attention(q, k, v, backend=backend)


class Activations(torch.nn.Module):
    def forward(self, x, backend="export"):
        return (ops.gelu(x, "none", backend=backend), ops.gelu(x, "tanh", backend=backend),
                ops.geglu(x, "none", backend=backend), ops.geglu(x, "tanh", backend=backend))


class SeparableConv(torch.nn.Module):
    def __init__(self, c, c_out, k):
        super().__init__()
        self.dw = torch.nn.Conv2d(c, c, k, padding=k // 2, groups=c)
        self.pw = torch.nn.Conv2d(c, c_out, 1)

    def forward(self, x, backend="export"):
        return ops.separable_conv(x, self.dw.weight, self.dw.bias, self.pw.weight, self.pw.bias, backend=backend)


def _cases():
    torch.manual_seed(0)
    return {
        "group_norm_silu": (GroupNormSiLU(8, 4, "silu"), (torch.randn(2, 8, 5, 3) * 2 + 1,)),
        "group_norm_3d": (GroupNormSiLU(6, 3, None), (torch.randn(1, 6, 10),)),
        "attention": (Attention(), (torch.randn(1, 2, 7, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))),
        "activations": (Activations(), (torch.randn(3, 10) * 3,)),
        "separable_conv": (SeparableConv(6, 5, 3), (torch.randn(2, 6, 7, 5),)),
    }


EXPECTED = {  # what the GPU delegate must see in the converted graph: composites with attributes, builtins
    "group_norm_silu": {"composites": [("odml.group_norm", {"num_groups": 4, "channel_axis": 3})],
                        "ops": {"LOGISTIC", "MUL"}},
    "group_norm_3d": {"composites": [("odml.group_norm", {"num_groups": 3, "channel_axis": 3})], "ops": set()},
    "attention": {"composites": [("odml.scaled_dot_product_attention", {"scale": 1 / math.sqrt(8)})],
                  "ops": set()},
    "activations": {"composites": [], "ops": {"GELU", "MUL"}},
    "separable_conv": {"composites": [], "ops": {"DEPTHWISE_CONV_2D", "CONV_2D"}},
}


@needs_litert
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_export_path_eager_equals_reference(name):
    """Traced or not, the export path computes the reference math (composite markers are identities)."""
    module, args = _cases()[name]
    with torch.no_grad():
        out, ref = module(*args), module(*args, backend="reference")
    for o, r in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,),
                    strict=True):
        assert o.shape == r.shape and rel_err(o, r) <= 1e-6


def _tflite_contents(model: bytes):
    """(builtin op names, [(composite name, attributes)]) of a .tflite flatbuffer."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.interpreter import Interpreter
    from flatbuffers import flexbuffers

    interpreter = Interpreter(model_content=model)
    interpreter.allocate_tensors()
    op_names = {op["op_name"] for op in interpreter._get_ops_details()}
    flat = schema.ModelT.InitFromPackedBuf(model, 0)
    options = [op.builtinOptions2 for graph in flat.subgraphs for op in graph.operators
               if isinstance(op.builtinOptions2, schema.StableHLOCompositeOptionsT)]
    return op_names, [(o.name.decode(), flexbuffers.Loads(bytes(o.compositeAttributes))) for o in options]


@pytest.mark.slow
@needs_litert
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_export_converts_and_runs_in_litert(name):
    import litert_torch
    from ai_edge_litert.interpreter import Interpreter

    module, args = _cases()[name]
    module.eval()
    model = bytes(litert_torch.convert(module, args).model_content())
    op_names, composites = _tflite_contents(model)
    expected = EXPECTED[name]["composites"]
    assert [c[0] for c in composites] == [e[0] for e in expected], op_names
    for (_, attrs), (_, want) in zip(composites, expected, strict=True):
        for key, value in want.items():
            assert attrs[key] == pytest.approx(value), (key, attrs)
    assert EXPECTED[name]["ops"] <= op_names, op_names

    runner = Interpreter(model_content=model).get_signature_runner("serving_default")
    outputs = runner(**{f"args_{i}": a.numpy() for i, a in enumerate(args)})
    with torch.no_grad():
        ref = module(*args, backend="reference")
    ref = ref if isinstance(ref, tuple) else (ref,)
    assert len(outputs) == len(ref)
    for i, r in enumerate(ref):
        out = torch.from_numpy(outputs[f"output_{i}"])
        assert out.shape == r.shape
        assert rel_err(out, r) <= 1e-4, f"output {i}: relative error {rel_err(out, r):.2e}"
