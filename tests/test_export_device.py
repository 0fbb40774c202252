"""Device readiness of bundles: SD1.5-layout UNets at fp16 and full int8, int16-activation bundles
(quantized inputs/outputs, schema 2), GPU-delegate verdicts, the memory check, provenance, `info` and
`bench --bundle` on a bundle. Conversions use tiny models (export_cases.py)."""
import json
import os

import numpy as np
import pytest
import torch

from export_cases import default_bundle, micro_pipeline, needs_litert, sd15_tiny_config, session_bundle
from mobilediffusion.errors import ConfigError
from mobilediffusion.export import export_bundle

pytestmark = needs_litert


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return session_bundle(tmp_path_factory)


def _entries(folder):
    return sorted(p.name for p in folder.iterdir())


def _component(path, signature):
    from mobilediffusion.export.verify import signature_io
    from mobilediffusion.runtime.interpreter import Component

    ins, outs = signature_io(path, signature)
    return Component(path, {"file": path.name, "signature": signature, "inputs": ins, "outputs": outs})


HEAVY = pytest.mark.skipif(os.environ.get("MD_HEAVY_TESTS") != "1", reason="opt-in (a minute of CPU; the micro "
                           "model's int8_dynamic bundle and the quantizer tests of test_export run by default): set "
                           "MD_HEAVY_TESTS=1")


# --------------------------------------------------------------------------- SD1.5 layout, fp16 and full int8
@HEAVY
def test_sd15_layout_unet_fp16_and_full_int8(tmp_path):
    """An SD1.5-layout UNet converted once: fp16 within 1e-2 of torch; int8 with every conv/linear weight
    stored int8 (read from the flatbuffer), at most 0.3 of the fp32 file; the GPU composites kept."""
    from mobilediffusion.export.components import Shapes, Signature, UNetExport, example_inputs, export_copy
    from mobilediffusion.export.convert import convert
    from mobilediffusion.export.flatbuffer import composite_counts, weight_storage
    from mobilediffusion.export.gpu import gpu_report
    from mobilediffusion.export.quantize import quantize
    from mobilediffusion.export.verify import as_feed, check_component, torch_outputs
    from mobilediffusion.pipeline import build_pipeline

    pipe = build_pipeline(sd15_tiny_config(), seed=1)
    shapes = Shapes(batch=1, unet_batch=2, tokens=77, context_dim=32, latent_channels=4, upscale=8, sizes=((64, 64),))
    module = UNetExport(export_copy(pipe.unet)).eval()
    inputs = example_inputs("unet", shapes, Signature("unet", (64, 64), 77))
    ref, feed = torch_outputs(module, inputs), as_feed(inputs)
    fp32 = tmp_path / "unet.tflite"
    info = convert("unet", module, {"unet": inputs}, "fp32", fp32)
    composites = composite_counts(fp32)
    assert composites["odml.group_norm"] > 0 and composites["odml.scaled_dot_product_attention"] > 0
    assert gpu_report(fp32)["compatible"]
    sizes, errors = {}, {}
    for precision in ("fp16", "int8_dynamic", "int8_weight_only"):
        path = tmp_path / f"{precision}.tflite"
        quantize(fp32, path, precision, "unet")
        sizes[precision] = path.stat().st_size / info["fp32_bytes"]
        errors[precision] = check_component(_component(path, "unet"), feed, ref, precision)["rel_error"]
        stored = weight_storage(path)
        assert len(stored) > 200 and set(stored.values()) == {"FLOAT16" if precision == "fp16" else "INT8"}
        assert composite_counts(path) == composites and gpu_report(path)["compatible"]
    print("size / fp32", {k: round(v, 3) for k, v in sizes.items()}, "errors", {k: f"{v:.1e}" for k, v in errors.items()})
    assert errors["fp16"] <= 1e-2 and sizes["fp16"] < 0.6
    assert max(errors["int8_dynamic"], errors["int8_weight_only"]) < 0.1
    assert max(sizes["int8_dynamic"], sizes["int8_weight_only"]) <= 0.3


