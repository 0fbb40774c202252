"""The cpu ops backend: the AVX-512 attention kernel compiled at first use (ops/cpu_kernel.py) against the
reference path on odd sizes and the layouts the UNet produces; its fallbacks; a UNet on it."""
import copy
import dataclasses
import logging
import math
import sys

import pytest
import torch
from torch import nn

from mobilediffusion import ops
from mobilediffusion.export.components import export_copy
from mobilediffusion.ops import Backend, choose_backend, cpu_kernel
from mobilediffusion.ops.backend import log_once
from mobilediffusion.presets import PRESETS
from mobilediffusion.unet import UNet

WHY_NOT = cpu_kernel.unavailable()  # builds the kernel once for the session (cached on disk after)
needs_kernel = pytest.mark.skipif(WHY_NOT is not None, reason=f"no CPU attention kernel here: {WHY_NOT}")
# the group norm is in the AVX-512 library only (a CPU with AVX2 alone gets the attention and the linear)
needs_group_norm = pytest.mark.skipif(WHY_NOT is not None or "md_group_norm_f32" not in cpu_kernel.load()[0].fns,
                                      reason="no group-norm kernel here (AVX-512)")
KERNEL_DTYPES = cpu_kernel.load()[0].dtypes() if WHY_NOT is None else ()
needs_bf16 = pytest.mark.skipif(torch.bfloat16 not in KERNEL_DTYPES, reason="the kernel here has no bf16 (AVX512-BF16)")

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def unet_layout(B, heads, T, d, dtype, g, scale=1.0):
    """(B, heads, T, d) as the UNet's Attention makes it: a view of a (B, T, heads * d) projection."""
    x = torch.randn(B, T, heads * d, generator=g) * scale
    return x.to(dtype).view(B, T, heads, d).transpose(1, 2)


# --------------------------------------------------------------------------- parity with the reference
@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16)])
@pytest.mark.parametrize("B, heads, Tq, Tk, d", [
    (1, 2, 37, 29, 40),     # nothing a multiple of a block
    (2, 3, 100, 77, 72),    # batch > 1, cross-attention's 77 keys
    (1, 2, 65, 800, 80),    # several key blocks (384 keys each)
    (2, 1, 33, 130, 160),   # wide heads
    (1, 1, 17, 5, 7),       # odd head dim, fewer keys than a vector
    (1, 2, 64, 64, 64),
])
def test_kernel_matches_reference(B, heads, Tq, Tk, d, dtype):
    g = torch.Generator().manual_seed(Tq * Tk + d)
    q = unet_layout(B, heads, Tq, d, dtype, g, scale=3.0)  # peaked rows: the running max changes across blocks
    k, v = unet_layout(B, heads, Tk, d, dtype, g), unet_layout(B, heads, Tk, d, dtype, g)
    out = ops.attention(q, k, v, backend=Backend.CPU)
    ref = ops.attention(q, k, v, backend=Backend.REFERENCE)
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out, ref) <= TOL[dtype]
    assert out.transpose(1, 2).is_contiguous()  # (B, T, heads, d) memory: the UNet's reshape is a view
    dense = [t.contiguous() for t in (q, k, v)]  # the (B, heads, T, d) layout, and a custom scale
    assert rel_err(ops.attention(*dense, scale=0.3, backend="cpu"), ops.attention(*dense, scale=0.3)) <= TOL[dtype]


@needs_kernel
def test_shared_keys_and_values_and_large_scores():
    g = torch.Generator().manual_seed(0)
    q, kv = unet_layout(2, 2, 50, 40, torch.float32, g, scale=30.0), unet_layout(2, 2, 400, 40, torch.float32, g)
    assert rel_err(ops.attention(q, kv, kv, backend="cpu"), ops.attention(q, kv, kv)) <= 1e-5


# --------------------------------------------------------------------------- what it does not take
@needs_kernel
def test_unsupported_inputs_take_the_reference_logged_once(caplog):
    log_once.cache_clear()
    g = torch.Generator().manual_seed(1)
    half = unet_layout(1, 2, 9, 8, torch.float16, g)
    wide = unet_layout(1, 1, 9, 260, torch.float32, g)
    with caplog.at_level(logging.INFO, logger="mobilediffusion.ops"):
        for _ in range(3):
            assert torch.equal(ops.attention(half, half, half, backend="cpu"), ops.attention(half, half, half))
            assert torch.equal(ops.attention(wide, wide, wide, backend="cpu"), ops.attention(wide, wide, wide))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "dtype torch.float16" in messages[0] and "head dim 260 > 256 for torch.float32" in messages[1]
    assert cpu_kernel.unsupported(half, half, half, -1.0) is not None  # a negative scale


