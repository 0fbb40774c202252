"""The bundle's web player (LiteRT.js in headless Chromium), used as a person uses it (type the prompt, pick the
settings, click Generate, read the canvas), against the Python runtime on the same seed; the bundle checks shown
in the page; the player's noise, tokenizer and sampler loop in Node against numpy and the Python runtime; the web
CLI and its errors.

Needs Node.js >= 20 with npm (the player's and the driver's packages are installed with `npm ci` from their
lockfiles into ~/.cache/mobilediffusion) and, for the page tests, Chromium at /usr/bin/chromium
(MD_CHROMIUM overrides); skipped with the reason otherwise. The default-bundle page test exports the shipped
default (about a minute of CPU).
"""
import base64
import contextlib
import json
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from browser_cases import CHROMIUM, DRIVER_DIR, needs_chromium, needs_node, playwright_core
from export_cases import PROMPT, default_bundle, micro_pipeline, needs_litert, psnr, session_bundle
from mobilediffusion.runtime import BundlePipeline, numpy_noise
from mobilediffusion.runtime.lora_pack import read_pack
from mobilediffusion.runtime.manifest import READABLE_SCHEMAS, SCHEMA_VERSION
from mobilediffusion.runtime.sampler import SAMPLERS
from mobilediffusion.web import PLAYER_DIR, WebPlayerError, write_player
from mobilediffusion.web.install import npm_ci
from mobilediffusion.web.player import FILE_BYTES, HEAP_BYTES, TENSOR_TYPES

ROOT = Path(__file__).resolve().parent.parent


def b64(array) -> str:
    return base64.b64encode(np.ascontiguousarray(array, np.float32).tobytes()).decode()


def unb64(text, dtype=np.float32):
    return np.frombuffer(base64.b64decode(text), dtype)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def player_modules(tmp_path_factory):
    """The player's modules next to the lockfile's node_modules, importable by Node."""
    modules = npm_ci(PLAYER_DIR, "web") / "node_modules"
    folder = tmp_path_factory.mktemp("player")
    for path in PLAYER_DIR.glob("*.js"):
        shutil.copyfile(path, folder / path.name)
    (folder / "node_modules").symlink_to(modules, target_is_directory=True)
    return folder


