"""The nodes called directly (no ComfyUI), as ComfyUI would call them."""
import importlib

import pytest
import torch

EMBEDDED = "(embedded default)"


@pytest.fixture(scope="module")
def nodes(plugin):
    return plugin.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def loaded(nodes):
    return nodes["LoadMobileDiffusionModel"]().load(EMBEDDED, "auto", "auto", "cpu")


def test_registry_is_complete(plugin, nodes):
    assert set(nodes) == set(plugin.NODE_DISPLAY_NAME_MAPPINGS)
    for name, cls in nodes.items():
        spec = cls.INPUT_TYPES()
        assert cls.CATEGORY == "MobileDiffusion"
        assert callable(getattr(cls(), cls.FUNCTION))
        for section in spec.values():
            for input_name, (kind, *opts) in section.items():
                if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING"):
                    assert opts and "tooltip" in opts[0] or input_name in ("dtype", "device", "height", "batch_size"), \
                        f"{name}.{input_name} has no tooltip"


def test_text_to_image_through_the_nodes(nodes, loaded):
    unet, clip, decoder, _ = loaded
    (pos,) = nodes["MobileDiffusionTextEncode"]().encode(clip, "a red circle in the top left")
    (neg,) = nodes["MobileDiffusionTextEncode"]().encode(clip, "")
    assert isinstance(pos, list) and pos[0][0].shape == (1, 77, clip.config.hidden_size) and pos[0][1] == {}
    (latent,) = nodes["MobileDiffusionSampler"]().sample(unet, pos, neg, 42, 0, 0.0, "auto", 64, 96, 2)
    samples = latent["samples"]
    f = unet.config.decoder.upscale
    assert samples.shape == (2, unet.config.latent_channels, 96 // f, 64 // f)
    (image,) = nodes["MobileDiffusionLiteDecode"]().decode(decoder, latent)
    assert image.shape == (2, 96, 64, 3) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    # the same seed gives the same latents; another seed does not
    (again,) = nodes["MobileDiffusionSampler"]().sample(unet, pos, neg, 42, 0, 0.0, "auto", 64, 96, 2)
    (other,) = nodes["MobileDiffusionSampler"]().sample(unet, pos, neg, 43, 0, 0.0, "auto", 64, 96, 2)
    assert torch.equal(samples, again["samples"]) and not torch.equal(samples, other["samples"])


def test_latent_is_raw_and_decodes_like_the_pipeline(plugin, nodes, loaded):
    """LATENT holds raw latents; Lite Decode turns them back into what the pipeline decodes."""
    unet, clip, decoder, _ = loaded
    pipe_mod = plugin.mobilediffusion.pipeline
    (pos,) = nodes["MobileDiffusionTextEncode"]().encode(clip, "a blue square")
    (latent,) = nodes["MobileDiffusionSampler"]().sample(unet, pos, pos, 1, 1, 1.0, "onestep", 64, 64, 1)
    direct = pipe_mod.sample_latents(unet.unet, unet.config, pos[0][0], steps=1, guidance=1.0, seed=1, height=64,
                                     width=64, sampler="onestep")
    cfg = unet.config
    assert torch.allclose(latent["samples"], direct / cfg.latent_scale + cfg.latent_shift)
    (image,) = nodes["MobileDiffusionLiteDecode"]().decode(decoder, latent)
    expected = decoder.decoder(direct).permute(0, 2, 3, 1)
    assert torch.allclose(image, expected, atol=1e-6)


def test_comfy_conditioning_nodes_work(nodes, loaded):
    """Combine (two entries), zero-out (zeros) and strength, as ComfyUI's own nodes produce them."""
    unet, clip, *_ = loaded
    (a,) = nodes["MobileDiffusionTextEncode"]().encode(clip, "a red circle")
    (b,) = nodes["MobileDiffusionTextEncode"]().encode(clip, "a green star")
    combined = a + b
    zero = [[torch.zeros_like(a[0][0]), {"pooled_output": None}]]
    s = nodes["MobileDiffusionSampler"]()
    (l1,) = s.sample(unet, combined, zero, 0, 2, 3.0, "ddim", 64, 64, 1)
    (l2,) = s.sample(unet, a, zero, 0, 2, 3.0, "ddim", 64, 64, 1)
    assert l1["samples"].shape == l2["samples"].shape and not torch.equal(l1["samples"], l2["samples"])


def test_model_is_cached_between_runs(nodes, loaded):
    again = nodes["LoadMobileDiffusionModel"]().load(EMBEDDED, "auto", "auto", "cpu")
    assert again[0].unet is loaded[0].unet and again[1] is loaded[1]


def test_img2img(nodes, loaded):
    unet, clip, *_ = loaded
    (pos,) = nodes["MobileDiffusionTextEncode"]().encode(clip, "a red circle")
    s = nodes["MobileDiffusionSampler"]()
    (base,) = s.sample(unet, pos, pos, 0, 1, 1.0, "onestep", 64, 64, 1)
    (edit,) = s.sample(unet, pos, pos, 5, 4, 1.0, "ddim", 512, 512, 3, latent_image=base, denoise=0.5)
    assert edit["samples"].shape == base["samples"].shape  # the input latent's size and batch win


def test_bad_inputs_name_the_fix(plugin, nodes, loaded):
    ConfigError = plugin.mobilediffusion.errors.ConfigError
    unet, clip, decoder, _ = loaded
    (pos,) = nodes["MobileDiffusionTextEncode"]().encode(clip, "x")
    s = nodes["MobileDiffusionSampler"]()
    with pytest.raises(ConfigError, match="multiple of"):
        s.sample(unet, pos, pos, 0, 1, 1.0, "auto", 100, 64, 1)
    wrong = {"samples": torch.zeros(1, 4, 8, 8)}
    with pytest.raises(ConfigError, match="4-channel latents but this UNet expects 8"):
        s.sample(unet, pos, pos, 0, 2, 1.0, "ddim", 64, 64, 1, latent_image=wrong, denoise=0.5)
    with pytest.raises(ConfigError, match="reads 8-channel latents"):
        nodes["MobileDiffusionLiteDecode"]().decode(decoder, wrong)
    with pytest.raises(ConfigError, match="not a CONDITIONING"):
        s.sample(unet, [["text"]], pos, 0, 1, 1.0, "auto", 64, 64, 1)
    with pytest.raises(plugin.mobilediffusion.errors.CheckpointError, match="not found"):
        nodes["LoadMobileDiffusionModel"]().load("checkpoints/missing.safetensors", "auto", "auto", "cpu")


def test_taesd_decodes_comfy_sd15_latents(plugin, nodes, tmp_path):
    """A raw SD1.5 LATENT (ComfyUI's KSampler) through a TAESD file: decoder(raw * 0.18215)."""
    from safetensors.torch import save_file

    md = plugin.mobilediffusion
    torch.manual_seed(0)
    ref = md.decoder.build_decoder(md.presets.TAESD_DECODER)
    state = {k.removeprefix("layers."): v for k, v in ref.state_dict().items()}  # taesd_decoder.pth naming
    path = tmp_path / "taesd_decoder.safetensors"
    save_file(state, str(path))
    (handle,) = nodes["LoadLiteDecoder"]().load(str(path), "auto", "cpu")
    raw = torch.randn(1, 4, 8, 8) * 5
    (image,) = nodes["MobileDiffusionLiteDecode"]().decode(handle, {"samples": raw})
    expected = ref(raw * 0.18215).permute(0, 2, 3, 1)
    assert image.shape == (1, 64, 64, 3) and torch.allclose(image, expected, atol=1e-6)


def test_out_of_memory_is_a_message_not_a_crash(plugin, nodes, monkeypatch):
    def too_big(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: you tried "
                           "to allocate 3435973836800 bytes.")

    monkeypatch.setattr(plugin.mobilediffusion.pipeline, "load_pipeline", too_big)
    with pytest.raises(plugin.mobilediffusion.errors.MobileDiffusionError, match="does not fit in cpu memory"):
        nodes["LoadMobileDiffusionModel"]().load(EMBEDDED, "auto", "bf16", "cpu")


def test_nodes_run_under_inference_mode_as_in_comfyui(nodes):
    """ComfyUI executes every node under torch.inference_mode: weights loaded there are inference tensors."""
    with torch.inference_mode():
        unet, clip, decoder, encoder = nodes["LoadMobileDiffusionModel"]().load(EMBEDDED, "auto", "bf16", "cpu")
    with torch.inference_mode():
        (pos,) = nodes["MobileDiffusionTextEncode"]().encode(clip, "a red circle in the top left")
        (latent,) = nodes["MobileDiffusionSampler"]().sample(unet, pos, pos, 0, 0, 0.0, "auto", 0, 0, 1)
        (image,) = nodes["MobileDiffusionLiteDecode"]().decode(decoder, latent)
        (again,) = nodes["MobileDiffusionLiteEncode"]().encode(encoder, image)
    assert image.shape[0] == 1 and torch.isfinite(image).all()
    assert again["samples"].shape == latent["samples"].shape and again["samples"].dtype == torch.float32


# --------------------------------------------------------------------------- confined paths
def _fake_bundle(folder):
    """A folder the nodes take for a bundle (listing and resolving look for manifest.json only)."""
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{}")
    return folder


@pytest.fixture
def bundle_tree(tmp_path, monkeypatch):
    """Outside ComfyUI the nodes use ./output/mobilediffusion and ./models/mobilediffusion: bundles, a zip,
    things that are not bundles, a partial export, and links leading inside and outside the folder."""
    import os
    import zipfile

    monkeypatch.chdir(tmp_path)
    out, models = tmp_path / "output" / "mobilediffusion", tmp_path / "models" / "mobilediffusion"
    _fake_bundle(out / "b1")
    _fake_bundle(models / "m1")
    _fake_bundle(out / ".b2.partial-1234")
    (out / "not-a-bundle").mkdir()
    (models / "model.safetensors").write_bytes(b"")
    with zipfile.ZipFile(models / "z.zip", "w") as zf:
        zf.writestr("z/manifest.json", "{}")
    (models / "other.zip").write_bytes(b"not a zip")
    outside = _fake_bundle(tmp_path / "elsewhere")
    os.symlink(outside, out / "link-out")
    os.symlink(out / "b1", out / "link-in")
    return tmp_path


def test_run_bundle_offers_the_bundles_of_the_two_folders(plugin, nodes, bundle_tree):
    import os

    bundles = plugin.nodes.bundles
    choices = nodes["RunTFLiteBundle"].INPUT_TYPES()["required"]["bundle"][0]
    assert choices == ["output/b1", "output/link-in", "models/m1", "models/z.zip"]
    out = bundle_tree / "output" / "mobilediffusion"
    assert bundles.resolve_bundle("output/b1") == os.path.realpath(out / "b1")
    assert bundles.resolve_bundle("output/link-in") == os.path.realpath(out / "b1")
    models = bundle_tree / "models" / "mobilediffusion"
    assert bundles.resolve_bundle("models/z.zip") == os.path.realpath(models / "z.zip")


@pytest.mark.parametrize("choice,message", [
    ("/abs/elsewhere", "is not a bundle name from the list"),
    ("ABS", "is not a bundle name from the list"),  # the absolute path of a real bundle outside the folders
    ("elsewhere", "is not a bundle name from the list"),  # no folder prefix
    ("../elsewhere", "is not a bundle name from the list"),
    ("output/../../elsewhere", "is not a bundle name from the list"),
    ("output/b1/../../../elsewhere", "is not a bundle name from the list"),
    ("output/..", "is not a bundle name from the list"),
    ("other/b1", "is not a bundle name from the list"),
    ("output/.b2.partial-1234", "is not a bundle name from the list"),
    ("output/link-out", r"is a link to .*elsewhere, outside"),
    ("output/not-a-bundle", "is not a bundle"),
    ("models/nothing", "was not found"),
])
def test_run_bundle_refuses_names_outside_the_folders(plugin, nodes, bundle_tree, choice, message):
    if choice == "ABS":
        choice = str(bundle_tree / "elsewhere")
    with pytest.raises(plugin.mobilediffusion.errors.ConfigError, match=message):
        nodes["RunTFLiteBundle"]().run(choice, "x", "", 0)


@pytest.fixture
def comfy_folders(tmp_path, monkeypatch):
    """A stand-in for ComfyUI's folder_paths: output folder, models/mobilediffusion (+ an extra model path),
    checkpoints and diffusers folders."""
    import os
    import sys
    import types

    base = tmp_path / "comfy"
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(base / "models")
    fp.folder_names_and_paths = {
        "mobilediffusion": ([str(base / "models" / "mobilediffusion"), str(base / "extra")], {".safetensors"}),
        "checkpoints": ([str(base / "models" / "checkpoints")], {".safetensors"}),
        "diffusers": ([str(base / "models" / "diffusers")], set()),
    }
    fp.get_output_directory = lambda: str(base / "output")
    fp.get_folder_paths = lambda name: fp.folder_names_and_paths[name][0]

    def get_full_path(folder, name):  # as ComfyUI's: the name is normalised under the folder, files only
        name = os.path.relpath(os.path.join("/", name), "/")
        for d in fp.folder_names_and_paths[folder][0]:
            if os.path.isfile(os.path.join(d, name)):
                return os.path.join(d, name)
        return None

    fp.get_full_path = get_full_path
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    return base


def test_inside_comfyui_bundles_and_models_resolve_only_in_their_folders(plugin, nodes, comfy_folders, tmp_path):
    errors = plugin.mobilediffusion.errors
    resolve = plugin.nodes._common.resolve
    _fake_bundle(comfy_folders / "output" / "mobilediffusion" / "b1")
    _fake_bundle(comfy_folders / "extra" / "b2")
    choices = nodes["RunTFLiteBundle"].INPUT_TYPES()["required"]["bundle"][0]
    assert choices == ["output/b1", "models/b2"]
    assert plugin.nodes.bundles.resolve_bundle("models/b2").endswith("extra/b2")
    # the model loaders: names in the model folders only, no path taken as is
    (comfy_folders / "models" / "checkpoints").mkdir(parents=True)
    (comfy_folders / "models" / "checkpoints" / "x.safetensors").write_bytes(b"")
    (comfy_folders / "models" / "diffusers").mkdir(parents=True)
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"")
    assert resolve("checkpoints/x.safetensors") == str(comfy_folders / "models" / "checkpoints" / "x.safetensors")
    for choice in (str(secret), "checkpoints/../../../secret.safetensors", "diffusers/../../..", "diffusers/.."):
        with pytest.raises(errors.CheckpointError, match="was not found in ComfyUI's models folders"):
            resolve(choice)


