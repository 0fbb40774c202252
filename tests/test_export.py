"""TFLite export: the bundle's files and manifest, builtin-ops check, precisions, atomic writes, bad input,
the two nodes and the CLI. Conversions use the micro model of export_cases.py."""
import argparse
import importlib
import json

import numpy as np
import pytest
import torch

from export_cases import BUNDLE_OPTIONS, PROMPT, SIZES, micro_pipeline, needs_litert, session_bundle
from mobilediffusion.errors import ConfigError
from mobilediffusion.export import ExportError, export_bundle
from mobilediffusion.runtime import BundlePipeline
from mobilediffusion.runtime.manifest import sha256_file

pytestmark = needs_litert


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return session_bundle(tmp_path_factory)


def _entries(folder):
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- the bundle
@pytest.mark.slow
def test_bundle_files_and_manifest(bundle):
    assert _entries(bundle.parent) == ["micro", "micro.zip"]  # no temporary folder left behind
    assert _entries(bundle) == ["decoder.tflite", "manifest.json", "text_encoder.folds.safetensors",
                                "text_encoder.tflite", "tokenizer.json", "tokenizer_config.json", "unet.folds.safetensors",
                                "unet.tflite"]
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["schema_version"] == 1 and m["format"] == "mobilediffusion-tflite-bundle"  # float inputs/outputs
    cfg = micro_pipeline().config
    assert m["model"] | {"config": None} == {
        "family": "tiny", "latent_channels": 4, "latent_scale": 0.5, "latent_shift": 0.0, "scaling_factor": 0.5,
        "prediction_type": "v_prediction", "resolution": [32, 24], "config": None}
    assert m["model"]["config"] == json.loads(cfg.to_json())
    assert m["image"] | {"layout": None} == {"height": 32, "width": 24, "batch_size": 1, "latent_shape": [1, 4, 16, 12],
                                             "sizes": [[32, 24], [24, 32]], "layout": None}
    assert m["tokenizer"]["max_chunks"] == 2
    s = m["sampler"]
    assert (s["name"], s["steps"], s["guidance"]) == ("euler_ancestral", 2, 2.5)
    assert len(s["timesteps"]) == len(s["a"]) == len(s["b"]) == len(s["c"]) == len(s["c_in"]) == 2
    io = {name: ([(i["name"], i["shape"], i["dtype"]) for i in e["inputs"]],
                 [(o["name"], o["shape"], o["dtype"]) for o in e["outputs"]]) for name, e in m["components"].items()}
    assert io == {  # guidance 2.5: the UNet runs [uncond, cond] at batch 2
        "text_encoder": ([("ids", [1, 77], "int32")], [("context", [1, 77, 32], "float32")]),
        "unet": ([("sample", [2, 4, 16, 12], "float32"), ("timestep", [2], "float32"),
                  ("context", [2, 77, 32], "float32")], [("output", [2, 4, 16, 12], "float32")]),
        "decoder": ([("latents", [1, 4, 16, 12], "float32")], [("image", [1, 32, 24, 3], "float32")]),
    }
    # one signature per size (and, for the UNet, context length of 1 or 2 chunks: 77 or 154 tokens), the first the
    # component's own (what the entry's inputs/outputs describe)
    signatures = {name: [(s["signature"], s["size"], s["tokens"]) for s in e["signatures"]]
                  for name, e in m["components"].items()}
    assert signatures == {
        "text_encoder": [("text_encoder", None, None)],
        "unet": [("unet", [32, 24], 77), ("unet_24x32_t154", [32, 24], 154), ("unet_32x24_t77", [24, 32], 77),
                 ("unet_32x24_t154", [24, 32], 154)],
        "decoder": [("decoder", [32, 24], None), ("decoder_32x24", [24, 32], None)]}
    unet_io = {s["signature"]: [i["shape"] for i in s["inputs"]] for s in m["components"]["unet"]["signatures"]}
    assert unet_io["unet_32x24_t154"] == [[2, 4, 12, 16], [2], [2, 154, 32]]
    for name, e in m["components"].items():
        assert e["file"] == f"{name}.tflite" and e["signature"] == name and e["precision"] == "fp32"
        first = e["signatures"][0]
        assert (first["signature"], first["inputs"], first["outputs"]) == (name, e["inputs"], e["outputs"])
        # where the parameters LoRA packs may patch live: every conv / linear weight of the text encoder and UNet
        weights = e.get("weights")
        if name == "decoder":
            assert weights is None
        else:
            module = {"unet": micro_pipeline().unet, "text_encoder": micro_pipeline().text_encoder}[name]
            expected = {n for n, p in module.named_parameters() if p.ndim >= 2 and "embedding" not in n}
            assert expected <= set(weights), sorted(expected - set(weights))
            assert {w["layout"] for w in weights.values()} <= {"same", "ohwi"}
            # the LayerNorms the converter folded into the Linear after them, with their parameters beside the file
            folded = {k for k, w in weights.items() if "norm" in w}
            assert {"mlp.fc1.weight", "mlp.fc1.bias", "q_proj.weight"} <= {k.split("layers.0.")[-1].split("self_attn.")[-1]
                                                                          for k in folded} if name == "text_encoder" \
                else any(k.endswith("ff.fc1.weight") for k in folded)
            assert e["lora_folds"]["file"] == f"{name}.folds.safetensors"
            q = [w["scale"] for k, w in weights.items() if "q_proj.weight" in k]
            assert all(abs(c - 0.5) < 1e-7 for c in q) if name == "text_encoder" else True  # 16-wide heads: d^-1/4
        assert e["sha256"] == sha256_file(bundle / e["file"]) and e["bytes"] == (bundle / e["file"]).stat().st_size
        assert e["bytes"] == e["fp32_bytes"] and e["large_model_form"] is False
        # the GPU-delegate verdict of every component: the analyzer's line and the per-op check
        gpu = e["gpu"]
        assert gpu["compatible"] is True and gpu["unsupported_ops"] == {}, (name, gpu)
        assert gpu["analyzer"] and gpu["analyzer"][0].startswith("Your model looks compatible with GPU delegate")
    # the ops' export path: composites the LiteRT GPU delegate fuses
    assert m["components"]["unet"]["composites"]["odml.group_norm"] > 0
    assert m["components"]["unet"]["composites"]["odml.scaled_dot_product_attention"] > 0
    assert m["components"]["decoder"]["composites"]["odml.group_norm"] > 0
    v = m["verification"]
    for name in ("text_encoder", "unet", "decoder"):
        print(f"{name}: fp32 relative error {v[name]['rel_error']:.2e}")
        assert v[name]["passed"] and v[name]["rel_error"] <= 1e-4 and v[name]["limit"] == 1e-4
    assert sorted(v["unet"]["signatures"]) == sorted(s for s, _, _ in signatures["unet"])  # every one checked
    # what it takes to run, measured in a fresh process: each component's resident memory and a generation's peak
    memory = m["memory"]
    assert memory["size"] == [32, 24] and memory["generation_peak_bytes"] > 0
    for name, used in memory["components"].items():
        assert used["resident_bytes"] == used["weights_bytes"] + used["arena_bytes"] > 0, name
    e2e = v["end_to_end"]
    print(f"end to end PSNR {e2e['psnr_db']} dB")
    assert e2e["psnr_db"] >= 35 and (e2e["steps"], e2e["of_steps"]) == (2, 2)
    assert e2e["sampler_rel_error"] <= 1e-5


