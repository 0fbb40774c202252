"""The plugin inside the real ComfyUI (opt-in: set COMFYUI_DIR to a ComfyUI checkout).

    COMFYUI_DIR=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/comfy-venv/bin/python \
        python -m pytest tests/test_comfyui_integration.py -s

Starts ComfyUI on 127.0.0.1 with a temporary base directory: the plugin linked into
custom_nodes, tiny checkpoints in models/{mobilediffusion,checkpoints,vae_approx,loras}. Then checks
/object_info, queues every shipped API workflow (also on the placed checkpoints) and checks the
PNGs, sends bad prompts to see ComfyUI name the node, checks the bridge (From ComfyUI Model) against
ComfyUI's own model in ComfyUI's Python (tests/comfy/bridge_check.py), and runs a real queue: failing
prompts between good ones, an interrupt, repeated runs (server RSS) and switching models.
"""
import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from browser_cases import CHROMIUM, needs_chromium, needs_node, playwright_core

ROOT = Path(__file__).resolve().parent.parent
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not COMFYUI_DIR, reason="opt-in: set COMFYUI_DIR to a ComfyUI checkout to run it"),
]
API = ROOT / "workflows" / "api"


def _call(url, body=None, timeout=30):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _place_models(base: Path):
    """Tiny checkpoints in ComfyUI's model folders: native (with its lite encoder), SD1-layout single file,
    TAESD; and the workflows' pictures in input/."""
    from safetensors.torch import save_file

    from mobilediffusion.config import ModelConfig, UNetConfig
    from mobilediffusion.decoder import build_decoder
    from mobilediffusion.loading import load_encoder
    from mobilediffusion.pipeline import DEFAULT_WEIGHTS, build_pipeline, default_pipeline
    from mobilediffusion.presets import SD_TEXT, TAESD_DECODER, get_preset
    from mobilediffusion.weights.native import save_native
    from mobilediffusion.weights.single_file import save_single_file

    models = base / "models"
    for d in ("mobilediffusion", "checkpoints", "vae_approx", "loras", "controlnet"):
        (models / d).mkdir(parents=True, exist_ok=True)
    pipe = default_pipeline()
    save_native(models / "mobilediffusion" / "tiny.safetensors", pipe.config, pipe.unet, pipe.text_encoder,
                pipe.decoder, load_encoder(DEFAULT_WEIGHTS))
    (base / "input").mkdir(exist_ok=True)  # the pictures the img2img-from-image workflow loads
    for picture in (ROOT / "workflows" / "input").iterdir():  # (and the training images' folder)
        (shutil.copytree if picture.is_dir() else shutil.copy)(picture, base / "input" / picture.name)
    # an SD1.5-layout file that ComfyUI's own CheckpointLoaderSimple also accepts: 320 base channels,
    # 768 context, full-size CLIP ViT-L/14 text encoder, SD VAE decoder; only two UNet levels
    sd = get_preset("sd15")
    cfg = ModelConfig(family="sd1", text=SD_TEXT, decoder=sd.decoder, schedule=sd.schedule, unet=UNetConfig(
        block_out_channels=(320, 640), layers_per_block=(1, 1), attention=("full", "none"),
        transformer_depth=(1, 1), num_attention_heads=(8, 8), separable=(False, False)))
    for seed, name in ((1, "tiny-sd1"), (2, "tiny-sd1b")):  # two models to switch between
        save_single_file(build_pipeline(cfg, seed=seed), models / "checkpoints" / f"{name}.safetensors",
                         dtype=torch.float16)
    # the same with an SD VAE encoder (VAE Encode of the training workflow's images)
    from mobilediffusion.encoder import build_encoder
    from mobilediffusion.presets import SD_KL_ENCODER
    from mobilediffusion.weights.encoder_keys import LDM_KL_ENC
    from mobilediffusion.weights.single_file import single_file_tensors

    tensors = single_file_tensors(build_pipeline(cfg, seed=1))
    torch.manual_seed(4)
    for k, v in LDM_KL_ENC.reverse(build_encoder(SD_KL_ENCODER).state_dict()).items():
        tensors[k] = v[:, :, None, None] if ".attn_1." in k and v.ndim == 2 else v  # 1x1 convs in LDM
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(models / "checkpoints" / "tiny-sd1-train.safetensors"))
    # a ControlNet for it in the LDM layout ComfyUI's ControlNetLoader reads (random weights, zero convs too)
    from mobilediffusion.control.controlnet import ControlNet, ControlNetConfig
    from mobilediffusion.control.keys import ldm_controlnet_tensors

    torch.manual_seed(5)
    cn = ControlNet(ControlNetConfig(cfg.unet))
    with torch.no_grad():
        for p in cn.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    save_file(ldm_controlnet_tensors(cn), str(models / "controlnet" / "tiny-sd1-controlnet.safetensors"))
    bridge_check = _bridge_check_module()
    bridge_check.write_lora(models / "loras" / "lcm-lora-sdv1-5.safetensors", 768, 768, torch.Generator().manual_seed(7),
                            linear=False)
    taesd = build_decoder(TAESD_DECODER)
    save_file({k.removeprefix("layers."): v for k, v in taesd.state_dict().items()},
              str(models / "vae_approx" / "taesd_decoder.safetensors"))