@needs_kernel
def test_inputs_needing_gradients_take_the_reference():
    g = torch.Generator().manual_seed(2)
    q = unet_layout(1, 2, 12, 16, torch.float32, g).requires_grad_()
    out = ops.attention(q, q, q, backend="cpu")
    out.sum().backward()  # the reference path has a backward; the kernel has none
    assert q.grad is not None and torch.equal(out, ops.attention(q, q, q))
    with torch.no_grad():
        assert rel_err(ops.attention(q, q, q, backend="cpu"), out) <= 1e-5


def test_requested_but_unavailable_falls_back_with_one_line(monkeypatch, caplog):
    monkeypatch.setattr(cpu_kernel, "_LOADED", {"result": (None, "no C compiler found (test)")})
    with caplog.at_level(logging.INFO, logger="mobilediffusion.ops"):
        assert choose_backend("cpu", "cpu") is Backend.REFERENCE
        assert choose_backend("cpu") is Backend.REFERENCE
    assert [r.getMessage() for r in caplog.records] == [
        "ops backend: cpu requested but no C compiler found (test); using the reference (torch) path",
        "ops backend: reference (device cpu)"]
    q = torch.randn(1, 1, 4, 8)
    assert torch.equal(ops.attention(q, q, q, backend="cpu"), ops.attention(q, q, q))  # called directly: no crash


def test_no_compiler_or_failed_build_is_a_reason_not_a_crash(monkeypatch, tmp_path):
    monkeypatch.setenv("MOBILEDIFFUSION_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_LOADED", {})
    monkeypatch.setattr(cpu_kernel, "cpu_flags", lambda: {*cpu_kernel.REQUIRED_CPU, "avx512_bf16"})
    monkeypatch.setattr(cpu_kernel.sys, "platform", "linux")
    monkeypatch.setattr(cpu_kernel.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_kernel, "find_compiler", lambda: None)
    assert "no C compiler found" in cpu_kernel.unavailable()
    monkeypatch.setattr(cpu_kernel, "_LOADED", {})
    monkeypatch.setattr(cpu_kernel, "find_compiler", lambda: ["false"])  # a "compiler" that always fails
    assert cpu_kernel.unavailable().startswith("building the CPU attention kernel failed (false failed")
    assert not list(tmp_path.rglob("*.so"))  # nothing half-written left behind
    monkeypatch.setattr(cpu_kernel, "_LOADED", {})
    monkeypatch.setattr(cpu_kernel, "cpu_flags", lambda: {"avx2", "fma"})  # no AVX-512: the AVX2 library
    assert cpu_kernel.unavailable().startswith("building the CPU AVX2 kernels failed (false failed")
    assert cpu_kernel.linear_kernel()[0] is None
    monkeypatch.setattr(cpu_kernel, "_LOADED", {})
    monkeypatch.setattr(cpu_kernel, "cpu_flags", lambda: {"sse4_2"})
    assert "AVX2 + FMA" in cpu_kernel.unavailable()
    monkeypatch.setattr(cpu_kernel, "_LOADED", {})
    monkeypatch.setattr(cpu_kernel.platform, "machine", lambda: "aarch64")
    assert "needs an x86-64 CPU" in cpu_kernel.unavailable()


def test_choice_off_the_cpu_and_export_copies(monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="mobilediffusion.ops"):
        assert choose_backend("meta", "cpu") is Backend.REFERENCE
    assert [r.getMessage() for r in caplog.records] == [
        "ops backend: cpu requested but device meta is not the CPU; using the reference (torch) path"]
    with pytest.raises(ValueError, match="not 'cpu'"):
        export_copy(nn.Linear(2, 2), backend="cpu")


