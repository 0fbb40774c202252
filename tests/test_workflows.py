"""Shipped workflows: valid node types, sockets and widget values; UI and API twins agree; each runs."""
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
UI = sorted((ROOT / "workflows").glob("*.json"))
API = ROOT / "workflows" / "api"
FILE_WIDGETS = {"checkpoint", "decoder_name", "encoder_name"}  # choices come from the model folders at run time
INPUT = ROOT / "workflows" / "input"  # pictures the workflows load (copy them to ComfyUI's input folder)
UI_ONLY = {"upload": "image"}  # widgets the editor saves but API prompts leave out: Load Image's upload button
FOLDERS = ("(embedded default)", "checkpoints/", "diffusers/", "mobilediffusion/", "vae_approx/")

# the ComfyUI core nodes the workflows use: widgets in order, input sockets, output types
CORE = {
    "SaveImage": (["filename_prefix"], {"images": "IMAGE"}, []),
    "LoadImage": (["image", "upload"], {}, ["IMAGE", "MASK"]),
    "PreviewImage": ([], {"images": "IMAGE"}, []),
    "CheckpointLoaderSimple": (["ckpt_name"], {}, ["MODEL", "CLIP", "VAE"]),
    "CLIPTextEncode": (["text"], {"clip": "CLIP"}, ["CONDITIONING"]),
    "EmptyLatentImage": (["width", "height", "batch_size"], {}, ["LATENT"]),
    "LoraLoader": (["lora_name", "strength_model", "strength_clip"], {"model": "MODEL", "clip": "CLIP"},
                   ["MODEL", "CLIP"]),
    "KSampler": (["seed", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
                 {"model": "MODEL", "positive": "CONDITIONING", "negative": "CONDITIONING", "latent_image": "LATENT"},
                 ["LATENT"]),
    "Canny": (["low_threshold", "high_threshold"], {"image": "IMAGE"}, ["IMAGE"]),
    "ControlNetLoader": (["control_net_name"], {}, ["CONTROL_NET"]),
    "ControlNetApplyAdvanced": (["strength", "start_percent", "end_percent"],
                                {"positive": "CONDITIONING", "negative": "CONDITIONING", "control_net": "CONTROL_NET",
                                 "image": "IMAGE", "vae": "VAE"}, ["CONDITIONING", "CONDITIONING"]),
    "VAEEncode": ([], {"pixels": "IMAGE", "vae": "VAE"}, ["LATENT"]),
    "SetLatentNoiseMask": ([], {"samples": "LATENT", "mask": "MASK"}, ["LATENT"]),
    "LoadImageTextSetFromFolderNode": (["folder", "resize_method", "width", "height"], {"clip": "CLIP"},
                                       ["IMAGE", "CONDITIONING"]),
    "LossGraphNode": (["filename_prefix"], {"loss": "LOSS_MAP"}, []),
}


def spec_of(plugin, node_type):
    """(widget specs {name: (kind, opts)} in order, sockets {name: type}, output types)."""
    if node_type in CORE:
        widgets, sockets, outs = CORE[node_type]
        return {w: (None, {}) for w in widgets}, sockets, outs
    cls = plugin.NODE_CLASS_MAPPINGS[node_type]
    widgets, sockets = {}, {}
    for section in ("required", "optional"):
        for name, (kind, *opts) in cls.INPUT_TYPES().get(section, {}).items():
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN"):
                widgets[name] = (kind, opts[0] if opts else {})
            else:
                sockets[name] = kind
    return widgets, sockets, list(cls.RETURN_TYPES)


def check_value(name, kind, opts, value):
    if name in FILE_WIDGETS:
        assert isinstance(value, str) and value.startswith(FOLDERS), f"{name}={value!r}"
    elif isinstance(kind, list):
        assert value in kind, f"{name}={value!r} not in {kind}"
    elif kind == "INT":
        assert isinstance(value, int) and opts.get("min", value) <= value <= opts.get("max", value), f"{name}={value}"
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and opts.get("min", value) <= value <= opts.get("max", value)
    elif kind == "STRING":
        assert isinstance(value, str)


def test_there_is_a_workflow_for_each_job():
    names = {p.stem for p in UI}
    assert {"mobilediffusion_one_step", "mobilediffusion_multi_step", "mobilediffusion_img2img",
            "mobilediffusion_img2img_from_image", "taesd_preview_sd15", "lcm_lora_sd15",
            "export_bundle_lora", "controlnet_sd15", "inpaint_sd15", "mobilediffusion_scribble_plugin",
            "export_bundle_control", "train_onestep_lora_sd15"} <= names
    assert names == {p.stem for p in API.glob("*.json")}  # every UI workflow has its API twin


@pytest.mark.parametrize("path", UI, ids=lambda p: p.stem)
def test_ui_workflow_is_valid_and_matches_its_api_twin(plugin, path):
    ui = json.loads(path.read_text())
    api = json.loads((API / path.name).read_text())
    nodes = {n["id"]: n for n in ui["nodes"]}
    links = {link[0]: link for link in ui["links"]}
    assert set(map(str, nodes)) == set(api)
    for nid, node in nodes.items():
        widgets, sockets, outs = spec_of(plugin, node["type"])
        twin = api[str(nid)]
        assert twin["class_type"] == node["type"]
        # widgets: in INPUT_TYPES order; the editor adds "control after generate" after a seed
        values = list(node["widgets_values"])
        for name, (kind, opts) in widgets.items():
            if name in UI_ONLY:
                assert values.pop(0) == UI_ONLY[name], f"{node['type']}.{name}"
                continue
            # every widget, optional ones too: the editor sends them all (tests/test_comfyui_integration.py
            # compares its prompt with the twin), so a twin that leaves one out is not what a user queues
            assert name in twin["inputs"] and values, f"{node['type']}.{name} is missing from the workflow"
            value = values.pop(0)
            assert value == twin["inputs"][name], f"{node['type']}.{name}"
            check_value(name, kind, opts, value)
            if name == "seed":
                assert values.pop(0) in ("fixed", "increment", "decrement", "randomize")
        assert values == [], f"{node['type']} has extra widget values {values}"
        # outputs as the node defines them, by slot index (older workflows may lack outputs added later:
        # the editor fills those in from the node definition)
        assert [o["type"] for o in node["outputs"]] == outs[:len(node["outputs"])], node["type"]
        # sockets: each link joins an output and an input of the same type, as in the API twin
        for slot in node["inputs"]:
            assert slot["name"] in sockets and slot["type"] == sockets[slot["name"]]
            if slot["link"] is None:
                assert slot["name"] not in twin["inputs"]
                continue
            _, src, src_slot, dst, _, kind = links[slot["link"]]
            assert dst == nid and kind == slot["type"] == spec_of(plugin, nodes[src]["type"])[2][src_slot]
            assert twin["inputs"][slot["name"]] == [str(src), src_slot]
        required = set(sockets) - {"latent_image", "vae", "control", "encoder"}  # (optional sockets)
        if node["type"] not in CORE:
            required &= set(plugin.NODE_CLASS_MAPPINGS[node["type"]].INPUT_TYPES()["required"])
        assert required <= set(twin["inputs"]), f"{node['type']} misses inputs {required - set(twin['inputs'])}"


def run_api(plugin, workflow, fakes):
    """Execute an API workflow with the node classes; `fakes` stand in for ComfyUI core nodes."""
    done = {}

    def value(nid):
        if nid not in done:
            node = workflow[nid]
            kwargs = {}
            for k, v in node["inputs"].items():
                kwargs[k] = value(v[0])[v[1]] if isinstance(v, list) else v
            t = node["class_type"]
            if t in fakes:
                done[nid] = fakes[t](**kwargs)
            else:
                cls = plugin.NODE_CLASS_MAPPINGS[t]
                done[nid] = getattr(cls(), cls.FUNCTION)(**kwargs)
        return done[nid]

    for nid in workflow:
        value(nid)
    return done


def _load_image(image):
    """ComfyUI's LoadImage for a picture in workflows/input: (IMAGE (1, H, W, 3) in [0, 1], MASK)."""
    import numpy as np
    from PIL import Image

    with Image.open(INPUT / image) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(rgb)[None], torch.zeros(1, *rgb.shape[:2])


def test_pictures_the_workflows_load_are_shipped():
    for path in UI:
        for node in json.loads(path.read_text())["nodes"]:
            if node["type"] == "LoadImage":
                assert (INPUT / node["widgets_values"][0]).is_file(), path.name
            if node["type"] == "LoadImageTextSetFromFolderNode":  # a folder of images, each with its caption
                folder = INPUT / node["widgets_values"][0]
                captions = sorted(p.stem for p in folder.glob("*.txt"))
                assert captions and captions == sorted(p.stem for p in folder.glob("*.png")), path.name


def _sink(store):
    def save(images, filename_prefix="preview"):
        store.append(images)
        return ()
    return save


@pytest.mark.parametrize("name", [p.stem for p in UI if p.stem.startswith("mobilediffusion_")])
def test_api_workflow_runs_on_the_tiny_model(plugin, name):
    images = []
    workflow = json.loads((API / f"{name}.json").read_text())
    done = run_api(plugin, workflow, {"SaveImage": _sink(images), "LoadImage": _load_image})
    assert len(images) == 1
    (image,) = images
    assert image.ndim == 4 and image.shape[-1] == 3 and 0 <= image.min() and image.max() <= 1
    for nid, node in workflow.items():
        if node["class_type"] == "LoadImage":  # img2img from the picture: its size, a changed image
            picture = done[nid][0]
            assert picture.shape == image.shape and not torch.equal(picture, image)


def test_taesd_preview_workflow_runs(plugin, tmp_path, monkeypatch):
    """ComfyUI's SD1.5 graph is faked up to its LATENT; our TAESD part runs for real."""
    from safetensors.torch import save_file

    md = plugin.mobilediffusion
    torch.manual_seed(0)
    taesd = md.decoder.build_decoder(md.presets.TAESD_DECODER)
    (tmp_path / "vae_approx").mkdir()
    save_file({k.removeprefix("layers."): v for k, v in taesd.state_dict().items()},
              str(tmp_path / "vae_approx" / "taesd_decoder.safetensors"))
    workflow = json.loads((API / "taesd_preview_sd15.json").read_text())
    for node in workflow.values():  # the file the user would have, here as .safetensors in a temp folder
        if node["class_type"] == "LoadLiteDecoder":
            node["inputs"]["decoder_name"] = str(tmp_path / "vae_approx" / "taesd_decoder.safetensors")
    images = []
    fakes = {
        "CheckpointLoaderSimple": lambda ckpt_name: ("model", "clip", "vae"),
        "CLIPTextEncode": lambda text, clip: ([[torch.zeros(1, 77, 768), {}]],),
        "EmptyLatentImage": lambda width, height, batch_size: ({"samples": torch.zeros(batch_size, 4, height // 8,
                                                                                       width // 8)},),
        "KSampler": lambda latent_image, **kw: ({"samples": torch.randn_like(latent_image["samples"]) * 5},),
        "PreviewImage": _sink(images),
    }
    run_api(plugin, workflow, fakes)
    assert images[0].shape == (1, 512, 512, 3)


def test_scribble_workflow_puts_the_object_where_it_is_drawn(plugin):
    """The shipped scribble (a square outline, bottom right) through the default's plugin: the object is there."""
    import importlib

    import numpy as np

    images = []
    run_api(plugin, json.loads((API / "mobilediffusion_scribble_plugin.json").read_text()),
            {"SaveImage": _sink(images), "LoadImage": _load_image})
    control = importlib.import_module(f"{plugin.__name__}.mobilediffusion.train.control")
    got = control.object_mask((images[0][0].numpy() * 255).round().astype(np.uint8))
    drawn = np.zeros((128, 128), bool)
    drawn[84:114, 88:118] = True  # the scribble's square
    assert control.iou(got, drawn) > 0.5
