"""The torch-free bundle runtime: sampler loop, tokenizer, images vs the torch pipeline, no torch import,
and refusal of altered bundles."""
import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from export_cases import BUNDLE_OPTIONS, PROMPT, SIZES, micro_pipeline, needs_litert, psnr, session_bundle, torch_image, \
    torch_noise
from mobilediffusion.config import ScheduleConfig
from mobilediffusion.export.schedule import BUNDLE_SAMPLERS, sampler_section
from mobilediffusion.presets import PRESETS
from mobilediffusion.runtime import BundleError, BundlePipeline, numpy_noise
from mobilediffusion.runtime import sampler as np_sampler
from mobilediffusion.sampling import sample as torch_sample


# --------------------------------------------------------------------------- sampler loop (no conversion)
class ToyModel:
    """A fixed nonlinear 'UNet' usable from torch and numpy: out = tanh(W x + t / 1000)."""

    def __init__(self, channels=4):
        g = torch.Generator().manual_seed(1)
        self.w = torch.randn(channels, channels, generator=g) / channels**0.5

    def torch(self, x, t):
        return torch.tanh(torch.einsum("oc,bchw->bohw", self.w, x) + t / 1000.0)

    def numpy(self, x, t):
        return np.tanh(np.einsum("oc,bchw->bohw", self.w.numpy(), x) + np.float32(t / 1000.0)).astype(np.float32)


@pytest.mark.parametrize("sampler,steps", [(s, 1 if s == "onestep" else n) for s in BUNDLE_SAMPLERS for n in (2, 5)])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_numpy_loop_equals_torch_sampler(sampler, steps, prediction, spacing):
    """The manifest's coefficients run by the numpy loop reproduce sampling.sample (same noise)."""
    import dataclasses

    cfg = dataclasses.replace(PRESETS["sd15"], schedule=ScheduleConfig(timestep_spacing=spacing),
                              unet=dataclasses.replace(PRESETS["sd15"].unet, prediction_type=prediction))
    section = json.loads(json.dumps(sampler_section(cfg, sampler, steps, 0.0)))  # as stored in the manifest
    model = ToyModel()
    shape = (2, 4, 6, 5)
    got = np_sampler.sample(model.numpy, shape, section, torch_noise(7))
    gen = torch.Generator().manual_seed(7)
    noise = torch.randn(shape, generator=gen)
    ref = torch_sample(model.torch, noise, sampler=sampler, steps=steps, schedule_config=cfg.schedule,
                       prediction_type=prediction, generator=gen).numpy()
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert err <= 1e-5, f"{sampler} x{steps}: relative error {err:.2e}"


@pytest.mark.parametrize("sampler,steps", [("onestep", 1), ("euler", 3), ("euler_ancestral", 3), ("dpmpp_2m", 3),
                                           ("lcm", 2), ("ddim", 3)])
def test_numpy_loop_keeps_a_known_region_as_torch_does(sampler, steps):
    """known=(latents, mask): the manifest's sigmas and x0 lists reproduce sampling.sample(keep=) (ComfyUI's noise
    mask, KeepKnown) with the same noise; outside the mask the result is the known latents."""
    import dataclasses

    cfg = dataclasses.replace(PRESETS["sd15"], schedule=ScheduleConfig(timestep_spacing="trailing"))
    section = json.loads(json.dumps(sampler_section(cfg, sampler, steps, 0.0)))
    model, shape = ToyModel(), (2, 4, 6, 5)
    g = torch.Generator().manual_seed(9)
    latents = torch.randn(shape, generator=g)
    mask = (torch.rand(1, 1, 6, 5, generator=g) > 0.5).float()
    mask[..., 0, 0] = 0.5  # a soft edge, as a bilinearly resized mask has
    got = np_sampler.sample(model.numpy, shape, section, torch_noise(7), known=(latents.numpy(), mask.numpy()))
    gen = torch.Generator().manual_seed(7)
    noise = torch.randn(shape, generator=gen)
    ref = torch_sample(model.torch, noise, sampler=sampler, steps=steps, schedule_config=cfg.schedule,
                       prediction_type=cfg.prediction_type, generator=gen, init_latents=latents, keep=mask).numpy()
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert err <= 1e-5, f"{sampler} x{steps}: relative error {err:.2e}"
    if sampler != "ddim":  # DDIM ends at the last alpha_bar (SD's set_alpha_to_one=False), not at sigma 0
        kept = np.broadcast_to(mask.numpy() == 0, shape)
        np.testing.assert_allclose(got[kept], latents.numpy()[kept], rtol=0, atol=1e-4)


