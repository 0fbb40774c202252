"""`mobilediffusion bench`: runs on the tiny preset with --json, measures what it says, refuses bad requests."""
import importlib.util
import json
import os

import pytest
import torch
from torch import nn

from mobilediffusion import bench, cli, fast

FAST = ["--runs", "1", "--warmup", "0", "--size", "64"]


def run_cli(capsys, *argv):
    code = cli.main(["bench", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_bench_tiny_json(capsys):
    pytest.importorskip("diffusers")
    code, out, _ = run_cli(capsys, "--preset", "tiny", "--precision", "fp32", "--peers", "diffusers", "--json", *FAST)
    assert code == 0
    result = json.loads(out)
    rows = {r["component"]: r for r in result["rows"]}
    assert set(rows) == {"text", "unet", "decoder"}
    for r in rows.values():
        assert r["preset"] == "tiny" and r["precision"] == "fp32" and r["mode"] == "eager"
        assert r["ms"] > 0 and r["gflop"] > 0
        assert r["gflops"] == pytest.approx(r["gflop"] / r["ms"] * 1e3)
        assert r["peak_fraction"] == pytest.approx(r["gflops"] / result["machine"]["peak"]["fp32"]["gflops"])
    # diffusers cannot express the MobileDiffusion UNet layout: no reference, and the row says why
    assert rows["unet"]["ref_ms"] is None and "diffusers cannot express" in rows["unet"]["note"]
    # the lite decoder is a diffusers AutoencoderKL: timed against it on the same weights, equal outputs
    dec = rows["decoder"]
    assert dec["ref"] == "diffusers AutoencoderKL" and dec["ratio"] == pytest.approx(dec["ref_ms"] / dec["ms"])
    assert dec["rel_err"] <= 1e-5
    assert rows["text"]["rel_err"] <= 1e-5
    assert result["settings"]["latent"] == 8


def test_bench_text_table(capsys):
    code, out, _ = run_cli(capsys, "--preset", "tiny", "--precision", "fp32", "--components", "unet",
                           "--no-reference", *FAST)
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].split()[:4] == ["preset", "component", "mode", "ms"]
    assert lines[1].split()[:3] == ["tiny", "unet", "fp32"]
    assert lines[-1].startswith("peak on ")


def test_unknown_preset_is_a_clear_error(capsys):
    code, out, err = run_cli(capsys, "--preset", "sd99", *FAST)
    assert code == 2 and out.strip() == ""
    assert "unknown preset 'sd99'" in err and "tiny" in err  # lists the known ones


def test_unavailable_precision_is_a_clear_error(capsys):
    missing = [p for p in ("bf16", "fp16") if fast.unsupported_precision(p) is not None]
    if not missing:
        pytest.skip("this machine runs every precision bench knows")
    code, out, err = run_cli(capsys, "--preset", "tiny", "--precision", missing[-1], *FAST)
    assert code == 2 and out.strip() == ""
    assert f"precision {missing[-1]} is not available on cpu" in err and "use fp32" in err


def test_default_precisions_the_cpu_lacks_are_one_line_each(capsys, monkeypatch):
    """Without --precision the bench times fp32 and bf16; on a CPU without bf16 it says so in one line and times
    fp32 (asked for, bf16 is refused: the test above)."""
    real = fast.unsupported_precision
    monkeypatch.setattr(fast, "unsupported_precision",
                        lambda p, device="cpu": "no bf16 here (test)" if p == "bf16" else real(p, device))
    code, out, err = run_cli(capsys, "--preset", "tiny", "--components", "unet", "--no-reference", "--json", *FAST)
    result = json.loads(out)
    assert code == 0 and result["precisions_skipped"] == {"bf16": "no bf16 here (test)"}
    assert [r["precision"] for r in result["rows"]] == ["fp32"]
    code, out, _ = run_cli(capsys, "--preset", "tiny", "--components", "unet", "--no-reference", *FAST)
    assert out.splitlines()[0] == "bf16 rows skipped: no bf16 here (test)"


@pytest.mark.parametrize("argv,message", [
    (["--precision", "fp8"], "unknown precision 'fp8'"),
    (["--components", "vae"], "unknown component 'vae'"),
    (["--size", "100"], "multiple of 8"),
])
def test_other_bad_requests(capsys, argv, message):
    code, _, err = run_cli(capsys, "--preset", "tiny", *argv)
    assert code == 2 and message in err


def test_flop_count_and_alternating_timer():
    lin = nn.Linear(32, 16, bias=False)
    x = torch.randn(8, 32)
    assert bench.count_gflop(lambda: lin(x)) == pytest.approx(2 * 8 * 32 * 16 / 1e9)
    calls = []
    ms = bench.time_alternating({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, runs=3, warmup=1)
    assert set(ms) == {"a", "b"} and all(v >= 0 for v in ms.values())
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]  # order reversed every other round


def test_peak_probe():
    peak = bench.measure_peak(torch.float32, runs=1)
    assert peak["gflops"] > 0 and peak["probe"] in peak["probes"]
    assert peak["gflops"] == max(peak["probes"].values()) or abs(peak["gflops"] - max(peak["probes"].values())) < 0.1




# --------------------------------------------------------------------------- peers, modes, rows, end to end
def test_unknown_peer_is_a_clear_error(capsys):
    code, out, err = run_cli(capsys, "--preset", "tiny", "--peers", "diffusers,tensorrt", *FAST)
    assert code == 2 and out.strip() == ""
    assert "unknown peer 'tensorrt'" in err and "comfyui" in err and "openvino" in err
    code, _, err = run_cli(capsys, "--preset", "tiny", "--peers", "diffusers", "--no-reference", *FAST)
    assert code == 2 and "not both" in err


def test_unavailable_peers_are_one_line_each_and_the_bench_runs(capsys, monkeypatch, tmp_path):
    from mobilediffusion.benchmarks import peers

    real = peers.importlib.util.find_spec
    monkeypatch.setattr(peers.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("openvino", "stable_diffusion_cpp") else real(name, *a))
    monkeypatch.delenv("COMFYUI_DIR", raising=False)
    code, out, _ = run_cli(capsys, "--preset", "tiny", "--precision", "fp32", "--components", "unet",
                           "--peers", "comfyui,openvino,sdcpp", *FAST)
    assert code == 0
    lines = out.strip().splitlines()
    assert [ln for ln in lines if "peer comfyui" in ln] == [
        "peer comfyui skipped: no ComfyUI directory given; pass --comfyui DIR (or set COMFYUI_DIR) and, if this "
        "Python lacks ComfyUI's requirements, --comfyui-python with ComfyUI's own Python"]
    assert [ln for ln in lines if "peer openvino" in ln] == [
        "peer openvino skipped: not installed; install it with: pip install openvino (or the bench extra: "
        "pip install 'comfyui-mobilediffusion[bench]')"]
    assert [ln for ln in lines if "peer sdcpp" in ln] == [
        "peer sdcpp skipped: not installed; install it with: pip install stable-diffusion-cpp-python (builds "
        "stable-diffusion.cpp from source: needs cmake and a C++ compiler, about 3 minutes on 2 cores)"]
    assert any(ln.split()[:3] == ["tiny", "unet", "fp32"] for ln in lines)  # the rest of the bench ran
    # a folder that is not ComfyUI: one line saying so
    code, out, _ = run_cli(capsys, "--preset", "tiny", "--precision", "fp32", "--components", "none",
                           "--peers", "comfyui", "--comfyui", str(tmp_path), *FAST)
    assert code == 0 and f"peer comfyui skipped: {tmp_path} is not a ComfyUI checkout" in out


SDCPP_LOG = """stable-diffusion.cpp:3168 - get_learned_condition completed, taking 0.23s
  |==================================================| 4/4 - 22.06s/it
stable-diffusion.cpp:3432 - sampling completed, taking 88.16s
stable-diffusion.cpp:3212 - decode_first_stage completed, taking 59.53s
stable-diffusion.cpp:3591 - generate_image completed in 147.93s
"""


def test_sdcpp_peer_splits_its_log_and_sets_it_beside_ours(monkeypatch):
    """stable-diffusion.cpp's image: its logged parts (text, sampling, decode), per step, and how many times faster
    ours is on the same case in the matching precision (f16 - bf16, q8_0 - int8); a missing part is an error."""
    from mobilediffusion.benchmarks import sdcpp_peer
    from mobilediffusion.errors import ConfigError

    assert sdcpp_peer.parse_log(SDCPP_LOG) == pytest.approx({"text": 230.0, "unet": 88160.0, "decoder": 59530.0})
    with pytest.raises(ConfigError, match="no decoder time"):
        sdcpp_peer.parse_log(SDCPP_LOG.replace("decode_first_stage", "x"))
    monkeypatch.setattr(sdcpp_peer, "write_weights", lambda path: path)
    fake = {"f16": 150000.0, "q8_0": 100000.0}

    def image(model, wtype, *, steps, threads, size=512):
        parts = {"text": 200.0, "unet": fake[wtype] - 60200.0, "decoder": 60000.0}
        return {"wtype": wtype, "steps": steps, "size": size, "ms": fake[wtype], "parts_ms": {**parts, "other": 0.0},
                "step_ms": parts["unet"] / steps, "load_s": 1.0, "peak_rss_mb": 3000.0}

    monkeypatch.setattr(sdcpp_peer, "image", image)
    ours = [{"name": "sd15 lcm 4 steps", "precision": "bf16", "ms": 15000.0,
             "parts_ms": {"text": 100.0, "unet": 8000.0, "decoder": 6000.0, "other": 900.0}}]
    lines = []
    rows = sdcpp_peer.run(ours, 2, lines.append)
    assert [r["wtype"] for r in rows] == ["f16", "q8_0"] and "speedup" not in rows[1]  # (no int8 case of ours ran)
    assert rows[0]["speedup"] == pytest.approx({"image": 10.0, "step": (89800 / 4) / 2000, "text": 2.0,
                                                "decoder": 10.0})
    assert "ours bf16 is 10.0x faster per image (step 11.2x, text 2.0x, decoder 10.0x)" in lines[0]


@pytest.mark.skipif(os.environ.get("MD_HEAVY_TESTS") != "1" or importlib.util.find_spec("stable_diffusion_cpp") is None,
                    reason="opt-in (writes SD1.5 weights, 2 GB): MD_HEAVY_TESTS=1 and pip install "
                    "stable-diffusion-cpp-python")
def test_sdcpp_peer_makes_an_image_from_our_sd15_file(tmp_path):
    from mobilediffusion.benchmarks import sdcpp_peer

    model = sdcpp_peer.write_weights(str(tmp_path / "sd15.safetensors"))
    r = sdcpp_peer.image(model, "q8_0", steps=2, size=64, threads=2)
    print(sdcpp_peer.format_result(r))
    assert all(r["parts_ms"][k] > 0 for k in ("text", "unet", "decoder")) and r["step_ms"] == r["parts_ms"]["unet"] / 2


def test_row_format():
    row = bench.Row(preset="sd15", component="unet", precision="bf16", mode="int8", shape="x", ms=100.0, gflop=80.0,
                    gflops=800.0, peak_fraction=0.5, ref_ms=150.0, ratio=1.5, rel_err=0.01, eager_ms=120.0,
                    note="dynamic int8 linears")
    cols = bench.format_row(row).split()
    assert cols[:7] == ["sd15", "unet", "bf16+int8", "100.0", "150.0", "1.50", "-"]
    assert cols[7:11] == ["80.0", "800.0", "50.0%", "1.0e-02"]
    assert bench.format_row(row).endswith("(eager alongside 120.0 ms; dynamic int8 linears)")
    peer = bench.PeerRow(preset="sd15", component="unet", peer="openvino", precision="bf16", shape="x", ms=90.0,
                         ours_ms=100.0, ratio=0.9, ref_fp32_ms=900.0, ratio_vs_ref_fp32=10.0, gflop=80.0, gflops=888.9,
                         peak_fraction=0.555, rel_err=0.03, setup_s=61.0, note="OpenVINO 2026.4.1")
    cols = bench.format_peer(peer).split()
    assert cols[:12] == ["sd15", "unet", "openvino", "bf16", "90.0", "100.0", "0.90", "10.00", "80.0", "888.9",
                         "55.5%", "3.0e-02"]
    assert bench.format_peer(peer).endswith("(setup 61.0 s; OpenVINO 2026.4.1)")
    gone = bench.PeerRow(preset="mobilediffusion-512", component="unet", peer="comfyui", precision="fp32,bf16",
                         shape="x", ms=None, note="ComfyUI's UNetModel cannot express this UNet: separable convolutions")
    assert bench.format_peer(gone).split()[:5] == ["mobilediffusion-512", "unet", "comfyui", "fp32,bf16", "-"]
    assert bench.format_peer(gone).endswith("(ComfyUI's UNetModel cannot express this UNet: separable convolutions)")


def _micro_sd_config():
    """An SD-layout model small enough to convert and run in a second or two."""
    import dataclasses

    from mobilediffusion.config import UNetConfig
    from mobilediffusion.presets import TINY_TEXT, get_preset

    unet = UNetConfig(block_out_channels=(16, 32), layers_per_block=(1, 1), attention=("none", "full"),
                      transformer_depth=(1, 1), num_attention_heads=(1, 2), cross_attention_dim=64, norm_num_groups=8)
    return dataclasses.replace(get_preset("tiny"), unet=dataclasses.replace(unet, in_channels=8, out_channels=8),
                               text=TINY_TEXT)


PEAKS = {"fp32": {"gflops": 100.0}, "bf16": {"gflops": 200.0}}


def test_int8_and_compile_modes_per_component():
    from types import SimpleNamespace

    from mobilediffusion.benchmarks.components import _modes

    args = SimpleNamespace(compile=True, int8=True)
    assert _modes(args, "unet") == ["eager", "compile", "int8", "int8-static"]
    assert _modes(args, "decoder") == ["eager", "int8", "int8-static"] and _modes(args, "text") == ["eager"]


def test_int8_mode_row():
    from mobilediffusion.benchmarks.components import bench_component
    from mobilediffusion.ops.int8 import int8_unavailable

    if int8_unavailable():
        pytest.skip(int8_unavailable())
    rows, peer_rows = bench_component("unet", "micro", _micro_sd_config(), precisions=["fp32"],
                                      modes=("eager", "int8", "int8-static"), batch=1, latent=8, runs=1, warmup=0,
                                      with_reference=False, peaks=PEAKS, emit=lambda line: None)
    eager, int8, static = rows
    assert (eager.mode, int8.mode, static.mode) == ("eager", "int8", "int8-static") and peer_rows == []
    assert eager.rel_err is None and 0 < int8.rel_err < 5e-2  # against ours fp32 (no reference here)
    assert 0 < static.rel_err < 1e-1 and static.rel_err != int8.rel_err  # ranges from other inputs than the timed
    assert int8.eager_ms > 0 and int8.gflops == pytest.approx(int8.gflop / int8.ms * 1e3)
    assert "scales per call" in int8.note and "static scales calibrated on 6 inputs" in static.note
    from mobilediffusion.ops.int8 import kept
    from mobilediffusion.unet import UNet

    named = kept(UNet(_micro_sd_config().unet))["kept by name (first / last layers, time embedding)"]
    assert {"conv_in", "conv_out"} <= set(named)  # and the resnets' time projections
    assert f"kept in float: {len(named)} kept by name (first / last layers, time embedding)" in int8.note


def _int8_or_skip():
    from mobilediffusion.ops.int8 import int8_unavailable

    if int8_unavailable():
        pytest.skip(int8_unavailable())


def test_int8_peak_probe():
    _int8_or_skip()
    peak = bench.measure_int8_peak(runs=1)
    assert peak["probe"] in peak["probes"] and set(peak["probes"]) >= {"u8s8 matmul 4096x320x1280",
                                                                       "u8s8 conv3x3 320ch 64x64"}
    assert peak["gflops"] == pytest.approx(max(peak["probes"].values()), abs=0.1)


def test_precision_int8_is_the_int8_mode_beside_bf16(capsys):
    """--precision int8: the int8 rows (and the int8 peak) beside bf16's eager rows they chain to."""
    _int8_or_skip()
    if fast.unsupported_precision("bf16"):
        pytest.skip("no bf16 here")
    code, out, _ = run_cli(capsys, "--preset", "tiny", "--precision", "int8", "--components", "unet", "--no-reference",
                           "--json", *FAST)
    assert code == 0
    result = json.loads(out)
    assert [(r["precision"], r["mode"]) for r in result["rows"]] == [("bf16", "eager"), ("bf16", "int8"),
                                                                      ("bf16", "int8-static")]
    assert set(result["machine"]["peak"]) == {"bf16", "int8"}
    int8 = result["rows"][1]
    assert int8["peak_fraction"] == pytest.approx(int8["gflops"] / result["machine"]["peak"]["int8"]["gflops"])


def test_int8_without_vnni_is_one_line_and_the_bench_runs(capsys, monkeypatch):
    from mobilediffusion.ops import int8

    monkeypatch.setattr(int8, "int8_unavailable", lambda: "this CPU has no VNNI int8 dot products (test)")
    code, out, _ = run_cli(capsys, "--preset", "tiny", "--precision", "fp32", "--int8", "--components", "unet",
                           "--no-reference", *FAST)
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0] == ("int8 rows skipped: this CPU has no VNNI int8 dot products (test); the int8 precision runs "
                        "bf16 here")
    assert [ln.split()[2] for ln in lines if ln.startswith("tiny")] == ["fp32"]  # the eager row ran, no int8 row


