"""Triton kernel cases, run by tests/test_ops_triton.py in a fresh interpreter with TRITON_INTERPRET=1.

triton decides interpreter vs compiled when its own library functions (tl.sum, tl.zeros, ...) and our
kernels are decorated, i.e. at import; a pytest process that imported triton earlier (through torch,
a plugin or another test) cannot switch. So these cases run in their own process, started with the
variable set, and test_ops_triton.py reports them per kernel. Every kernel is compared with the
reference path over tiny shapes (the interpreter is hundreds of times slower than a GPU): odd sizes,
several blocks with ragged tails, batch > 1, fp32 (<= 1e-5 relative) and fp16/bf16 (<= 1e-2).
"""
import os
import types

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run by tests/test_ops_triton.py in a subprocess with TRITON_INTERPRET=1", allow_module_level=True)

from mobilediffusion import ops  # noqa: E402
from mobilediffusion.errors import ConfigError  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
ERRORS_ENV = "MD_TRITON_ERRORS_FILE"  # where measured errors are appended (one line per check)


@pytest.fixture(scope="module")
def kernels():
    """The kernel modules; they must come out interpreted in this process."""
    from mobilediffusion.ops.kernels import _common, attention, depthwise_conv, gelu, group_norm

    assert _common.is_interpreted(gelu._gelu_kernel), "triton was imported before TRITON_INTERPRET=1 was set"
    return types.SimpleNamespace(_common=_common, group_norm=group_norm, gelu=gelu, attention=attention,
                                 depthwise_conv=depthwise_conv)


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def check(out, ref, dtype):
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    err = rel_err(out, ref)
    if os.environ.get(ERRORS_ENV):
        with open(os.environ[ERRORS_ENV], "a") as f:
            f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]}\t{dtype}\t{err:.3e}\n")
    assert err <= TOL[dtype], f"relative error {err:.2e} over {TOL[dtype]:.0e} for {dtype}"


def randn(*shape, dtype, seed=0, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale + shift).to(dtype)


# --------------------------------------------------------------------------- group norm + SiLU
GN_CASES = [  # shape, groups, block: group sizes 105, 27, 18, 2; blocks that leave ragged tails
    ((2, 12, 5, 7), 4, 16),
    ((1, 48, 3, 3), 16, None),
    ((3, 6, 9), 3, 8),
    ((2, 10), 5, 16),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups,block", GN_CASES)
@pytest.mark.parametrize("act", ["silu", None])
def test_group_norm_act_kernel(kernels, dtype, shape, groups, block, act):
    x = randn(*shape, dtype=dtype, scale=0.5, shift=10.0)  # large mean: sum/sum-of-squares would lose digits
    w = randn(shape[1], dtype=dtype, seed=1)
    b = randn(shape[1], dtype=dtype, seed=2)
    out = kernels.group_norm.group_norm_act_triton(x, groups, w, b, 1e-5, act, block=block)
    check(out, ops.group_norm_act(x, groups, w, b, 1e-5, act), dtype)


def test_group_norm_kernel_no_affine_noncontiguous(kernels):
    x = randn(2, 9, 8, 6, dtype=torch.float32).transpose(2, 3)  # (2, 9, 6, 8), not contiguous
    out = kernels.group_norm.group_norm_act_triton(x, 3, None, None, 1e-6, "silu", block=32)
    check(out, ops.group_norm_act(x, 3, None, None, 1e-6, "silu"), torch.float32)


# --------------------------------------------------------------------------- gelu / geglu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37,), (3, 5, 11), (2, 300)])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_kernel(kernels, dtype, shape, approximate):
    x = randn(*shape, dtype=dtype, scale=4.0)  # reaches both tails
    out = kernels.gelu.gelu_triton(x, approximate, block=64)
    check(out, ops.gelu(x, approximate), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 14), (2, 3, 48), (1, 66)])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_geglu_kernel(kernels, dtype, shape, approximate):
    x = randn(*shape, dtype=dtype, scale=3.0)
    out = kernels.gelu.geglu_triton(x, approximate, block=32)
    check(out, ops.geglu(x, approximate), dtype)


# --------------------------------------------------------------------------- attention
ATTN_CASES = [  # B, heads, Tq, Tk, d: single key, odd lengths, several tiles, d not a power of two
    (1, 1, 1, 1, 8),
    (2, 3, 37, 29, 24),
    (1, 2, 40, 40, 32),
    (2, 1, 5, 17, 20),
]