def test_numpy_noise_is_seeded():
    a, b, c = numpy_noise(5)((2, 3)), numpy_noise(5)((2, 3)), numpy_noise(6)((2, 3))
    assert a.dtype == np.float32 and np.array_equal(a, b) and not np.array_equal(a, c)


# --------------------------------------------------------------------------- tokenizer (no conversion)
PROMPTS = [
    "a red circle",
    "",
    "A  PHOTO of   a Cat,with punctuation!!! ... (and) [brackets] {braces} #hash @at 100% $5 & co.",
    "unicode: café naïve 東京 🚀 émoji — dashes – «quotes» ß Ǆ",
    "it's they're we'll I'd you've",
    " ".join(["long prompt"] * 60),  # > 77 tokens: cut, EOS kept last
    "tab\tnew\nline",
]


WEIGHTED = PROMPTS + ["a (red:1.3) circle, ((very)) \\(round\\) " + "and shiny " * 40 + "(end:0.5)",
                      "(unclosed (nested:2) paren", "embedding:missing a cat"]


@pytest.mark.parametrize("pad_token", [None, "!"])
def test_bundle_tokenizer_chunks_equal_text_encoder(tmp_path, pad_token):
    """Long prompts with emphasis: the runtime's chunks and weights (`tokenizers`) are the torch encoder's
    (CLIPTokenizer), for every prompt; at most max_chunks chunks."""
    from mobilediffusion.config import TextEncoderConfig
    from mobilediffusion.export.files import write_tokenizer
    from mobilediffusion.runtime.tokenizer import BundleTokenizer
    from mobilediffusion.text_encoder import TextEncoder

    cfg = TextEncoderConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            **({"pad_token": pad_token} if pad_token else {}))
    enc = TextEncoder(cfg)
    spec = {**write_tokenizer(enc, tmp_path), "max_chunks": 8}
    tok = BundleTokenizer(tmp_path, spec)
    for prompt in WEIGHTED:
        ids, weights = tok.chunks(prompt)
        ref_ids, ref_weights = enc.chunks(prompt)
        np.testing.assert_array_equal(ids, ref_ids.numpy(), err_msg=prompt)
        np.testing.assert_array_equal(weights, ref_weights.numpy(), err_msg=prompt)
    assert len(tok.chunks(WEIGHTED[-3])[0]) == 2
    one = BundleTokenizer(tmp_path, {**spec, "max_chunks": 1})
    assert len(one.chunks(WEIGHTED[-3])[0]) == 1  # cut to the bundle's limit (a warning names it)


# --------------------------------------------------------------------------- against the torch pipeline
@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    if not all(map(__import__("importlib").util.find_spec, ("litert_torch", "ai_edge_litert"))):
        pytest.skip("the export extra is not installed: pip install litert-torch==0.10.0 ai-edge-litert==2.3.0")
    return session_bundle(tmp_path_factory)


@pytest.mark.slow
@needs_litert
@pytest.mark.parametrize("seed", [0, 11])
def test_runtime_image_matches_torch_pipeline(bundle, seed):
    """fp32 bundle (euler_ancestral, 2 steps, CFG 2.5) vs the torch pipeline on the same noise: PSNR >= 35 dB."""
    pipe = BundlePipeline(bundle)
    got = pipe(PROMPT, "", seed=seed, noise=torch_noise(seed))
    ref = torch_image(micro_pipeline(), PROMPT, seed)
    o = BUNDLE_OPTIONS
    assert got.shape == ref.shape == (o["batch_size"], *SIZES[0], 3) and got.dtype == np.float32
    value = psnr(got, ref)
    print(f"PSNR vs torch, seed {seed}: {value:.1f} dB")
    assert value >= 35.0
    assert psnr(got, torch_image(micro_pipeline(), "something else", seed)) < value  # the prompt matters


