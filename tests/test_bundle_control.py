"""Bundles with a control model and an image encoder: export writes them as components, the torch-free runtime (and
run-bundle, as typed) equals the torch pipeline with the same control image, mask and noise; bad input is refused.

The default suite exports one bundle (micro model + T2I-Adapter + encoder, guided, a size whose aspect differs from
the control image's so the fitting is exercised); a ControlNet bundle and a 9-channel inpainting UNet bundle are
opt-in (MD_HEAVY_TESTS=1: two more exports of ~2 minutes)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from export_cases import MICRO, micro_pipeline, needs_litert, psnr, torch_noise

pytestmark = needs_litert
HEAVY = pytest.mark.skipif(os.environ.get("MD_HEAVY_TESTS") != "1",
                           reason="opt-in: two more bundle exports (~2 min each); set MD_HEAVY_TESTS=1")
SIZE = (32, 24)  # (H, W): the control image and picture below are 40 x 48, so they are cropped and resized
OPTIONS = dict(precision="fp32", sizes=[SIZE], steps=2, sampler="euler", guidance=2.5, end_to_end_steps=1, prompt_chunks=1)
PROMPT = "a red circle"


def _with_encoder(pipe, unet=None):
    from mobilediffusion.encoder import build_encoder, lite_encoder_config
    from mobilediffusion.pipeline import Pipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        encoder = build_encoder(lite_encoder_config(pipe.config.decoder)).eval()
    config = pipe.config if unet is None else __import__("dataclasses").replace(pipe.config, unet=unet.config)
    return Pipeline(config, unet or pipe.unet, pipe.text_encoder, pipe.decoder, encoder=encoder)


def _adapter():
    from mobilediffusion.control.adapter import Adapter, AdapterConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Adapter(AdapterConfig("full", 3, (16, 32), 1, 3, False, 2)).eval()


def _controlnet():
    from mobilediffusion.control.controlnet import ControlNet, ControlNetConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = ControlNet(ControlNetConfig(MICRO.unet, 3, (8, 16))).eval()
        with torch.no_grad():  # zero convolutions re-initialised, or every comparison passes trivially
            for name, p in net.named_parameters():
                if name.startswith(("zero_convs", "mid_out")):
                    p.normal_(0, 0.2)
    return net


rng = np.random.default_rng(3)
HINT = (rng.random((40, 48)) > 0.9).astype(np.float32)  # an edge map, greyscale
PICTURE = rng.random((40, 48, 3)).astype(np.float32)
MASK = np.zeros((40, 48), np.float32)
MASK[5:25, 10:40] = 1.0


@pytest.fixture(scope="module")
def adapter_bundle(tmp_path_factory):
    from mobilediffusion.export import export_bundle

    pipe = _with_encoder(micro_pipeline())
    control = _adapter()
    # verify=False: the tests below hold the bundle to torch themselves (the exporter's checks would repeat them)
    out = export_bundle(pipe, tmp_path_factory.mktemp("ctl") / "adapter", control=control, encoder=True,
                        control_source={"file": "micro-adapter.safetensors"}, **{**OPTIONS, "verify": False})
    return out, pipe, control


def _torch_image(pipe, seed=1, **kw):
    """The torch pipeline's image at the bundle's settings, (1, H, W, 3) in [0, 1] (8-bit, as the Pipeline gives)."""
    images = pipe(PROMPT, steps=OPTIONS["steps"], guidance=OPTIONS["guidance"], sampler=OPTIONS["sampler"], seed=seed,
                  height=SIZE[0], width=SIZE[1], **kw)
    return np.stack([np.asarray(i, np.float32) / 255 for i in images])


def _tensor(a):
    t = torch.from_numpy(a)
    return t[None, None] if t.dim() == 2 else t.permute(2, 0, 1)[None]


def _bundle_image(bundle, seed=1, **kw):
    return np.round(bundle(PROMPT, noise=torch_noise(seed), **kw) * 255) / 255


def _cases(control):
    hint = _tensor(HINT)
    known = dict(image=_tensor(PICTURE), mask=_tensor(MASK))
    return {
        "control": (dict(control_image=HINT, control_strength=0.8), dict(control=[(control, hint, 0.8)])),
        "control window": (dict(control_image=HINT, control_strength=1.3, control_start=0.0, control_end=0.5),
                           dict(control=[(control, hint, 1.3, 0.0, 0.5)])),
        "mask": (dict(image=PICTURE, mask=MASK), known),
        "mask and control": (dict(image=PICTURE, mask=MASK, control_image=HINT), {**known, "control": [(control, hint)]}),
    }


@pytest.mark.parametrize("case", ["control", "control window", "mask", "mask and control"])
def test_adapter_bundle_equals_torch(adapter_bundle, case):
    from mobilediffusion.runtime import BundlePipeline

    path, pipe, control = adapter_bundle
    bundle_kw, torch_kw = _cases(control)[case]
    got = _bundle_image(BundlePipeline(path), **bundle_kw)
    ref = _torch_image(pipe, **torch_kw)
    plain = _torch_image(pipe)
    # 8-bit images: at most a rounding step apart anywhere (measured: identical), and rarely
    assert np.abs(got - ref).max() <= 1.5 / 255 and psnr(got, ref) >= 60, f"{case}: {psnr(got, ref):.1f} dB"
    assert psnr(ref, plain) < 40, f"{case}: the control / mask changed nothing ({psnr(ref, plain):.1f} dB)"


def test_manifest_records_the_control_and_the_encoder(adapter_bundle):
    path, _, control = adapter_bundle
    m = json.loads((path / "manifest.json").read_text())
    assert list(m["components"]) == ["text_encoder", "encoder", "adapter", "unet", "decoder"]
    c = m["control"]
    assert c["component"] == "adapter" and c["kind"] == "t2i_adapter"
    assert c["source"] == {"file": "micro-adapter.safetensors"}
    assert c["hint"]["channels"] == 3 and c["hint"]["factor"] == 2 and [c["hint"]["height"], c["hint"]["width"]] == \
        list(SIZE)
    assert c["residuals"] == ["res_input_1", "res_input_3"] and c["gpu"] == m["components"]["adapter"]["gpu"]
    assert "compatible" in c["gpu"]
    unet_inputs = {i["name"]: i["shape"] for i in m["components"]["unet"]["inputs"]}
    assert unet_inputs["res_input_1"] == [2, 16, 16, 12] and unet_inputs["res_input_3"] == [2, 32, 8, 6]
    assert m["components"]["adapter"]["inputs"][0]["shape"] == [1, 3, 32, 24]
    assert m["components"]["encoder"]["inputs"][0]["shape"] == [1, 32, 24, 3]
    assert m["inpainting"]["concat_channels"] == 0 and "sigmas" in m["sampler"]
    from mobilediffusion.export.report import describe

    text = describe(path, m)  # what `mobilediffusion info BUNDLE` prints
    assert "control: adapter (t2i_adapter, runs once per image) from micro-adapter.safetensors, hint 3x32x24" in text
    assert "inpainting: the encoder repaints a masked image (the known region kept at every step)" in text


def test_strength_zero_and_no_control_image_are_the_plain_bundle(adapter_bundle):
    from mobilediffusion.runtime import BundlePipeline

    path, pipe, _ = adapter_bundle
    b = BundlePipeline(path)
    plain = b(PROMPT, seed=4)
    np.testing.assert_array_equal(b(PROMPT, seed=4, control_image=HINT, control_strength=0.0), plain)
    assert psnr(np.round(b(PROMPT, noise=torch_noise(1)) * 255) / 255, _torch_image(pipe)) >= 50


def test_hint_and_mask_formats(adapter_bundle, tmp_path):
    """RGBA and greyscale control images, 8-bit files and float arrays give one hint; a mask file is read as grey."""
    from PIL import Image

    from mobilediffusion.runtime import BundlePipeline

    b = BundlePipeline(adapter_bundle[0])
    u8 = (HINT * 255).astype(np.uint8)
    Image.fromarray(u8).save(tmp_path / "grey.png")
    Image.fromarray(np.stack([u8] * 3 + [np.full_like(u8, 128)], -1), "RGBA").save(tmp_path / "rgba.png")
    ref = b.control_hint(HINT)
    for image in (tmp_path / "grey.png", tmp_path / "rgba.png", np.stack([HINT] * 3, -1)):
        np.testing.assert_array_equal(b.control_hint(image), ref)
    Image.fromarray((MASK * 255).astype(np.uint8)).convert("RGB").save(tmp_path / "mask.png")
    a = b(PROMPT, seed=2, image=PICTURE, mask=MASK)
    np.testing.assert_array_equal(b(PROMPT, seed=2, image=PICTURE, mask=tmp_path / "mask.png"), a)


def test_bad_control_and_mask_input_is_refused(adapter_bundle, tmp_path):
    from mobilediffusion.runtime import BundleError, BundlePipeline

    b = BundlePipeline(adapter_bundle[0])
    (tmp_path / "notes.txt").write_text("not an image")
    cases = [
        (dict(control_image=tmp_path / "notes.txt"), "cannot be read as an image"),
        (dict(control_image=np.zeros((4, 4, 2), np.float32)), "(H, W, 1/3/4 channels)"),
        (dict(image=PICTURE, mask=np.zeros((40, 48), np.float32)), "mask is empty"),
        (dict(image=PICTURE, mask=np.ones((40, 48), np.float32)), "covers the whole image"),
        (dict(mask=MASK), "needs an image"),
        (dict(image=PICTURE), "give a mask"),
        (dict(control_image=HINT, control_start=0.8, control_end=0.2), "0 <= start <= end <= 1"),
        (dict(control_image=HINT, height=64, width=64), "no 64x64"),
    ]
    for kw, message in cases:
        with pytest.raises(BundleError, match=__import__("re").escape(message)):
            b(PROMPT, **kw)
    # the same bundle without its control model and encoder (as a bundle exported without them describes itself)
    import shutil

    bare = shutil.copytree(adapter_bundle[0], tmp_path / "bare")
    m = json.loads((bare / "manifest.json").read_text())
    for key in ("control", "inpainting"):
        del m[key]
    for name in ("adapter", "encoder"):
        del m["components"][name]
        (bare / f"{name}.tflite").unlink()
    (bare / "manifest.json").write_text(json.dumps(m))
    plain = BundlePipeline(bare)
    with pytest.raises(BundleError, match="no control model; export it with one"):
        plain(PROMPT, control_image=HINT)
    with pytest.raises(BundleError, match="no image encoder"):
        plain(PROMPT, image=PICTURE, mask=MASK)


def test_run_bundle_cli_with_control_image_and_mask(adapter_bundle, tmp_path):
    """As typed: run-bundle --control-image --image --mask writes the runtime's image; a bad mask is one line."""
    from PIL import Image

    from mobilediffusion.runtime import BundlePipeline

    path = adapter_bundle[0]
    Image.fromarray((HINT * 255).astype(np.uint8)).save(tmp_path / "edges.png")
    Image.fromarray((PICTURE * 255).round().astype(np.uint8)).save(tmp_path / "picture.png")
    Image.fromarray((MASK * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    args = [sys.executable, "-m", "mobilediffusion.cli", "run-bundle", str(path), PROMPT, "-o", str(out), "--seed", "3",
            "--control-image", str(tmp_path / "edges.png"), "--control-strength", "0.7", "--image",
            str(tmp_path / "picture.png"), "--mask", str(tmp_path / "mask.png")]
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ref = BundlePipeline(path)(PROMPT, seed=3, control_image=tmp_path / "edges.png", control_strength=0.7,
                               image=tmp_path / "picture.png", mask=tmp_path / "mask.png")
    got = np.asarray(Image.open(out), np.float32) / 255
    assert psnr(got, ref[0]) >= 45
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(tmp_path / "black.png")
    r = subprocess.run(args[:-1] + [str(tmp_path / "black.png")], capture_output=True, text=True)
    assert r.returncode != 0 and "mask is empty" in r.stderr and "Traceback" not in r.stderr


@HEAVY
def test_controlnet_bundle_equals_torch(tmp_path):
    from mobilediffusion.export import export_bundle
    from mobilediffusion.runtime import BundlePipeline

    pipe = _with_encoder(micro_pipeline())
    control = _controlnet()
    path = export_bundle(pipe, tmp_path / "controlnet", control=control, encoder=True, **OPTIONS)
    m = json.loads((path / "manifest.json").read_text())
    assert m["control"]["component"] == "controlnet" and m["control"]["residuals"][0] == "res_middle"
    b = BundlePipeline(path)
    for case, (bundle_kw, torch_kw) in _cases(control).items():
        got, ref = _bundle_image(b, **bundle_kw), _torch_image(pipe, **torch_kw)
        assert np.abs(got - ref).max() <= 1.5 / 255 and psnr(got, ref) >= 60, f"{case}: {psnr(got, ref):.1f} dB"


@HEAVY
def test_inpainting_unet_bundle_equals_torch(tmp_path):
    """A 9-channel UNet: the bundle's UNet takes `concat` (mask + masked-image latents through the encoder)."""
    import dataclasses

    from mobilediffusion.export import export_bundle
    from mobilediffusion.runtime import BundleError, BundlePipeline
    from mobilediffusion.unet import UNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        unet = UNet(dataclasses.replace(MICRO.unet, in_channels=9)).eval()
    pipe = _with_encoder(micro_pipeline(), unet)
    path = export_bundle(pipe, tmp_path / "inpaint", **OPTIONS)  # the encoder comes with a 9-channel UNet
    m = json.loads((path / "manifest.json").read_text())
    assert "encoder" in m["components"] and m["inpainting"]["concat_channels"] == 5
    b = BundlePipeline(path)
    got = _bundle_image(b, image=PICTURE, mask=MASK)
    ref = _torch_image(pipe, image=_tensor(PICTURE), mask=_tensor(MASK))
    assert np.abs(got - ref).max() <= 1.5 / 255 and psnr(got, ref) >= 60, f"inpainting UNet: {psnr(got, ref):.1f} dB"
    with pytest.raises(BundleError, match="inpainting UNet: give image= and mask="):
        b(PROMPT)
