"""SD single-file checkpoints (model.diffusion_model.*, cond_stage_model.*, first_stage_model.*).

Parity: our tiny random models are written with `save_single_file`; diffusers reads the same file
with its own single-file conversion (diffusers.loaders.single_file_utils, given the LDM config a
real release ships as yaml), we read it with `load_*`; outputs are compared. So the key maps are
checked against an independent implementation, not against their own inverse.
"""
import dataclasses
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

diffusers = pytest.importorskip("diffusers")
sfu = pytest.importorskip("diffusers.loaders.single_file_utils")

from transformers import CLIPTextModel  # noqa: E402

from mobilediffusion import load_decoder, load_pipeline, load_text_encoder, load_unet  # noqa: E402
from mobilediffusion.config import DecoderConfig, ModelConfig, TextEncoderConfig, UNetConfig  # noqa: E402
from mobilediffusion.decoder import build_decoder  # noqa: E402
from mobilediffusion.errors import CheckpointError, ConfigError  # noqa: E402
from mobilediffusion.loading import load_model_config  # noqa: E402
from mobilediffusion.pipeline import Pipeline  # noqa: E402
from mobilediffusion.presets import LEADING, PRESETS  # noqa: E402
from mobilediffusion.text_encoder import TextEncoder  # noqa: E402
from mobilediffusion.unet import UNet  # noqa: E402
from mobilediffusion.weights.formats import detect  # noqa: E402
from mobilediffusion.weights.keymap import KeyMap, load_state  # noqa: E402
from mobilediffusion.weights.single_file import save_single_file, single_file_tensors  # noqa: E402
from mobilediffusion.weights.single_file_shapes import config_from_shapes  # noqa: E402
from mobilediffusion.weights.text_keys import open_clip_keymap  # noqa: E402

TOL = 1e-5

# --------------------------------------------------------------------------- tiny models
# Each case: our configs, and the LDM yaml values a release of that layout would ship (read by
# diffusers' create_*_config_from_ldm, independently of our key-derived configs).
VAE = DecoderConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1)  # widths differ: level order shows
VAE_LDM = {"ch": 32, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "z_channels": 4, "in_channels": 3, "out_ch": 3,
           "resolution": 256, "attn_resolutions": [], "double_z": True, "dropout": 0.0}
CLIP_TEXT = TextEncoderConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1)
# OpenCLIP-H-like: 24 resblocks in the file, SD 2.x (and diffusers) use 23; gelu; "!" padding
OPENCLIP_TEXT = dataclasses.replace(PRESETS["sd21-base"].text, hidden_size=32, intermediate_size=64,
                                    num_attention_heads=1)
_3 = dict(block_out_channels=(32, 32, 64), transformer_depth=(1, 1, 1))

CASES = {
    "sd1": dict(
        unet=UNetConfig(**_3, layers_per_block=(2, 2, 2), attention=("full", "full", "none"),
                        num_attention_heads=(8, 8, 8), cross_attention_dim=32),
        text=CLIP_TEXT,
        ldm=dict(num_res_blocks=2, attention_resolutions=[1, 2], num_heads=8, context_dim=32),
    ),
    "sd2": dict(
        unet=UNetConfig(**_3, layers_per_block=(2, 2, 2), attention=("full", "full", "none"),
                        num_attention_heads=(1, 1, 1), cross_attention_dim=32, use_linear_projection=True),
        text=OPENCLIP_TEXT,
        ldm=dict(num_res_blocks=2, attention_resolutions=[1, 2], num_heads=1, context_dim=32,
                 use_linear_in_transformer=True),
    ),
    "bk-sdm": dict(  # one block per level, no mid block
        unet=UNetConfig(**_3, layers_per_block=(1, 1, 1), attention=("full", "full", "none"),
                        num_attention_heads=(8, 8, 8), cross_attention_dim=32, mid_block=False),
        text=CLIP_TEXT,
        ldm=dict(num_res_blocks=1, attention_resolutions=[1, 2], num_heads=8, context_dim=32),
    ),
    "sdxs": dict(  # no attention at the outer level, no mid block, linear projections
        unet=UNetConfig(**_3, layers_per_block=(1, 1, 1), attention=("none", "full", "full"),
                        num_attention_heads=(1, 1, 1), cross_attention_dim=32, mid_block=False,
                        use_linear_projection=True),
        text=OPENCLIP_TEXT,
        ldm=dict(num_res_blocks=1, attention_resolutions=[2, 4], num_heads=1, context_dim=32,
                 use_linear_in_transformer=True),
    ),
}