# --------------------------------------------------------------------------- in a model
SMALL_SD = dataclasses.replace(PRESETS["sd15"].unet, block_out_channels=(32, 64, 64, 64), num_attention_heads=(2, 2, 4, 4),
                               norm_num_groups=8, cross_attention_dim=48)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16)])
def test_unet_on_the_cpu_backend_matches_the_reference(dtype):
    torch.manual_seed(0)
    ref = UNet(SMALL_SD, backend="reference").eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # no zero-initialised output layers
    ours = UNet(SMALL_SD, backend="cpu").eval()
    ours.load_state_dict(ref.state_dict())
    assert ours.ops_backend is Backend.CPU
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g).to(dtype)
    ctx = torch.randn(2, 77, 48, generator=g).to(dtype)
    with torch.no_grad():
        out, expected = ours.to(dtype)(x, torch.tensor([999, 31]), ctx), ref.to(dtype)(x, torch.tensor([999, 31]), ctx)
    assert rel_err(out, expected) <= (1e-5 if dtype == torch.float32 else 3e-2)


@needs_kernel
def test_compiled_module_keeps_the_kernel_as_one_op():
    class Attend(nn.Module):
        def forward(self, q, k, v):
            out = ops.attention(q, k, v, backend="cpu")  # (B, heads, T, d)
            return out.transpose(1, 2).flatten(2) * 2  # (B, T, heads * d)

    g = torch.Generator().manual_seed(3)
    q, k, v = (unet_layout(2, 2, 20, 24, torch.float32, g) for _ in range(3))
    module = Attend()
    expected = module(q, k, v)
    module.compile(fullgraph=True, dynamic=False)  # fullgraph: no graph break at the kernel
    with torch.no_grad():
        assert rel_err(module(q, k, v), expected) <= 1e-6