@pytest.mark.slow
def test_files_hold_builtin_ops_only_and_flex_is_refused(bundle):
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    from mobilediffusion.export.flatbuffer import check_builtin_only

    for name in ("text_encoder", "unet", "decoder"):
        ops = check_builtin_only((bundle / f"{name}.tflite").read_bytes(), name)
        assert ops and "CUSTOM" not in ops
    # the same decoder with one op turned into a Flex (select TensorFlow) op
    flat = schema.ModelT.InitFromPackedBuf((bundle / "decoder.tflite").read_bytes(), 0)
    code = flat.operatorCodes[0]
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
    code.customCode = "FlexAddV2"
    builder = flatbuffers.Builder(1024)
    builder.Finish(flat.Pack(builder), file_identifier=b"TFL3")
    with pytest.raises(ExportError, match=r"decoder: .*non-builtin ops \['FlexAddV2'\].*Flex ops"):
        check_builtin_only(bytes(builder.Output()), "decoder")


@pytest.mark.slow
def test_precisions(bundle, tmp_path):
    """From the session bundle's fp32 UNet: fp16 within 1e-2 of torch, the int8 variants reported and all
    weights int8; each smaller than fp32 (the micro UNet)."""
    from mobilediffusion.export.components import Shapes, Signature, UNetExport, example_inputs, export_copy
    from mobilediffusion.export.flatbuffer import check_builtin_only, constant_bytes, weight_storage
    from mobilediffusion.export.quantize import quantize
    from mobilediffusion.export.verify import as_feed, check_component, signature_io, torch_outputs
    from mobilediffusion.runtime.interpreter import Component

    shapes = Shapes(batch=1, unet_batch=2, tokens=77, context_dim=32, latent_channels=4, upscale=2, sizes=((32, 24),))
    module = UNetExport(export_copy(micro_pipeline().unet)).eval()
    inputs = example_inputs("unet", shapes, Signature("unet", (32, 24), 77))
    ref, feed = torch_outputs(module, inputs), as_feed(inputs)
    fp32 = bundle / "unet.tflite"
    sizes, errors, weights = {"fp32": fp32.stat().st_size}, {}, {}
    for precision in ("fp32", "fp16", "int8_dynamic", "int8_weight_only"):
        path = fp32 if precision == "fp32" else tmp_path / f"{precision}.tflite"
        if precision != "fp32":
            quantize(fp32, path, precision, "unet")
        check_builtin_only(path, "unet")
        ins, outs = signature_io(path, "unet")
        entry = {"file": path.name, "signature": "unet", "inputs": ins, "outputs": outs}
        check = check_component(Component(path, entry), feed, ref, precision)
        sizes[precision], errors[precision] = path.stat().st_size, check["rel_error"]
        assert check["passed"] and check["limit"] == {"fp32": 1e-4, "fp16": 1e-2}.get(precision)
        stored = set(weight_storage(path).values())
        assert stored == {{"fp32": "FLOAT32", "fp16": "FLOAT16"}.get(precision, "INT8")}, (precision, stored)
        weights[precision] = constant_bytes(path)
    print("sizes", sizes, "weights", weights, "errors", {k: f"{v:.1e}" for k, v in errors.items()})
    assert errors["fp32"] <= 1e-4 and errors["fp16"] <= 1e-2
    assert 1e-4 < errors["int8_dynamic"] < 0.2 and 1e-5 < errors["int8_weight_only"] < 0.1
    # the micro graph's structure (four signatures) weighs more than its weights; the weights take 1/2 and ~1/4
    assert all(sizes[p] < sizes["fp32"] for p in sizes if p != "fp32")
    assert weights["fp16"] < 0.55 * weights["fp32"]
    assert max(weights["int8_dynamic"], weights["int8_weight_only"]) < min(0.35 * weights["fp32"], weights["fp16"])