@torch.no_grad()
def randomize(module, seed):
    """Every parameter random (norm scales too, so swapped tensors show), activations kept O(1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if name.endswith("bias"):
            p.copy_(0.1 * r)
        elif p.ndim == 1:  # norm scales
            p.copy_(1 + 0.1 * r)
        else:
            p.copy_(r / (p[0].numel() ** 0.5))
    return module.eval()


def build(case: str, seed: int = 0) -> Pipeline:
    c = CASES[case]
    cfg = ModelConfig(family=case, unet=c["unet"], text=c["text"], decoder=VAE, schedule=LEADING)
    return Pipeline(cfg, randomize(UNet(cfg.unet), seed), randomize(TextEncoder(cfg.text), seed + 1).eval(),
                    randomize(build_decoder(cfg.decoder), seed + 2), trained=False)


def assert_same_weights(a, b):
    """Bitwise-equal parameters and buffers under the same names (the CPU fast path may still
    compute with them in another order, so outputs are compared with a tolerance elsewhere)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def rel_err(ours, ref) -> float:
    return ((ours - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """case -> (source pipeline, fp32 file); plus "sd1-fp16" and "sd2-fp16" files of the same models."""
    out = {}
    for case in CASES:
        pipe = build(case)
        folder = tmp_path_factory.mktemp(case)
        out[case] = pipe, save_single_file(pipe, folder / "model.safetensors")
        if case in ("sd1", "sd2"):
            out[case + "-fp16"] = pipe, save_single_file(pipe, folder / "model-fp16.safetensors",
                                                         dtype=torch.float16)
    return out


# --------------------------------------------------------------------------- diffusers' side
def original_config(case: str) -> dict:
    """The LDM yaml (as a dict) of a release of this layout: what diffusers converts with."""
    unet = {"in_channels": 4, "out_channels": 4, "model_channels": 32, "channel_mult": [1, 1, 2],
            "transformer_depth": 1, **CASES[case]["ldm"]}
    return {"model": {"params": {"unet_config": {"params": unet},
                                 "first_stage_config": {"params": {"ddconfig": VAE_LDM}}}}}


def diffusers_unet(case: str, checkpoint: dict):
    config = sfu.create_unet_diffusers_config_from_ldm(original_config(case), checkpoint)
    if not any(k.startswith("model.diffusion_model.middle_block.") for k in checkpoint):
        config["mid_block_type"] = None  # LDM yaml has no switch for it: BK-SDM / SDXS drop the blocks
    unet = diffusers.UNet2DConditionModel(**config)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(checkpoint, config), strict=True)
    return unet.eval()


def diffusers_vae(checkpoint: dict):
    config = sfu.create_vae_diffusers_config_from_ldm(original_config("sd1"), checkpoint)
    vae = diffusers.AutoencoderKL(**config)
    missing, unexpected = vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(checkpoint, config), strict=False)
    assert not unexpected and missing and all(k.startswith(("encoder.", "quant_conv.")) for k in missing)
    return vae.eval()


def diffusers_text(cfg: TextEncoderConfig, checkpoint: dict, tmp_path):
    """diffusers' single-file CLIP loader, given the CLIPTextConfig a release ships (saved locally)."""
    cfg.to_transformers().save_pretrained(tmp_path)
    return sfu.create_diffusers_clip_model_from_ldm(CLIPTextModel, checkpoint, config=str(tmp_path),
                                                    local_files_only=True).eval()


def checkpoint_fp32(path) -> dict:
    return {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}


# --------------------------------------------------------------------------- parity
PARITY = ["sd1", "sd2", "sd1-fp16", "sd2-fp16", "bk-sdm", "sdxs"]