@needs_kernel
def test_a_second_copy_of_the_module_reuses_the_custom_op(monkeypatch):
    """ComfyUI imports the plugin's package under the plugin folder's name: a second import must not fail."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("another_copy_of_cpu_kernel", cpu_kernel.__file__)
    copy = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, copy)
    spec.loader.exec_module(copy)  # registering mobilediffusion::cpu_attention again would raise
    q = unet_layout(1, 2, 10, 8, torch.float32, torch.Generator().manual_seed(4))
    assert torch.equal(copy.cpu_attention_op(q, q, q, 0.5), cpu_kernel.cpu_attention_op(q, q, q, 0.5))


# --------------------------------------------------------------------------- the bench table
def test_attention_table_rows():
    from mobilediffusion.benchmarks import attention as table

    peaks = {"fp32": {"gflops": 100.0}}
    rows = table.kernel_rows(precisions=("fp32",), shapes=[("tiny", 1, 2, 40, 24, 16)], runs=1, warmup=0, peaks=peaks)
    by_route = {r.route: r for r in rows}
    assert set(by_route) == {"cpu kernel", "torch sdpa", "reference"}
    sdpa = by_route["torch sdpa"]
    for r in rows:
        assert r.dims == "1x2x40x24x16" and r.gflop == pytest.approx(4 * 2 * 40 * 24 * 16 / 1e9)
        if r.route == "cpu kernel" and WHY_NOT is not None:
            assert r.note.startswith("not run here") and math.isnan(r.ms)
            continue
        assert r.gflops == pytest.approx(r.gflop / r.ms * 1e3) and r.peak_fraction == pytest.approx(r.gflops / 100)
        assert r.ratio == pytest.approx(sdpa.ms / r.ms) and r.rel_err <= 1e-5
    assert table.format_row(rows[0]).startswith("tiny")


def test_bench_attention_refuses_an_unknown_table(capsys):
    from mobilediffusion import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--attention", "everything"])
    assert e.value.code == 2 and "invalid choice: 'everything'" in capsys.readouterr().err


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), pytest.param(torch.bfloat16, 1e-2, marks=needs_bf16)])
def test_separable_conv_on_the_cpu_backend_runs_the_packed_convs_in_its_dtype(dtype, tol):
    """Backend.CPU: the depthwise and pointwise convolutions run as the fast path's packed modules in the input's
    dtype (the reference computes bf16 in fp32, 3x slower for MobileDiffusion's 16x16 levels), within the
    precision's tolerance of the reference."""
    from mobilediffusion import fast
    from mobilediffusion.unet_blocks import SeparableConv

    g = torch.Generator().manual_seed(0)
    layer = SeparableConv(48, 40).eval()
    x = torch.randn(2, 48, 9, 7, generator=g)
    with torch.no_grad():
        ref = layer(x)  # the reference backend, fp32
    fast.optimize(layer, dtype=dtype)
    layer.backend = Backend.CPU
    calls = []
    for m in (layer.depthwise, layer.pointwise):
        m.register_forward_hook(lambda mod, args, out: calls.append((type(mod), args[0].dtype, out.dtype)))
    with torch.inference_mode():
        out = layer(x.to(dtype).contiguous(memory_format=torch.channels_last))
    assert out.dtype == dtype and rel_err(out.float(), ref) <= tol
    if fast.packed_weights_available():
        assert calls == [(fast.PackedConv2d, dtype, dtype)] * 2


# --------------------------------------------------------------------------- group norm + SiLU
def group_norm_fp64(x, groups, weight, bias, eps, act):
    y = nn.functional.group_norm(x.double(), groups, None if weight is None else weight.double(),
                                 None if bias is None else bias.double(), eps)
    return nn.functional.silu(y) if act == "silu" else y


@needs_group_norm
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16)])
@pytest.mark.parametrize("shape, groups, affine, act", [
    ((1, 48, 7, 9), 8, True, "silu"),
    ((2, 20, 5, 3), 4, True, None),       # batch > 1, channels not a multiple of 16, no activation
    ((1, 33, 6, 6), 3, False, "silu"),    # odd group width, no affine
    ((1, 64, 40, 40), 32, True, "silu"),  # offset mean: sums of squares must not cancel
])
def test_group_norm_kernel_matches_fp64(shape, groups, affine, act, dtype):
    """Per-channel sums in double, one rounding: fp32 within 1e-6 of an fp64 GroupNorm (+ SiLU), bf16 within
    bf16 rounding; in place it writes the same values into x."""
    g = torch.Generator().manual_seed(shape[1])
    x = (torch.randn(shape, generator=g) * 3 + 20).to(dtype).contiguous(memory_format=torch.channels_last)
    w, b = (torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)) if affine else (None, None)
    truth = group_norm_fp64(x, groups, w, b, 1e-5, act)
    with torch.inference_mode():
        out = ops.group_norm_act(x, groups, w, b, 1e-5, act, backend=Backend.CPU)
        assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
        assert rel_err(out, truth) <= (1e-6 if dtype == torch.float32 else 5e-3)
        assert rel_err(ops.group_norm_act(x, groups, w, b, 1e-5, act), truth) <= TOL[dtype]  # the reference too
        y = x.clone(memory_format=torch.channels_last)
        same = ops.group_norm_act(y, groups, w, b, 1e-5, act, backend=Backend.CPU, inplace=True)
        assert same.data_ptr() == y.data_ptr() and torch.equal(same, out)


@needs_group_norm
def test_group_norm_kernel_leaves_other_inputs_to_the_reference(caplog):
    """NCHW maps, 3-D inputs and inputs needing gradients take the reference (never a wrong result), logged
    once per reason; the reference ignores inplace."""
    log_once.cache_clear()
    x = torch.randn(1, 32, 6, 6)
    with caplog.at_level(logging.INFO, logger="mobilediffusion.ops"):
        for _ in range(2):
            for t in (x, x.reshape(1, 32, 36)):
                assert cpu_kernel.group_norm_unsupported(t) is not None
                got = ops.group_norm_act(t, 8, backend=Backend.CPU, inplace=True)
                assert torch.equal(got, ops.group_norm_act(t, 8)) and got.data_ptr() != t.data_ptr()
    assert [r.getMessage() for r in caplog.records] == [
        "cpu group-norm kernel: a map that is not 4-D channels_last; the reference path takes these inputs"]
    leaf = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    ops.group_norm_act(leaf, 8, backend=Backend.CPU).sum().backward()  # the reference, differentiable
    assert leaf.grad is not None


# --------------------------------------------------------------------------- the AVX2 fp32 linear
AVX2, LINEAR_WHY = cpu_kernel.avx2_kernel()  # built wherever AVX2 + FMA are (routed only without AVX-512)
LINEAR = None if AVX2 is None else AVX2.fns
needs_linear = pytest.mark.skipif(LINEAR is None, reason=f"no AVX2 linear kernel here: {LINEAR_WHY}")


