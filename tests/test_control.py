"""Spatial control: the UNet's control residuals against diffusers' UNet2DConditionModel on the same weights."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from test_unet_parity import CASES, _reference, _rel

from mobilediffusion.control import Residuals
from mobilediffusion.errors import ConfigError
from mobilediffusion.loading import load_unet

SD_LAYOUTS = ["sd15", "sd2"]  # a T2I residual per level lands where diffusers puts it when levels end in attention


@pytest.fixture(scope="module")
def unets(tmp_path_factory):
    out = {}
    for name in SD_LAYOUTS + ["bk-sdm-small"]:
        ref = _reference(CASES[name])
        folder = tmp_path_factory.mktemp(name)
        ref.save_pretrained(folder)
        out[name] = ref, load_unet(folder)
    return out


def _inputs(ref, size=(16, 8), seed=1):
    torch.manual_seed(seed)
    x = torch.randn(2, 4, *size)
    t = torch.tensor([10.0, 700.0])
    ctx = torch.randn(2, 5, ref.config.cross_attention_dim)
    return x, t, ctx


def _random(shapes, batch=2, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *s, generator=g) for s in shapes]


@pytest.mark.parametrize("case", SD_LAYOUTS + ["bk-sdm-small"])
def test_controlnet_residuals_equal_diffusers(unets, case):
    """ControlNet-style residuals (every skip, and the mid block) = diffusers' down/mid additional residuals."""
    ref, ours = unets[case]
    x, t, ctx = _inputs(ref)
    shapes = ours.skip_shapes(*x.shape[2:])
    skips = _random(shapes)
    c = ours.config.block_out_channels[-1]
    h, w = shapes[-1][1:]
    mid = torch.randn(2, c, h, w)
    with torch.no_grad():
        want = ref(x, t, ctx, down_block_additional_residuals=tuple(skips),
                   mid_block_additional_residual=mid).sample  # (added at the bottleneck, mid block or not)
        got = ours(x, t, ctx, control=Residuals(output=tuple(skips), middle=mid))
        plain = ours(x, t, ctx)
    assert _rel(got, want) <= 1e-5
    assert _rel(got, plain) > 1e-2  # the residuals matter


@pytest.mark.parametrize("case", SD_LAYOUTS)
def test_adapter_residuals_equal_diffusers(unets, case):
    """T2I-Adapter-style residuals (one per level, on its last block) = diffusers' down_intrablock residuals."""
    ref, ours = unets[case]
    x, t, ctx = _inputs(ref)
    shapes = ours.skip_shapes(*x.shape[2:])
    feats = _random([shapes[_last_block(ours, i)] for i in range(len(ours.down))])
    inputs = [None] * len(shapes)
    for i, f in enumerate(feats):
        inputs[_last_block(ours, i)] = f
    with torch.no_grad():
        want = ref(x, t, ctx, down_intrablock_additional_residuals=list(feats)).sample
        got = ours(x, t, ctx, control=Residuals(input=tuple(inputs)))
    assert _rel(got, want) <= 1e-5


def _last_block(unet, level: int) -> int:
    """The skip index of level's last block."""
    return sum(len(lv.blocks) + 1 for lv in unet.down[: level + 1]) - 1


def test_no_control_and_zero_control_are_the_plain_unet(unets):
    ref, ours = unets["sd15"]
    x, t, ctx = _inputs(ref)
    shapes = ours.skip_shapes(*x.shape[2:])
    zeros = Residuals(input=tuple(torch.zeros(2, *s) for s in shapes), output=tuple(torch.zeros(2, *s) for s in shapes))
    with torch.no_grad():
        plain = ours(x, t, ctx)
        assert torch.equal(ours(x, t, ctx, control=None), plain)
        assert torch.equal(ours(x, t, ctx, control=Residuals()), plain)
        assert torch.equal(ours(x, t, ctx, control=zeros), plain)