@torch.no_grad()
@pytest.mark.parametrize("case", PARITY)
def test_unet_parity_with_diffusers_conversion(files, case):
    src, path = files[case]
    ref = diffusers_unet(case.removesuffix("-fp16"), checkpoint_fp32(path))
    ours = load_unet(path)
    assert ours.config == src.unet.config
    g = torch.Generator().manual_seed(1)
    for B, h, w in [(2, 8, 8), (1, 12, 16)]:
        x, ctx = torch.randn(B, 4, h, w, generator=g), torch.randn(B, 7, 32, generator=g)
        t = torch.tensor([999, 17][:B])
        err = rel_err(ours(x, t, ctx), ref(x, t, encoder_hidden_states=ctx).sample)
        assert err <= TOL, (case, (B, h, w), err)
    if not case.endswith("fp16"):  # the file holds our weights exactly
        assert_same_weights(ours, src.unet)


@torch.no_grad()
@pytest.mark.parametrize("case", ["sd1", "sd2", "sd1-fp16", "sd2-fp16"])
def test_text_encoder_parity_with_diffusers_conversion(files, case, tmp_path):
    src, path = files[case]
    ours = load_text_encoder(path)
    assert ours.config == src.text_encoder.config  # layout, widths, layer count (23 of 24) from the keys
    ref = diffusers_text(ours.config, checkpoint_fp32(path), tmp_path)
    ids = torch.randint(0, ours.config.vocab_size, (2, 77), generator=torch.Generator().manual_seed(2))
    ids = torch.cat([ids, ours.tokenize(["a red circle"])])  # and a real prompt, with padding
    err = rel_err(ours.encode(ids), ref(input_ids=ids).last_hidden_state)
    assert err <= TOL, (case, err)