# --------------------------------------------------------------------------- the shipped default at int8


@pytest.mark.slow
@pytest.mark.parametrize("precision,min_psnr", [("int8_dynamic", 25.0), pytest.param("int8_a16", 20.0, marks=HEAVY)])
def test_shipped_default_int8_bundle(tmp_path_factory, tmp_path, precision, min_psnr):
    """The embedded default model's bundle at full int8: PSNR against torch on the same noise >= 25 dB
    (int8 weights) / 20 dB (int16 activations too), every conv/linear weight int8, the runtime runs it.
    int8_a16 files take and return int16 tensors: schema 2, with each tensor's quantization recorded. The
    manifest's memory figures are what a separate process running the bundle uses (within 20%), under the budget.
    int8_dynamic: the bundle `mobilediffusion export` writes with the scribble plugin, the encoder and the web player
    (the one the web player test drives)."""
    from mobilediffusion.export.flatbuffer import weight_storage
    from mobilediffusion.pipeline import default_pipeline
    from mobilediffusion.runtime import BundlePipeline

    if precision == "int8_dynamic":
        out = default_bundle(tmp_path_factory)
    else:
        out = export_bundle(default_pipeline(), tmp_path / "b", precision, prompt_chunks=1, budget="1GB")
    m = json.loads((out / "manifest.json").read_text())
    e2e = m["verification"]["end_to_end"]
    print(precision, {n: f"{m['verification'][n]['rel_error']:.1e}" for n in m["components"]}, f"PSNR {e2e['psnr_db']} dB")
    assert e2e["psnr_db"] >= min_psnr and (e2e["steps"], e2e["of_steps"]) == (1, 1)
    for name, e in m["components"].items():
        assert set(weight_storage(out / e["file"]).values()) == {"INT8"}, name
        assert e["bytes"] < 0.5 * e["fp32_bytes"] and e["large_model_form"]  # weights after the flatbuffer
    unet = m["components"]["unet"]
    if precision == "int8_a16":
        assert m["schema_version"] == 2
        assert [i["dtype"] for i in unet["inputs"]] == ["int16"] * 3 and "quantization" in unet["outputs"][0]
        assert not unet["gpu"]["compatible"] and "INT16 activations" in json.dumps(unet["gpu"]["unsupported_ops"])
    else:
        assert m["schema_version"] == 1 and unet["gpu"]["compatible"]
    image = BundlePipeline(out)("a red circle", seed=0)
    assert image.shape == (1, 128, 128, 3) and image.dtype == np.float32 and 0 <= image.min() <= image.max() <= 1
    check_memory_figures(out, m["memory"], precision)


@pytest.mark.slow
def test_int8_a16_bundle_of_the_micro_model(tmp_path):
    """int8_a16 (int16 activations) on the micro model: schema 2, the UNet's tensors int16 with their quantization
    recorded, every weight int8, the end-to-end check run, and the runtime makes an image from it."""
    from mobilediffusion.export.flatbuffer import weight_storage
    from mobilediffusion.runtime import BundlePipeline

    out = export_bundle(micro_pipeline(), tmp_path / "b", "int8_a16", sizes=((32, 32),), prompt_chunks=1, steps=1,
                        sampler="euler", guidance=1.0)
    m = json.loads((out / "manifest.json").read_text())
    unet = m["components"]["unet"]
    assert m["schema_version"] == 2 and [i["dtype"] for i in unet["inputs"]] == ["int16"] * 3
    assert "quantization" in unet["outputs"][0] and m["verification"]["end_to_end"]["psnr_db"] > 0
    for name, e in m["components"].items():
        assert set(weight_storage(out / e["file"]).values()) == {"INT8"}, name
    image = BundlePipeline(out)("a red circle", seed=0)
    assert image.shape == (1, 32, 32, 3) and 0 <= image.min() <= image.max() <= 1