def test_export_copy_is_plain_float32_and_leaves_the_model_alone():
    """The traced copy: float32, contiguous, no packed linears or compile wrapper, the ops' export path;
    the caller's (fast-path, half precision) model keeps its layout, classes and dtype."""
    from mobilediffusion.export.components import export_copy
    from mobilediffusion.layers import OpsLayer
    from mobilediffusion.ops import Backend
    from mobilediffusion.unet import UNet

    torch.manual_seed(0)
    model = UNet(micro_pipeline().config.unet).eval()
    args = (torch.randn(1, 4, 8, 8), torch.tensor([10.0]), torch.randn(1, 77, 32))
    with torch.no_grad():
        ref = model(*args)
    fast = importlib.import_module("mobilediffusion.fast")
    fast.optimize(model)  # oneDNN-packed convs and linears
    # a channels_last weight, as unpacked convolutions (compile) have them: litert-torch needs it contiguous
    model.conv_in.weight.data = model.conv_in.weight.data.contiguous(memory_format=torch.channels_last)
    classes = {type(m) for m in model.modules()}
    copied = export_copy(model)
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in copied.state_dict().values())
    assert fast.PackedLinear not in {type(m) for m in copied.modules()} and {type(m) for m in model.modules()} == classes
    assert all(m.backend is Backend.EXPORT for m in copied.modules() if isinstance(m, OpsLayer))
    shared = {id(p) for p in model.parameters()} & {id(p) for p in copied.parameters()}
    assert shared and id(model.conv_in.weight) not in shared  # contiguous weights shared, channels_last copied
    with torch.no_grad():
        assert torch.allclose(copied(*args), ref, rtol=1e-4, atol=1e-5)
        half = export_copy(model.half())
        assert next(model.parameters()).dtype == torch.float16 and next(half.parameters()).dtype == torch.float32