def _bridge_check_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bridge_check", ROOT / "tests" / "comfy" / "bridge_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy")
    (base / "custom_nodes").mkdir()
    os.symlink(ROOT, base / "custom_nodes" / "ComfyUI-MobileDiffusion")
    _place_models(base)
    port = _free_port()
    log = open(base / "comfyui.log", "w")
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    proc = subprocess.Popen(
        [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
         "--base-directory", str(base), "--database-url", "sqlite:///:memory:"],
        cwd=COMFYUI_DIR, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(480):
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited: {(base / 'comfyui.log').read_text()[-3000:]}")
            try:
                if _call(url + "/system_stats", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("ComfyUI did not answer within 240 s")
        yield {"url": url, "base": base, "log": base / "comfyui.log", "pid": proc.pid}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def run(comfy, prompt, timeout=600):
    status, body = _call(comfy["url"] + "/prompt", {"prompt": prompt, "client_id": "pytest"})
    if status != 200:
        return {"http": status, **body}
    pid = body["prompt_id"]
    t0 = time.time()
    while time.time() - t0 < timeout:
        _, hist = _call(f"{comfy['url']}/history/{pid}")
        entry = hist.get(pid)
        if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
            entry["seconds"] = round(time.time() - t0, 2)
            return entry
        time.sleep(0.25)
    pytest.fail(f"prompt {pid} did not finish in {timeout} s")


def _pngs(comfy, entry):
    from PIL import Image

    out = []
    for node in entry["outputs"].values():
        for im in node.get("images", []):
            folder = comfy["base"] / ("output" if im["type"] == "output" else "temp")
            with Image.open(folder / im["subfolder"] / im["filename"]) as png:
                out.append(png.size)
    return out


# --------------------------------------------------------------------------- in ComfyUI's Python, before the server
# (first in the file: these load SD1.5-size models, so they run before the server fixture holds its own)
def _run_in_comfyui(script: str, work: Path) -> dict:
    """Run tests/comfy/<script> with ComfyUI's Python; the JSON object on its last line."""
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    r = subprocess.run([python, str(ROOT / "tests" / "comfy" / script), "--comfyui", COMFYUI_DIR, "--work", str(work)],
                       capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_bridge_equals_comfyui_model(tmp_path):
    """In ComfyUI's Python: an SD1.5- and an SD2-layout (v-prediction) checkpoint with a LoRA at 0.7 applied by
    ComfyUI's LoraLoader; the bridged UNet, x0, text (CLIPSetLastLayer -1 / -2; a short prompt and a long one with
    emphasis) and decoded image equal ComfyUI's."""
    results = _run_in_comfyui("bridge_check.py", tmp_path)
    print("\nbridge vs ComfyUI (fp32; relative error):")
    for family, row in results.items():
        errors = {k: v for k, v in row.items() if "rel_err" in k}
        print(f"  {family}: {row['prediction_type']}, {row['unet_name']}; "
              + ", ".join(f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}" for k, v in errors.items())
              + f"; long prompt {row['text_long_tokens']} tokens"
              + f"; bridge {row['bridge_s']} s, our loader {row['our_loader_s']} s, ComfyUI load {row['comfy_load_s']} s")
        assert all(isinstance(v, float) and v <= 1e-4 for v in errors.values()), row
        assert row["comfy_unchanged_rel_err"] == 0.0, row
        assert row["text_long_tokens"] == 3 * 77, row  # the long prompt is 3 chunks in ComfyUI too
    assert results["sd1"]["prediction_type"] == "epsilon" and results["sd2"]["prediction_type"] == "v_prediction"


def test_controls_and_masks_equal_comfyui(tmp_path):
    """In ComfyUI's Python, an SD1.5-layout checkpoint: a ControlNet and a T2I-Adapter loaded by ComfyUI and applied
    with ControlNetApplyAdvanced (0.8, 0.1-0.9): the MobileDiffusion Sampler's controlled x0 equals ComfyUI's
    apply_model with the same control (<= 1e-4) inside the window and the plain model outside it; strength 0
    leaves no control. A masked img2img keeps the known latents (as ComfyUI's KSampler does)."""
    results = _run_in_comfyui("control_check.py", tmp_path)
    print("\ncontrols vs ComfyUI (fp32; relative error of x0):")
    for kind in ("controlnet", "t2i"):
        row = results[kind]
        errors = {k: v for k, v in row.items() if k.endswith("_rel_err")}
        print(f"  {kind} ({row['comfy_class']}): " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
        assert all(v <= 1e-4 for v in errors.values()), row
        assert row["strength0_leaves_no_control"] and row["shared_chain"], row
        for sigma in ("2.5", "0.5"):  # inside 0.1-0.9: the control acts
            assert row[f"s0.8_sigma{sigma}_active"] and row[f"s0.8_sigma{sigma}_control_effect"] > 1e-3, row
        for sigma in ("13.0", "0.03"):  # outside: ComfyUI gives no control either
            assert not row[f"s0.8_sigma{sigma}_active"], row
    mask = results["mask"]
    print(f"  masked img2img: known latents max abs {mask['latent_known_max_abs']:.1e} (ComfyUI KSampler "
          f"{mask['comfy_latent_known_max_abs']:.1e}); decoded known region mean abs {mask['known_mean_abs']:.3f} "
          f"(ComfyUI KSampler {mask['comfy_ksampler_known_mean_abs']:.3f}: the SD VAE's mid-block attention spreads "
          f"the repainted latents), repainted {mask['repainted_mean_abs']:.3f}")
    assert mask["latent_known_max_abs"] <= 1e-4 and mask["repainted_mean_abs"] > 2 * mask["known_mean_abs"]
    assert mask["known_mean_abs"] <= 1.25 * mask["comfy_ksampler_known_mean_abs"] + 1 / 255


def test_nodes_are_listed_and_nothing_failed_to_import(comfy, plugin):
    status, info = _call(comfy["url"] + "/object_info")
    assert status == 200
    missing = set(plugin.NODE_CLASS_MAPPINGS) - set(info)
    assert not missing, f"not in /object_info: {missing}"
    assert "IMPORT FAILED" not in comfy["log"].read_text()
    choices = info["LoadMobileDiffusionModel"]["input"]["required"]["checkpoint"][0]
    assert {"mobilediffusion/tiny.safetensors", "checkpoints/tiny-sd1.safetensors"} <= set(choices)
    print("\nnodes:", ", ".join(sorted(plugin.NODE_CLASS_MAPPINGS)))


def _variants():
    """(label, workflow file, {node class: {input: value}}) for every shipped API workflow."""
    out = []
    for path in sorted(API.glob("*.json")):
        name = path.stem
        if name == "taesd_preview_sd15":
            out.append((name, path, {"CheckpointLoaderSimple": {"ckpt_name": "tiny-sd1.safetensors"},
                                     "LoadLiteDecoder": {"decoder_name": "vae_approx/taesd_decoder.safetensors"},
                                     "EmptyLatentImage": {"width": 256, "height": 256}, "KSampler": {"steps": 2}}))
        elif name == "export_bundle":
            out.append((name, path, {"ExportTFLiteBundle": {"name": "integration-test", "overwrite": True}}))
        elif name == "export_bundle_control":
            out.append((name, path, {"ExportTFLiteBundle": {"name": "integration-control", "overwrite": True}}))
        elif name == "export_bundle_lora":
            out.append((name, path, {"CheckpointLoaderSimple": {"ckpt_name": "tiny-sd1.safetensors"},
                                     "ExportTFLiteBundle": {"name": "integration-lora", "overwrite": True,
                                                            "width": 64, "height": 64, "precision": "fp32"}}))
            # the same graph's LoRA as a pack: the model exported without it (LoraLoader's merge subtracted)
            out.append((f"{name}@packs", path, {"CheckpointLoaderSimple": {"ckpt_name": "tiny-sd1.safetensors"},
                                                "ExportTFLiteBundle": {"name": "integration-lora-packs", "overwrite": True,
                                                                       "width": 64, "height": 64, "precision": "fp32",
                                                                       "prompt_chunks": 1, "loras_as_packs": True}}))
        elif name == "controlnet_sd15":
            out.append((name, path, {"CheckpointLoaderSimple": {"ckpt_name": "tiny-sd1.safetensors"},
                                     "ControlNetLoader": {"control_net_name": "tiny-sd1-controlnet.safetensors"},
                                     "MobileDiffusionSampler": {"width": 128, "height": 128, "steps": 3}}))
        elif name == "inpaint_sd15":
            out.append((name, path, {"CheckpointLoaderSimple": {"ckpt_name": "tiny-sd1.safetensors"},
                                     "MobileDiffusionSampler": {"steps": 3}}))
        elif name == "lcm_lora_sd15":
            out.append((name, path, {"CheckpointLoaderSimple": {"ckpt_name": "tiny-sd1.safetensors"},
                                     "MobileDiffusionSampler": {"width": 128, "height": 128}}))
        elif name == "train_onestep_lora_sd15":
            out.append((name, path, {"CheckpointLoaderSimple": {"ckpt_name": "tiny-sd1-train.safetensors"},
                                     "TrainMobileDiffusionLoRA": {"steps": 4, "batch_size": 2,
                                                                  "lora_name": "integration-onestep"}}))
        elif name.startswith("mobilediffusion_"):
            out.append((name, path, {}))
            out.append((f"{name}@native", path, {"LoadMobileDiffusionModel":
                                                 {"checkpoint": "mobilediffusion/tiny.safetensors"}}))
    out.append(("mobilediffusion_multi_step@sd1-single-file", API / "mobilediffusion_multi_step.json",
                {"LoadMobileDiffusionModel": {"checkpoint": "checkpoints/tiny-sd1.safetensors"},
                 "MobileDiffusionSampler": {"steps": 3, "width": 128, "height": 128}}))
    out.append(("mobilediffusion_one_step@int8", API / "mobilediffusion_one_step.json",  # the loader's int8 precision
                {"LoadMobileDiffusionModel": {"dtype": "int8"}}))
    return out


@pytest.mark.parametrize("label,path,changes", _variants(), ids=[v[0] for v in _variants()])
def test_workflow_runs_in_comfyui(comfy, label, path, changes):
    prompt = json.loads(path.read_text())
    for node in prompt.values():
        node["inputs"].update(changes.get(node["class_type"], {}))
    entry = run(comfy, prompt)
    assert entry.get("status", {}).get("status_str") == "success", json.dumps(entry)[:3000]
    if label.startswith("export_bundle"):  # an output node with a text summary, and a bundle folder
        text = "\n".join(t for node in entry["outputs"].values() for t in node.get("text", []))
        if "pip install" in text:  # ComfyUI's Python has no litert-torch: the node says how to get it
            print(f"\n{label}: success in {entry['seconds']} s, litert-torch missing: {text.strip()}")
            return
        name = changes["ExportTFLiteBundle"]["name"]
        bundle = comfy["base"] / "output" / "mobilediffusion" / name
        assert (bundle / "manifest.json").is_file(), text
        source = json.loads((bundle / "manifest.json").read_text()).get("source", {})
        if label == "export_bundle_lora":  # the LoRA and the checkpoint are recorded
            assert "tiny-sd1.safetensors" in json.dumps(source) and "lcm-lora-sdv1-5" in json.dumps(source), source
        if label == "export_bundle_lora@packs":  # the pack at the graph's strength draws what the baked bundle draws
            from mobilediffusion.runtime import BundlePipeline

            pack = bundle / "loras" / "lcm-lora-sdv1-5.lorapack"
            strength = json.loads((bundle / "loras" / "index.json").read_text())["packs"][0]
            baked = BundlePipeline(bundle.with_name("integration-lora"))("a photo of a cat", seed=3)
            plain = BundlePipeline(bundle)
            without = plain("a photo of a cat", seed=3)
            plain.set_loras([(pack, 1.0)])
            mse = float(np.mean((plain("a photo of a cat", seed=3) - baked) ** 2))
            value = 10 * np.log10(1 / mse) if mse else float("inf")
            print(f"\n{label}: {strength}; the pack at 1.0 vs the bundle with the LoRA baked in: PSNR {value:.1f} dB "
                  f"(without it: {10 * np.log10(1 / float(np.mean((without - baked) ** 2))):.1f} dB)")
            assert "loras_as_packs" in source and value >= 45
        if label == "export_bundle_control":
            _check_control_bundle(comfy, bundle)
        print(f"\n{label}: success in {entry['seconds']} s, {sorted(p.name for p in bundle.iterdir())}\n{text}"
              f"\nsource: {json.dumps(source)}")
        return
    sizes = _pngs(comfy, entry)
    assert sizes, "no image was written"
    if label == "train_onestep_lora_sd15":  # the LoRA is in models/loras (a loss graph is the image)
        text = "\n".join(t for node in entry["outputs"].values() for t in node.get("text", []))
        assert "integration-onestep" in text and list((comfy["base"] / "models" / "loras").glob(
            "integration-onestep*.safetensors")), text
    print(f"\n{label}: success in {entry['seconds']} s, images {sizes}")


def _check_control_bundle(comfy, bundle):
    """The bundle the export-with-control workflow wrote: the plugin and the encoder are components, the web player
    is there; Run TFLite Bundle in ComfyUI with the shipped scribble and with a picture + mask equals the runtime, and
    the object lands in the scribbled square."""
    from PIL import Image

    from mobilediffusion.runtime import BundlePipeline
    from mobilediffusion.train.control import iou, object_mask

    m = json.loads((bundle / "manifest.json").read_text())
    assert m["control"]["component"] == "adapter" and "encoder" in m["components"], list(m["components"])
    assert m["control"]["source"]["name"] == "shipped/md-shapes-scribble" and (bundle / "web" / "index.html").is_file()
    prompt = "a blue square on a white background"
    scribble = ROOT / "workflows" / "input" / "md_shapes_scribble.png"
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "md_shapes_scribble.png"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "md_shapes_inpaint.png"}},
        "3": {"class_type": "RunTFLiteBundle", "inputs": {
            "bundle": "output/integration-control", "prompt": prompt, "negative_prompt": "", "seed": 3,
            "control_image": ["1", 0], "control_strength": 1.0}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "integration/control"}},
        "5": {"class_type": "RunTFLiteBundle", "inputs": {
            "bundle": "output/integration-control", "prompt": prompt, "negative_prompt": "", "seed": 3,
            "image": ["2", 0], "mask": ["2", 1]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "integration/repaint"}},
    }
    entry = run(comfy, graph)
    assert entry.get("status", {}).get("status_str") == "success", json.dumps(entry)[:3000]
    files = {nid: comfy["base"] / "output" / e["images"][0].get("subfolder", "") / e["images"][0]["filename"]
             for nid, e in entry["outputs"].items()}
    pipe = BundlePipeline(bundle)
    got = np.asarray(Image.open(files["4"]).convert("RGB"), np.float64) / 255
    ref = pipe(prompt, seed=3, control_image=np.asarray(Image.open(scribble).convert("RGB")))[0]
    assert 10 * np.log10(1 / max(float(np.mean((got - np.round(ref * 255) / 255) ** 2)), 1e-12)) >= 45
    drawn = np.zeros((128, 128), bool)
    drawn[84:114, 88:118] = True  # the scribble's square
    placed = iou(object_mask((got * 255).round().astype(np.uint8)), drawn)
    with Image.open(ROOT / "workflows" / "input" / "md_shapes_inpaint.png") as im:
        rgba = np.asarray(im.convert("RGBA"), np.float32) / 255
    repaint = np.asarray(Image.open(files["6"]).convert("RGB"), np.float64) / 255
    ref = pipe(prompt, seed=3, image=rgba[..., :3], mask=1.0 - rgba[..., 3])[0]  # LoadImage's MASK: 1 - alpha
    value = 10 * np.log10(1 / max(float(np.mean((repaint - np.round(ref * 255) / 255) ** 2)), 1e-12))
    print(f"\nRun TFLite Bundle in ComfyUI: scribble -> object IoU {placed:.2f}; picture + mask vs runtime {value:.1f} dB")
    assert placed > 0.5 and value >= 45