def check_memory_figures(folder, memory, what):
    """The manifest's peak of one generation (measured at export) against what a separate process running the bundle
    as the app does measures: its high-water mark over what it held with the runtime loaded (/proc's VmHWM: getrusage's
    ru_maxrss would start from pytest's own, kept across fork + exec); within 20%, and under the budget."""
    import re
    import subprocess
    import sys

    script = (
        "import re, sys\n"
        "from mobilediffusion.runtime import BundlePipeline\n"
        "from mobilediffusion.runtime.interpreter import interpreter_class\n"
        "kib = lambda key: int(re.search(key + r':\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
        "interpreter_class()\n"
        "base = kib('VmRSS')\n"
        "BundlePipeline(sys.argv[1])('a red circle in the top left on a white background', seed=0)\n"
        "print(f'peak={(kib(\"VmHWM\") - base) * 1024}', flush=True)\n")
    runs = [int(re.search(r"peak=(\d+)", subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True,
                                                        text=True, check=True).stdout).group(1)) for _ in range(2)]
    measured, peak = min(runs), memory["generation_peak_bytes"]
    print(f"{what}: manifest peak {peak / 2**20:.1f} MiB, a separate run {measured / 2**20:.1f} MiB "
          f"(runs {[round(r / 2**20, 1) for r in runs]}); per component "
          + ", ".join(f"{n} {c['resident_bytes'] / 2**20:.1f} MiB" for n, c in memory["components"].items()
                      if c["resident_bytes"] is not None)  # (an adapter runs inside the UNet's figure)
          + f"; estimate {memory['estimate_bytes'] / 2**20:.1f} MiB, budget {memory['budget_bytes'] / 2**20:.0f} MiB")
    assert abs(peak - measured) <= 0.2 * measured
    assert peak <= memory["budget_bytes"]


def test_quantized_io_round_trip():
    """quantize / dequantize of the runtime follow the manifest's scale and zero point, clipped to the type."""
    from mobilediffusion.runtime.interpreter import dequantize, quantize

    spec = {"dtype": "int16", "quantization": {"scale": 0.01, "zero_point": 3}}
    q = quantize(np.array([0.0, 1.0, -1.0, 1e6], np.float32), spec)
    assert q.dtype == np.int16 and q.tolist() == [3, 103, -97, 32767]
    assert np.allclose(dequantize(q[:3], spec), [0.0, 1.0, -1.0]) and dequantize(q, spec).dtype == np.float32


# --------------------------------------------------------------------------- GPU delegate
class NotForTheGpu(torch.nn.Module):
    """Ops the LiteRT GPU delegate cannot take: a clamp to [0, 1] (RELU_0_TO_1) and a sort."""

    def forward(self, x):
        return {"y": x.clamp(0, 1), "s": torch.sort(x, dim=-1).values}


def test_gpu_report_names_the_ops_the_delegate_cannot_take(tmp_path):
    from mobilediffusion.export.convert import convert
    from mobilediffusion.export.gpu import gpu_report, summary_line

    path = tmp_path / "m.tflite"
    convert("m", NotForTheGpu().eval(), {"m": {"x": torch.randn(1, 8)}}, "fp32", path)
    report = gpu_report(path)
    print(report)
    assert report["compatible"] is False
    assert set(report["unsupported_ops"]) == {"RELU_0_TO_1", "STABLEHLO_SORT"}
    assert report["unsupported_ops"]["RELU_0_TO_1"] == "not supported op (x1)"
    # LiteRT's own analyzer, as shipped, finds nothing (its per-op GPU check is not compiled in): recorded as is
    assert report["analyzer"][0].startswith("Your model looks compatible with GPU delegate")
    assert "RELU_0_TO_1 (x1)" in summary_line(report) and "NOT all ops supported" in summary_line(report)