@pytest.mark.slow
@needs_litert
def test_runtime_noise_is_numpy_from_the_seed(bundle):
    pipe = BundlePipeline(bundle)
    a, b, c = pipe(PROMPT, seed=1), pipe(PROMPT, seed=1), pipe(PROMPT, seed=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert 0.0 <= a.min() and a.max() <= 1.0


@pytest.mark.slow
@needs_litert
def test_zip_runs_like_the_folder(bundle):
    zipped = BundlePipeline(bundle.with_name(bundle.name + ".zip"))
    assert np.array_equal(zipped(PROMPT, seed=4), BundlePipeline(bundle)(PROMPT, seed=4))


NO_TORCH = textwrap.dedent("""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")
    sys.meta_path.insert(0, Block())
    import numpy as np
    from mobilediffusion.runtime import BundlePipeline
    images = BundlePipeline(sys.argv[1])(sys.argv[2], seed=int(sys.argv[3]))
    np.save(sys.argv[4], images)
    assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
    print("torch-free ok")
""")


@pytest.mark.slow
@needs_litert
def test_runtime_runs_without_torch(bundle, tmp_path):
    out = tmp_path / "image.npy"
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, str(bundle), PROMPT, "3", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch-free ok" in proc.stdout
    np.testing.assert_array_equal(np.load(out), BundlePipeline(bundle)(PROMPT, seed=3))


# --------------------------------------------------------------------------- refusing bad bundles
@pytest.fixture
def copy(bundle, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(bundle, dst)
    return dst


@pytest.mark.slow
@needs_litert
def test_changed_file_is_refused(copy):
    data = bytearray((copy / "unet.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "unet.tflite").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="unet.tflite does not match the manifest"):
        BundlePipeline(copy)


@pytest.mark.slow
@needs_litert
@pytest.mark.parametrize("edit,message", [
    (lambda m: m.update(schema_version=3), "schema version 3, but this runtime reads versions 1, 2"),
    (lambda m: m.update(format="something-else"), "is not a mobilediffusion-tflite-bundle manifest"),
    (lambda m: m["components"]["decoder"].update(sha256="0" * 64), "decoder.tflite does not match"),
    (lambda m: m["components"]["decoder"].update(file="../decoder.tflite"), "only plain file names"),
    (lambda m: m["tokenizer"]["files"][0].update(sha256="1" * 64), "tokenizer.json does not match"),
    (lambda m: m.pop("sampler"), "lacks the keys"),
    (lambda m: m["components"].pop("unet"), "needs all of"),
])
def test_bad_manifest_is_refused(copy, edit, message):
    m = json.loads((copy / "manifest.json").read_text())
    edit(m)
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=message.replace("(", r"\(")):
        BundlePipeline(copy)


@pytest.mark.slow
@needs_litert
def test_missing_or_broken_bundle(copy, tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        BundlePipeline(tmp_path / "nowhere")
    (copy / "decoder.tflite").unlink()
    with pytest.raises(BundleError, match="decoder.tflite is missing"):
        BundlePipeline(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        BundlePipeline(copy)


# --------------------------------------------------------------------------- interpreter choice
def test_interpreter_falls_back_to_tflite_runtime(monkeypatch):
    import types

    from mobilediffusion.runtime.interpreter import interpreter_class

    fake = types.ModuleType("tflite_runtime.interpreter")
    fake.Interpreter = type("Interpreter", (), {})
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "tflite_runtime", types.ModuleType("tflite_runtime"))
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", fake)
    assert interpreter_class() is fake.Interpreter
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)
    with pytest.raises(BundleError, match="needs a TFLite interpreter; install it with: pip install ai-edge-litert"):
        interpreter_class()