# --------------------------------------------------------------------------- image -> latent (Lite Encode)
def _scene_image(n=2):
    """IMAGE (n, 128, 128, 3) float in [0, 1]: scenes like the embedded default was trained on, as Load Image gives."""
    import numpy as np

    from mobilediffusion.train.data import SceneConfig, SyntheticScenes

    data = SyntheticScenes(SceneConfig(resolution=128), "heldout", length=n)
    return torch.from_numpy(np.stack([data[i].image for i in range(n)])).float() / 255


def test_loader_gives_the_encoder_after_the_three_stages(nodes, loaded):
    cls = nodes["LoadMobileDiffusionModel"]
    assert cls.RETURN_TYPES[:3] == ("MD_UNET", "MD_CLIP", "MD_DECODER")  # saved workflows link by slot index
    assert cls.RETURN_TYPES[3] == "MD_ENCODER" and len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS) == 4
    unet, _, decoder, encoder = loaded
    assert encoder.encoder.config.latent_channels == unet.config.latent_channels
    assert (encoder.latent_scale, encoder.latent_shift) == (decoder.latent_scale, decoder.latent_shift)


def test_lite_encode_then_decode_round_trips(nodes, loaded):
    """Lite Encode writes raw latents (sampler latents / scale + shift); Lite Decode reads them back."""
    import math

    _, _, decoder, encoder = loaded
    image = _scene_image()
    (latent,) = nodes["MobileDiffusionLiteEncode"]().encode(encoder, image)
    raw = latent["samples"]
    with torch.no_grad():
        direct = encoder.encoder(image.permute(0, 3, 1, 2))
    assert raw.shape == (2, 8, 16, 16) and torch.allclose(raw, direct / encoder.latent_scale + encoder.latent_shift)
    (back,) = nodes["MobileDiffusionLiteDecode"]().decode(decoder, latent)
    psnr = 10 * math.log10(1 / ((back - image) ** 2).mean().item())
    assert back.shape == image.shape and psnr > 30, psnr
    # an alpha channel (Load Image of an RGBA png keeps 3, other nodes may not) is dropped, as VAEEncode does
    rgba = torch.cat([image, torch.ones_like(image[..., :1])], dim=-1)
    assert torch.equal(nodes["MobileDiffusionLiteEncode"]().encode(encoder, rgba)[0]["samples"], raw)