def test_residuals_add_scale_and_read_comfyui_order():
    a = Residuals(input=(torch.ones(1), None), middle=torch.ones(1), output=(None, torch.ones(1)))
    b = Residuals(input=(torch.ones(1),), output=(torch.ones(1), torch.ones(1), torch.ones(1)))
    s = a + b * 2
    assert [None if v is None else v.item() for v in s.input] == [3.0, None]
    assert s.middle.item() == 1.0 and [v.item() for v in s.output] == [2.0, 3.0, 2.0]
    # ComfyUI pops "input" from the end as the input blocks run and "output" from the end as the up path pops skips
    comfy = {"input": [torch.tensor(3.0), None, torch.tensor(1.0)], "middle": [torch.tensor(9.0)],
             "output": [torch.tensor(5.0), torch.tensor(6.0)]}
    r = Residuals.from_comfy(comfy, skips=4)
    assert [None if v is None else v.item() for v in r.input] == [1.0, None, 3.0]
    assert [None if v is None else v.item() for v in r.output] == [None, None, 5.0, 6.0]
    assert r.middle.item() == 9.0
    with pytest.raises(ConfigError, match="another UNet layout"):
        Residuals.from_comfy({"output": [torch.ones(1)] * 5}, skips=4)


def test_too_many_residuals_are_refused(unets):
    ref, ours = unets["sd15"]
    x, t, ctx = _inputs(ref)
    n = len(ours.skip_shapes(*x.shape[2:]))
    with pytest.raises(ConfigError, match="another UNet layout"):
        ours(x, t, ctx, control=Residuals(output=(None,) * (n + 1)))


# --------------------------------------------------------------------------- ControlNet and T2I-Adapter parity
def _perturbed(model, seed=0, scale=0.1):
    """Every weight random (diffusers zero-initialises the zero convs and conv_out: a UNet ignoring them would pass)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


# SD's 32 GroupNorm groups (single files do not say the group count; SD ControlNets all use 32)
CN_UNET = dict(block_out_channels=(32, 64, 64), layers_per_block=2, attention_head_dim=2, cross_attention_dim=24,
               down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), sample_size=16)
CONTROLNET = dict({k: v for k, v in CN_UNET.items() if k not in ("up_block_types", "sample_size")},
                  conditioning_embedding_out_channels=(8, 16, 16, 32))


@pytest.fixture(scope="module")
def controlnet(tmp_path_factory):
    """(diffusers UNet, our UNet, diffusers ControlNetModel, ours loaded from its save_pretrained folder)."""
    from mobilediffusion.control.load import load_control

    ref_unet = _reference(CN_UNET)
    folder = tmp_path_factory.mktemp("cn_unet")
    ref_unet.save_pretrained(folder)
    unet = load_unet(folder)
    ref = _perturbed(diffusers.ControlNetModel(**CONTROLNET))
    folder = tmp_path_factory.mktemp("controlnet")
    ref.save_pretrained(folder)
    return ref_unet, unet, ref, load_control(folder, base=unet)


def test_controlnet_residuals_and_controlled_unet_equal_diffusers(controlnet):
    """ControlNetModel's residuals and the UNet they control: <= 1e-5 relative, fp32."""
    ref_unet, unet, ref, ours = controlnet
    x, t, ctx = _inputs(ref_unet)
    hint = torch.rand(2, 3, 8 * x.shape[2], 8 * x.shape[3], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        down, mid = ref(x, t, ctx, controlnet_cond=hint, return_dict=False)
        got = ours(x, t, ctx, hint)
        assert len(got.output) == len(down) == unet.skip_count
        for a, b in zip(got.output, down):
            assert _rel(a, b) <= 1e-5
        assert _rel(got.middle, mid) <= 1e-5
        want = ref_unet(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        assert _rel(unet(x, t, ctx, control=got), want) <= 1e-5
        half = unet(x, t, ctx, control=got * 0.5)
        want_half = ref_unet(x, t, ctx, down_block_additional_residuals=[d * 0.5 for d in down],
                             mid_block_additional_residual=mid * 0.5).sample
        assert _rel(half, want_half) <= 1e-5


def test_controlnet_single_files_load_the_same(tmp_path, controlnet):
    """The same ControlNet as a diffusers-named single file, as an LDM file (control_model.* and bare), as a .pth
    read with weights_only, and as a diff ControlNet against its base UNet: equal weights."""
    from safetensors.torch import save_file

    from mobilediffusion.control.keys import ldm_controlnet_keymap
    from mobilediffusion.control.load import load_control

    _, base, ref, ours = controlnet
    want = ours.state_dict()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "diffusers_names.safetensors")
    ldm = ldm_controlnet_keymap(ours.control_config).reverse(want)
    save_file({k: v.contiguous() for k, v in ldm.items()}, tmp_path / "ldm.safetensors")
    bare = {k.removeprefix("control_model."): v for k, v in ldm.items()}
    torch.save(bare, tmp_path / "bare.pth")
    ldm_base = ldm_controlnet_keymap(ours.control_config).reverse(
        {k: v for k, v in base.state_dict().items() if k in want})
    diff = {k: v - ldm_base[k] if k in ldm_base else v for k, v in ldm.items()}
    diff["difference"] = torch.zeros(1)
    save_file({k: v.contiguous() for k, v in diff.items()}, tmp_path / "diff.safetensors")
    for name in ("diffusers_names.safetensors", "ldm.safetensors", "bare.pth", "diff.safetensors"):
        got = load_control(tmp_path / name, base=base).state_dict()
        assert set(got) == set(want), name
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=f"{name}: {k}")