# --------------------------------------------------------------------------- atomic writes and bad input
def test_bad_requests_fail_before_any_work(tmp_path):
    pipe = micro_pipeline()
    out = tmp_path / "b"
    for kwargs, message in [
        (dict(precision="int4"), "unknown precision 'int4'"),
        (dict(components=("unet", "vae")), "components must be a non-empty subset"),
        (dict(components=()), "components must be a non-empty subset"),
        (dict(height=30), "expected a multiple of 4 for height"),
        (dict(sampler="heun"), "unknown sampler 'heun'"),
        (dict(steps=2, sampler="onestep"), "exactly one model call"),
        (dict(batch_size=0), "batch_size must be an integer >= 1"),
        (dict(end_to_end_steps=-1), "end_to_end_steps must be an integer >= 0"),
        (dict(source="model.safetensors"), "source must be a dict"),
        (dict(source={"loras": [{"file": "a.safetensors"}]}), r"source\['loras'\]\[0\] must have exactly the keys"),
        (dict(source={"loras": [{"file": "a", "sha256": "xyz", "strength": 1.0, "component": "unet"}]}),
         "must be 64 lowercase hex digits"),
    ]:
        with pytest.raises(ConfigError, match=message):
            export_bundle(pipe, out, **kwargs)
    assert _entries(tmp_path) == []