def test_img2img_from_a_picture(nodes, loaded):
    """Load Image -> Lite Encode -> Sampler (denoise < 1) keeps the picture; denoise 1 ignores it."""
    unet, clip, decoder, encoder = loaded
    image = _scene_image(1)
    (latent,) = nodes["MobileDiffusionLiteEncode"]().encode(encoder, image)
    (pos,) = nodes["MobileDiffusionTextEncode"]().encode(clip, "a blue circle in the top left on a white background")
    s = nodes["MobileDiffusionSampler"]()
    outs = {d: s.sample(unet, pos, pos, 3, 4, 1.0, "ddim", 0, 0, 1, latent_image=latent, denoise=d)[0]["samples"]
            for d in (0.3, 1.0)}
    assert outs[0.3].shape == latent["samples"].shape
    near, far = ((outs[d] - latent["samples"]).norm() for d in (0.3, 1.0))
    assert near < far  # less re-noising stays closer to the encoded picture


def test_encoder_loader_and_the_comfyui_latent_convention(plugin, nodes, tmp_path):
    """A taesd_encoder from models/vae_approx: LATENT = taesd_encoder(x) / 0.18215, as ComfyUI's TAESD VAE
    encodes (raw = taesd_encoder(x) / vae_scale + vae_shift), so ComfyUI's VAEDecode reads it."""
    from safetensors.torch import save_file

    md = plugin.mobilediffusion
    torch.manual_seed(0)
    ref = md.encoder.build_encoder(md.presets.TAESD_ENCODER)
    path = tmp_path / "taesd_encoder.safetensors"
    save_file({k.removeprefix("layers."): v for k, v in ref.state_dict().items()}, str(path))
    (handle,) = nodes["LoadLiteEncoder"]().load(str(path), "auto", "cpu")
    assert (handle.latent_scale, handle.latent_shift) == (0.18215, 0.0)
    image = torch.rand(1, 32, 48, 3)
    (latent,) = nodes["MobileDiffusionLiteEncode"]().encode(handle, image)
    with torch.no_grad():
        expected = ref(image.permute(0, 3, 1, 2)) / 0.18215
    assert latent["samples"].shape == (1, 4, 4, 6) and torch.allclose(latent["samples"], expected, atol=1e-6)
    assert nodes["LoadLiteEncoder"]().load(str(path), "auto", "cpu")[0].encoder is handle.encoder  # cached