def qkv(B, H, Tq, Tk, d, dtype):
    return (randn(B, H, Tq, d, dtype=dtype, seed=3), randn(B, H, Tk, d, dtype=dtype, seed=4),
            randn(B, H, Tk, d, dtype=dtype, seed=5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,Tq,Tk,d", ATTN_CASES)
def test_flash_attention_kernel(kernels, dtype, B, H, Tq, Tk, d):
    q, k, v = qkv(B, H, Tq, Tk, d, dtype)
    out = kernels.attention.flash_attention_triton(q, k, v, d ** -0.5, block_m=16, block_n=16)
    check(out, ops.attention(q, k, v), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,Tq,Tk,d", ATTN_CASES + [(1, 2, 6, 9, 160)])
def test_partial_softmax_attention_kernel(kernels, dtype, B, H, Tq, Tk, d):
    q, k, v = qkv(B, H, Tq, Tk, d, dtype)
    out = kernels.attention.partial_softmax_attention_triton(q, k, v, d ** -0.5, block_m=16, block_n=16,
                                                             block_d=16)
    check(out, ops.attention(q, k, v), dtype)


def test_attention_kernels_strided_inputs(kernels):
    """q/k/v as head views of (B, T, heads, d) projections, as a transformer block hands them over."""
    x = randn(2, 13, 3, 16, dtype=torch.float32)  # (B, T, heads, d)
    q = k = v = x.transpose(1, 2)  # (B, heads, T, d), strided
    ref = ops.attention(q, k, v, scale=0.2)
    check(kernels.attention.flash_attention_triton(q, k, v, 0.2, block_m=16, block_n=16), ref, torch.float32)
    check(kernels.attention.partial_softmax_attention_triton(q, k, v, 0.2), ref, torch.float32)


# --------------------------------------------------------------------------- separable conv
SEP_CASES = [  # B, C, Cout, H, W, K, bias
    (2, 6, 5, 9, 7, 3, True),
    (1, 5, 8, 1, 1, 3, True),
    (1, 48, 16, 4, 4, 3, False),
    (2, 3, 3, 6, 5, 5, True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,C,Cout,H,W,K,bias", SEP_CASES)
def test_separable_conv_kernel(kernels, dtype, B, C, Cout, H, W, K, bias):
    x = randn(B, C, H, W, dtype=dtype)
    dw = randn(C, 1, K, K, dtype=dtype, seed=1)
    db = randn(C, dtype=dtype, seed=2) if bias else None
    pw = randn(Cout, C, 1, 1, dtype=dtype, seed=3)
    pb = randn(Cout, dtype=dtype, seed=4) if bias else None
    ref_dw = ops.separable_conv(x, dw, db, torch.eye(C, dtype=dtype), None)  # depthwise alone
    check(kernels.depthwise_conv.depthwise_conv_triton(x, dw, db, block=16), ref_dw, dtype)
    out = kernels.depthwise_conv.separable_conv_triton(x, dw, db, pw, pb, block=16)
    check(out, ops.separable_conv(x, dw, db, pw, pb), dtype)


# --------------------------------------------------------------------------- dispatch and bad input
def test_ops_dispatch_to_triton(kernels):
    """backend="triton" on the public ops runs the kernels (CPU tensors work only in the interpreter)."""
    x = randn(2, 8, 3, 3, dtype=torch.float32)
    check(ops.group_norm_act(x, 4, backend="triton"), ops.group_norm_act(x, 4), torch.float32)
    check(ops.gelu(x, "tanh", backend="triton"), ops.gelu(x, "tanh"), torch.float32)
    x2 = x.reshape(2, 8, 9)[..., :8]  # (2, 8, 8): even last dim, strided
    check(ops.geglu(x2, backend="triton"), ops.geglu(x2), torch.float32)
    q, k, v = qkv(1, 2, 7, 5, 8, torch.float32)
    for variant in ("flash", "partial_softmax"):
        check(ops.attention(q, k, v, variant=variant, backend="triton"), ops.attention(q, k, v), torch.float32)
    dw, pw = randn(8, 1, 3, 3, dtype=torch.float32), randn(4, 8, 1, 1, dtype=torch.float32)
    check(ops.separable_conv(x, dw, None, pw, None, backend="triton"), ops.separable_conv(x, dw, None, pw, None),
          torch.float32)


def test_flash_rejects_head_dim_over_128(kernels):
    q = torch.randn(1, 1, 4, 160)
    with pytest.raises(ConfigError, match=r"head dim 160 \(q shape \(1, 1, 4, 160\)\) is over 128.*partial_softmax"):
        ops.attention(q, q, q, backend="triton", variant="flash")


def test_kernels_reject_float64(kernels):
    with pytest.raises(ConfigError, match="float32/float16/bfloat16 tensors, got torch.float64"):
        kernels.gelu.gelu_triton(torch.randn(4, dtype=torch.float64))


def test_compiled_kernel_refuses_cpu_tensors(kernels):
    """Outside the interpreter a launcher names the device problem instead of crashing in the driver."""
    compiled_like = object()  # anything that is not an InterpretedFunction
    with pytest.raises(ConfigError, match="run on CUDA tensors, got device cpu"):
        kernels._common.check_launch(compiled_like, "gelu", torch.randn(3))
    with pytest.raises(ConfigError, match="one device"):
        kernels._common.check_launch(compiled_like, "gelu", torch.randn(3), torch.randn(3, device="meta"))