@pytest.fixture
def linear_built(monkeypatch):
    """cpu_kernel.linear on the AVX2 kernel whatever the CPU's class."""
    monkeypatch.setitem(cpu_kernel._LOADED, "linear", (LINEAR, None))


@needs_linear
@pytest.mark.parametrize("M, K, N", [
    (1, 7, 3),           # one row, fewer columns than a vector
    (5, 24, 40),         # rows short of a tile, columns short of a panel
    (13, 100, 37),       # tails everywhere
    (600, 64, 160),      # several row blocks (three of 200: even, at most 256 rows), whole panels
    (97, 320, 33),
])
@pytest.mark.parametrize("bias", [True, False])
def test_avx2_linear_matches_fp64(linear_built, M, K, N, bias):
    g = torch.Generator().manual_seed(M * N + K)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    packed = cpu_kernel.pack_linear_weight(w)
    padded = None if b is None else nn.functional.pad(b, (0, -N % 16))
    got = cpu_kernel.linear(x, packed, padded, N)
    want = nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.shape == (M, N) and rel_err(got, want) <= 1e-6
    # rows with a stride (a slice of a wider map) and leading dims: the same values, no copy needed
    wide = torch.randn(2, M, K + 9, generator=g)
    got = cpu_kernel.linear(wide[..., :K], packed, padded, N)
    want = nn.functional.linear(wide[..., :K].double(), w.double(), None if b is None else b.double())
    assert got.shape == (2, M, N) and rel_err(got, want) <= 1e-6
    assert cpu_kernel.linear(x[:0], packed, padded, N).shape == (0, N)  # no rows: nothing to do, no crash


@needs_linear
def test_packed_linear_takes_the_avx2_kernel_and_follows_new_weights(linear_built):
    from mobilediffusion import fast

    lin = nn.Linear(24, 40)
    packed = copy.deepcopy(lin)
    assert fast.pack_weights(packed) == 1
    x = torch.randn(3, 11, 24)
    with torch.no_grad(), torch.profiler.profile() as prof:
        got = packed(x)
    assert "mobilediffusion::cpu_linear" in {e.name for e in prof.events()}
    assert rel_err(got, lin(x)) <= 1e-6
    with torch.no_grad():
        packed.bias.add_(1.0)  # a bias changed in place (a LoRA patch) is packed again
        assert rel_err(packed(x), lin(x) + 1.0) <= 1e-6
        packed(torch.randn(7, 24))  # another shape reuses the panels (they do not depend on it)
        assert packed._pack_key[3] is None


@needs_linear
@pytest.mark.parametrize("B, heads, Tq, Tk, d", [
    (1, 2, 37, 29, 40),     # nothing a multiple of a block or a tile
    (2, 3, 100, 77, 72),    # batch > 1, cross-attention's 77 keys
    (1, 2, 65, 800, 80),    # several key blocks (256 each)
    (1, 1, 17, 5, 7),       # odd head dim, fewer keys than a panel
])
def test_avx2_attention_matches_the_reference(monkeypatch, B, heads, Tq, Tk, d):
    """The AVX2 library's attention (what load() gives on CPUs without AVX-512), on any CPU with AVX2, in the
    layout the UNet makes."""
    monkeypatch.setitem(cpu_kernel._LOADED, "result",
                        (cpu_kernel.Kernel(AVX2.path, {"md_attention_f32": AVX2.fns["md_attention_f32"]}), None))
    g = torch.Generator().manual_seed(Tq + Tk)
    q = unet_layout(B, heads, Tq, d, torch.float32, g)
    k, v = (unet_layout(B, heads, Tk, d, torch.float32, g) for _ in range(2))
    with torch.profiler.profile() as prof:
        got = ops.attention(q, k, v, backend="cpu")
    assert "mobilediffusion::cpu_attention" in {e.name for e in prof.events()}  # the kernel, not a fallback
    assert rel_err(got, ops.attention(q.double(), k.double(), v.double())) <= 1e-6
    assert got.transpose(1, 2).is_contiguous()  # (B, Tq, heads, d) in memory, as the kernel's contract says