@pytest.mark.parametrize("kind", ["full_adapter", "light_adapter"])
def test_t2i_adapter_equals_diffusers(tmp_path, unets, kind):
    """T2IAdapter (full, light) features, and the UNet with them as down_intrablock residuals: <= 1e-5."""
    from mobilediffusion.control.adapter import adapter_skips
    from mobilediffusion.control.load import load_control

    ref_unet, unet = unets["sd15"]
    channels = [16, 32, 32] if kind == "full_adapter" else [16, 32]
    ref = _perturbed(diffusers.T2IAdapter(in_channels=3, channels=channels, num_res_blocks=2, downscale_factor=8,
                                          adapter_type=kind))
    ref.save_pretrained(tmp_path)
    ours = load_control(tmp_path)
    x, t, ctx = _inputs(ref_unet)
    hint = torch.rand(2, 3, 8 * x.shape[2], 8 * x.shape[3], generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        feats = ref(hint)
        got = ours.features(hint)
        assert len(got) == len(feats) == len(unet.down)
        for a, b in zip(got, feats):
            assert _rel(a, b) <= 1e-5
        want = ref_unet(x, t, ctx, down_intrablock_additional_residuals=[f.clone() for f in feats]).sample
        res = ours(hint, adapter_skips(unet), unet.skip_count)
        assert _rel(unet(x, t, ctx, control=res), want) <= 1e-5


@pytest.mark.parametrize("kind", ["full_adapter", "light_adapter"])
def test_t2i_adapter_original_layouts_load_the_same(tmp_path, kind):
    """TencentARC's key layouts (ComfyUI's renaming of diffusers' keys: body.i.resnets.j -> body.{2i+j} for the
    full adapter, body.i.resnets.j -> body.i.body.j for the light one) load into the same weights."""
    from safetensors.torch import save_file

    from mobilediffusion.control.load import load_control

    channels = [16, 32, 32, 32] if kind == "full_adapter" else [16, 32, 32]
    ref = _perturbed(diffusers.T2IAdapter(in_channels=1, channels=channels, num_res_blocks=2, downscale_factor=8,
                                          adapter_type=kind))
    ref.save_pretrained(tmp_path / "folder")
    want = load_control(tmp_path / "folder").state_dict()
    renamed = {}
    for k, v in ref.state_dict().items():
        k = k.removeprefix("adapter.")
        parts = k.split(".")
        if kind == "full_adapter" and parts[0] == "body":
            i = int(parts[1])
            if parts[2] == "resnets":
                k = ".".join(["body", str(2 * i + int(parts[3]))] + parts[4:])
            else:
                k = ".".join(["body", str(2 * i)] + parts[2:])
        elif parts[0] == "body" and parts[2] == "resnets":
            k = ".".join(["body", parts[1], "body"] + parts[3:])
        renamed[k] = v.contiguous()
    save_file(renamed, tmp_path / "original.safetensors")
    model = load_control(tmp_path / "original.safetensors")
    assert model.config.hint_channels == 1 and model.config.kind == kind.split("_")[0]
    got = model.state_dict()
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


def test_refused_control_models_are_named(tmp_path):
    from safetensors.torch import save_file

    from mobilediffusion.control.load import load_control
    from mobilediffusion.errors import CheckpointError

    cases = {"lora_controlnet": "Control-LoRA", "control_add_embedding.linear_1.weight": "union ControlNet",
             "control_model.label_emb.0.0.weight": "SDXL ControlNet", "backbone.0.0.weight": "style adapter"}
    for key, name in cases.items():
        save_file({key: torch.zeros(2)}, tmp_path / "x.safetensors")
        with pytest.raises((ConfigError, CheckpointError), match=name):
            load_control(tmp_path / "x.safetensors")
    save_file({"conv_in.weight": torch.zeros(320, 256, 3, 3), "body.0.block1.weight": torch.zeros(1)},
              tmp_path / "xl.safetensors")
    with pytest.raises(CheckpointError, match="SDXL"):
        load_control(tmp_path / "xl.safetensors")
    save_file({"unrelated.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="no T2I-Adapter layout"):
        load_control(tmp_path / "other.safetensors")


def test_controlnet_for_another_model_is_refused(controlnet, unets):
    from mobilediffusion.control.load import load_control

    ref = controlnet[2]
    with pytest.raises(ConfigError, match="made for a UNet with widths"):
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            ref.save_pretrained(d)
            load_control(d, base=unets["sd15"][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fast_path_runs_controlnet_and_adapter(controlnet, dtype):
    """The CPU fast path (channels-last, packed weights, its kernels; bf16 too) on the ControlNet and the controlled
    UNet: within fp32 / bf16 rounding of the plain modules."""
    import copy

    from mobilediffusion.fast import optimize, unsupported_precision

    if unsupported_precision(dtype):
        pytest.skip(unsupported_precision(dtype))
    _, unet, _, cn = controlnet
    fast_unet, fast_cn = optimize(copy.deepcopy(unet), dtype=dtype), optimize(copy.deepcopy(cn), dtype=dtype)
    x, t, ctx = _inputs(unet)
    hint = torch.rand(2, 3, 8 * x.shape[2], 8 * x.shape[3], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = unet(x, t, ctx, control=cn(x, t, ctx, hint))
        res = fast_cn(x.to(dtype), t, ctx.to(dtype), hint)
        got = fast_unet(x.to(dtype), t, ctx.to(dtype), control=res).float()
    assert _rel(got, want) <= (1e-5 if dtype == torch.float32 else 3e-2)


# --------------------------------------------------------------------------- pipelines
@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    from test_pipeline_diffusers import make_sd_folder

    folder = tmp_path_factory.mktemp("sd")
    ref = make_sd_folder(folder, diffusers.EulerDiscreteScheduler)
    return folder, ref


def _hint(size=64, channels=3, seed=9):
    return torch.rand(1, channels, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_pipeline_with_controlnet_equals_diffusers(tmp_path, sd_folder, guidance):
    """StableDiffusionControlNetPipeline and pipe(control=[(controlnet, image, strength)]) on the same weights."""
    from mobilediffusion import load_pipeline
    from mobilediffusion.control.load import load_control

    folder, ref = sd_folder
    cn = _perturbed(diffusers.ControlNetModel.from_unet(ref.unet, conditioning_embedding_out_channels=(8, 16, 16, 32)),
                    seed=3, scale=0.05)
    cn.save_pretrained(tmp_path / "cn")
    ref_cn = diffusers.StableDiffusionControlNetPipeline(**{k: v for k, v in ref.components.items()}, controlnet=cn,
                                                         requires_safety_checker=False)
    hint = _hint()
    want = ref_cn("a red circle", negative_prompt="blurry", image=hint, num_inference_steps=3, guidance_scale=guidance,
                  controlnet_conditioning_scale=0.8, height=64, width=64, output_type="pt",
                  generator=torch.Generator().manual_seed(7)).images
    pipe = load_pipeline(folder)
    got = _generate(pipe, "a red circle", "blurry", guidance, [(load_control(tmp_path / "cn", base=pipe.unet), hint, 0.8)])
    plain = _generate(pipe, "a red circle", "blurry", guidance, [])
    assert _rel(got, want) <= 1e-5
    assert _rel(got, plain) > 1e-3  # the control matters


def test_pipeline_with_t2i_adapter_equals_diffusers(tmp_path, sd_folder, kind="full_adapter"):
    """StableDiffusionAdapterPipeline and pipe(control=[(adapter, image, strength)]) on the same weights (a light
    adapter repeats its last width, which this 2-level UNet does not: it is checked on the UNet above)."""
    from mobilediffusion import load_pipeline
    from mobilediffusion.control.load import load_control

    folder, ref = sd_folder
    channels = [32, 64]
    adapter = _perturbed(diffusers.T2IAdapter(in_channels=3, channels=channels, num_res_blocks=2, downscale_factor=8,
                                              adapter_type=kind), seed=4, scale=0.05)
    adapter.save_pretrained(tmp_path / "ad")
    ref_ad = diffusers.StableDiffusionAdapterPipeline(**{k: v for k, v in ref.components.items()
                                                         if k not in ("image_encoder",)}, adapter=adapter,
                                                      requires_safety_checker=False)
    hint = _hint()
    want = ref_ad("a red circle", negative_prompt="blurry", image=hint, num_inference_steps=3, guidance_scale=5.0,
                  adapter_conditioning_scale=0.7, height=64, width=64, output_type="pt",
                  generator=torch.Generator().manual_seed(7)).images
    if not isinstance(want, torch.Tensor):  # (this pipeline gives (B, H, W, 3) numpy for "pt")
        want = torch.from_numpy(want).permute(0, 3, 1, 2)
    pipe = load_pipeline(folder)
    got = _generate(pipe, "a red circle", "blurry", 5.0, [(load_control(tmp_path / "ad"), hint, 0.7)])
    assert _rel(got, want) <= 1e-5


def _generate(pipe, prompt, negative, guidance, control):
    context = pipe.encode_prompt([prompt])
    uncond = pipe.encode_prompt([negative])
    latents = pipe.sample_latents(context, uncond, steps=3, guidance=guidance, seed=7, height=64, width=64,
                                  sampler="euler", control=control)
    return pipe.decode(latents)


def test_control_window_strength_and_chain(controlnet):
    """ComfyUI's rules: a control acts while the timestep lies in [(1 - end), (1 - start)] x 999, scaled by its
    strength; two controls add up; strength 0 and an empty window give no residuals."""
    from mobilediffusion.control.apply import Control, ControlStack

    _, unet, _, cn = controlnet
    x, t, ctx = _inputs(unet)
    hint = torch.rand(1, 3, 8 * x.shape[2], 8 * x.shape[3], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = cn(x, torch.tensor(500.0), ctx, hint)
        stack = ControlStack([Control(cn, hint, 0.5, 0.1, 0.9), (cn, hint, 0.25)], unet)
        both = stack(x, torch.tensor(500.0), ctx)
        assert _rel(both.middle, full.middle * 0.75) <= 1e-6
        # 0.1 -> timestep 899.1, 0.9 -> 99.9: outside, only the second (whole-schedule) control acts
        for step in (950.0, 50.0):
            only = stack(x, torch.tensor(step), ctx)
            assert _rel(only.middle, cn(x, torch.tensor(step), ctx, hint).middle * 0.25) <= 1e-6
        assert ControlStack([Control(cn, hint, 0.0)], unet)(x, torch.tensor(500.0), ctx) is None
        assert ControlStack([Control(cn, hint, 1.0, 0.6, 0.6)], unet)(x, torch.tensor(500.0), ctx) is None


def test_hint_is_fitted_as_comfyui_does():
    """Centre crop to the target's aspect ratio, then nearest-exact resize (ComfyUI's common_upscale)."""
    from mobilediffusion.control.apply import fit_hint

    hint = torch.arange(2 * 6 * 4, dtype=torch.float32).reshape(1, 2, 6, 4)
    square = fit_hint(hint, 4, 4)  # 6x4 -> crop one row top and bottom -> 4x4
    assert torch.equal(square, hint[:, :, 1:5, :])
    wide = fit_hint(hint, 2, 4)  # aspect 2: crop rows to 2 (from row 2), width kept
    assert torch.equal(wide, hint[:, :, 2:4, :])
    big = fit_hint(hint[:, :, :4, :], 8, 8)
    assert torch.equal(big, torch.nn.functional.interpolate(hint[:, :, :4, :], size=(8, 8), mode="nearest-exact"))


def test_bad_controls_are_refused(controlnet, unets, tmp_path):
    from PIL import Image

    from mobilediffusion.control.apply import Control, ControlStack, as_hint
    from mobilediffusion.pipeline import controls_of

    _, unet, _, cn = controlnet
    with pytest.raises(ConfigError, match="start and end"):
        Control(cn, _hint(), 1.0, 0.8, 0.2)
    with pytest.raises(ConfigError, match="image tensor"):
        Control(cn, torch.rand(3, 8))
    with pytest.raises(ConfigError, match="ControlNet or T2I-Adapter"):
        Control(unet, _hint())
    with pytest.raises(ConfigError, match="made for a UNet with widths"):
        ControlStack([Control(cn, _hint())], unets["sd15"][1])
    (tmp_path / "not.png").write_text("text")
    with pytest.raises(ConfigError, match="cannot be read as an image"):
        controls_of([(cn, tmp_path / "not.png")])
    with pytest.raises(ConfigError, match="a control is"):
        controls_of([cn])
    # RGBA loses alpha, greyscale stays one channel, uint8 -> [0, 1]
    rgba = Image.new("RGBA", (16, 8), (255, 0, 0, 10))
    assert as_hint(rgba).shape == (1, 3, 8, 16) and as_hint(rgba)[0, 0].min() == 1.0
    assert as_hint(Image.new("L", (4, 4), 128)).shape == (1, 1, 4, 4)


def test_cli_generate_with_controls_as_typed(tmp_path, sd_folder, capsys):
    """`mobilediffusion generate --checkpoint SD --control CN:edges.png:0.8 --control ADAPTER:edges.png` as typed:
    the image equals the pipeline's with the same controls; bad --control values are one line, nothing written."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from mobilediffusion import load_pipeline
    from mobilediffusion.cli import main
    from mobilediffusion.control.load import load_control

    folder, ref = sd_folder
    _perturbed(diffusers.ControlNetModel.from_unet(ref.unet, conditioning_embedding_out_channels=(8, 16, 16, 32)),
               seed=3, scale=0.05).save_pretrained(tmp_path / "cn")
    _perturbed(diffusers.T2IAdapter(in_channels=3, channels=[32, 64], num_res_blocks=2, downscale_factor=8),
               seed=4, scale=0.05).save_pretrained(tmp_path / "ad")
    edges = (np.random.default_rng(0).random((96, 64, 3)) > 0.8).astype(np.uint8) * 255  # another aspect: cropped
    Image.fromarray(edges).save(tmp_path / "edges.png")
    out = tmp_path / "out.png"
    cmd = [sys.executable, "-m", "mobilediffusion.cli", "generate", "a red circle", "-o", str(out), "--checkpoint",
           str(folder), "--steps", "2", "--size", "64x64", "--guidance", "3", "--sampler", "euler", "-q",
           "--control", f"{tmp_path / 'cn'}:{tmp_path / 'edges.png'}:0.8", "--control",
           f"{tmp_path / 'ad'}:{tmp_path / 'edges.png'}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    pipe = load_pipeline(folder)
    controls = [(load_control(tmp_path / "cn", base=pipe.unet), tmp_path / "edges.png", 0.8),
                (load_control(tmp_path / "ad"), tmp_path / "edges.png", 1.0)]
    want = pipe("a red circle", steps=2, guidance=3.0, height=64, width=64, sampler="euler", control=controls)[0]
    plain = pipe("a red circle", steps=2, guidance=3.0, height=64, width=64, sampler="euler")[0]
    got = Image.open(out)
    assert np.array_equal(np.asarray(got), np.asarray(want))
    assert not np.array_equal(np.asarray(got), np.asarray(plain))
    for spec, message in ((f"{tmp_path / 'cn'}", "CONTROL_MODEL:IMAGE"),
                          (f"{tmp_path / 'cn'}:{tmp_path / 'none.png'}", "no such file"),
                          (f"{tmp_path / 'cn'}:{tmp_path / 'edges.png'}:500", "strength"),
                          (f"{tmp_path / 'edges.png'}:{tmp_path / 'edges.png'}", "safetensors")):
        bad = tmp_path / "bad.png"
        assert main(cmd[3:6] + [str(bad)] + cmd[7:-4] + ["--control", spec]) != 0
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (spec, err)
        assert not bad.exists()


# --------------------------------------------------------------------------- inpainting
def _inpaint_inputs(size=64):
    g = torch.Generator().manual_seed(11)
    image = torch.rand(1, 3, size, size, generator=g)
    mask = torch.zeros(1, 1, size, size)
    mask[..., 16:48, 8:40] = 1.0  # white = repaint
    return image, mask


def test_inpainting_unet_equals_diffusers(tmp_path):
    """A 9-channel SD inpainting UNet: pipe(prompt, image=, mask=) equals StableDiffusionInpaintPipeline on the same
    weights (its masked-image latents given, as the VAE's posterior mean: diffusers would draw a sample)."""
    from test_pipeline_diffusers import _perturb, make_sd_folder

    from mobilediffusion import load_pipeline

    ref = make_sd_folder(tmp_path / "base", diffusers.EulerDiscreteScheduler)
    torch.manual_seed(1)
    unet9 = _perturb(diffusers.UNet2DConditionModel(**{**ref.unet.config, "in_channels": 9}))
    inp = diffusers.StableDiffusionInpaintPipeline(**{**ref.components, "unet": unet9}, requires_safety_checker=False)
    inp.save_pretrained(tmp_path / "inpaint")
    pipe = load_pipeline(tmp_path / "inpaint", encoder=True)
    assert pipe.unet.concat_channels == 5 and pipe.config.latent_channels == 4
    image, mask = _inpaint_inputs()
    source = pipe._source(image, mask, 1.0, 64, 64)
    want = inp("a red circle", negative_prompt="blurry", image=image, mask_image=mask,
               masked_image_latents=source["concat"][:, 1:], num_inference_steps=3, guidance_scale=4.0, height=64,
               width=64, strength=1.0, generator=torch.Generator().manual_seed(7), output_type="pt").images
    context, uncond = pipe.encode_prompt(["a red circle"]), pipe.encode_prompt(["blurry"])
    got = pipe.decode(pipe.sample_latents(context, uncond, steps=3, guidance=4.0, seed=7, height=64, width=64,
                                          sampler="euler", **source))
    assert _rel(got, want) <= 1e-5
    images = pipe("a red circle", "blurry", steps=3, guidance=4.0, seed=7, sampler="euler", image=image, mask=mask)
    assert images[0].size == (64, 64)
    # the same UNet from an SD single file (model.diffusion_model.input_blocks.0.0 takes 9 channels)
    from mobilediffusion.loading import load_unet
    from mobilediffusion.weights.single_file import save_single_file

    file = save_single_file({"unet": pipe.unet}, tmp_path / "inpaint.safetensors")
    found = load_unet(file).config  # (head counts are not in the weights: SD's convention is assumed)
    assert found.in_channels == 9 and found.out_channels == 4
    assert found.block_out_channels == pipe.unet.config.block_out_channels
    single = load_unet(file, config=pipe.unet.config)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor(500.0)
    with torch.no_grad():
        torch.testing.assert_close(single(x, t, context, concat=source["concat"]),
                                   pipe.unet(x, t, context, concat=source["concat"]), rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="inpainting UNet"):
        pipe("a red circle", steps=1, height=64, width=64)


def test_masked_img2img_keeps_the_known_region(sd_folder):
    """An ordinary UNet with a mask: where the latent mask is 0 the result is the image's latents exactly (ComfyUI's
    noise-mask blend), and the masked region is repainted."""
    from mobilediffusion import load_pipeline

    folder, _ = sd_folder
    pipe = load_pipeline(folder, encoder=True)
    image, mask = _inpaint_inputs()
    source = pipe._source(image, mask, 0.8, 64, 64)
    context = pipe.encode_prompt(["a red circle"])
    out = pipe.sample_latents(context, None, steps=4, guidance=1.0, seed=3, height=64, width=64, sampler="euler",
                              denoise=0.8, **source)
    known = source["mask"] == 0
    kept = source["init_latents"].expand_as(out)[known.expand_as(out)]
    torch.testing.assert_close(out[known.expand_as(out)], kept, rtol=0, atol=1e-5)  # (the last Euler step's rounding)
    repaint = (source["mask"] == 1).expand_as(out)
    assert (out[repaint] - source["init_latents"].expand_as(out)[repaint]).abs().mean() > 1e-2
    # no mask: img2img; bad masks and missing pieces are one clear error each
    assert len(pipe("a red circle", image=image, denoise=0.5, steps=2, sampler="euler")) == 1
    for kw, message in (({"image": image, "mask": torch.zeros(1, 1, 64, 64)}, "mask is empty"),
                        ({"image": image, "mask": torch.ones(1, 1, 64, 64)}, "whole image"),
                        ({"mask": mask}, "needs an image"),
                        ({"image": image}, "denoise < 1"),
                        ({"image": image, "mask": mask, "denoise": 1.5}, "fraction")):
        with pytest.raises(ConfigError, match=message):
            pipe("a red circle", steps=2, sampler="euler", **kw)
    with pytest.raises(ConfigError, match="no image encoder"):
        load_pipeline(folder)("a red circle", steps=2, image=image, mask=mask)


def test_cli_inpainting_as_typed(tmp_path, sd_folder, capsys):
    """`generate --checkpoint SD --image photo.png --mask mask.png --denoise 0.9`: the pipeline's image; bad
    combinations are one line and nothing is written."""
    import numpy as np
    from PIL import Image

    from mobilediffusion import load_pipeline
    from mobilediffusion.cli import main

    folder, _ = sd_folder
    image, mask = _inpaint_inputs()
    Image.fromarray((image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(tmp_path / "photo.png")
    Image.fromarray((mask[0, 0].numpy() * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    base = ["generate", "a red circle", "--checkpoint", str(folder), "--steps", "2", "--sampler", "euler", "-q"]
    assert main([*base, "-o", str(out), "--image", str(tmp_path / "photo.png"), "--mask", str(tmp_path / "mask.png"),
                 "--denoise", "0.9"]) == 0
    pipe = load_pipeline(folder, encoder=True)
    want = pipe("a red circle", steps=2, sampler="euler", image=tmp_path / "photo.png", mask=tmp_path / "mask.png",
                denoise=0.9)[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(want)) and want.size == (64, 64)
    for extra, message in ((["--mask", str(tmp_path / "mask.png")], "--mask needs --image"),
                           (["--denoise", "0.5"], "--denoise needs --image"),
                           (["--image", str(tmp_path / "none.png")], "no such file"),
                           (["--image", str(tmp_path / "photo.png")], "denoise < 1")):
        bad = tmp_path / "bad.png"
        assert main([*base, "-o", str(bad), *extra]) != 0
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
        assert not bad.exists()


# --------------------------------------------------------------------------- model-free preprocessors
def test_canny_equals_comfyuis_canny_node():
    """control.preprocess.canny (numpy) against kornia.filters.canny, which ComfyUI's Canny node runs, on a picture
    with shapes, gradients and noise at ComfyUI's default and other thresholds: the same edge pixels."""
    import numpy as np

    kornia = pytest.importorskip("kornia")
    from mobilediffusion.control.preprocess import canny

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:80]
    img = np.stack([(xx / 80.0), (yy / 96.0), 0.5 + 0.0 * xx], -1)
    img[20:60, 15:50] = [0.9, 0.1, 0.2]
    img[((yy - 70) ** 2 + (xx - 55) ** 2) < 150] = [0.1, 0.2, 0.9]
    img = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1).astype(np.float32)
    for low, high in ((0.4, 0.8), (0.1, 0.2), (0.05, 0.3)):
        ours = canny(img, low, high)
        _, ref = kornia.filters.canny(torch.from_numpy(img).permute(2, 0, 1)[None], low, high)
        ref = ref[0, 0].numpy()
        assert ours.shape == ref.shape and set(np.unique(ours)) <= {0.0, 1.0}
        assert (ours != ref).mean() <= 1e-3, (low, high, int((ours != ref).sum()))
        assert ours.sum() > 20  # edges were found


def test_scribble_and_cli_preprocess(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from mobilediffusion.cli import main
    from mobilediffusion.control.preprocess import scribble

    page = np.full((32, 32, 3), 255, np.uint8)
    page[10, 4:28] = 0  # a dark stroke
    lines = scribble(page, thickness=1)
    assert lines[9:12, 5:27].all() and lines.sum() == 3 * 26 and lines[0].sum() == 0
    Image.fromarray(page).save(tmp_path / "page.png")
    assert main(["preprocess", "scribble", str(tmp_path / "page.png"), "-o", str(tmp_path / "s.png")]) == 0
    got = np.asarray(Image.open(tmp_path / "s.png"))
    assert got.shape == (32, 32, 3) and np.array_equal(got[..., 0] > 127, lines > 0)
    assert main(["preprocess", "canny", str(tmp_path / "page.png"), "-o", str(tmp_path / "c.png"), "--low", "0.9",
                 "--high", "0.2"]) != 0
    assert "thresholds" in capsys.readouterr().err and not (tmp_path / "c.png").exists()


def test_control_pickle_with_code_never_runs(tmp_path):
    """A .pth ControlNet whose pickle would run code is refused (weights_only) and the code never runs."""
    from test_single_file import _TouchOnLoad

    from mobilediffusion.control.load import load_control
    from mobilediffusion.errors import CheckpointError

    marker = tmp_path / "code-ran"
    torch.save({"control_model.input_hint_block.0.weight": _TouchOnLoad(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_control(tmp_path / "evil.pth")
    assert not marker.exists()
