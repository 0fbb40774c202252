"""int8 convolutions and linears (mobilediffusion.ops.int8): the CPU kernel's quantize and range passes against
torch, each int8 layer against the same arithmetic in fp32 (fake-quantized input and weight), which layers a UNet
quantizes, static calibration, and the refusal where int8 cannot run."""
import pytest
import torch
from torch import nn

from mobilediffusion.errors import ConfigError
from mobilediffusion.ops import cpu_kernel
from mobilediffusion.ops.int8 import (Int8Conv2d, Int8Linear, QuantizedMap, activation_params, calibrate,
                                      int8_unavailable, kept,
                                      quantize_int8, targets, weight_int8)

pytestmark = pytest.mark.skipif(int8_unavailable() is not None, reason=f"int8 cannot run here: {int8_unavailable()}")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _fake_quant(x, scale, zp):
    """What uint8 activations carry, back in fp32."""
    return (torch.clamp(torch.round(x.float() / scale) + zp, 0, 255) - zp) * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_and_minmax_kernels_equal_torch(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 37, 9, 11, generator=g) * 3).to(dtype).to(memory_format=torch.channels_last)  # odd sizes
    for scale, zp in ((0.05, 128), (0.01, 1), (0.2, 255)):
        q = cpu_kernel.quantize_u8(x, scale, zp)
        want = torch.clamp(torch.round(x.float() * (1.0 / scale)) + zp, 0, 255).to(torch.uint8)
        assert q.dtype == torch.uint8 and q.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(q, want), (scale, zp)
    assert cpu_kernel.minmax(x) == (x.min().item(), x.max().item())
    flat = torch.randn(1001, generator=g).to(dtype)
    flat[5] = float("nan")
    finite = flat[~flat.isnan()]
    assert cpu_kernel.minmax(flat) == (finite.min().item(), finite.max().item())  # NaNs skipped


def test_activation_params_cover_the_range_and_zero():
    for lo, hi in ((-3.0, 5.0), (0.0, 2.0), (-1.0, -0.5), (0.3, 0.4)):
        scale, zp = activation_params(lo, hi)
        assert 1 <= zp <= 255
        for v in (min(lo, 0.0), max(hi, 0.0), 0.0):  # each representable within half a step
            assert abs(_fake_quant(torch.tensor(v), scale, zp).item() - v) <= scale / 2 + 1e-7
    assert activation_params(0.0, 0.0) == (1.0, 128)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("kernel,stride,padding", [(3, 2, 1), (1, 1, 0)])  # 1x1: through the int8 matmul