# --------------------------------------------------------------------------- the graph editor
def _prompt_differences(got: dict, want: dict) -> list:
    """[(node id, class, input, editor's value, API twin's value)] where two API prompts differ."""
    out = [(k, None, "node", got.get(k, {}).get("class_type"), want.get(k, {}).get("class_type"))
           for k in sorted(set(got) ^ set(want))]
    for k in sorted(set(got) & set(want)):
        a, b = got[k], want[k]
        if a["class_type"] != b["class_type"]:
            out.append((k, b["class_type"], "class_type", a["class_type"], b["class_type"]))
            continue
        for name in sorted(set(a["inputs"]) | set(b["inputs"])):
            if a["inputs"].get(name, "<absent>") != b["inputs"].get(name, "<absent>"):
                out.append((k, b["class_type"], name, a["inputs"].get(name, "<absent>"), b["inputs"].get(name, "<absent>")))
    return out


@needs_node
@needs_chromium
def test_ui_workflows_in_the_graph_editor(comfy, tmp_path):
    """Every saved UI workflow loads in ComfyUI's graph editor (headless Chromium, as a user opens the file): no
    unknown node type, no error dialog, no page error. The prompt the editor would queue equals the workflow's
    API twin (same nodes, links and widget values; e.g. the seed's "control after generate" widget does not
    shift the values after it), and that prompt runs."""
    job = {"playwright": str(playwright_core()), "chromium": CHROMIUM, "url": comfy["url"], "timeout_ms": 120_000,
           "workflows": [{"name": p.name, "graph": json.loads(p.read_text())}
                         for p in sorted((ROOT / "workflows").glob("*.json"))],
           "screenshot": str(tmp_path / "editor.png")}
    r = subprocess.run(["node", str(ROOT / "tests" / "comfy" / "editor.mjs")], input=json.dumps(job),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    startup = [e for e in result["page_errors"] if e["during"] == "startup"]
    if startup:  # the editor's own start (its settings), before any workflow: reported, not ours
        print("\neditor page errors at its startup (before any workflow):", [e["text"][:200] for e in startup])
    assert not [e for e in result["page_errors"] if e["during"] != "startup"], result["page_errors"]
    changes = {path.name: c for label, path, c in _variants() if "@" not in label}
    differences = {}
    for wf in result["workflows"]:
        name = wf["name"]
        assert wf["error"] is None and not wf["unknown"] and not wf["dialogs"], wf
        twin = json.loads((API / name).read_text())
        differences[name] = _prompt_differences(wf["prompt"], twin)
        if differences[name]:
            continue
        for node in wf["prompt"].values():  # tiny models and sizes, as the API runs above
            node["inputs"].update(changes.get(name, {}).get(node["class_type"], {}))
        entry = run(comfy, wf["prompt"])
        assert entry.get("status", {}).get("status_str") == "success", json.dumps(entry)[:3000]
        print(f"\neditor: {name} loaded, {len(twin)} nodes equal to the API twin, queued: success in {entry['seconds']} s")
    if any(differences.values()):  # (node, class, input, the editor's value, the API twin's value)
        pytest.fail("the editor's prompts differ from the API twins:\n" + "\n".join(
            f"{name}: {d}" for name, diffs in differences.items() for d in diffs))
    if result["console_errors"]:
        print("editor console errors (not failures):", [(e["during"], e["text"][:200]) for e in result["console_errors"][:8]])


def test_bad_prompts_name_the_node(comfy):
    base = json.loads((API / "mobilediffusion_one_step.json").read_text())
    # 1. wrong type: a CONDITIONING into the UNet socket
    wrong = copy.deepcopy(base)
    wrong["4"]["inputs"]["unet"] = ["2", 0]
    r = run(comfy, wrong)
    assert r["http"] == 400 and "4" in r["node_errors"], r
    # 2. a missing required input
    missing = copy.deepcopy(base)
    del missing["4"]["inputs"]["positive"]
    r = run(comfy, missing)
    assert r["http"] == 400 and "4" in r["node_errors"], r
    # 3. a width the UNet cannot take: an execution error on that node, with the fix in the message
    odd = copy.deepcopy(base)
    odd["4"]["inputs"]["width"] = 200
    entry = run(comfy, odd)
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_id"] == "4" and "multiple of" in errors[0]["exception_message"], entry
    # 4. the server keeps running
    assert _call(comfy["url"] + "/system_stats")[0] == 200
    print("\nbad prompts: wrong type -> node_errors[4], missing input -> node_errors[4], "
          f"width 200 -> execution_error on node 4: {errors[0]['exception_message'].strip()}")


# --------------------------------------------------------------------------- a real queue
def _rss_mb(pid) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _one_step(seed=0):
    prompt = json.loads((API / "mobilediffusion_one_step.json").read_text())
    for node in prompt.values():
        if node["class_type"] == "MobileDiffusionSampler":
            node["inputs"]["seed"] = seed
    return prompt


def test_failing_prompts_between_good_ones(comfy):
    good, bad = _one_step(), _one_step()
    bad["4"]["inputs"]["width"] = 200  # fails at run time, on the sampler
    statuses = [run(comfy, p)["status"]["status_str"] for p in (good, bad, good, bad, bad, good)]
    assert statuses == ["success", "error", "success", "error", "error", "success"], statuses
    print(f"\nmixed queue: {statuses}")


def test_interrupt_stops_a_long_run(comfy):
    long = json.loads((API / "mobilediffusion_multi_step.json").read_text())
    for node in long.values():
        if node["class_type"] == "MobileDiffusionSampler":  # about a minute on 2 cores
            node["inputs"].update(steps=1000, seed=11, width=128, height=128)
    status, body = _call(comfy["url"] + "/prompt", {"prompt": long, "client_id": "pytest"})
    assert status == 200, body
    pid = body["prompt_id"]
    t0 = time.time()
    while not any(item[1] == pid for item in _call(comfy["url"] + "/queue")[1].get("queue_running", [])):
        assert time.time() - t0 < 60, "the long run did not start"
        time.sleep(0.1)
    time.sleep(2.0)  # into the sampling loop
    assert pid not in _call(f"{comfy['url']}/history/{pid}")[1], "the long run finished before the interrupt"
    t0 = time.time()
    _call(comfy["url"] + "/interrupt", {})
    while True:
        entry = _call(f"{comfy['url']}/history/{pid}")[1].get(pid)
        if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
            break
        assert time.time() - t0 < 30, "the run did not stop within 30 s of the interrupt"
        time.sleep(0.1)
    stopped = time.time() - t0
    kinds = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds, kinds
    assert stopped < 5.0, f"stopped {stopped:.1f} s after the interrupt"
    after = run(comfy, _one_step(seed=5))
    assert after["status"]["status_str"] == "success"
    print(f"\ninterrupt: a 1000-step run stopped {stopped:.2f} s after /interrupt; the next prompt succeeded")


def test_repeated_runs_do_not_grow_memory(comfy):
    for seed in range(3):  # warm-up: models loaded, caches filled
        assert run(comfy, _one_step(seed))["status"]["status_str"] == "success"
    warm = _rss_mb(comfy["pid"])
    for seed in range(3, 23):
        assert run(comfy, _one_step(seed))["status"]["status_str"] == "success"
    after = _rss_mb(comfy["pid"])
    print(f"\n20 one-step runs with changing seeds: server RSS {warm:.0f} MB after warm-up -> {after:.0f} MB "
          f"({100 * (after / warm - 1):+.1f}%)")
    assert after < 1.10 * warm


def test_switching_models_keeps_the_cache_bounded(comfy):
    """Loaded and bridged models share one cache (2 entries): cycling through four models (two checkpoints by our
    loader, the same two bridged from ComfyUI's loader with a LoRA) does not keep them all."""
    prompts = []
    for ckpt in ("tiny-sd1.safetensors", "tiny-sd1b.safetensors"):
        loaded = json.loads((API / "mobilediffusion_multi_step.json").read_text())
        bridged = json.loads((API / "lcm_lora_sd15.json").read_text())
        for node in list(loaded.values()) + list(bridged.values()):
            node["inputs"].update({"LoadMobileDiffusionModel": {"checkpoint": f"checkpoints/{ckpt}"},
                                   "CheckpointLoaderSimple": {"ckpt_name": ckpt},
                                   "MobileDiffusionSampler": {"steps": 1, "width": 64, "height": 64}}
                                  .get(node["class_type"], {}))
        prompts += [loaded, bridged]
    rss = []
    for round_ in range(int(os.environ.get("MD_SWITCH_ROUNDS", 3))):
        for p in prompts:
            entry = run(comfy, p)
            assert entry["status"]["status_str"] == "success", json.dumps(entry)[:2000]
        rss.append(_rss_mb(comfy["pid"]))
    print(f"\nswitching 2 checkpoints x (loaded, bridged + LoRA), {len(rss)} rounds: server RSS after each round "
          f"{', '.join(f'{r:.0f}' for r in rss)} MB")
    assert rss[-1] < 1.10 * rss[0], rss


def test_trained_lora_loads_in_comfyui_lora_loader(tmp_path):
    """In ComfyUI's Python: Train MobileDiffusion LoRA on ComfyUI's MODEL with LATENT + CONDITIONING from its own
    dataset and VAE Encode nodes; the file in models/loras maps every key in ComfyUI's LoraLoader and ComfyUI's
    patched UNet equals our pipeline with the same LoRA (<= 1e-4)."""
    row = _run_in_comfyui("train_check.py", tmp_path)
    print(f"\ntrainer in ComfyUI: {json.dumps(row)}")
    assert row["unused_keys"] == [] and row["comfy_patched_weights"] == row["lora_modules"] > 0, row
    assert row["rel_err"] <= 1e-4 and row["lora_effect"] > 1e-4, row
    assert row["steps"] == 6 and row["images"] == 8, row