def test_encode_bad_inputs_name_the_fix(plugin, nodes, loaded, tmp_path):
    from mobilediffusion.loading import load_decoder, load_model_config, load_text_encoder, load_unet
    from mobilediffusion.pipeline import DEFAULT_WEIGHTS
    from mobilediffusion.weights.native import save_native

    ConfigError = plugin.mobilediffusion.errors.ConfigError
    *_, encoder = loaded
    encode = nodes["MobileDiffusionLiteEncode"]().encode
    with pytest.raises(ConfigError, match=r"multiples of 8 .* got 62x64 .* 56x64 or 64x64"):
        encode(encoder, torch.rand(1, 62, 64, 3))
    with pytest.raises(ConfigError, match=r"\(batch, height, width, 3\)"):
        encode(encoder, torch.rand(64, 64, 3))
    # a checkpoint without an encoder still loads; its encoder output says what to do when used
    m = DEFAULT_WEIGHTS
    path = save_native(tmp_path / "no-encoder.safetensors", load_model_config(m), load_unet(m), load_text_encoder(m),
                       load_decoder(m))
    *stages, none = nodes["LoadMobileDiffusionModel"]().load(str(path), "auto", "auto", "cpu")
    assert none.encoder is None and all(stages)
    with pytest.raises(ConfigError, match="has no image encoder.*Load Lite Encoder"):
        encode(none, torch.rand(1, 64, 64, 3))