@torch.no_grad()
@pytest.mark.parametrize("case", ["sd1", "sd1-fp16"])
def test_decoder_parity_with_diffusers_conversion(files, case):
    src, path = files[case]
    ref = diffusers_vae(checkpoint_fp32(path))
    ours = load_decoder(path)
    assert ours.config == VAE
    latents = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(3)) * VAE.scaling_factor
    theirs = (ref.decode(latents / VAE.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert ((theirs > 0) & (theirs < 1)).float().mean() > 0.3  # not lost to the clamp
    err = rel_err(ours(latents), theirs)
    assert err <= TOL, (case, err)


def test_written_layout_is_the_release_layout(files):
    """What real SD files (and ComfyUI) expect: SD1 1x1-conv projections and text_model. names, SD2
    linear projections and the OpenCLIP names, VAE attention as 1x1 convs, 24 resblocks for 23 layers."""
    sd1, sd2 = (load_file(str(files[c][1])) for c in ("sd1", "sd2"))
    assert sd1["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape == (32, 32, 1, 1)
    assert sd2["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape == (32, 32)
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in sd1
    assert sd1["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert sd2["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
    assert "cond_stage_model.model.transformer.resblocks.23.mlp.c_proj.weight" in sd2
    assert "cond_stage_model.model.transformer.resblocks.24.ln_1.weight" not in sd2
    assert load_file(str(files["sd1-fp16"][1]))["model.diffusion_model.out.2.weight"].dtype == torch.float16


@torch.no_grad()
def test_skipped_openclip_layer_is_an_identity(files):
    """The written 24th resblock (SD 2.x skips it) is an identity: all 24 layers give the same features."""
    src, path = files["sd2"]
    cfg24 = dataclasses.replace(OPENCLIP_TEXT, num_hidden_layers=24)
    full = TextEncoder(cfg24)
    state = {k: v for k, v in load_file(str(path)).items() if k.startswith("cond_stage_model.")}
    load_state(full.model, state, open_clip_keymap(full.key_prefix, 24), what="text encoder")
    ids = src.text_encoder.tokenize(["a red circle", "a blue square"])
    assert torch.equal(full.encode(ids), src.text_encoder.encode(ids))


@torch.no_grad()
def test_fp16_file_into_fp16_modules(files):
    src, path = files["sd1-fp16"]
    pipe = load_pipeline(path, dtype=torch.float16)
    for m in (pipe.unet, pipe.text_encoder.model, pipe.decoder):
        assert all(p.dtype == torch.float16 for p in m.parameters())
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 7, 32)
    fp32 = load_unet(path)(x, 500, ctx)  # the same fp16 weights, computed in fp32
    half = pipe.unet(x.half(), 500, ctx.half())
    assert half.dtype == torch.float16 and rel_err(half.float(), fp32) < 1e-2


# --------------------------------------------------------------------------- detection
@pytest.mark.parametrize("case", list(CASES))
def test_family_and_config_from_keys(files, case):
    src, path = files[case]
    assert detect(path).kind == "single_file"
    cfg = load_model_config(path)
    assert cfg.family == case
    assert (cfg.unet, cfg.text, cfg.decoder) == (src.unet.config, src.text_encoder.config, VAE)
    assert cfg.prediction_type == "epsilon" and cfg.schedule == LEADING


@pytest.mark.parametrize("name", ["sd15", "sd21-base", "bk-sdm-base", "bk-sdm-small", "bk-sdm-tiny", "sdxs-512"])
def test_full_size_presets_detected_from_shapes(name):
    """Real-size layouts (meta tensors: shapes only) give back the preset: UNet incl. heads, text
    encoder (OpenCLIP-H: 23 of 24 layers), and the preset's family and sampling defaults."""
    p = PRESETS[name]
    with torch.device("meta"):
        parts = {"unet": UNet(p.unet), "text_encoder": TextEncoder(p.text), "decoder": build_decoder(VAE_FULL)}
    shapes = {k: tuple(v.shape) for k, v in single_file_tensors(parts).items()}
    cfg = config_from_shapes(shapes)
    assert cfg.unet == p.unet and cfg.text == p.text and cfg.decoder == VAE_FULL
    assert (cfg.family, cfg.schedule, cfg.default_steps, cfg.default_sampler) == (
        p.family, p.schedule, p.default_steps, p.default_sampler)


VAE_FULL = PRESETS["sd15"].decoder  # the SD VAE every single file carries (SDXS ships TAESD separately)


def test_prediction_type_hints(files, tmp_path):
    src, path = files["sd2"]
    state = load_file(str(path))
    assert load_model_config(path).prediction_type == "epsilon"  # nothing in the weights says v
    marked = tmp_path / "v.safetensors"
    save_file({**state, "v_pred": torch.zeros(0)}, str(marked))
    assert load_model_config(marked).prediction_type == "v_prediction"
    spec = tmp_path / "spec.safetensors"
    save_file(state, str(spec), metadata={"modelspec.architecture": "stable-diffusion-v2-768-v",
                                          "modelspec.resolution": "768x768"})
    cfg = load_model_config(spec)
    assert cfg.prediction_type == "v_prediction" and cfg.resolution == 768 and cfg.unet.sample_size == 96
    # the writer marks a v-prediction UNet, and the file reads back as one
    v_unet = UNet(dataclasses.replace(src.unet.config, prediction_type="v_prediction"))
    v_unet.load_state_dict(src.unet.state_dict())
    written = save_single_file({"unet": v_unet, "text_encoder": src.text_encoder}, tmp_path / "w.safetensors")
    assert load_unet(written).config.prediction_type == "v_prediction"


# --------------------------------------------------------------------------- whole pipeline
def test_load_pipeline_generates(files):
    src, path = files["sd1"]
    pipe = load_pipeline(path)
    size = pipe.size_multiple
    kw = dict(steps=2, seed=3, height=size, width=2 * size, sampler="ddim")
    ours = pipe("a red circle", **kw)[0]
    assert ours.size == (2 * size, size)
    # the same weights, the same image: the loaded pipeline runs the CPU fast path (packed weights, the kernels),
    # the source plain torch, so a rounding may tip a pixel by one level
    a, b = (np.asarray(im, dtype=np.int16) for im in (ours, src("a red circle", **kw)[0]))
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01


def test_pickle_ckpt_single_file_loads(files, tmp_path):
    src, path = files["sd1"]
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(path)), "global_step": 1}, ckpt)
    assert detect(ckpt).kind == "single_file"
    assert load_model_config(ckpt) == load_model_config(path)
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 7, 32)
    with torch.no_grad():
        assert_same_weights(load_unet(ckpt), src.unet)
        assert rel_err(load_unet(ckpt)(x, 10, ctx), src.unet(x, 10, ctx)) <= TOL


