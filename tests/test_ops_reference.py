"""The reference (plain torch) path of every op against independent formulas, bad input, backend choice."""
import logging
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from mobilediffusion import ops
from mobilediffusion.errors import ConfigError
from mobilediffusion.ops import Backend, choose_backend
from mobilediffusion.ops import backend as backend_mod
from mobilediffusion.ops import cpu_kernel


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


# --------------------------------------------------------------------------- group norm + activation
@pytest.mark.parametrize("shape,groups", [((2, 12, 5, 7), 4), ((1, 48, 3, 3), 16), ((3, 6, 9), 3), ((2, 10), 5)])
@pytest.mark.parametrize("act", ["silu", None])
def test_group_norm_act_matches_torch(shape, groups, act):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3 + 2
    w, b = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
    ref = F.group_norm(x, groups, w, b, 1e-5)
    ref = F.silu(ref) if act == "silu" else ref
    assert rel_err(ops.group_norm_act(x, groups, w, b, 1e-5, act), ref) <= 1e-5
    # no affine
    ref = F.group_norm(x, groups, None, None, 1e-6)
    ref = F.silu(ref) if act == "silu" else ref
    assert rel_err(ops.group_norm_act(x, groups, None, None, 1e-6, act), ref) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_group_norm_act_half_is_fp32_math(dtype):
    x = torch.randn(2, 8, 4, 4).to(dtype)
    w, b = torch.randn(8).to(dtype), torch.randn(8).to(dtype)
    out = ops.group_norm_act(x, 2, w, b)
    assert out.dtype == dtype
    ref = F.silu(F.group_norm(x.float(), 2, w.float(), b.float())).to(dtype)
    assert rel_err(out, ref) <= 1e-2


# --------------------------------------------------------------------------- gelu / geglu
@pytest.mark.parametrize("shape", [(37,), (3, 5, 11), (2, 64)])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_matches_torch(shape, approximate):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 4
    assert rel_err(ops.gelu(x, approximate), F.gelu(x, approximate=approximate)) <= 1e-6


@pytest.mark.parametrize("dims", [(4, 6, 10), (2, 3, 7, 24)])
def test_geglu_matches_diffusers(dims):
    from diffusers.models.activations import GEGLU

    *lead, dim_in, dim_out = dims
    torch.manual_seed(2)
    module = GEGLU(dim_in, dim_out).eval()  # proj, chunk(2), hidden * exact gelu(gate)
    x = torch.randn(*lead, dim_in)
    with torch.no_grad():
        ref = module(x)
        out = ops.geglu(module.proj(x))
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("shape", [(5, 14), (2, 3, 48)])
def test_geglu_tanh_matches_torch(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5)) * 3
    hidden, gate = x.chunk(2, dim=-1)
    assert rel_err(ops.geglu(x, "tanh"), hidden * F.gelu(gate, approximate="tanh")) <= 1e-6


# --------------------------------------------------------------------------- attention
def naive_attention(q, k, v, scale):
    s = q.double() @ k.double().transpose(-1, -2) * scale  # (B, heads, Tq, Tk)
    return torch.softmax(s, dim=-1) @ v.double()