def test_int8_conv_equals_its_arithmetic_in_fp32(dtype, static, kernel, stride, padding):
    torch.manual_seed(0)
    conv = nn.Conv2d(48, 40, kernel, padding=padding, stride=stride)
    x = torch.randn(2, 48, 15, 13).to(dtype)
    lo, hi = x.float().min().item(), x.float().max().item()
    scale, zp = activation_params(lo * 0.8, hi * 0.8) if static else activation_params(lo, hi)  # static: clips
    layer = Int8Conv2d(conv, (scale, zp) if static else None)
    q, w_scale = weight_int8(conv.weight)
    want = nn.functional.conv2d(_fake_quant(x, scale, zp), q.float() * w_scale.view(-1, 1, 1, 1), conv.bias, stride,
                                padding)
    got = layer(x)
    assert got.dtype == dtype and got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
    assert _rel(got, want) <= (1e-5 if dtype == torch.float32 else 6e-3), _rel(got, want)
    assert _rel(got, conv(x.float())) < 0.05  # and int8 is close to the float layer
    torch.testing.assert_close(layer(x, relu=True), torch.relu(got), rtol=0, atol=0)  # the fused ReLU post-op
    other = torch.randn(got.shape).to(dtype).contiguous(memory_format=torch.channels_last)
    acc = other.clone()
    summed = layer(x, add=acc)  # the sum post-op: accumulated into acc, in place
    assert torch.equal(summed, acc)
    assert _rel(summed, got.float() + other.float()) <= (1e-6 if dtype == torch.float32 else 4e-3)
    assert _rel(layer(x, relu=True, add=other.clone()), torch.relu(got.float() + other.float())) <= 4e-3
    xq, xs, xzp = layer._quantize(x.contiguous(memory_format=torch.channels_last))  # a map quantized before
    torch.testing.assert_close(layer(QuantizedMap(xq, xs, xzp, dtype)), got, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_equals_its_arithmetic_in_fp32(dtype):
    torch.manual_seed(1)
    linear = nn.Linear(64, 80)
    x = torch.randn(3, 7, 64).to(dtype)
    layer = Int8Linear(linear)
    scale, zp = activation_params(x.float().min().item(), x.float().max().item())
    q, w_scale = weight_int8(linear.weight)
    want = nn.functional.linear(_fake_quant(x, scale, zp), q.float() * w_scale[:, None], linear.bias)
    got = layer(x)
    assert got.dtype == dtype and got.shape == (3, 7, 80)
    assert _rel(got, want) <= (1e-5 if dtype == torch.float32 else 6e-3), _rel(got, want)
    assert _rel(got, linear(x.float())) < 0.05
    bare = Int8Linear(nn.Linear(64, 16, bias=False))
    assert bare(x).shape == (3, 7, 16)


@pytest.mark.parametrize("activation", ["gelu", "swish", "geglu"])
def test_int8_linear_applies_the_feed_forward_activation(activation):
    """fc1 with its activation in the same pass (oneDNN post-ops; GEGLU as two products on the halves) equals the
    int8 product followed by the activation (ops.geglu's halves for GEGLU)."""
    from mobilediffusion import ops

    torch.manual_seed(2)
    linear = nn.Linear(64, 96)
    x = torch.randn(2, 9, 64)
    fn = {"gelu": nn.functional.gelu, "swish": nn.functional.silu, "geglu": ops.geglu}[activation]
    want = fn(Int8Linear(linear)(x))
    got = Int8Linear(linear, activation=activation)(x)
    # fp32 out: measured 0 / 6e-8 / 1.3e-7; the tanh GELU instead of the exact one would be 2e-4
    assert got.dtype == torch.float32 and got.shape == want.shape and _rel(got, want) <= 1e-5, _rel(got, want)
    half = Int8Linear(linear, activation=activation)(x.bfloat16())
    assert half.dtype == torch.bfloat16 and _rel(half, want) <= 1e-2  # bf16 output rounding (measured 2.9e-3)
    with pytest.raises(ConfigError, match="activation 'relu'"):
        Int8Linear(linear, activation="relu")


def test_unet_quantizes_by_rule_and_calibrates(tiny_unet_inputs):
    unet, (x, t, ctx) = tiny_unet_inputs
    with torch.no_grad():
        ref = unet(x, t, ctx)
    names = {n for n, _ in targets(unet)}
    assert names and not any(n.startswith(("conv_in", "conv_out", "time_embedding")) for n in names)
    left = kept(unet)  # what the bench lists as kept in float: every other convolution and linear
    floats = {n for ns in left.values() for n in ns}
    assert {"conv_in", "conv_out"} <= floats and not floats & names
    assert floats | names == {n for n, m in unet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert all(m.groups == 1 for n, m in unet.named_modules() if n in names and isinstance(m, nn.Conv2d))
    ranges = calibrate(unet, lambda: unet(x, t, ctx))
    assert set(ranges) == names and all(lo <= hi for lo, hi in ranges.values())
    static = quantize_int8(unet, ranges=ranges)
    assert static == len(names)
    ffs = [m for m in unet.modules() if hasattr(m, "fc1") and hasattr(m, "activation")]
    assert ffs and all(m.fc1.activation == m.activation for m in ffs)  # each feed-forward's activation fused
    assert all(m.act is not None for m in unet.modules() if isinstance(m, (Int8Conv2d, Int8Linear)))
    with torch.no_grad():
        err = _rel(unet(x, t, ctx), ref)
    print(f"tiny UNet, int8 (static scales) vs fp32: {err:.2e}")
    assert err < 0.1


def test_int8_refused_without_vnni(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "cpu_flags", lambda: {"avx512f"})
    assert "VNNI" in int8_unavailable()
    with pytest.raises(ConfigError, match="VNNI.*use bf16 or fp32"):
        quantize_int8(nn.Sequential(nn.Linear(32, 32)))


def test_calibration_that_runs_nothing_is_refused():
    with pytest.raises(ConfigError, match="calibration prompts"):
        calibrate(nn.Sequential(nn.Linear(32, 32)), lambda: None)


@pytest.mark.skipif("md_group_norm_u8_bf16" not in (cpu_kernel.load()[0].fns if cpu_kernel.load()[0] else {}),
                    reason="the CPU kernel here has no bf16 entry points")
@pytest.mark.parametrize("silu", [True, False])
def test_group_norm_writes_uint8_for_the_int8_layer_next(silu):
    """GroupNorm (+ SiLU) straight to uint8: with a given scale, the quantized float result (at most one step off
    where bf16 rounding crosses a step); without, a range bounded from each channel's extremes, which covers the
    output and is at most a little wider than its true range."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 64, 9, 13, generator=g) * 3 + 1).bfloat16().contiguous(memory_format=torch.channels_last)
    w, b = (torch.rand(64, generator=g) * 2 - 0.5).bfloat16(), torch.randn(64, generator=g).bfloat16()
    y = cpu_kernel.group_norm_act(x, 16, w, b, 1e-6, silu)
    exact = activation_params(*cpu_kernel.minmax(y))
    q, scale, zp = cpu_kernel.group_norm_u8(x, 16, w, b, 1e-6, silu, exact)
    want = cpu_kernel.quantize_u8(y, *exact)
    assert q.dtype == torch.uint8 and q.is_contiguous(memory_format=torch.channels_last)
    assert (scale, zp) == pytest.approx(exact) and (q.int() - want.int()).abs().max() <= 1
    assert (q == want).float().mean() > 0.97
    q, scale, zp = cpu_kernel.group_norm_u8(x, 16, w, b, 1e-6, silu)  # the range bounded in the statistics pass
    assert exact[0] * 0.99 <= scale <= exact[0] * 1.05 and 1 <= zp <= 255  # (exact: of y rounded to bf16)
    assert ((q.float() - zp) * scale - y.float()).abs().max() <= scale / 2 + y.float().abs().max() / 128


@pytest.mark.parametrize("preset", ["mobilediffusion-512"])
def test_int8_resblocks_normalize_to_uint8_and_accumulate_in_place(preset):
    """A fast decoder's int8 ResBlock: the norms write uint8, conv2 accumulates into the shortcut (the block's
    input itself for an identity shortcut); the same result as the float norms + quantize + add path, and that path
    while calibration observes the convolutions."""
    from mobilediffusion import fast
    from mobilediffusion import fast_decoder
    from mobilediffusion.decoder import build_decoder
    from mobilediffusion.presets import get_preset

    if "md_group_norm_u8_bf16" not in cpu_kernel.load()[0].fns:
        pytest.skip("the CPU kernel here has no bf16 entry points")
    torch.manual_seed(0)
    dec = fast.optimize(build_decoder(get_preset(preset).decoder).eval()).to(torch.bfloat16)
    quantize_int8(dec)
    blocks = [m for m in dec.modules() if isinstance(m, fast_decoder.FastResBlock)]
    same = next(b for b in blocks if isinstance(b.conv_shortcut, nn.Identity))
    wider = next(b for b in blocks if not isinstance(b.conv_shortcut, nn.Identity))
    for block in (same, wider):
        c = block.norm1.num_channels
        x = torch.randn(1, c, 12, 10).bfloat16().contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            assert fast_decoder._int8_ready(block, x)
            fused = block(x.clone()) if block is wider else None
            if block is same:
                inp = x.clone()
                fused = block(inp)
                assert torch.equal(inp, fused)  # accumulated into the input
            plain = ResBlockForward(block, x)
        assert _rel(fused, plain) < 1.5e-2, _rel(fused, plain)
    handle = same.conv1.register_forward_pre_hook(lambda m, a: None)  # as calibration observes it
    try:
        assert not fast_decoder._int8_ready(same, x.new_zeros(1, same.norm1.num_channels, 4, 4))
    finally:
        handle.remove()


def test_int8_tiny_blocks_add_and_relu_inside_the_last_convolution():
    """TAESD's int8 TinyBlock in bf16: relu(conv(x) + x) with the add and ReLU as the last convolution's post-ops,
    accumulated into x (the block consumes its input); the same as the convolutions then add and ReLU."""
    from mobilediffusion import fast, fast_decoder
    from mobilediffusion.decoder import build_decoder
    from mobilediffusion.presets import get_preset

    torch.manual_seed(0)
    dec = fast.optimize(build_decoder(get_preset("sdxs-512").decoder).eval()).to(torch.bfloat16)
    quantize_int8(dec)
    block = next(m for m in dec.modules() if isinstance(m, fast_decoder.FastTinyBlock))
    c0, _, c1, _, c2 = block.conv
    x = torch.randn(1, c0.in_channels, 12, 10).bfloat16().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = torch.relu(c2(c1(c0(x, relu=True), relu=True)).float() + x.float())
        inp = x.clone()
        got = block(inp)
    assert torch.equal(inp, got) and _rel(got, want) < 1e-2, _rel(got, want)


def ResBlockForward(block, x):
    """The block's plain forward (float norms, convolutions quantizing their inputs, an add)."""
    from mobilediffusion.decoder import ResBlock

    with torch.no_grad():
        return ResBlock.forward(block, x.clone())


def test_every_entry_point_is_bound_from_the_table():
    kernel, why = cpu_kernel.load()
    assert why is None
    for name, (kinds, bf16) in cpu_kernel.ENTRY_POINTS.items():
        if bf16 and torch.bfloat16 not in kernel.dtypes():
            continue
        assert len(kernel.fns[name].argtypes) == len(kinds), name


@pytest.fixture
def tiny_unet_inputs():
    from mobilediffusion.presets import get_preset
    from mobilediffusion.unet import UNet

    cfg = get_preset("tiny")
    torch.manual_seed(0)
    unet = UNet(cfg.unet).eval()
    with torch.no_grad():
        for p in unet.parameters():  # zero-initialised output layers would make every output 0
            p.add_(torch.randn_like(p) * 0.02)
    g = torch.Generator().manual_seed(0)
    size = cfg.unet.sample_size
    x = torch.randn(2, cfg.unet.in_channels, size, size, generator=g)
    ctx = torch.randn(2, 77, cfg.unet.cross_attention_dim, generator=g)
    return unet, (x, torch.tensor([10, 500]), ctx)


# --------------------------------------------------------------------------- the int8 precision
def _images(pipe):
    import numpy as np

    from mobilediffusion.benchmarks.accuracy import PROMPTS

    return np.stack([np.asarray(pipe(p, seed=i)[0]) for i, p in enumerate(PROMPTS)]).astype(np.float64)


def test_shipped_default_at_precision_int8_keeps_its_images():
    """load_pipeline(dtype="int8"): the UNet's and decoder's layers int8 in a bf16 model, the text encoder bf16;
    the shipped default's images >= 35 dB PSNR from fp32 (measured 51.4 dB; bf16 alone 55.5 dB)."""
    import math

    import numpy as np

    from mobilediffusion.pipeline import load_pipeline

    pipe = load_pipeline(None, dtype="int8")
    int8 = lambda m: sum(isinstance(x, (Int8Conv2d, Int8Linear)) for x in m.modules())  # noqa: E731
    assert int8(pipe.unet) > 20 and int8(pipe.decoder) > 5 and int8(pipe.text_encoder) == 0
    assert next(pipe.text_encoder.parameters()).dtype == torch.bfloat16
    got, want = _images(pipe), _images(load_pipeline(None))
    value = 10 * math.log10(255.0 ** 2 / max(float(np.mean((got - want) ** 2)), 1e-12))
    print(f"shipped default, int8 vs fp32 images: {value:.1f} dB")
    assert value >= 35


def test_precision_int8_without_vnni_is_bf16_with_one_line(monkeypatch, caplog):
    from mobilediffusion.pipeline import load_pipeline

    monkeypatch.setattr(cpu_kernel, "cpu_flags", lambda: {"avx512f"})
    with caplog.at_level("WARNING"):
        pipe = load_pipeline(None, dtype="int8")
    lines = [r.getMessage() for r in caplog.records if "int8" in r.getMessage()]
    assert len(lines) == 2 and all("VNNI" in x and "running bf16 instead" in x for x in lines)  # UNet, decoder
    assert not any(isinstance(m, (Int8Conv2d, Int8Linear)) for m in pipe.unet.modules())
    assert next(pipe.unet.parameters()).dtype == torch.bfloat16


def test_loader_node_offers_int8(plugin):
    nodes = plugin.NODE_CLASS_MAPPINGS
    loader = nodes["LoadMobileDiffusionModel"]
    assert "int8" in loader.INPUT_TYPES()["required"]["dtype"][0]
    unet, clip, decoder, encoder = loader().load("(embedded default)", "auto", "int8", "cpu")
    ops = __import__(f"{plugin.__name__}.mobilediffusion.ops.int8", fromlist=["Int8Conv2d"])
    assert any(isinstance(m, ops.Int8Conv2d) for m in unet.unet.modules())
    (image,) = nodes["MobileDiffusionLiteDecode"]().decode(decoder, nodes["MobileDiffusionSampler"]().sample(
        unet, *[nodes["MobileDiffusionTextEncode"]().encode(clip, t)[0] for t in ("a red circle", "")],
        0, 0, 0.0, "auto", 0, 0, 1)[0])
    assert image.shape == (1, 128, 128, 3) and 0 <= image.min() <= image.max() <= 1


def test_int8_with_compile_is_refused_before_loading():
    from mobilediffusion.pipeline import load_pipeline

    with pytest.raises(ConfigError, match="int8 does not combine with compile"):
        load_pipeline(None, dtype="int8", compile=True)


def test_random_pipeline_and_end_to_end_child_at_precision_int8():
    """build_pipeline(dtype="int8") (the bench's end-to-end cases) quantizes as load_pipeline does; the end-to-end
    child runs a case in precision int8 and times each component."""
    from mobilediffusion.benchmarks.end_to_end import Case, end_to_end_subprocess
    from mobilediffusion.pipeline import build_pipeline
    from mobilediffusion.presets import get_preset

    pipe = build_pipeline(get_preset("md-shapes-128"), dtype="int8")
    assert any(isinstance(m, (Int8Conv2d, Int8Linear)) for m in pipe.unet.modules())
    assert any(isinstance(m, Int8Conv2d) for m in pipe.decoder.modules())
    assert next(pipe.text_encoder.parameters()).dtype == torch.bfloat16
    r = end_to_end_subprocess(Case("md-shapes-128", 1, 0.0, "onestep"), "int8", False, size=128)
    assert r["precision"] == "int8" and r["unet_calls"] == 1 and all(r["parts_ms"][k] > 0 for k in ("unet", "decoder"))


# --------------------------------------------------------------------------- static scales from calibration prompts
CALIBRATION = ["a red circle in the top left on a white background", "a blue square left of a green triangle on a "
               "white background"]


def test_calibration_is_cached_and_recalibrated_when_the_checkpoint_changes(tmp_path, monkeypatch, caplog):
    """load_pipeline(dtype="int8", calibration=prompts): every int8 layer gets a static range, written to the cache;
    the same request reads it back (the same ranges); a changed checkpoint makes it stale: recalibrated, one line."""
    import math
    import os
    import shutil

    import numpy as np

    from mobilediffusion.int8_calibration import calibrate_int8, cache_dir
    from mobilediffusion.ops.int8 import int8_layers
    from mobilediffusion.pipeline import DEFAULT_WEIGHTS, load_pipeline

    monkeypatch.setenv("MOBILEDIFFUSION_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model.safetensors"
    shutil.copy(DEFAULT_WEIGHTS, model)
    acts = lambda p: {f"{k}.{n}": m.act for k, mod in (("unet", p.unet), ("decoder", p.decoder))  # noqa: E731
                      for n, m in int8_layers(mod)}
    pipe = load_pipeline(model, dtype="int8", calibration=CALIBRATION)
    first = acts(pipe)
    assert len(first) > 25 and all(a is not None for a in first.values())  # every layer static
    assert len(list(cache_dir().glob("*.json"))) == 1
    again = load_pipeline(model, dtype="int8")
    assert calibrate_int8(again, CALIBRATION, source=model) == "cached" and acts(again) == first
    # the images stay close to fp32's (static ranges from two prompts, generating others)
    got, want = _images(pipe), _images(load_pipeline(model))
    value = 10 * math.log10(255.0 ** 2 / max(float(np.mean((got - want) ** 2)), 1e-12))
    print(f"shipped default, int8 with calibrated scales vs fp32 images: {value:.1f} dB")
    assert value >= 35
    # the checkpoint changes: stale, recalibrated and rewritten
    st = model.stat()
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with caplog.at_level("WARNING"):
        assert calibrate_int8(load_pipeline(model, dtype="int8"), CALIBRATION, source=model) == "recalibrated"
    lines = [r.getMessage() for r in caplog.records if "stale" in r.getMessage()]
    assert len(lines) == 1 and "checkpoint changed since it was calibrated" in lines[0]
    assert calibrate_int8(load_pipeline(model, dtype="int8"), CALIBRATION, source=model) == "cached"


def test_calibration_bad_requests_are_refused_before_loading(monkeypatch):
    from mobilediffusion import pipeline

    monkeypatch.setattr(pipeline, "default_pipeline", lambda **kw: pytest.fail("loaded before refusing"))
    for prompts in ([], [""], "  "):
        with pytest.raises(ConfigError, match="int8 calibration needs prompts"):
            pipeline.load_pipeline(None, dtype="int8", calibration=prompts)
    with pytest.raises(ConfigError, match="calibration prompts are for dtype 'int8'"):
        pipeline.load_pipeline(None, dtype="bf16", calibration=CALIBRATION)


@pytest.mark.parametrize("preset", ["md-shapes-128", "sdxs-512"])  # lite decoder, TAESD
def test_decoder_upsample_convolutions_run_int8_on_the_phase_kernels(preset):
    """A nearest 2x upsample + 3x3 convolution becomes Identity + Int8UpsampleConv (the four phase kernels on the
    small map, int8); the decoders' fused sequences plan again, so no float convolution they held runs any more."""
    from mobilediffusion import fast
    from mobilediffusion.decoder import build_decoder
    from mobilediffusion.fast_decoder import FusedSequential, Int8UpsampleConv
    from mobilediffusion.presets import get_preset

    torch.manual_seed(0)
    cfg = get_preset(preset).decoder
    ref = build_decoder(cfg).eval()
    dec = fast.optimize(build_decoder(cfg).eval())
    dec.load_state_dict(ref.state_dict())
    quantize_int8(dec)
    ups = [m for m in dec.modules() if isinstance(m, Int8UpsampleConv)]
    assert len(ups) == 3
    lat = torch.randn(1, cfg.latent_channels, 16, 16) * cfg.scaling_factor
    with torch.no_grad():
        got, want = dec(lat).float(), ref(lat)
    for seq in (m for m in dec.modules() if isinstance(m, FusedSequential)):  # what ran was planned on the int8 ones
        children = {id(c) for c in seq}
        assert all(id(m) in children for _, mods in seq.__dict__["_steps"] for m in mods)
    assert got.shape == want.shape and _rel(got, want) < 0.05, _rel(got, want)