# --------------------------------------------------------------------------- what ComfyUI's own nodes put in the graph
class _ComfyControl:
    """Stands in for ComfyUI's ControlNet / T2IAdapter objects as ControlNetApplyAdvanced leaves them (the fields
    nodes/comfy_reader.control_chain reads): the control model (its state_dict in ComfyUI's names), the image,
    strength, percent range and the previous control in the chain."""

    def __init__(self, module, hint, strength, start_end=(0.0, 1.0), previous=None, kind="control_model"):
        import types

        setattr(self, kind, module)
        self.cond_hint_original, self.strength, self.timestep_percent_range = hint, strength, start_end
        self.previous_controlnet, self.global_average_pooling = previous, False
        self.strength_type, self.extra_args = types.SimpleNamespace(name="CONSTANT"), {}
        self.extra_conds = ["y"] if kind == "control_model" else []  # (ComfyUI's ControlNet default)


class _Named(torch.nn.Module):
    """A module whose state_dict is the given tensors (ComfyUI's control models keep LDM / TencentARC names)."""

    def __init__(self, state):
        super().__init__()
        self._state = state

    def state_dict(self, *a, **k):
        return dict(self._state)


def _md(plugin, name):
    """The plugin's own copy of mobilediffusion.<name> (ComfyUI imports the package under the plugin's name)."""
    import importlib

    return importlib.import_module(f"{plugin.__name__}.mobilediffusion.{name}")