def test_openvino_int8_peer_rows():
    """OpenVINO in int8: NNCF's post-training quantization and its weight compression, each timed alternating with
    ours int8 and chained through ours int8's row."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    _int8_or_skip()
    from types import SimpleNamespace

    from mobilediffusion.benchmarks.components import bench_component

    peaks = {**PEAKS, "int8": {"gflops": 400.0}}
    rows, peer_rows = bench_component("unet", "micro", _micro_sd_config(), precisions=["bf16"], modes=("eager", "int8"),
                                      batch=1, latent=8, runs=1, warmup=0, with_reference=False, peaks=peaks,
                                      peer_names=["openvino"], args=SimpleNamespace(int8=True), emit=lambda line: None)
    assert [r.mode for r in rows] == ["eager", "int8"]
    assert [r.precision for r in peer_rows] == ["bf16", "int8", "int8w"]
    _, q, w = peer_rows
    for r in (q, w):
        assert r.ms > 0 and r.ours_ms > 0 and r.ratio == r.ms / r.ours_ms and r.rel_err < 0.2
        assert r.peak_fraction == pytest.approx(r.gflops / 400.0)  # against the int8 peak, as ours int8
        assert "vs ours int8" in r.note
    assert "nncf.quantize, 6 calibration inputs" in q.note and "nncf.compress_weights" in w.note


def test_openvino_peer_rows():
    pytest.importorskip("openvino")
    from mobilediffusion.benchmarks.components import bench_component

    lines = []
    rows, peer_rows = bench_component("unet", "micro", _micro_sd_config(), precisions=["fp32", "bf16"], batch=1,
                                      latent=8, runs=1, warmup=0, with_reference=False, peaks=PEAKS,
                                      peer_names=["openvino"], emit=lines.append)
    assert [r.precision for r in rows] == ["fp32", "bf16"] and [r.precision for r in peer_rows] == ["fp32", "bf16"]
    fp32, bf16 = peer_rows
    assert fp32.peer == "openvino" and fp32.ms > 0 and fp32.ours_ms > 0 and fp32.ratio == fp32.ms / fp32.ours_ms
    assert fp32.rel_err < 1e-5 and bf16.rel_err < 1e-1  # the same weights; bf16 inference precision
    # the precision OpenVINO ran: bf16 where the CPU has it (it runs a bf16 request in f32 on one without)
    ov_bf16 = "f32" if fast.unsupported_precision("bf16") else "bf16"
    assert "inference precision f32" in fp32.note and f"inference precision {ov_bf16}" in bf16.note
    assert "converted from our UNet" in fp32.note and fp32.setup_s > 0
    assert len(lines) == 4 and lines[2].split()[:4] == ["micro", "unet", "openvino", "fp32"]


@pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="opt-in: set COMFYUI_DIR (and COMFYUI_PYTHON) to run it")
def test_comfyui_peer_rows():
    import argparse
    import dataclasses

    from mobilediffusion.benchmarks import comfyui_peer
    from mobilediffusion.benchmarks.components import bench_component
    from mobilediffusion.config import UNetConfig
    from mobilediffusion.presets import get_preset

    args = argparse.Namespace(comfyui=os.environ["COMFYUI_DIR"], comfyui_python=os.environ.get("COMFYUI_PYTHON"),
                              comfyui_args="")
    why, facts = comfyui_peer.probe(args)
    assert why is None, why
    # SD1.5's widths and context (so ComfyUI detects it as SD15), two levels only
    cfg = dataclasses.replace(get_preset("sd15"), unet=UNetConfig(
        block_out_channels=(320, 640), layers_per_block=(1, 1), attention=("full", "full"), transformer_depth=(1, 1),
        num_attention_heads=(8, 8)))
    rows, peer_rows = bench_component("unet", "sd15-mini", cfg, precisions=["fp32", "bf16"], batch=1, latent=8, runs=1,
                                      warmup=0, with_reference=False, peaks=PEAKS, peer_names=["comfyui"], args=args,
                                      emit=lambda line: None)
    fp32, bf16 = peer_rows
    assert fp32.ms > 0 and fp32.ours_ms > 0 and fp32.rel_err < 1e-5 and bf16.rel_err < 5e-2
    assert "SD15 EPS" in fp32.note and "weights bfloat16 compute float32" in bf16.note
    assert "saw other inputs" not in fp32.note


@pytest.mark.slow
def test_end_to_end_child_on_the_tiny_preset():
    from mobilediffusion.benchmarks.end_to_end import Case, end_to_end_subprocess, format_result

    r = end_to_end_subprocess(Case("tiny", 2, 0.0, "euler"), "fp32", False, size=64)
    assert r["ms"] > 0 and r["peak_rss_mb"] > 50 and r["size"] == 64 and r["unet_calls"] == 2
    parts = r["parts_ms"]
    assert set(parts) == {"text", "unet", "decoder", "other"} and all(parts[k] > 0 for k in ("text", "unet", "decoder"))
    assert sum(parts.values()) == pytest.approx(r["ms"])
    line = format_result("tiny", r)
    assert line.startswith("end-to-end tiny") and "unet" in line and "(2 calls)" in line and "peak RSS" in line


def test_ours_in_the_bench_runs_the_loaders_ops_backend():
    """The bench builds ours from the reference's weights on meta; it must choose the ops backend a loaded
    model gets on the CPU (with the cpu attention kernel where this machine has one), not the meta device's."""
    from mobilediffusion.benchmarks.models import build_unets
    from mobilediffusion.ops import choose_backend

    make_ours, ref, why = build_unets(_micro_sd_config(), with_reference=True)
    ours = make_ours()
    assert ours.ops_backend == choose_backend("cpu")
    assert {m.backend for m in ours.modules() if hasattr(m, "backend")} == {choose_backend("cpu")}