@pytest.mark.parametrize("B,H,Tq,Tk,d", [(1, 1, 1, 1, 8), (2, 3, 37, 29, 24), (1, 2, 40, 77, 40), (2, 1, 9, 9, 160)])
@pytest.mark.parametrize("variant", ["flash", "partial_softmax"])
def test_attention_matches_naive_softmax(B, H, Tq, Tk, d, variant):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, T, d, generator=g) for T in (Tq, Tk, Tk))
    out = ops.attention(q, k, v, variant=variant)
    assert out.shape == (B, H, Tq, d)
    assert rel_err(out, naive_attention(q, k, v, 1 / math.sqrt(d))) <= 1e-5
    assert rel_err(ops.attention(q, k, v, scale=0.3), naive_attention(q, k, v, 0.3)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_half_is_fp32_math(dtype):
    q, k, v = (torch.randn(1, 2, 11, 16).to(dtype) for _ in range(3))
    out = ops.attention(q, k, v)
    assert out.dtype == dtype
    assert rel_err(out, naive_attention(q, k, v, 0.25)) <= 1e-2


# --------------------------------------------------------------------------- separable conv
def naive_depthwise(x, w, b):
    """Sum of shifted planes: an independent depthwise 'same' conv."""
    B, C, H, W = x.shape
    K = w.shape[-1]
    xp = F.pad(x.double(), (K // 2,) * 4)  # (B, C, H + K - 1, W + K - 1)
    out = sum(xp[:, :, i:i + H, j:j + W] * w[:, 0, i, j].double().view(1, C, 1, 1)
              for i in range(K) for j in range(K))
    return out + b.double().view(1, C, 1, 1)


@pytest.mark.parametrize("B,C,Cout,H,W,K", [(2, 6, 5, 9, 7, 3), (1, 5, 8, 1, 1, 3), (1, 16, 16, 8, 8, 3),
                                            (1, 4, 3, 6, 5, 5)])
def test_separable_conv_matches_torch(B, C, Cout, H, W, K):
    torch.manual_seed(4)
    dwc = torch.nn.Conv2d(C, C, K, padding=K // 2, groups=C)
    pwc = torch.nn.Conv2d(C, Cout, 1)
    x = torch.randn(B, C, H, W)
    with torch.no_grad():
        ref = pwc(dwc(x))
        out = ops.separable_conv(x, dwc.weight, dwc.bias, pwc.weight, pwc.bias)
        out2d = ops.separable_conv(x, dwc.weight, dwc.bias, pwc.weight[:, :, 0, 0], None)  # (Cout, C) weight
        naive = torch.einsum("oc,bchw->bohw", pwc.weight[:, :, 0, 0].double(), naive_depthwise(x, dwc.weight, dwc.bias))
    assert rel_err(out, ref) <= 1e-5
    assert rel_err(out, naive + pwc.bias.double().view(1, -1, 1, 1)) <= 1e-5
    assert rel_err(out2d, naive) <= 1e-5


# --------------------------------------------------------------------------- bad input
def test_group_norm_bad_input():
    x = torch.randn(2, 10, 4, 4)
    with pytest.raises(ConfigError, match=r"10 channels \(x shape \(2, 10, 4, 4\)\) do not split into 4 groups"):
        ops.group_norm_act(x, 4)
    with pytest.raises(ConfigError, match=r"weight must have shape \(10,\)"):
        ops.group_norm_act(x, 5, torch.ones(8), None)
    with pytest.raises(ConfigError, match="act must be one of"):
        ops.group_norm_act(x, 5, act="gelu")
    with pytest.raises(ConfigError, match=r"\(B, C, \*spatial\)"):
        ops.group_norm_act(torch.randn(10), 5)


def test_activation_bad_input():
    with pytest.raises(ConfigError, match=r"must be even, got shape \(3, 7\)"):
        ops.geglu(torch.randn(3, 7))
    with pytest.raises(ConfigError, match="approximate must be one of"):
        ops.gelu(torch.randn(3), "sigmoid")


def test_attention_bad_input():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ConfigError, match=r"4-D \(B, heads, T, d\), got q \(2, 5, 8\)"):
        ops.attention(q[0], q[0], q[0])
    with pytest.raises(ConfigError, match="k and v must both be"):
        ops.attention(q, q, torch.randn(1, 2, 6, 8))
    with pytest.raises(ConfigError, match="same head dim"):
        ops.attention(q, torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))
    with pytest.raises(ConfigError, match=r"no keys \(Tk = 0\)"):
        ops.attention(q, q[:, :, :0], q[:, :, :0])
    with pytest.raises(ConfigError, match="one dtype"):
        ops.attention(q, q.half(), q.half())
    with pytest.raises(ConfigError, match="variant must be one of"):
        ops.attention(q, q, q, variant="fused")


def test_separable_conv_bad_input():
    x = torch.randn(1, 4, 6, 6)
    pw = torch.randn(3, 4, 1, 1)
    with pytest.raises(ConfigError, match=r"K odd .* got \(4, 1, 2, 2\)"):
        ops.separable_conv(x, torch.randn(4, 1, 2, 2), None, pw)
    with pytest.raises(ConfigError, match=r"depthwise_weight must be \(C, 1, K, K\) = \(4, 1, K, K\)"):
        ops.separable_conv(x, torch.randn(4, 4, 3, 3), None, pw)
    with pytest.raises(ConfigError, match=r"pointwise_weight must be \(Cout, 4, 1, 1\)"):
        ops.separable_conv(x, torch.randn(4, 1, 3, 3), None, torch.randn(3, 5, 1, 1))
    with pytest.raises(ConfigError, match=r"x must be \(B, C, H, W\)"):
        ops.separable_conv(x[0], torch.randn(4, 1, 3, 3), None, pw)


def test_unknown_backend_names_choices():
    with pytest.raises(ConfigError,
                       match="unknown ops backend 'cuda'; choose one of 'reference', 'cpu', 'triton', 'export'"):
        ops.gelu(torch.randn(3), backend="cuda")


# --------------------------------------------------------------------------- backend choice
def cpu_default():
    """What choose_backend picks on the CPU here (the cpu kernel where it builds); builds it first, so the
    build's own log line is not among a test's records."""
    return Backend.CPU if cpu_kernel.unavailable() is None else Backend.REFERENCE


def test_choose_backend_cpu_one_log_line(caplog):
    expected = cpu_default()
    with caplog.at_level(logging.INFO, logger="mobilediffusion.ops"):
        assert choose_backend("cpu") is expected
    assert [r.getMessage() for r in caplog.records] == [f"ops backend: {expected.value} (device cpu)"]


def test_choose_backend_triton_without_cuda_falls_back_with_one_line(caplog):
    expected = cpu_default()
    with caplog.at_level(logging.INFO, logger="mobilediffusion.ops"):
        assert choose_backend(torch.device("cpu"), "triton") is expected
    assert len(caplog.records) == 1
    assert caplog.records[0].levelno == logging.WARNING
    assert "triton requested" in caplog.records[0].getMessage()
    assert f"using the {expected.value}" in caplog.records[0].getMessage()


def test_choose_backend_on_cuda(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backend_mod, "triton_available", lambda: True)
    assert choose_backend("cuda") is Backend.TRITON
    assert choose_backend("cuda", "reference") is Backend.REFERENCE
    monkeypatch.setattr(backend_mod, "triton_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="mobilediffusion.ops"):
        assert choose_backend("cuda:0", "triton") is Backend.REFERENCE
    assert [r.getMessage() for r in caplog.records] == [
        "ops backend: triton requested but triton is not installed; using the reference (torch) path"]
    assert choose_backend("cuda") is Backend.REFERENCE


def test_export_without_litert_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "litert_torch.hlfb", None)  # import of a None entry raises ImportError
    monkeypatch.setitem(sys.modules, "ai_edge_torch.hlfb", None)
    install = "pip install litert-torch==0.10.0 ai-edge-litert==2.3.0"
    with pytest.raises(ConfigError, match=install):
        choose_backend("cpu", "export")
    with pytest.raises(ConfigError, match=install):
        ops.group_norm_act(torch.randn(1, 4, 2, 2), 2, backend="export")
    with pytest.raises(ConfigError, match=install):
        ops.attention(*(torch.randn(1, 1, 3, 4),) * 3, backend="export")


def test_import_is_light():
    """Importing the ops package pulls in neither triton nor litert-torch."""
    import subprocess

    code = "import sys, mobilediffusion.ops; print('triton' in sys.modules, 'litert_torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.split() == ["False", "False"]