def node_units(player_modules, job: dict) -> dict:
    r = subprocess.run(["node", str(DRIVER_DIR / "units.mjs"), str(player_modules)], input=json.dumps(job),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def playwright():
    return playwright_core()


@contextlib.contextmanager
def serving(*folders):
    """Each bundle folder served by serve-bundle's server on 127.0.0.1 (any free port); yields the player URLs."""
    from mobilediffusion.web.serve import make_server, player_url

    servers = [make_server(f, 0) for f in folders]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    try:
        yield [player_url(s) for s in servers]
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()


def drive(playwright, pages: list[dict]) -> list[dict]:
    """Use the pages in headless Chromium as a person does (tests/web/drive.mjs: type, pick, click Generate, read
    the canvases); their results in order."""
    job = {"playwright": str(playwright), "chromium": CHROMIUM, "timeout_ms": 120_000, "idle_ms": 60_000,
           "pages": pages}
    r = subprocess.run(["node", str(DRIVER_DIR / "drive.mjs")], input=json.dumps(job), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)["pages"]


def image_of(result) -> np.ndarray:
    """The run's pictures as read off the page's canvases: (B, H, W, 3) float in [0, 1], 8 bits per channel."""
    assert result["error_text"] is None and result["images"], result["status"]
    pictures = [np.frombuffer(base64.b64decode(text), np.uint8) for text in result["images"]]
    return np.stack(pictures).reshape(result["shape"]).astype(np.float64) / 255.0


def as_shown(images) -> np.ndarray:
    """Runtime images (B, H, W, 3) in [0, 1] as a canvas shows them: rounded to 8 bits."""
    return np.clip(np.round(np.asarray(images, np.float64) * 255.0), 0, 255) / 255.0


def assert_clean(page):
    """A page that loaded, ran every click, and logged no error."""
    assert page["ready_error"] is None, page["ready_error"]
    assert all(r["error_text"] is None and r["status"].startswith("done") for r in page["results"]), \
        [(r["status"], r["error_text"]) for r in page["results"]]
    assert page["page_errors"] == [] and page["console_errors"] == [], page["page_errors"] + page["console_errors"]


def recorded(noise):
    """noise wrapped to keep every draw (to hand the same arrays to the page)."""
    draws = []

    def draw(shape):
        draws.append(np.asarray(noise(shape), np.float32))
        return draws[-1]

    return draw, draws


def as_int8_a16(folder: Path) -> None:
    """Rewrite a bundle's manifest as an int8_a16 export writes it (schema 2, int16 unet/decoder inputs and
    outputs with their quantization); the files stay, the manifest is not in any sha256."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["schema_version"] = 2
    for name in ("unet", "decoder"):
        entry = manifest["components"][name]
        entry["precision"] = "int8_a16"
        for t in [*entry["inputs"], *entry["outputs"]]:
            t.update(dtype="int16", quantization={"scale": 1e-4, "zero_point": 0})
    path.write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A copy of the tiny SD-layout session bundle (euler_ancestral 2 steps, CFG 2.5, two sizes, two prompt chunks)
    with a LoRA pack (loras/style.lorapack) and its web player."""
    from lora_cases import kohya_state, own_factors, save

    from mobilediffusion.export.lora_pack import export_lora_pack

    folder = tmp_path_factory.mktemp("web") / "micro"
    shutil.copytree(session_bundle(tmp_path_factory), folder)
    lora = save(kohya_state(own_factors(micro_pipeline(), seed=1, scale=0.3), alpha=1.0),
                tmp_path_factory.mktemp("lora") / "style.safetensors")
    export_lora_pack(lora, folder)
    write_player(folder)
    return folder


# --------------------------------------------------------------------------- the page vs the Python runtime
def runtime_image(pipe, prompt, negative="", *, seed, section=None, guidance=None, size=None, loras=()):
    """The Python runtime's image for what a user set in the page: another sampler section (from the player's
    tables) and guidance replace the manifest's for this run only; size (H, W); LoRA packs [(path, strength)]."""
    sampler = dict(section or pipe.manifest["sampler"])
    if guidance is not None:
        sampler["guidance"] = guidance
    own = pipe.manifest["sampler"]
    pipe.manifest["sampler"] = sampler
    pipe.set_loras(list(loras))
    try:
        return pipe(prompt, negative, seed=seed, height=size and size[0], width=size and size[1])
    finally:
        pipe.manifest["sampler"] = own
        pipe.set_loras([])


def compare(page, refs, what):
    """Each clicked run's canvas against the Python runtime's image as a canvas shows it: >= 35 dB."""
    for run, ref, name in zip(page["results"], refs, what):
        got = image_of(run)
        assert got.shape == ref.shape, (name, got.shape, ref.shape)
        value = psnr(got, as_shown(ref))
        print(f"{name}: page canvas vs Python runtime PSNR {value:.1f} dB ({run['status']})")
        assert value >= 35.0, name


@pytest.mark.slow
@needs_litert
@needs_node
@needs_chromium
def test_page_image_equals_python_runtime_tiny_sd_bundle(micro, playwright):
    """A guided bundle (CFG 2.5): the user types prompts, picks seed, sampler, steps and guidance, clicks Generate.
    (The bundle's LoRA pack is set to 0 first: its slider starts at the pack's strength.)"""
    pipe = BundlePipeline(micro)
    schedules = json.loads((micro / "web" / "player.json").read_text())["schedules"]
    assert schedules[pipe.manifest["sampler"]["name"]]["2"] == pipe.manifest["sampler"]  # same tables as the export
    runs = [{"prompt": PROMPT, "negative": "blurry", "seed": 7, "loras": {"style": 0}},
            # another sampler and step count from the player's tables (DPM++ 2M reuses the previous x0)
            {"prompt": PROMPT, "negative": "", "seed": 11, "sampler": "dpmpp_2m", "steps": 3},
            {"prompt": PROMPT, "negative": "blurry", "seed": 7, "sampler": "euler_ancestral", "steps": 2,
             "guidance": 4.0}]
    refs = [runtime_image(pipe, PROMPT, "blurry", seed=7),
            runtime_image(pipe, PROMPT, "", seed=11, section=schedules["dpmpp_2m"]["3"]),
            runtime_image(pipe, PROMPT, "blurry", seed=7, guidance=4.0)]
    with serving(micro) as (url,):
        (page,) = drive(playwright, [{"url": url, "runs": runs}])
    assert_clean(page)
    assert page["isolated"] is True  # serve-bundle's COOP/COEP headers: LiteRT.js runs its threaded build
    assert not page["controls"]["guidance"]["hidden"] and not page["controls"]["negative"]["hidden"]
    compare(page, refs, ("seed 7", "dpmpp_2m x3, seed 11", "guidance 4"))
    # the settings matter (the random micro model responds to guidance only a little: 38 dB apart)
    assert psnr(image_of(page["results"][0]), image_of(page["results"][1])) < 35.0
    assert psnr(image_of(page["results"][0]), image_of(page["results"][2])) < 45.0


LONG = "a (red:1.3) circle on blue, " + "with a ((thin)) white outline " * 14 + "and \\(no\\) shadow"


@pytest.mark.slow
@needs_litert
@needs_node
@needs_chromium
def test_page_sizes_long_prompts_and_lora_sliders(micro, playwright):
    """The user picks the bundle's second size, types a 2-chunk weighted prompt and generates with the LoRA pack's
    slider where it starts (the pack's strength, 1), then drags it (0.7, -0.4, back to 0): each canvas equals the
    Python runtime with the same pack and strength; strength 0 is the plain bundle again."""
    pipe = BundlePipeline(micro)
    pack = micro / "loras" / "style.lorapack"
    assert read_pack(pack).info["strength"] == 1.0
    runs = [{"prompt": LONG, "negative": "blurry", "seed": 3, "size": "32x24"},
            {"prompt": PROMPT, "negative": "", "seed": 4, "size": "24x32", "loras": {"style": 0.7}},
            {"prompt": LONG, "negative": "blurry", "seed": 3, "size": "32x24", "loras": {"style": -0.4}},
            {"prompt": PROMPT, "negative": "", "seed": 4, "size": "24x32", "loras": {"style": 0}}]
    refs = [runtime_image(pipe, LONG, "blurry", seed=3, size=(24, 32), loras=[(pack, 1.0)]),
            runtime_image(pipe, PROMPT, "", seed=4, loras=[(pack, 0.7)]),
            runtime_image(pipe, LONG, "blurry", seed=3, size=(24, 32), loras=[(pack, -0.4)]),
            runtime_image(pipe, PROMPT, "", seed=4)]
    with serving(micro) as (url,):
        (page,) = drive(playwright, [{"url": url, "runs": runs}])
    assert_clean(page)
    controls = page["controls"]
    assert controls["size"]["options"] == ["24x32", "32x24"] and not controls["size"]["hidden"]
    assert controls["lora:style"]["value"] == "1"
    compare(page, refs, ("32x24, 2-chunk weighted prompt, LoRA as loaded (1)", "LoRA 0.7", "32x24, long prompt, LoRA -0.4",
                         "LoRA back to 0"))
    assert image_of(page["results"][0]).shape == (1, 24, 32, 3)
    assert psnr(image_of(page["results"][1]), image_of(page["results"][3])) < 35.0  # the LoRA matters


def pad_array(result, name):
    """A pad the run used, as read off the page: scribble / picture (H, W, 3) uint8, mask (H, W) uint8 (alpha)."""
    pads = result["pads"]
    a = np.frombuffer(base64.b64decode(pads[name]), np.uint8)
    return a.reshape(pads["height"], pads["width"], *(() if name == "mask" else (3,)))


@pytest.mark.slow
@needs_litert
@needs_node
@needs_chromium
def test_page_generates_with_the_default_bundle(tmp_path_factory, tmp_path, playwright):
    """The shipped default exported as a user does (int8_dynamic, guidance 1: the page hides guidance) with its
    scribble plugin and the image encoder; the user generates, draws a square on the scribble pad (the object lands
    there), lowers the control strength, then chooses a picture and paints a mask: every canvas equals the Python
    runtime given what the page's pads held. (A hidden guidance field of 1 under min="1.01" used to block the form:
    the click did nothing.)"""
    from PIL import Image

    from mobilediffusion.train.control import iou, object_mask
    from mobilediffusion.train.data import Scene, SceneConfig, render

    # exported by `mobilediffusion export` as typed, one prompt chunk (the micro bundle's page tests cover long ones)
    folder = default_bundle(tmp_path_factory)
    pipe = BundlePipeline(folder)
    assert pipe.manifest["control"]["source"]["file"] == "md-shapes-scribble.safetensors"
    scene = render(Scene("red", "circle", "top left"), SceneConfig(resolution=128))  # the default's size
    Image.fromarray(scene).save(tmp_path / "scene.png")
    prompt, unplaced = "a red circle in the top left on a white background", "a blue square on a white background"
    square = [[[88, 88], [116, 88], [116, 116], [88, 116], [88, 88]]]  # an outline, bottom right (image pixels)
    runs = [{"prompt": prompt, "seed": 0}, {"prompt": prompt, "seed": 0},
            {"prompt": unplaced, "seed": 1, "scribble": square},
            {"prompt": unplaced, "seed": 1, "control_strength": 0.5},
            {"prompt": unplaced, "seed": 2, "clear_scribble": True, "picture_file": str(tmp_path / "scene.png"),
             "mask_brush": 20, "mask": [[[80, 16], [80, 112]], [[104, 16], [104, 112]]]}]
    with serving(folder) as (url,):
        (page,) = drive(playwright, [{"url": url, "runs": runs}])
    assert_clean(page)
    assert page["controls"]["guidance"]["hidden"] and page["controls"]["guidance"]["disabled"]
    assert not page["controls"]["scribble"]["hidden"] and not page["controls"]["picture"]["hidden"]
    r = page["results"]
    drawn = pad_array(r[2], "scribble")
    assert drawn.any() and (pad_array(r[3], "scribble") == drawn).all() and not pad_array(r[4], "scribble").any()
    picture, mask = pad_array(r[4], "picture"), pad_array(r[4], "mask").astype(np.float32) / 255
    assert (picture == scene).all() and 0.2 < (mask >= 0.5).mean() < 0.8
    refs = [pipe(prompt, seed=0), pipe(prompt, seed=0), pipe(unplaced, seed=1, control_image=drawn),
            pipe(unplaced, seed=1, control_image=drawn, control_strength=0.5),
            pipe(unplaced, seed=2, image=picture, mask=mask)]
    compare(page, refs, ("default int8_dynamic, seed 0", "seed 0 again", "square scribbled", "control strength 0.5",
                         "picture + painted mask"))
    # the scribble places the object: its mask overlaps the drawn square's (filled) area
    filled = np.zeros((128, 128), bool)
    filled[88:117, 88:117] = True
    placed = iou(object_mask((image_of(r[2])[0] * 255).round().astype(np.uint8)), filled)
    print(f"object vs scribbled square IoU {placed:.2f}")
    assert placed > 0.4
    # what the mask keeps stays the picture (up to the lite autoencoder's round trip)
    err = np.abs(image_of(r[4])[0] - scene / 255.0)[mask < 0.5].mean()
    print(f"kept region: mean abs difference to the picture {err:.4f}")
    assert err < 0.05


@pytest.mark.slow
@needs_litert
@needs_node
@needs_chromium
def test_page_shows_bundle_errors_and_does_not_run(micro, playwright, tmp_path):
    """A changed file, a missing file, a newer schema, int16 inputs/outputs (int8_a16, which LiteRT.js cannot pass),
    a broken player: the page shows the error; nothing runs."""
    cases = {}
    for name in ("tampered", "missing", "newer", "int16", "heap", "player"):
        cases[name] = shutil.copytree(micro, tmp_path / name)
    unet = cases["tampered"] / "unet.tflite"
    data = bytearray(unet.read_bytes())
    data[len(data) // 2] ^= 0xFF
    unet.write_bytes(bytes(data))
    (cases["missing"] / "decoder.tflite").unlink()
    manifest = json.loads((cases["newer"] / "manifest.json").read_text())
    manifest["schema_version"] = SCHEMA_VERSION + 1
    (cases["newer"] / "manifest.json").write_text(json.dumps(manifest))
    as_int8_a16(cases["int16"])
    manifest = json.loads((cases["heap"] / "manifest.json").read_text())
    manifest["memory"]["generation_peak_bytes"] = 3 * 10**9  # as an SD1.5 fp16 bundle measures
    (cases["heap"] / "manifest.json").write_text(json.dumps(manifest))
    (cases["player"] / "web" / "vendor" / "huggingface-tokenizers" / "tokenizers.mjs").unlink()
    expected = {
        "tampered": r"^unet: unet\.tflite does not match the manifest \(sha256 [0-9a-f]{12}\.\.\., expected",
        "missing": r"^decoder: decoder\.tflite is missing from the bundle \(HTTP 404\)",
        "newer": rf"^this bundle has schema version {SCHEMA_VERSION + 1}, but this player reads versions "
                 rf"{', '.join(map(str, READABLE_SCHEMAS))}; write a newer player",
        "int16": r"^this bundle was exported at precision int8_a16: its tensors unet sample \(int16\), .*, decoder image "
                 r"\(int16\) are of a type LiteRT\.js cannot pass .* export the bundle again for the web at precision "
                 r"fp16, or int8_dynamic ",
        "heap": r"^this bundle needs about 3\.00 GB while it runs \(measured at export\), more than the 2\.15 GB a page's "
                r"WebAssembly memory holds \(LiteRT\.js\); export a smaller bundle for the web: mobilediffusion export "
                r"--precision int8_dynamic --web",
        "player": r"^The player could not be loaded \(a file of web/ is missing\); write it again",
    }
    with serving(*cases.values()) as urls:
        pages = drive(playwright, [{"url": u, "runs": [{"prompt": PROMPT}]} for u in urls])
    for (name, pattern), page in zip(expected.items(), pages):
        print(f"{name}: {page['ready_error']}")
        assert re.search(pattern, page["ready_error"] or ""), (name, page["ready_error"])
        assert page["results"] == [] and page["page_errors"] == []
        assert page["controls"]["generate"]["disabled"]  # nothing to click


# --------------------------------------------------------------------------- the player's parts in Node
@needs_node
def test_noise_is_numpys_generator(player_modules):
    """default_rng(seed).standard_normal(float32) drawn in call order; at most a few far-tail draws 1 ulp apart
    (libm's log1pf)."""
    shapes = [[1, 4, 16, 12], [2, 3], [120_000]]
    seeds = [0, 5, 2**32 + 1, 2**64 - 1]
    got = node_units(player_modules, {"noise": [{"seed": str(s), "shapes": shapes} for s in seeds]})["noise"]
    for seed, arrays in zip(seeds, got):
        noise = numpy_noise(seed)
        for shape, text in zip(shapes, arrays):
            ref = noise(tuple(shape)).ravel()
            out = unb64(text)
            differ = np.flatnonzero(out != ref)
            assert len(differ) <= 3 and np.all(np.abs(ref[differ]) > 3.6), (seed, shape, differ[:5])
            np.testing.assert_allclose(out, ref, rtol=3e-7, atol=0)


@needs_node
@pytest.mark.parametrize("pad_token", [None, "!"])
def test_tokenizer_equals_runtime_tokenizer(player_modules, tmp_path, pad_token):
    """tokenizer.json read by @huggingface/tokenizers and prompt.js give the Python runtime's chunks and emphasis
    weights (CLIP, SD2's '!' padding) for long, weighted, odd prompts, cut at max_chunks."""
    from test_runtime import PROMPTS, WEIGHTED

    from mobilediffusion.config import TextEncoderConfig
    from mobilediffusion.export.files import write_tokenizer
    from mobilediffusion.runtime.tokenizer import BundleTokenizer
    from mobilediffusion.text_encoder import TextEncoder

    prompts = [*PROMPTS, "ＦＵＬＬＷＩＤＴＨ ﬁ ligature Ⅻ ½ x² 𝔸", "   spaces   around  ",
               "HTTPServer 3.14 1e-5", *WEIGHTED[len(PROMPTS):], "(a:1_0) (b: 2 ) (c:.5) (d:1e1) (e:inf) (f:x)",
               "((((deep)))) (a (b (c:0.5) d) e)", "embedding:one, embedding:two\nembedding:three", ("word " * 200)]
    cfg = TextEncoderConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            **({"pad_token": pad_token} if pad_token else {}))
    spec = {**write_tokenizer(TextEncoder(cfg), tmp_path), "max_chunks": 2}
    read = lambda name: json.loads((tmp_path / name).read_text(encoding="utf-8"))  # noqa: E731
    job = {"tokenizer": {"json": read("tokenizer.json"), "config": read("tokenizer_config.json"), "spec": spec,
                         "prompts": prompts}}
    result = node_units(player_modules, job)
    ours = BundleTokenizer(tmp_path, spec)
    for prompt, chunks in zip(prompts, result["chunks"]):
        ids, weights = ours.chunks(prompt)
        np.testing.assert_array_equal(unb64(chunks["ids"], np.int32), ids.ravel(), err_msg=prompt)
        np.testing.assert_array_equal(unb64(chunks["weights"]), weights.ravel(), err_msg=prompt)
    assert max(c["k"] for c in result["chunks"]) == 2 and any(c["cut"] for c in result["chunks"])


@needs_node
def test_sampler_loop_equals_numpy_runtime(player_modules):
    """All six samplers' manifest sections run by sampler.js and by runtime/sampler.py on a toy model."""
    import dataclasses

    from mobilediffusion.presets import PRESETS
    from mobilediffusion.export.schedule import sampler_section
    from mobilediffusion.runtime import sampler as np_sampler

    cfg = dataclasses.replace(PRESETS["sd15"], unet=dataclasses.replace(PRESETS["sd15"].unet,
                                                                         prediction_type="v_prediction"))
    shape, weight = [2, 4, 6, 5], 0.9

    def model(x, t):
        return np.tanh(x * np.float32(weight) + np.float32(t / 1000)).astype(np.float32)

    cases, refs = [], []
    for name in SAMPLERS:
        section = json.loads(json.dumps(sampler_section(cfg, name, 1 if name == "onestep" else 4, 0.0)))
        draw, draws = recorded(numpy_noise(3))
        refs.append(np_sampler.sample(model, tuple(shape), section, draw))
        cases.append({"section": section, "shape": shape, "noise": [b64(d) for d in draws], "weight": weight})
    # and keeping a known region (inpainting with a noise mask, a soft edge included)
    g = np.random.default_rng(4)
    latents = g.standard_normal(shape, dtype=np.float32)
    mask = (g.random((1, 1, *shape[2:])) > 0.5).astype(np.float32)
    mask[..., 0, 0] = 0.25
    for name in SAMPLERS:
        section = json.loads(json.dumps(sampler_section(cfg, name, 1 if name == "onestep" else 4, 0.0)))
        draw, draws = recorded(numpy_noise(5))
        refs.append(np_sampler.sample(model, tuple(shape), section, draw, known=(latents, mask)))
        cases.append({"section": section, "shape": shape, "noise": [b64(d) for d in draws], "weight": weight,
                      "known": {"latents": b64(latents), "mask": b64(mask)}})
    got = node_units(player_modules, {"sampler": cases})["sampler"]
    names = [*SAMPLERS, *(f"{n} keeping a region" for n in SAMPLERS)]
    for name, text, ref in zip(names, got, refs):
        err = np.linalg.norm(unb64(text) - ref.ravel()) / np.linalg.norm(ref)
        assert err <= 1e-6, f"{name}: relative error {err:.2e}"


@needs_node
def test_conditioning_equals_numpy(player_modules):
    """The control image and the picture / mask prepared in the page (conditioning.js) equal runtime/conditioning.py:
    crops, nearest-exact / nearest / bilinear resizes, channel means, masks; bad masks are refused the same way."""
    from mobilediffusion.runtime import conditioning as c

    g = np.random.default_rng(8)
    rgb = g.random((37, 50, 3), dtype=np.float32)
    grey = g.random((37, 50, 1), dtype=np.float32)
    mask = np.zeros((37, 50, 1), np.float32)
    mask[5:30, 20:45] = 0.8
    mask[5:30, 19] = 0.3
    enc = lambda a: {"data": b64(a), "height": a.shape[0], "width": a.shape[1], "channels": a.shape[2]}  # noqa
    cases = [
        ({"op": "nearest", "image": enc(rgb), "height": 24, "width": 64}, c.resize_nearest(rgb, 24, 64)),
        ({"op": "nearest_floor", "image": enc(grey), "height": 9, "width": 13},
         c.resize_nearest(grey, 9, 13, exact=False)),
        ({"op": "bilinear", "image": enc(grey), "height": 9, "width": 13}, c.resize_bilinear(grey, 9, 13)),
        ({"op": "bilinear", "image": enc(rgb), "height": 80, "width": 61}, c.resize_bilinear(rgb, 80, 61)),
        ({"op": "fit", "image": enc(rgb), "height": 32, "width": 24}, c.fit(rgb, 32, 24)),
        ({"op": "fit", "image": enc(rgb), "height": 16, "width": 64}, c.fit(rgb, 16, 64)),
        ({"op": "hint", "image": enc(rgb), "height": 32, "width": 24, "channels": 1}, c.prepare_hint(rgb, 32, 24, 1)),
        ({"op": "hint", "image": enc(grey), "height": 32, "width": 24, "channels": 3}, c.prepare_hint(grey, 32, 24, 3)),
    ]
    for inpainting in (False, True):
        k = c.prepare_known(rgb, mask, 32, 24, (8, 6), inpainting_unet=inpainting)
        cases.append(({"op": "known", "image": enc(rgb), "mask": enc(mask), "height": 32, "width": 24,
                       "latent": [8, 6], "inpainting": inpainting},
                      {n: v for n, v in vars(k).items() if v is not None}))
    bad = [{"op": "known", "image": enc(rgb), "mask": enc(np.zeros_like(mask)), "height": 32, "width": 24,
            "latent": [8, 6], "inpainting": False},
           {"op": "known", "image": enc(rgb), "mask": enc(np.ones_like(mask)), "height": 32, "width": 24,
            "latent": [8, 6], "inpainting": False}]
    got = node_units(player_modules, {"conditioning": [job for job, _ in cases] + bad})["conditioning"]
    for (job, ref), out in zip(cases, got):
        assert "error" not in out, (job["op"], out)
        refs = ref if isinstance(ref, dict) else {"": ref}
        outs = out if job["op"] == "known" else {"": out}
        for name, want in refs.items():
            have = unb64(outs[{"image": "image", "mask": "mask", "hard_mask": "hardMask",
                               "masked_image": "maskedImage"}.get(name, name)]["data"])
            np.testing.assert_array_equal(have, np.asarray(want, np.float32).ravel(), err_msg=f"{job['op']} {name}")
    assert "mask is empty" in got[-2]["error"] and "covers the whole image" in got[-1]["error"]


@needs_node
def test_guidance_contexts_and_halves_equal_numpy(player_modules):
    """Classifier-free guidance mixing, contexts of different lengths batched (lcm repeat) and float16 rounding
    in the player equal the Python runtime's numpy (bit for bit)."""
    from mobilediffusion.runtime.pipeline import batch_contexts

    rng = np.random.default_rng(0)
    out = rng.standard_normal(2 * 60).astype(np.float32)
    contexts = [[rng.standard_normal((1, t, 4)).astype(np.float32) for t in (77, 154)],
                [rng.standard_normal((2, 154, 3)).astype(np.float32), rng.standard_normal((1, 231, 3)).astype(np.float32)]]
    halves = np.concatenate([rng.standard_normal(5000).astype(np.float32) * 10 ** rng.uniform(-9, 5, 5000),
                             np.array([0, -0.0, 65504, 65520, 1e9, -1e9, 5.96e-8, 2.98e-8, 2.99e-8, 1e-10, np.inf,
                                       1 + 2**-11, 1 + 3 * 2**-11, 2049, 2051, 6.1e-5, 6.0e-5], np.float32)])
    job = {"guidance": [{"out": b64(out), "g": 2.5}],
           "contexts": [[{"data": b64(c), "shape": list(c.shape)} for c in group] for group in contexts],
           "halves": b64(halves)}
    result = node_units(player_modules, job)
    u, c = out[:60], out[60:]
    np.testing.assert_array_equal(unb64(result["guidance"][0]), u + np.float32(2.5) * (c - u))
    for group, got in zip(contexts, result["contexts"]):
        ref = batch_contexts(group)
        assert got["shape"] == list(ref.shape)
        np.testing.assert_array_equal(unb64(got["data"]).reshape(ref.shape), ref)
    np.testing.assert_array_equal(unb64(result["halves"], np.uint16), halves.astype(np.float16).view(np.uint16))


@needs_node
def test_lora_patch_equals_python_runtime(player_modules, tmp_path):
    """A pack applied by lora.js to a file's float32, float16 and int8 (per-channel) tensors equals the Python
    runtime's patch; strength 0 changes nothing."""
    from safetensors.numpy import save_file

    from mobilediffusion.runtime.lora_pack import FORMAT, METADATA_KEY, VERSION, patched, read_pack

    rng = np.random.default_rng(1)
    w32 = rng.standard_normal((8, 6)).astype(np.float32)
    w16 = rng.standard_normal((6, 3, 3, 4)).astype(np.float16)
    q8 = rng.integers(-127, 128, (5, 7), dtype=np.int8)
    scales = rng.uniform(0.001, 0.01, 5).astype(np.float32)
    blob = b"\0" * 16 + w32.tobytes() + w16.tobytes() + q8.tobytes() + b"\0" + scales.tobytes()
    offsets = {"w32": 16, "w16": 16 + w32.nbytes, "q8": 16 + w32.nbytes + w16.nbytes}
    offsets["scales"] = offsets["q8"] + q8.nbytes + 1
    targets = [
        {"key": "0", "component": "unet", "param": "a", "tensor": "a", "dtype": "float32", "shape": [8, 6],
         "offset": offsets["w32"], "scale_offset": None, "axis": None, "form": "lowrank"},
        {"key": "1", "component": "unet", "param": "b", "tensor": "b", "dtype": "float16", "shape": [6, 3, 3, 4],
         "offset": offsets["w16"], "scale_offset": None, "axis": None, "form": "lowrank"},
        {"key": "2", "component": "unet", "param": "c", "tensor": "c", "dtype": "int8", "shape": [5, 7],
         "offset": offsets["q8"], "scale_offset": offsets["scales"], "axis": 0, "form": "dense"},
        {"key": "3", "component": "unet", "param": "a", "tensor": "a", "dtype": "float32", "shape": [8, 6],
         "offset": offsets["w32"], "scale_offset": None, "axis": None, "form": "dense"},  # a second update, summed
    ]
    tensors = {"0.a": rng.standard_normal((8, 2)), "0.b": rng.standard_normal((2, 6)),
               "1.a": rng.standard_normal((6, 3)) * 0.1, "1.b": rng.standard_normal((3, 36)) * 0.1,
               "2.delta": rng.standard_normal((5, 7)) * 0.01, "3.delta": rng.standard_normal((8, 6))}
    info = {"format": FORMAT, "version": VERSION, "name": "t.safetensors", "lora_sha256": "0" * 64, "naming": [],
            "bundle": {"unet": {"file": "unet.tflite", "sha256": "0" * 64}}, "targets": targets}
    path = tmp_path / "t.lorapack"
    save_file({k: v.astype(np.float32) for k, v in tensors.items()}, str(path), metadata={METADATA_KEY: json.dumps(info)})
    pack = read_pack(path)
    job = {"pack": {"bytes": base64.b64encode(path.read_bytes()).decode(),
                    "components": {"unet": base64.b64encode(blob).decode(), "text_encoder": ""},
                    "strengths": [0.7, -0.3]}}
    got = node_units(player_modules, job)["patched"]
    assert got["text_encoder"] is None
    ours = patched(blob, "unet", [(pack, 0.7), (pack, -0.3)])
    page = base64.b64decode(got["unet"])
    view = lambda data, what, dtype, n: np.frombuffer(data, dtype, n, offsets[what])  # noqa: E731
    np.testing.assert_allclose(view(page, "w32", np.float32, 48), view(ours, "w32", np.float32, 48), rtol=1e-6, atol=1e-6)
    assert view(page, "w32", np.float32, 48).tobytes() != w32.tobytes()
    half = np.abs(view(page, "w16", np.float16, w16.size).astype(np.float64) - view(ours, "w16", np.float16, w16.size))
    assert half.max() <= 2e-3  # the same, or one float16 step apart where the float32 sums round differently
    assert np.abs(view(page, "q8", np.int8, 35).astype(int) - view(ours, "q8", np.int8, 35)).max() <= 1
    np.testing.assert_allclose(view(page, "scales", np.float32, 5), view(ours, "scales", np.float32, 5), rtol=1e-6)
    zero = node_units(player_modules, {**job, "pack": {**job["pack"], "strengths": [0]}})["patched"]
    assert zero["unet"] is None


@needs_node
def test_player_sections_and_settings(player_modules, micro):
    """The player's choice of sampler section (the manifest's own, the tables', or an error) and its checks of a
    user's settings (seed, size, LoRA name and strength), in Node."""
    manifest = json.loads((micro / "manifest.json").read_text())
    schedules = json.loads((micro / "web" / "player.json").read_text())["schedules"]
    own = manifest["sampler"]
    asks = [[own["name"], own["steps"]], ["dpmpp_2m", 3], ["onestep", 4]]
    got = node_units(player_modules, {"sections": {"manifest": manifest, "schedules": schedules, "asks": asks}})
    assert got["sections"][0] == own and got["sections"][1] == schedules["dpmpp_2m"]["3"]
    assert got["sections"][2] == {"error": "sampler onestep with 4 steps is not offered for this bundle; choose one "
                                           "from the lists"}
    asks = [{"seed": 3}, {"seed": "-1"}, {"size": [64, 64]}, {"loras": {"nope": 1}}, {"loras": {"style": 1e3}},
            {"loras": {"style": 0.5}, "size": [32, 24], "guidance": 4}]
    got = node_units(player_modules, {"settings": {"manifest": manifest, "schedules": schedules,
                                                   "packs": {"style": {}}, "asks": asks}})["settings"]
    assert got[0]["seed"] == "3" and got[0]["size"] == [32, 24] and got[0]["section"] == own
    assert got[1]["error"].startswith("the seed must be a whole number")
    assert got[2]["error"] == "this bundle has no 64x64 size; it holds 24x32, 32x24"
    assert got[3]["error"] == 'no LoRA pack "nope" in this bundle'
    assert got[4]["error"].startswith("a LoRA strength is a number from -100 to 100")
    assert got[5]["loras"] == [["style", 0.5]] and got[5]["guidance"] == 4


@needs_litert
def test_bundles_over_the_browsers_limits_get_no_player(tmp_path_factory, tmp_path):
    """write_player refuses a bundle a page cannot hold (before npm), as the page does: a file over 2 GB, or a
    measured generation over LiteRT.js's 2 GiB WebAssembly memory; nothing written."""
    for field, value, message in (("bytes", 3 * 10**9, r"unet\.tflite is 3\.00 GB, more than a browser holds in one "
                                                        r"buffer"),
                                  ("memory", 3 * 10**9, r"needs about 3\.00 GB while it runs \(measured at export\)")):
        folder = shutil.copytree(session_bundle(tmp_path_factory), tmp_path / field)
        manifest = json.loads((folder / "manifest.json").read_text())
        if field == "bytes":
            manifest["components"]["unet"]["bytes"] = value
        else:
            manifest["memory"]["generation_peak_bytes"] = value
        (folder / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(WebPlayerError, match=message + r".*export a smaller bundle for the web: mobilediffusion export "
                                                           r"--precision int8_dynamic --web"):
            write_player(folder)
        assert not (folder / "web").exists() and not list(folder.glob(".web*"))


@needs_litert
def test_int8_a16_bundles_get_no_player(tmp_path_factory, tmp_path):
    """write_player refuses a bundle with int16 inputs/outputs (before npm), as the page would; nothing written."""
    from mobilediffusion.runtime.manifest import read_manifest

    folder = shutil.copytree(session_bundle(tmp_path_factory), tmp_path / "a16")
    as_int8_a16(folder)
    assert read_manifest(folder)["schema_version"] == 2  # a bundle the Python runtime reads
    with pytest.raises(WebPlayerError, match=r"cannot run this bundle: it was exported at precision int8_a16, and its "
                                             r"tensors unet sample \(int16\), .* export the bundle for the web at "
                                             r"precision fp16, or int8_dynamic"):
        write_player(folder)
    assert not (folder / "web").exists() and not list(folder.glob(".web*"))


def test_player_constants_follow_the_runtime():
    """The page reads the runtime's schema versions and names the runtime's samplers (bump both together)."""
    js = (PLAYER_DIR / "bundle.js").read_text()
    assert re.search(rf"export const SCHEMA_VERSION = {SCHEMA_VERSION};", js)
    readable = re.search(r"export const READABLE_SCHEMAS = (\[.*?\]);", js).group(1)
    assert json.loads(readable) == list(READABLE_SCHEMAS)
    limits = re.search(r"export const LIMITS = \{ heapBytes: 2 \*\* (\d+), fileBytes: 2 \*\* (\d+) \};", js)
    assert (2 ** int(limits.group(1)), 2 ** int(limits.group(2))) == (HEAP_BYTES, FILE_BYTES)
    types = re.search(r"export const TENSOR_TYPES = \{(.*?)\};", js).group(1)  # the page's and write_player's
    assert re.findall(r"(\w+): \w+Array", types) == list(TENSOR_TYPES)
    samplers = re.search(r"export const SAMPLERS = (\[.*?\]);", (PLAYER_DIR / "sampler.js").read_text()).group(1)
    assert json.loads(samplers) == list(SAMPLERS)


# --------------------------------------------------------------------------- CLI and errors
def test_no_node_is_a_clear_error(tmp_path, monkeypatch, capsys):
    """Without node/npm: the web player and `export --web` say what to install (export before loading a model)."""
    from mobilediffusion.cli import main
    from mobilediffusion.web import install

    monkeypatch.setenv("MOBILEDIFFUSION_CACHE", str(tmp_path / "cache"))  # nothing installed yet
    monkeypatch.setattr(install.shutil, "which", lambda name: None)
    with pytest.raises(WebPlayerError, match=r"needs Node\.js and npm .* node and npm was not found .*apt-get install "
                                             r"nodejs npm"):
        install.npm_ci(PLAYER_DIR, "web")
    assert main(["export", "-o", str(tmp_path / "b"), "--web", "-q"]) == 2
    assert "needs Node.js and npm" in capsys.readouterr().err and not (tmp_path / "b").exists()
    assert main(["export", "-o", str(tmp_path / "b"), "--web", "--components", "unet", "-q"]) == 2
    assert "--web runs the whole bundle" in capsys.readouterr().err and not (tmp_path / "b").exists()
    assert main(["export", "-o", str(tmp_path / "b"), "--web", "--precision", "int8_a16", "-q"]) == 2
    assert "cannot run int8_a16 bundles: their inputs and outputs are int16" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


@pytest.fixture
def export_node(plugin, tmp_path, monkeypatch):
    """Export TFLite Bundle as ComfyUI calls it, outside ComfyUI (./output/mobilediffusion), with the micro model."""
    import importlib

    from export_cases import micro_pipeline

    monkeypatch.chdir(tmp_path)
    common = importlib.import_module(f"{plugin.__name__}.nodes._common")
    pipe = micro_pipeline()
    handles = (common.UNetHandle(pipe.unet, pipe.config, "micro"), pipe.text_encoder,
               common.DecoderHandle(pipe.decoder, pipe.config.latent_scale, pipe.config.latent_shift, "micro"))
    node = importlib.import_module(f"{plugin.__name__}.nodes.export").ExportTFLiteBundle()
    args = dict(precision="fp32", width=0, height=0, steps=0, sampler_name="auto", cfg=0.0, batch_size=1,
                components="all", overwrite=False, make_zip=False)
    return lambda name, **kw: node.export(*handles, name, **{**args, **kw})


@needs_litert
def test_export_node_web_toggle_checks_first(plugin, export_node, tmp_path, monkeypatch):
    """web needs the whole bundle and node/npm: refused before any export work, nothing written."""
    import importlib

    errors = importlib.import_module(f"{plugin.__name__}.mobilediffusion.errors")
    spec = plugin.NODE_CLASS_MAPPINGS["ExportTFLiteBundle"].INPUT_TYPES()
    assert spec["optional"]["web"][0] == "BOOLEAN" and spec["optional"]["web"][1]["default"] is False
    with pytest.raises(errors.ConfigError, match="web player runs the whole bundle"):
        export_node("b", components="unet", web=True)
    with pytest.raises(errors.MobileDiffusionError, match="cannot run int8_a16 bundles"):
        export_node("b", precision="int8_a16", web=True)
    monkeypatch.setenv("MOBILEDIFFUSION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(errors.MobileDiffusionError, match="needs Node.js and npm"):
        export_node("b", web=True)
    assert not (tmp_path / "output").exists()


@needs_litert
@needs_node
def test_export_node_writes_the_player(plugin, export_node, tmp_path_factory, tmp_path, monkeypatch):
    """With web on, the bundle folder gets web/ and the summary says how to open it (the export itself is the
    session bundle, copied: the conversion is tested in test_export.py)."""
    import importlib

    session = session_bundle(tmp_path_factory)
    bundle_module = importlib.import_module(f"{plugin.__name__}.mobilediffusion.export.bundle")
    monkeypatch.setattr(bundle_module, "export_bundle",
                        lambda pipe, out_dir, *a, **kw: Path(shutil.copytree(session, out_dir)))
    out = export_node("with web", web=True)
    folder = tmp_path / "output" / "mobilediffusion" / "with web"
    assert (folder / "web" / "index.html").is_file() and (folder / "web" / "vendor" / "litertjs-core" / "wasm").is_dir()
    assert any(f"web player: {folder / 'web'}" in line and "serve-bundle" in line for line in out["ui"]["text"])


def test_serve_bundle_cli(tmp_path):
    """serve-bundle: 127.0.0.1 only, the wasm MIME type, COOP/COEP; a folder without a player is refused."""
    from mobilediffusion.cli import main

    bundle = tmp_path / "b"
    (bundle / "web" / "vendor").mkdir(parents=True)
    (bundle / "manifest.json").write_text("{}")
    (bundle / "web" / "index.html").write_text("<!doctype html>")
    (bundle / "web" / "vendor" / "x.wasm").write_bytes(b"\0asm")
    proc = subprocess.Popen([sys.executable, "-m", "mobilediffusion.cli", "serve-bundle", str(bundle), "--port", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"at (http://127\.0\.0\.1:\d+/web/) ", line).group(1)
        with urllib.request.urlopen(url + "vendor/x.wasm", timeout=10) as r:
            assert r.headers["Content-Type"] == "application/wasm" and r.read() == b"\0asm"
            assert r.headers["Cross-Origin-Opener-Policy"] == "same-origin"
            assert r.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    shutil.rmtree(bundle / "web")
    start = time.time()
    assert main(["serve-bundle", str(bundle), "--port", "0"]) == 2 and time.time() - start < 5