def test_control_rows_on_a_tiny_sd_layout():
    """bench --control's rows on a tiny SD-layout UNet: ours and diffusers timed, our controlled UNet equal to
    diffusers' in fp32, the adapter timed apart; layouts diffusers' ControlNetModel cannot copy are skipped by name."""
    import types

    pytest.importorskip("diffusers")
    import diffusers

    from mobilediffusion.benchmarks import control
    from mobilediffusion.config import UNetConfig
    from mobilediffusion.presets import get_preset

    cfg = UNetConfig(block_out_channels=(32, 64, 64, 64), layers_per_block=(2, 2, 2, 2), norm_num_groups=32,
                     attention=("full", "full", "full", "none"), num_attention_heads=(2, 2, 2, 2),
                     cross_attention_dim=32)
    printed = []
    bench_ = types.SimpleNamespace(precisions=["fp32"], print=printed.append)
    args = types.SimpleNamespace(size=64, batch=1, runs=1, warmup=0)
    rows = control.preset_rows("tiny-sd", cfg, args, bench_, diffusers)
    assert [r["case"] for r in rows] == ["controlnet step", "t2i-adapter step", "t2i-adapter (once per image)"]
    for r in rows:
        assert r["ours_ms"] > 0 and r["diffusers_ms"] > 0 and r["ratio"] > 0  # (ms and ratio rounded apart)
    # fp32 on the fast path (oneDNN-packed convolutions) vs diffusers' eager ops: 1.5e-5 on an AVX2-only CPU
    assert rows[0]["ours_rel_err"] <= 3e-5 and rows[1]["ours_rel_err"] <= 3e-5
    assert len(printed) == 3 and "controlnet step" in printed[0]
    assert "separable" in control.unsupported(get_preset("mobilediffusion-512").unet)
    assert "mid block" in control.unsupported(get_preset("sdxs-512").unet) or "diffusers" in \
        control.unsupported(get_preset("sdxs-512").unet)
    assert control.unsupported(get_preset("sd15").unet) is None