def test_existing_bundle_is_not_overwritten(tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists; choose another name or allow overwriting"):
        export_bundle(micro_pipeline(), out, "fp32", components=("decoder",))
    assert _entries(out) == ["keep.txt"] and _entries(tmp_path) == ["b"]


@pytest.mark.slow
def test_overwrite_replaces_and_partial_bundle_cannot_run(tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "old.txt").write_text("old")
    export_bundle(micro_pipeline(), out, "fp16", components=("decoder",), overwrite=True, height=16, width=16)
    assert _entries(tmp_path) == ["b"] and _entries(out) == ["decoder.tflite", "manifest.json", "tokenizer.json",
                                                            "tokenizer_config.json"]
    m = json.loads((out / "manifest.json").read_text())
    assert list(m["components"]) == ["decoder"] and m["verification"]["decoder"]["rel_error"] <= 1e-2
    assert "end_to_end" not in m["verification"]
    from mobilediffusion.runtime import BundleError

    with pytest.raises(BundleError, match="needs all of"):
        BundlePipeline(out)


class ErfinvDecoder(torch.nn.Module):
    """A decoder using an op litert-torch has no lowering for (aten.erfinv)."""

    def __init__(self, decoder):
        super().__init__()
        self.inner, self.config = decoder, decoder.config

    def forward(self, latents):
        return self.inner(torch.erfinv(torch.tanh(latents) * 0.5))


@pytest.mark.slow
def test_failed_conversion_names_the_op_and_leaves_nothing(tmp_path):
    import dataclasses

    pipe = dataclasses.replace(micro_pipeline(), decoder=ErfinvDecoder(micro_pipeline().decoder))
    with pytest.raises(ExportError, match=r"converting the decoder failed at op aten\.erfinv"):
        export_bundle(pipe, tmp_path / "b", "fp32", components=("decoder",), make_zip=True)
    assert _entries(tmp_path) == []


def test_interrupted_export_leaves_nothing(tmp_path):
    def progress(done, total, message):
        if message.startswith("converting"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_bundle(micro_pipeline(), tmp_path / "b", "fp32", make_zip=True, progress=progress)
    assert _entries(tmp_path) == []


@pytest.mark.slow
def test_failed_verification_writes_nothing(tmp_path, monkeypatch):
    from mobilediffusion.export import verify

    monkeypatch.setitem(verify.LIMITS, "fp32", 1e-12)
    with pytest.raises(ExportError, match=r"decoder: the fp32 model differs from torch by relative error .* nothing "
                                          r"was written"):
        export_bundle(micro_pipeline(), tmp_path / "b", "fp32", components=("decoder",))
    assert _entries(tmp_path) == []


# --------------------------------------------------------------------------- nodes
@pytest.fixture(scope="module")
def node_module(plugin):
    return importlib.import_module(f"{plugin.__name__}.nodes.export")


@pytest.fixture(scope="module")
def plugin_errors(plugin):
    """The plugin's own copy of mobilediffusion.errors (ComfyUI imports the repo as a separate package)."""
    return importlib.import_module(f"{plugin.__name__}.mobilediffusion.errors")


@pytest.fixture
def handles(plugin):
    common = importlib.import_module(f"{plugin.__name__}.nodes._common")
    pipe = micro_pipeline()
    cfg = pipe.config
    return (common.UNetHandle(pipe.unet, cfg, "micro"), pipe.text_encoder,
            common.DecoderHandle(pipe.decoder, cfg.latent_scale, cfg.latent_shift, "micro"))


NODE_ARGS = dict(precision="fp32", width=16, height=16, steps=0, sampler_name="auto", cfg=0.0, batch_size=1,
                 components="decoder", overwrite=False, make_zip=False)


def test_node_inputs_have_tooltips(node_module):
    for cls in (node_module.ExportTFLiteBundle, node_module.RunTFLiteBundle):
        spec = cls.INPUT_TYPES()
        for name, (kind, *opts) in {**spec["required"], **spec.get("optional", {})}.items():
            assert opts and "tooltip" in opts[0], f"{cls.__name__}.{name}"
        assert cls.CATEGORY == "MobileDiffusion"
    assert node_module.ExportTFLiteBundle.OUTPUT_NODE is True
    names = list(node_module.ExportTFLiteBundle.INPUT_TYPES()["required"])
    assert names == ["unet", "clip", "decoder", "name", *NODE_ARGS]
    assert list(node_module.ExportTFLiteBundle.INPUT_TYPES()["optional"]) == ["web", "end_to_end_check", "extra_sizes",
                                                                              "prompt_chunks", "budget", "loras_as_packs",
                                                                              "control", "encoder"]
    assert list(node_module.RunTFLiteBundle.INPUT_TYPES()["optional"]) == ["size", "lora", "lora_strength",
                                                                           "control_image", "control_strength", "image",
                                                                           "mask"]


@pytest.mark.parametrize("name", ["../escape", "a/b", "a\\b", "..", "", "   ", ".hidden", "/abs", "x/../../y",
                                  "dots..", "C:evil", "tab\tname"])
def test_node_rejects_names_with_paths(node_module, handles, tmp_path, monkeypatch, plugin_errors, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(plugin_errors.ConfigError, match="is not allowed"):
        node_module.ExportTFLiteBundle().export(*handles, name, **NODE_ARGS)
    assert _entries(tmp_path) == []


def test_node_without_litert_says_how_to_install(node_module, handles, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real = node_module.importlib.util.find_spec
    monkeypatch.setattr(node_module.importlib.util, "find_spec",
                        lambda n, *a: None if n == "litert_torch" else real(n, *a))
    out = node_module.ExportTFLiteBundle().export(*handles, "b", **NODE_ARGS)
    assert out["result"] == ()
    assert "pip install litert-torch==0.10.0 ai-edge-litert==2.3.0" in out["ui"]["text"][0]
    assert _entries(tmp_path) == []


@pytest.mark.slow
def test_node_exports_under_the_output_folder(node_module, handles, tmp_path, monkeypatch, plugin_errors):
    monkeypatch.chdir(tmp_path)  # outside ComfyUI the output folder is ./output
    out = node_module.ExportTFLiteBundle().export(*handles, "my bundle", **NODE_ARGS)
    folder = tmp_path / "output" / "mobilediffusion" / "my bundle"
    assert (folder / "decoder.tflite").is_file() and out["result"] == ()
    text = "\n".join(out["ui"]["text"])
    assert str(folder) in text and "decoder.tflite" in text and "rel. error" in text and "MiB" in text
    assert "GPU delegate:" in text  # the verdict is shown (this decoder comes from the other package copy, whose
    # ops layers the plugin's export_copy does not recognise: reference ops, so not all GPU-ready here)
    with pytest.raises(plugin_errors.ConfigError, match="already exists"):
        node_module.ExportTFLiteBundle().export(*handles, "my bundle", **NODE_ARGS)


@pytest.mark.slow
def test_run_bundle_node(node_module, bundle, tmp_path, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)  # outside ComfyUI the node reads ./output/mobilediffusion, ./models/mobilediffusion
    shutil.copytree(bundle, tmp_path / "output" / "mobilediffusion" / "micro")
    assert node_module.RunTFLiteBundle.INPUT_TYPES()["required"]["bundle"][0] == ["output/micro"]
    (image,) = node_module.RunTFLiteBundle().run("output/micro", PROMPT, "", 5)
    o = BUNDLE_OPTIONS
    assert isinstance(image, torch.Tensor) and image.dtype == torch.float32
    assert image.shape == (o["batch_size"], *SIZES[0], 3)
    np.testing.assert_array_equal(image.numpy(), BundlePipeline(bundle)(PROMPT, seed=5))
    (other,) = node_module.RunTFLiteBundle().run("output/micro", PROMPT, "", 5, size="32x24")  # width x height
    assert other.shape == (o["batch_size"], *SIZES[1], 3)
    with pytest.raises(Exception, match=r"no 64x64 \(width x height\) signature; it holds 24x32, 32x24"):
        node_module.RunTFLiteBundle().run("output/micro", PROMPT, "", 5, size="64x64")


def test_run_bundle_node_missing(node_module, tmp_path, monkeypatch, plugin_errors):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(plugin_errors.ConfigError, match="was not found"):
        node_module.RunTFLiteBundle().run("output/nothing-here", "x", "", 0)


# --------------------------------------------------------------------------- CLI
def _cli(argv):
    from mobilediffusion.export.cli import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command", required=True))
    a = parser.parse_args(argv)
    return a.func(a)


@pytest.mark.slow
def test_cli_run_bundle(bundle, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "out.png"
    assert _cli(["run-bundle", str(bundle), PROMPT, "-o", str(out), "--seed", "2"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    expected = (BundlePipeline(bundle)(PROMPT, seed=2)[0] * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), expected)


@pytest.mark.slow
def test_cli_export(tmp_path, capsys, monkeypatch):
    """The embedded default model's decoder at 64x64 (the UNet and text encoder are covered above)."""
    out = tmp_path / "cli-bundle"
    assert _cli(["export", "-o", str(out), "--precision", "fp32", "--size", "64", "--components", "decoder",
                 "--zip", "-q"]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out} (64x64" in text and "decoder.tflite" in text and "rel. error" in text
    assert _entries(tmp_path) == ["cli-bundle", "cli-bundle.zip"]
    with pytest.raises(ConfigError, match="already exists"):
        _cli(["export", "-o", str(out), "--components", "decoder", "-q"])


class BigConv(torch.nn.Module):
    """A 3x3 conv whose weight (1024 x 1024 x 3 x 3 fp32, 36 MiB) exceeds ai-edge-quantizer's 32 MiB chunk."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1024, 1024, 3, padding=1)

    def forward(self, x):
        return {"y": self.conv(x)}


@pytest.mark.slow
def test_int8_quantizes_weights_over_the_quantizers_chunk(tmp_path):
    """SD-size 3x3 convs (the 1024/1280-wide ones) break ai-edge-quantizer 0.10's chunked path; they are
    quantized by output-channel slices: int8 storage, a quarter of the size, per-channel accuracy."""
    from mobilediffusion.export.convert import convert
    from mobilediffusion.export.flatbuffer import weight_storage
    from mobilediffusion.export.verify import check_component, signature_io, torch_outputs
    from mobilediffusion.runtime.interpreter import Component

    module, inputs = BigConv().eval(), {"x": torch.randn(1, 1024, 4, 4)}
    ref = torch_outputs(module, inputs)
    for precision in ("int8_dynamic", "int8_weight_only"):
        path = tmp_path / f"{precision}.tflite"
        info = convert("big", module, {"big": inputs}, precision, path)
        assert list(weight_storage(path).values()) == ["INT8"]
        assert path.stat().st_size < 0.26 * info["fp32_bytes"]
        ins, outs = signature_io(path, "big")
        check = check_component(Component(path, {"file": path.name, "signature": "big", "inputs": ins,
                                                 "outputs": outs}), {"x": inputs["x"].numpy()}, ref, precision)
        print(precision, f"{check['rel_error']:.1e}")
        assert check["rel_error"] < 2e-2


def test_channel_slices_equal_the_quantizers_own_result(monkeypatch):
    """_large_weights_by_channel gives bit for bit what uniform_quantize gives on the whole tensor (here
    with the slicing threshold lowered, so a small 4-D per-channel weight takes the sliced path)."""
    import dataclasses

    from ai_edge_quantizer import qtyping
    from ai_edge_quantizer.algorithms.uniform_quantize import uniform_quantize_tensor as uqt

    from mobilediffusion.export import quantize as q

    w = np.random.default_rng(0).standard_normal((37, 3, 3, 16)).astype(np.float32)  # (O, H, W, I)
    scale = np.abs(w).reshape(37, -1).max(1) / 127
    params = qtyping.UniformQuantParams(num_bits=8, quantized_dimension=0, scale=scale,
                                        zero_point=np.zeros(37, np.int32), symmetric=True)
    whole = uqt.uniform_quantize(w, params)
    monkeypatch.setattr(q, "QUANTIZER_CHUNK_BYTES", w.nbytes // 5)  # 5 to 6 slices of whole channels
    original, shapes = uqt.uniform_quantize, []
    monkeypatch.setattr(uqt, "uniform_quantize", lambda t, *a, **k: shapes.append(t.shape) or original(t, *a, **k))
    counting = uqt.uniform_quantize
    with q._large_weights_by_channel():
        sliced = uqt.uniform_quantize(w, dataclasses.replace(params))
    assert uqt.uniform_quantize is counting  # restored on exit
    assert len(shapes) >= 5 and sum(s[0] for s in shapes) == 37 and all(s[1:] == (3, 3, 16) for s in shapes)
    assert sliced.dtype == whole.dtype and np.array_equal(sliced, whole)


@pytest.mark.slow
def test_shipped_export_workflow_runs(plugin, node_module, tmp_path, monkeypatch):
    """workflows/api/export_bundle.json through the node classes (decoder only, 64x64, to stay fast)."""
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    workflow = json.loads((Path(__file__).resolve().parent.parent / "workflows/api/export_bundle.json").read_text())
    loader, export = workflow["1"], workflow["2"]
    assert (loader["class_type"], export["class_type"]) == ("LoadMobileDiffusionModel", "ExportTFLiteBundle")
    cls = plugin.NODE_CLASS_MAPPINGS["LoadMobileDiffusionModel"]
    unet, clip, decoder, _ = getattr(cls(), cls.FUNCTION)(**loader["inputs"])
    inputs = {k: v for k, v in export["inputs"].items() if not isinstance(v, list)}
    inputs.update(components="decoder", width=64, height=64)
    out = node_module.ExportTFLiteBundle().export(unet, clip, decoder, **inputs)
    folder = tmp_path / "output" / "mobilediffusion" / inputs["name"]
    assert (folder / "decoder.tflite").is_file() and folder.with_name(folder.name + ".zip").is_file()
    assert any("decoder.tflite" in line for line in out["ui"]["text"])