def test_components_missing_from_the_file(files, tmp_path):
    src, _ = files["sd1"]
    unet_only = save_single_file({"unet": src.unet}, tmp_path / "unet-only.safetensors")
    assert load_unet(unet_only).config == src.unet.config
    with pytest.raises(CheckpointError, match=r"holds no text encoder \(cond_stage_model"):
        load_text_encoder(unet_only)
    with pytest.raises(CheckpointError, match=r"holds no VAE \(first_stage_model.*separate file"):
        load_decoder(unet_only)


def test_writer_refuses_what_the_layout_cannot_hold(tmp_path):
    tiny = PRESETS["tiny"]
    with pytest.raises(ConfigError, match="cannot hold this UNet layout.*separable"):
        save_single_file({"unet": UNet(tiny.unet)}, tmp_path / "x.safetensors")
    with pytest.raises(ConfigError, match="SD VAE"):
        save_single_file({"decoder": build_decoder(PRESETS["sdxs-512"].decoder)}, tmp_path / "x.safetensors")


# --------------------------------------------------------------------------- bad input
def _save(tmp_path, name, tensors):
    path = tmp_path / name
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("keys,found", [
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "lora_unet_x.alpha"], "a LoRA"),
    (["control_model.input_blocks.0.0.weight", "control_model.input_hint_block.0.weight"], "a ControlNet"),
    (["controlnet_cond_embedding.conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"], "a ControlNet"),
    (["model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.0.transformer.x"], "SDXL"),
    (["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"], "diffusion transformer"),
    (["classifier.weight", "features.0.weight"], "not a checkpoint this package reads"),
])
def test_not_a_diffusion_model(tmp_path, keys, found):
    path = _save(tmp_path, "x.safetensors", {k: torch.zeros(2, 2) for k in keys})
    with pytest.raises(CheckpointError, match=found) as e:
        load_pipeline(path)
    assert "expected" in str(e.value) and "single-file" in str(e.value)  # what would have worked
    assert sorted(keys)[0] in str(e.value)  # what was found