@pytest.mark.slow
def test_fp16_keeps_embedding_tables_where_the_gpu_delegate_reads_them(bundle, tmp_path, monkeypatch):
    """fp16 stores the text encoder's weights as float16 but its embedding table as float32: the GPU
    delegate runs a lookup into a float16 table behind DEQUANTIZE on the CPU, and the check says so."""
    from mobilediffusion.export import quantize as q
    from mobilediffusion.export.gpu import gpu_report

    path = tmp_path / "text_encoder.tflite"
    q.quantize(bundle / "text_encoder.tflite", path, "fp16", "text_encoder")
    assert gpu_report(path)["compatible"]
    assert path.stat().st_size > 0.9 * (bundle / "text_encoder.tflite").stat().st_size  # the 49408 x 32 table
    original = q.recipe
    monkeypatch.setattr(q, "recipe", lambda p: original(p)[:1])  # the fp16 recipe without the exception
    q.quantize(bundle / "text_encoder.tflite", tmp_path / "all16.tflite", "fp16", "text_encoder")
    report = gpu_report(tmp_path / "all16.tflite")
    assert list(report["unsupported_ops"]) == ["EMBEDDING_LOOKUP"] and "table computed at run time" in \
        report["unsupported_ops"]["EMBEDDING_LOOKUP"]


def test_decoder_clamp_exports_without_relu_0_to_1(tmp_path):
    """The decoders' clamp to [0, 1] lowers to a RELU6-fused multiply on the export path, so the whole
    decoder stays on the GPU delegate; torch's result is unchanged."""
    from mobilediffusion.export.components import DecoderExport, export_copy
    from mobilediffusion.export.convert import convert
    from mobilediffusion.export.gpu import gpu_report

    decoder = micro_pipeline().decoder
    module = DecoderExport(export_copy(decoder)).eval()
    latents = torch.randn(1, 4, 4, 4) * 3
    with torch.no_grad():
        assert torch.allclose(module(latents)["image"], decoder(latents).permute(0, 2, 3, 1), atol=1e-6)
    path = tmp_path / "decoder.tflite"
    info = convert("decoder", module, {"decoder": {"latents": latents}}, "fp32", path)
    assert "RELU_0_TO_1" not in info["ops"] and gpu_report(path)["compatible"]


# --------------------------------------------------------------------------- memory, provenance, schema
def _meta_pipeline(preset):
    from mobilediffusion.decoder import build_decoder
    from mobilediffusion.pipeline import Pipeline
    from mobilediffusion.presets import get_preset
    from mobilediffusion.text_encoder import TextEncoder
    from mobilediffusion.unet import UNet

    cfg = get_preset(preset)
    with torch.device("meta"):  # sizes without memory: the check runs before anything is converted
        return Pipeline(cfg, UNet(cfg.unet), TextEncoder(cfg.text), build_decoder(cfg.decoder), trained=False)


def test_export_without_the_memory_is_refused_with_the_estimate(tmp_path, monkeypatch):
    from mobilediffusion.export import budget

    pipe = _meta_pipeline("sd15")
    need = budget.estimate(budget.component_bytes(pipe, ("text_encoder", "unet", "decoder")), "fp32",
                           pixels=512 * 512, batch=1, in_place=False, end_to_end=True)
    print(f"SD1.5 fp32 export: {need.peak / 1e9:.1f} GB ({need})")
    assert 8e9 < need.peak < 20e9
    monkeypatch.setattr(budget, "available_memory", lambda: int(6e9))
    with pytest.raises(ConfigError, match=r"exporting the sd1 model \(text_encoder, unet, decoder\) at fp32 needs "
                                          r"about \d+\.\d GB .* but only 6\.0 GB are available"):
        export_bundle(pipe, tmp_path / "b", "fp32")
    assert _entries(tmp_path) == []
    monkeypatch.setattr(budget, "available_memory", lambda: None)  # unknown: logged, not refused
    budget.check_memory(need, "x")