def _plugin_module(plugin, name):
    import importlib

    return importlib.import_module(f"{plugin.__name__}.{name}")


@pytest.fixture(scope="module")
def sd_handle(plugin, tmp_path_factory):
    """An SD-layout MD_UNET (a tiny diffusers folder) and a ControlNet + T2I-Adapter for it in ComfyUI's names."""
    diffusers = pytest.importorskip("diffusers")
    from test_pipeline_diffusers import _perturb, make_sd_folder

    folder = tmp_path_factory.mktemp("sd")
    ref = make_sd_folder(folder, diffusers.EulerDiscreteScheduler)
    pipe = _md(plugin, "pipeline").load_pipeline(folder)
    handle = _plugin_module(plugin, "nodes._common").UNetHandle(pipe.unet, pipe.config, "tiny-sd")
    torch.manual_seed(3)
    cn_dir = folder / "cn"
    _perturb(diffusers.ControlNetModel.from_unet(ref.unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
             ).save_pretrained(cn_dir)
    ours = _md(plugin, "control.load").load_control(cn_dir, base=pipe.unet)
    ldm = _md(plugin, "control.keys").ldm_controlnet_keymap(ours.control_config, prefix="").reverse(ours.state_dict())
    ad_dir = folder / "ad"
    _perturb(diffusers.T2IAdapter(in_channels=3, channels=[32, 64], num_res_blocks=2, downscale_factor=8)
             ).save_pretrained(ad_dir)
    adapter = _md(plugin, "control.load").load_control(ad_dir)
    return handle, pipe, ours, ldm, adapter


def test_sampler_runs_comfyui_controls(plugin, nodes, sd_handle):
    """A ControlNet chained after a T2I-Adapter (ControlNetApplyAdvanced, strength 0.8, 0.1-0.9) on both sides:
    the node's latents equal sample_latents with the same controls; ComfyUI's old ControlNetApply
    (control_apply_to_uncond) reaches the negative side; what we do not run is refused by name."""
    handle, pipe, ours, ldm, adapter = sd_handle
    ad_state = adapter.state_dict()  # (diffusers-named: our loader reads them like ComfyUI's renamed ones)
    ad_state = {"adapter." + k.replace("levels.", "body."): v for k, v in ad_state.items()}
    hint = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    first = _ComfyControl(_Named(ad_state), hint, 0.6, kind="t2i_model")
    chain = _ComfyControl(_Named(ldm), hint, 0.8, (0.1, 0.9), previous=first)
    ctx, neg = pipe.encode_prompt(["a red circle"]), pipe.encode_prompt(["blurry"])
    positive = [[ctx, {"control": chain, "control_apply_to_uncond": False}]]
    negative = [[neg, {"control": chain, "control_apply_to_uncond": False}]]
    sampler = nodes["MobileDiffusionSampler"]()
    (got,) = sampler.sample(handle, positive, negative, 5, 3, 4.0, "euler", 64, 64, 1)
    Control = _md(plugin, "control.apply").Control
    want = _md(plugin, "pipeline").sample_latents(pipe.unet, pipe.config, ctx, neg, steps=3, guidance=4.0, seed=5, height=64,
                                      width=64, sampler="euler",
                                      control=[Control(adapter, hint, 0.6), Control(ours, hint, 0.8, 0.1, 0.9)])
    raw = handle.to_raw(want)  # (the random model's latents run to the hundreds: compared by relative norm)
    assert ((got["samples"] - raw).norm() / raw.norm()).item() <= 1e-5  # measured 2.3e-6 (the node's fast path)
    (plain,) = sampler.sample(handle, [[ctx, {}]], [[neg, {}]], 5, 3, 4.0, "euler", 64, 64, 1)
    assert (plain["samples"] - got["samples"]).abs().mean() > 1e-3
    # ControlNetApply (old): the positive's control with control_apply_to_uncond reaches the negative
    (old,) = sampler.sample(handle, [[ctx, {"control": chain, "control_apply_to_uncond": True}]], [[neg, {}]], 5, 3,
                            4.0, "euler", 64, 64, 1)
    torch.testing.assert_close(old["samples"], got["samples"], rtol=0, atol=1e-5)
    # only the positive side controlled: differs from both
    (one,) = sampler.sample(handle, positive, [[neg, {}]], 5, 3, 4.0, "euler", 64, 64, 1)
    assert (one["samples"] - got["samples"]).abs().mean() > 1e-4
    # refused by name
    ConfigError = _md(plugin, "errors").ConfigError

    class ControlLora(_ComfyControl):
        pass

    for bad, message in ((ControlLora(_Named(ldm), hint, 1.0), "Control-LoRA"),
                         (_ComfyControl(None, hint, 1.0), "no model or no image"),
                         (_ComfyControl(_Named({"control_add_embedding.linear_1.weight": torch.zeros(2)}), hint,
                                        1.0), "union ControlNet")):
        with pytest.raises(ConfigError, match=message):
            sampler.sample(handle, [[ctx, {"control": bad}]], [[neg, {}]], 5, 1, 4.0, "euler", 64, 64, 1)
    with pytest.raises(ConfigError, match="different ControlNets"):
        sampler.sample(handle, positive + [[ctx, {}]], negative, 5, 1, 4.0, "euler", 64, 64, 1)


def test_sampler_keeps_what_the_noise_mask_keeps(plugin, nodes, sd_handle):
    """A LATENT with ComfyUI's noise_mask (Set Latent Noise Mask, pixel size): the known region's latents come back
    (to float rounding) and the masked region is repainted."""
    handle, pipe, *_ = sd_handle
    ctx = pipe.encode_prompt(["a red circle"])
    raw = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1.0
    (out,) = nodes["MobileDiffusionSampler"]().sample(handle, [[ctx, {}]], [[ctx, {}]], 3, 3, 1.0, "euler", 64, 64,
                                                       1, {"samples": raw, "noise_mask": mask}, 1.0)
    small = torch.nn.functional.interpolate(mask[:, None], size=(8, 8), mode="bilinear")
    keep = (small == 0).expand_as(raw)
    torch.testing.assert_close(out["samples"][keep], raw[keep], rtol=0, atol=1e-4)
    assert (out["samples"] - raw)[(small == 1).expand_as(raw)].abs().mean() > 1e-2


def test_sampler_feeds_inpainting_unets_comfyuis_concat(plugin, nodes, tmp_path):
    """A 9-channel inpainting UNet with InpaintModelConditioning's concat_latent_image / concat_mask in the positive
    CONDITIONING: the node gives the UNet round(mask) and the image latents in sampler space (ComfyUI's
    concat_cond), equal to sample_latents with that concat; without it the node says what to connect."""
    diffusers = pytest.importorskip("diffusers")
    from test_pipeline_diffusers import _perturb, make_sd_folder

    ref = make_sd_folder(tmp_path / "base", diffusers.EulerDiscreteScheduler)
    torch.manual_seed(1)
    unet9 = _perturb(diffusers.UNet2DConditionModel(**{**ref.unet.config, "in_channels": 9}))
    diffusers.StableDiffusionInpaintPipeline(**{**ref.components, "unet": unet9}, requires_safety_checker=False
                                             ).save_pretrained(tmp_path / "inpaint")
    pipe = _md(plugin, "pipeline").load_pipeline(tmp_path / "inpaint")
    handle = _plugin_module(plugin, "nodes._common").UNetHandle(pipe.unet, pipe.config, "tiny-inpaint")
    ctx = pipe.encode_prompt(["a red circle"])
    g = torch.Generator().manual_seed(4)
    raw = torch.randn(1, 4, 8, 8, generator=g)  # VAE Encode's raw latents
    mask = torch.zeros(1, 64, 64)
    mask[:, 8:40, 16:56] = 1.0
    cond = [[ctx, {"concat_latent_image": raw, "concat_mask": mask}]]
    (out,) = nodes["MobileDiffusionSampler"]().sample(handle, cond, [[ctx, {"concat_latent_image": raw,
                                                                             "concat_mask": mask}]], 3, 2, 1.0,
                                                       "euler", 64, 64, 1)
    small = torch.nn.functional.interpolate(mask[:, None], size=(8, 8), mode="bilinear").round()
    concat = torch.cat([small, handle.to_sampler_space(raw)], dim=1)
    want = _md(plugin, "pipeline").sample_latents(pipe.unet, pipe.config, ctx, steps=2, guidance=1.0, seed=3,
                                                  height=64, width=64, sampler="euler", concat=concat)
    torch.testing.assert_close(out["samples"], handle.to_raw(want), rtol=0, atol=1e-5)
    with pytest.raises(_md(plugin, "errors").ConfigError, match="InpaintModelConditioning"):
        nodes["MobileDiffusionSampler"]().sample(handle, [[ctx, {}]], [[ctx, {}]], 3, 2, 1.0, "euler", 64, 64, 1)


def test_md_control_nodes_place_the_object(plugin, nodes, loaded):
    """Load MobileDiffusion Control (the shipped plugin) -> Apply MobileDiffusion Control -> Sampler: the latents
    equal sample_latents with the plugin (both sides, window and strength), and the object sits on the edge map."""
    unet, clip, decoder, _ = loaded
    (control,) = nodes["LoadMobileDiffusionControl"]().load(unet, "shipped/md-shapes-scribble")
    data = importlib.import_module(f"{plugin.__name__}.mobilediffusion.train.data")
    plugin_train = importlib.import_module(f"{plugin.__name__}.mobilediffusion.train.control")
    scene = data.render(data.Scene("green", "circle", "top right"), data.SceneConfig(resolution=128))
    edges = torch.from_numpy(plugin_train.edge_hint(scene, 1))[None, :, :, None].expand(-1, -1, -1, 3)  # IMAGE
    (pos,) = nodes["MobileDiffusionTextEncode"]().encode(clip, "a green circle on a white background")
    (neg,) = nodes["MobileDiffusionTextEncode"]().encode(clip, "")
    apply = nodes["MobileDiffusionApplyControl"]()
    cpos, cneg = apply.apply(pos, neg, control, edges, 0.9, 0.0, 1.0)
    assert pos[0][1] == {} and len(cpos[0][1]["md_control"]) == 1  # the input CONDITIONING is not changed
    sampler = nodes["MobileDiffusionSampler"]()
    (got,) = sampler.sample(unet, cpos, cneg, 7, 0, 0.0, "auto", 128, 128, 1)
    Control = _md(plugin, "control.apply").Control
    want = _md(plugin, "pipeline").sample_latents(
        unet.unet, unet.config, pos[0][0], neg[0][0], steps=1, guidance=1.0, seed=7, height=128, width=128,
        sampler="onestep", control=[Control(control.model, edges.permute(0, 3, 1, 2), 0.9)])
    raw = unet.to_raw(want)
    torch.testing.assert_close(got["samples"], raw, rtol=0, atol=1e-4)
    assert ((got["samples"] - raw).norm() / raw.norm()).item() <= 1e-5  # measured 2.3e-7 (the node's fast-path copy)
    (image,) = nodes["MobileDiffusionLiteDecode"]().decode(decoder, got)
    mask = plugin_train.object_mask((image[0].numpy() * 255).round().astype("uint8"))
    truth = plugin_train.object_mask(scene)
    assert (mask & truth).sum() / (mask | truth).sum() > 0.5
    # strength 0 is no control; start > end and a non-image are refused on the node
    assert apply.apply(pos, neg, control, edges, 0.0, 0.0, 1.0) == (pos, neg)
    ConfigError = _md(plugin, "errors").ConfigError
    with pytest.raises(ConfigError, match="start_percent must not be after end_percent"):
        apply.apply(pos, neg, control, edges, 1.0, 0.8, 0.2)
    with pytest.raises(ConfigError, match="not an IMAGE"):
        apply.apply(pos, neg, control, torch.zeros(64, 64), 1.0, 0.0, 1.0)


def test_md_control_for_another_model_is_refused(plugin, nodes, sd_handle):
    handle = sd_handle[0]
    ConfigError = _md(plugin, "errors").ConfigError
    with pytest.raises(ConfigError, match="widths"):
        nodes["LoadMobileDiffusionControl"]().load(handle, "shipped/md-shapes-scribble")


def test_export_node_refuses_control_or_inpainting_bundles_it_cannot_write(plugin, nodes, loaded, sd_handle):
    unet, clip, decoder, encoder = loaded
    (control,) = nodes["LoadMobileDiffusionControl"]().load(unet, "shipped/md-shapes-scribble")
    export = nodes["ExportTFLiteBundle"]()
    ConfigError = _md(plugin, "errors").ConfigError
    if _plugin_module(plugin, "nodes.export").litert_missing():
        pytest.skip("the export extra is not installed")
    with pytest.raises(ConfigError, match="whole bundle"):
        export.export(unet, clip, decoder, "x", "fp16", 0, 0, 0, "auto", 0.0, 1, "unet", False, False, control=control)
    other = _plugin_module(plugin, "nodes._common").EncoderHandle(encoder.encoder, 0.5, 0.0, "other")
    with pytest.raises(ConfigError, match="another latent space"):
        export.export(unet, clip, decoder, "x", "fp16", 0, 0, 0, "auto", 0.0, 1, "all", False, False, encoder=other)