def test_unknown_keys_and_unsupported_unets(files, tmp_path):
    state = load_file(str(files["sd1"][1]))
    extra = _save(tmp_path, "extra.safetensors", {**state, "embedding_manager.x": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="not part of an SD 1.x/2.x single-file checkpoint: embedding_manager.x"):
        load_pipeline(extra)
    pix2pix = dict(state)  # (9 = 4 + 5 is SD inpainting, which loads: tests/test_control.py)
    pix2pix["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 8, 3, 3)
    with pytest.raises(CheckpointError, match="8 input channels.*instruct-pix2pix"):
        load_unet(_save(tmp_path, "pix2pix.safetensors", pix2pix))
    damaged = {k: v for k, v in state.items() if k != "model.diffusion_model.input_blocks.1.0.in_layers.0.bias"}
    with pytest.raises(CheckpointError, match=r"missing 1 keys: down.0.blocks.0.res.norm1.bias"):
        load_unet(_save(tmp_path, "damaged.safetensors", damaged))
    # ignored by declaration: LDM's schedule buffers, an EMA copy, the position ids old exports saved
    ok = {**state, "alphas_cumprod": torch.ones(1000), "model_ema.decay": torch.ones(()),
          "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}
    pipe = load_pipeline(_save(tmp_path, "ok.safetensors", ok))
    assert pipe.config == load_model_config(files["sd1"][1])


def test_truncated_file(files, tmp_path):
    data = files["sd1"][1].read_bytes()
    for cut in (len(data) - 100, 2000):  # tensor data cut short; header cut
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="re-download or re-save"):
            load_pipeline(path)


class _TouchOnLoad:
    """Pickles as a call to Path.touch: unpickling it runs code (creates the marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))


def test_pickle_with_code_never_runs(tmp_path):
    marker = tmp_path / "code-ran"
    payload = pickle.dumps({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": _TouchOnLoad(marker)}})
    ckpt = tmp_path / "evil.ckpt"
    ckpt.write_bytes(payload)
    with pytest.raises(CheckpointError, match="weights_only=True.*contain code"):
        load_pipeline(ckpt)
    assert not marker.exists()
    pickle.loads(payload)  # the payload is live: plain unpickling runs it
    assert marker.exists()


# --------------------------------------------------------------------------- key map mechanics
def test_keymap_chunk_targets_and_reverse():
    km = KeyMap("toy", (
        (r"skip\..*", None),
        (r"blk\.(?P<i>\d+)\.in_proj_(?P<p>weight|bias)", tuple(rf"l.\g<i>.{n}.\g<p>" for n in "qkv")),
        (r"(?:pre\.|old\.)?blk\.(\d+)\.out\.(weight|bias)", r"l.\1.o.\2"),
    ))
    w = torch.arange(18.0).reshape(6, 3)
    out = km.apply({"skip.x": torch.ones(1), "blk.0.in_proj_weight": w, "old.blk.0.out.bias": torch.ones(2)})
    assert torch.equal(out["l.0.q.weight"], w[:2]) and torch.equal(out["l.0.v.weight"], w[4:])
    back = km.reverse(out)
    assert set(back) == {"blk.0.in_proj_weight", "pre.blk.0.out.bias"}  # optional part: its first spelling
    assert torch.equal(back["blk.0.in_proj_weight"], w)
    with pytest.raises(CheckpointError, match="cannot be split into 3 equal parts"):
        km.apply({"blk.1.in_proj_bias": torch.ones(4)})
    with pytest.raises(CheckpointError, match="both map to l.0.o.bias"):
        km.apply({"pre.blk.0.out.bias": torch.ones(2), "blk.0.out.bias": torch.ones(2)})
    with pytest.raises(ConfigError, match="only 2 are present"):
        km.reverse({"l.0.q.weight": w[:2], "l.0.k.weight": w[2:4]})
    with pytest.raises(ConfigError, match="no place in a toy checkpoint: other"):
        km.reverse({"other": w})


@pytest.mark.parametrize("name", ["sd15", "sd21-base", "sdxs-512"])
def test_every_table_round_trips(name):
    """reverse then apply gives back every module name, for the UNet, text and VAE tables we ship."""
    from mobilediffusion.weights.text_keys import clip_text_keymap
    from mobilediffusion.weights.unet_keys import DIFFUSERS_UNET, ldm_unet_keymap
    from mobilediffusion.weights.vae_keys import DIFFUSERS_KL, DIFFUSERS_TINY, LDM_KL, TAESD

    p = PRESETS[name]
    with torch.device("meta"):
        unet, text = UNet(p.unet).state_dict(), TextEncoder(p.text)
        kl, tiny = build_decoder(VAE_FULL).state_dict(), build_decoder(PRESETS["sdxs-512"].decoder).state_dict()
    tables = [(DIFFUSERS_UNET, unet), (ldm_unet_keymap(p.unet), unet), (DIFFUSERS_KL, kl), (LDM_KL, kl),
              (TAESD, tiny), (DIFFUSERS_TINY, tiny), (clip_text_keymap(text.key_prefix), text.model.state_dict()),
              (open_clip_keymap(text.key_prefix, p.text.num_hidden_layers), text.model.state_dict())]
    for km, state in tables:
        back = km.apply(km.reverse(state))
        assert set(back) == set(state), km.name
        assert all(back[k].shape == state[k].shape for k in state), km.name


def test_a_ckpt_is_unpickled_once_per_component(files, tmp_path, monkeypatch):
    """A pickle has no header: layout detection and configs share one read, then each component reads."""
    import mobilediffusion.weights.io as io
    from mobilediffusion import load_pipeline

    src, path = files["sd1"]
    ckpt = tmp_path / "counted.ckpt"
    torch.save(load_file(str(path)), ckpt)
    reads = []
    original = io._read_pickle
    monkeypatch.setattr(io, "_read_pickle", lambda p, prefix: reads.append(prefix) or original(p, prefix))
    pipe = load_pipeline(ckpt)
    assert len(reads) == 4, reads  # shapes once + unet, text encoder, decoder
    assert_same_weights(pipe.unet, src.unet)