@pytest.mark.slow
def test_source_is_written_and_shown(tmp_path):
    from mobilediffusion.export.report import describe
    from mobilediffusion.runtime import read_manifest

    source = {"checkpoint": "dreamshaper_8.safetensors", "bridged_from": "ComfyUI MODEL/CLIP/VAE",
              "loras": [{"file": "pixel.safetensors", "sha256": "ab" * 32, "strength": 0.8, "component": "unet"}]}
    out = export_bundle(micro_pipeline(), tmp_path / "b", "fp32", components=("decoder",), height=16, width=16,
                        source=source)
    m = read_manifest(out)
    assert m["source"] == source and m["schema_version"] == 1
    text = describe(out, m)
    assert "dreamshaper_8.safetensors" in text and "lora pixel.safetensors (unet, strength 0.8" in text


@pytest.mark.slow
def test_a_bundle_without_the_new_sections_still_reads(bundle, tmp_path, capsys):
    """A schema-1 manifest written before the GPU check, large-model flag and end-to-end steps existed."""
    import shutil

    from mobilediffusion.cli import main
    from mobilediffusion.runtime import BundlePipeline

    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    m = json.loads((old / "manifest.json").read_text())
    for e in m["components"].values():
        for key in ("gpu", "large_model_form", "fp32_bytes"):
            e.pop(key)
    m["verification"]["end_to_end"] = {"psnr_db": 99.0}
    (old / "manifest.json").write_text(json.dumps(m))
    assert BundlePipeline(old)("a red circle", seed=0).shape == (1, 32, 24, 3)
    assert main(["info", str(old)]) == 0
    text = capsys.readouterr().out
    assert "GPU delegate: not checked" in text and "end to end vs torch (all steps): PSNR 99.0 dB" in text


# --------------------------------------------------------------------------- info and bench on a bundle
@pytest.mark.slow
def test_info_describes_a_bundle(bundle, capsys):
    from mobilediffusion.cli import main

    assert main(["info", str(bundle)]) == 0
    text = capsys.readouterr().out
    assert f"bundle:           {bundle}" in text and "schema version:   1" in text
    assert text.count("GPU delegate: all ops supported") == 3 and "unet.tflite" in text


@pytest.mark.slow
def test_bench_bundle_times_each_file_against_torch(bundle):
    from mobilediffusion.benchmarks.bundle import bench_bundle, format_rows

    rows = bench_bundle(bundle, threads=1, runs=1, warmup=0)
    print(format_rows(rows, 1))
    assert [r.component for r in rows] == ["text_encoder", "unet", "decoder", "image"]
    assert all(r.tflite_ms > 0 for r in rows) and all(r.torch_ms > 0 and r.ratio > 0 for r in rows[:3])
    assert rows[1].shape == "2x4x16x12" and rows[3].shape == "24x32" and rows[0].precision == "fp32"


# --------------------------------------------------------------------------- over 2 GB (opt-in: ~10 GB of RAM)
class Wide(torch.nn.Module):
    """One 23,200 x 23,200 linear layer: 2.15 GB of fp32 weights, past the 2 GB flatbuffer limit."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(23200, 23200, bias=False)

    def forward(self, x):
        return {"y": self.fc(x)}


@pytest.mark.skipif(os.environ.get("MD_HEAVY_TESTS") != "1", reason="opt-in: needs ~10 GB of RAM and a few "
                    "minutes; set MD_HEAVY_TESTS=1 (run under flock /tmp/md-heavy.lock)")
def test_model_over_2gb_is_written_in_large_model_form_and_read_back(tmp_path):
    from mobilediffusion.export.convert import convert
    from mobilediffusion.export.flatbuffer import FLATBUFFER_LIMIT, large_model_form

    with torch.device("meta"):
        module = Wide()
    module = module.to_empty(device="cpu").eval()
    torch.nn.init.normal_(module.fc.weight, std=0.01)
    x = torch.randn(1, 23200)
    path = tmp_path / "wide.tflite"
    convert("wide", module, {"wide": {"x": x}}, "fp32", path)
    assert path.stat().st_size > FLATBUFFER_LIMIT and large_model_form(path)
    got = _component(path, "wide").run(x=x.numpy())["y"]
    with torch.no_grad():
        ref = module(x)["y"].numpy()
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5