def test_control_plugin_row():
    """bench --control's plugin row: a one-step default image with and without the shipped plugin, timed."""
    import types

    from mobilediffusion.benchmarks import control

    printed = []
    (row,) = control.plugin_rows(types.SimpleNamespace(runs=3, warmup=1), types.SimpleNamespace(print=printed.append))
    assert row["plain_ms"] > 0 and row["with_plugin_ms"] > 0 and row["adapter_ms"] > 0
    assert 100_000 < row["plugin_parameters"] < 1_000_000 and "md-shapes-scribble" in printed[0]


@pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="opt-in: needs a ComfyUI checkout (COMFYUI_DIR, and "
                    "COMFYUI_PYTHON with its requirements)")
def test_control_rows_against_comfyui():
    """With the comfyui peer: the ControlNet and T2I-Adapter steps in ComfyUI's graph on the same weights (as its
    files), its output equal to the fp32 truth, ours timed in its process."""
    import types

    pytest.importorskip("diffusers")
    import diffusers

    from mobilediffusion.benchmarks import control
    from mobilediffusion.config import UNetConfig

    # ComfyUI detects SD1.5 by 320 base channels and 768 context (the ControlNet's layout too)
    cfg = UNetConfig(block_out_channels=(320, 640, 1280, 1280), layers_per_block=(1, 1, 1, 1),
                     attention=("full", "full", "full", "none"), num_attention_heads=(8, 8, 8, 8),
                     cross_attention_dim=768)
    printed = []
    bench_ = types.SimpleNamespace(precisions=["fp32"], print=printed.append, peers=["comfyui"])
    args = types.SimpleNamespace(size=128, batch=1, runs=2, warmup=1, comfyui=os.environ["COMFYUI_DIR"],
                                 comfyui_python=os.environ.get("COMFYUI_PYTHON"), comfyui_args="")
    rows = control.preset_rows("tiny-sd", cfg, args, bench_, diffusers)
    comfy = [r for r in rows if r["case"].endswith("vs ComfyUI")]
    assert [r["case"] for r in comfy] == ["controlnet step vs ComfyUI", "t2i-adapter step vs ComfyUI"], rows[-1]
    for r in comfy:
        print(r)
        assert r["comfyui_ms"] > 0 and r["ours_ms"] > 0
    # the ControlNet step in ComfyUI equals the fp32 truth; its T2I-Adapter assumes SD's 2 blocks per level (this
    # layout has 1, to stay small: the sd15 bench compares it at SD1.5's own layout), which the row says
    assert comfy[0]["comfyui_rel_err"] <= 1e-4 and "2 blocks per level" in comfy[1]["note"]


def test_image_ssim_of_the_accuracy_table():
    """SSIM (kornia's) as the --int8 accuracy line reports it: 1 for equal images, lower for noisier ones."""
    import numpy as np

    pytest.importorskip("kornia")
    from mobilediffusion.benchmarks.accuracy import psnr_uint8, ssim_uint8

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    slight = np.clip(a.astype(int) + rng.integers(-2, 3, a.shape), 0, 255).astype(np.uint8)
    strong = np.clip(a.astype(int) + rng.integers(-60, 61, a.shape), 0, 255).astype(np.uint8)
    assert ssim_uint8(a, a) == pytest.approx(1.0)
    assert 1.0 > ssim_uint8(slight, a) > ssim_uint8(strong, a) > 0
    assert ssim_uint8(slight, a) == pytest.approx(ssim_uint8(a, slight))
    assert psnr_uint8(a, a) == float("inf") and psnr_uint8(slight, a) > psnr_uint8(strong, a)
