"""Decoders against diffusers on the same random weights, through every checkpoint layout we read.

Reference: what a diffusers pipeline does with sampler-space latents,
(vae.decode(latents / scaling_factor + shift_factor).sample / 2 + 0.5).clamp(0, 1).
"""
import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffusers
from mobilediffusion.config import DecoderConfig
from mobilediffusion.decoder import build_decoder
from mobilediffusion.errors import CheckpointError, ConfigError
from mobilediffusion.loading import load_decoder
from mobilediffusion.presets import LITE_DECODER, SD_KL_DECODER, TAESD_DECODER, TINY_LITE_DECODER
from mobilediffusion.weights.keymap import load_state
from mobilediffusion.weights.vae_keys import (DIFFUSERS_KL, LDM_KL, TAESD, decoder_config_from_diffusers,
                                              decoder_config_from_taesd, decoder_config_to_diffusers,
                                              vae_layout_from_keys)

TOL = 1e-5

# small AutoencoderKL decoders: SD-like (mid attention, 4 levels) and one with the rarer options
KL_SMALL = DecoderConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8)
KL_ODD = DecoderConfig(scaling_factor=1.5, shift_factor=0.1, block_out_channels=(8, 16, 16), layers_per_block=2,
                       post_quant_conv=False, norm_num_groups=4)
TINY_SMALL = DecoderConfig(kind="tiny", latent_channels=4, scaling_factor=1.0, tiny_channels=(16,) * 4,
                           tiny_blocks=(1, 2, 1, 1))
SHAPES = [(1, 8, 8), (2, 12, 16)]  # (batch, h, w) of the latents


def rel_err(ours, ref):
    return ((ours - ref).norm() / ref.norm()).item()


@torch.no_grad()
def randomize(module, seed=0):
    """Every parameter random (norm scales too, so swapped tensors show), activations kept O(1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if name.endswith("bias"):
            p.copy_(0.1 * r)
        elif p.ndim == 1:  # GroupNorm scale
            p.copy_(1 + 0.1 * r)
        else:
            p.copy_(r / (p[0].numel() ** 0.5))
    return module


def diffusers_vae(cfg, seed=0, **extra):
    cls_name, kwargs = decoder_config_to_diffusers(cfg)
    if cls_name == "AutoencoderTiny":  # a small encoder: it is saved but never read
        extra = {"encoder_block_out_channels": (8,) * 4, "num_encoder_blocks": (1,) * 4, **extra}
    return randomize(getattr(diffusers, cls_name)(**kwargs, **extra), seed).eval()


@torch.no_grad()
def reference(vae, cfg, latents):
    return (vae.decode(latents / cfg.scaling_factor + cfg.shift_factor).sample / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def check_parity(ours, vae, cfg, shape, seed=1):
    B, h, w = shape
    latents = torch.randn(B, cfg.latent_channels, h, w, generator=torch.Generator().manual_seed(seed))
    latents = latents * cfg.scaling_factor  # sampler-space latents of unit-scale raw latents
    ref, out = reference(vae, cfg, latents), ours(latents)
    assert out.shape == (B, 3, h * cfg.upscale, w * cfg.upscale) == ref.shape
    # the test must be able to fail: a good share of pixels inside (0, 1), not lost to the clamp
    inside = ((ref > 0) & (ref < 1)).float().mean().item()
    assert inside > 0.3
    err = rel_err(out, ref)
    assert err <= TOL, err


# --------------------------------------------------------------------------- diffusers folders
@pytest.mark.parametrize("cfg", [KL_SMALL, KL_ODD, TINY_LITE_DECODER, TINY_SMALL, TAESD_DECODER],
                         ids=["kl", "kl-shift-nopqc-3lvl", "lite-tiny", "tiny-small", "taesd"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_diffusers_folder_parity(cfg, shape, tmp_path):
    vae = diffusers_vae(cfg)
    vae.save_pretrained(tmp_path)
    ours = load_decoder(tmp_path)
    assert ours.config == cfg
    check_parity(ours, vae, cfg, shape)


def test_lite_design_is_autoencoderkl_without_mid_attention():
    cls_name, kwargs = decoder_config_to_diffusers(LITE_DECODER)
    assert cls_name == "AutoencoderKL" and kwargs["mid_block_add_attention"] is False
    assert kwargs["latent_channels"] == 8 == TINY_LITE_DECODER.latent_channels


def test_lite_decoder_full_size_parity(tmp_path):
    vae = diffusers_vae(LITE_DECODER)
    vae.save_pretrained(tmp_path)
    check_parity(load_decoder(tmp_path), vae, LITE_DECODER, (1, 8, 8))


def test_old_attention_names(tmp_path):
    """Files from diffusers < 0.14 name the mid attention query/key/value/proj_attn."""
    vae = diffusers_vae(KL_SMALL)
    vae.save_pretrained(tmp_path)
    f = tmp_path / "diffusion_pytorch_model.safetensors"
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for k, v in load_file(f).items():
        for new, name in old.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{name}.")
        state[k] = v
    assert any(".proj_attn." in k for k in state)
    save_file(state, f)
    check_parity(load_decoder(tmp_path), vae, KL_SMALL, SHAPES[0])


# --------------------------------------------------------------------------- TAESD files
def taesd_state(vae):
    """A diffusers AutoencoderTiny's decoder in taesd_decoder.pth keys (taesd.py's stage i is
    diffusers' layer i - 1: stage 0 is the parameter-free input clamp)."""
    out = {}
    for k, v in vae.state_dict().items():
        if k.startswith("decoder.layers."):
            i, rest = k[len("decoder.layers."):].split(".", 1)
            out[f"{int(i) + 1}.{rest}"] = v.clone()
    return out


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_taesd_file_parity(suffix, tmp_path):
    vae = diffusers_vae(TAESD_DECODER, seed=3)
    state = taesd_state(vae)
    assert "1.weight" in state and "3.conv.0.weight" in state and "19.bias" in state
    f = tmp_path / f"taesd_decoder{suffix}"
    if suffix == ".safetensors":
        save_file(state, f)
    else:
        torch.save(state, f)
    ours = load_decoder(f)
    for shape in SHAPES:
        check_parity(ours, vae, TAESD_DECODER, shape)


@pytest.mark.parametrize("layout", ["decoder.", "comfyui"])
def test_taesd_prefixed_state_parity(layout):
    """A whole TAESD module's state (encoder. + decoder.) and ComfyUI's TAESD VAE state
    (taesd_encoder. + taesd_decoder. + vae_scale/vae_shift) read with the same map."""
    vae = diffusers_vae(TAESD_DECODER, seed=4)
    dec = taesd_state(vae)
    enc_prefix, dec_prefix = ("encoder.", "decoder.") if layout == "decoder." else ("taesd_encoder.", "taesd_decoder.")
    state = {f"{dec_prefix}{k}": v for k, v in dec.items()}
    state[f"{enc_prefix}0.weight"] = torch.zeros(8, 3, 3, 3)
    if layout == "comfyui":
        state |= {"vae_scale": torch.tensor(0.18215), "vae_shift": torch.tensor(0.0)}
    cfg = decoder_config_from_taesd(state)
    assert cfg == TAESD_DECODER
    ours = build_decoder(cfg)
    load_state(ours, state, TAESD)
    check_parity(ours, vae, cfg, SHAPES[1])


def test_taesd_config_from_keys():
    state = taesd_state(diffusers_vae(dataclasses.replace(TAESD_DECODER, latent_channels=16)))
    assert decoder_config_from_taesd(state).latent_channels == 16  # taesd3 / taef1
    with pytest.raises(CheckpointError, match="encoder"):
        decoder_config_from_taesd({"0.weight": torch.zeros(64, 3, 3, 3), "1.conv.0.weight": torch.zeros(1)})


# --------------------------------------------------------------------------- ldm / single-file layout
def ldm_name(k):
    """diffusers AutoencoderKL decoder key -> the original (ldm) SD VAE key, written out independently."""
    k = k.replace("decoder.mid_block.resnets.0.", "decoder.mid.block_1.")
    k = k.replace("decoder.mid_block.resnets.1.", "decoder.mid.block_2.")
    k = k.replace("decoder.mid_block.attentions.0.", "decoder.mid.attn_1.")
    for new, old in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
        k = k.replace(f"attn_1.{new}.", f"attn_1.{old}.")
    k = k.replace("decoder.conv_norm_out.", "decoder.norm_out.").replace("conv_shortcut", "nin_shortcut")
    if k.startswith("decoder.up_blocks."):
        i, rest = k[len("decoder.up_blocks."):].split(".", 1)
        rest = rest.replace("resnets.", "block.").replace("upsamplers.0.", "upsample.")
        k = f"decoder.up.{3 - int(i)}.{rest}"
    return k


def test_ldm_single_file_parity():
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg = KL_SMALL
    vae = diffusers_vae(cfg, seed=5)
    dstate = {k: v for k, v in vae.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}
    ldm = {}
    for k, v in dstate.items():
        v = v[:, :, None, None] if ".attentions.0.to_" in k and k.endswith("weight") else v  # ldm: 1x1 convs
        ldm["first_stage_model." + ldm_name(k)] = v
    # our ldm names are right iff diffusers' own converter maps them back to the same tensors
    back = convert_ldm_vae_checkpoint(ldm, {"down_block_types": [], "up_block_types": [None] * 4})
    assert back.keys() == dstate.keys() and all(torch.equal(back[k], dstate[k]) for k in dstate)
    ldm["first_stage_model.encoder.conv_in.weight"] = torch.zeros(1)  # ignored by name
    ours = build_decoder(cfg)
    load_state(ours, ldm, LDM_KL)
    check_parity(ours, vae, cfg, SHAPES[1])


def test_layout_from_keys():
    kl = diffusers_vae(KL_SMALL).state_dict()
    tiny = diffusers_vae(TINY_SMALL).state_dict()
    ldm = {"first_stage_model." + ldm_name(k): v for k, v in kl.items() if k.startswith("decoder.")}
    assert vae_layout_from_keys(kl) == ("kl", "diffusers")
    assert vae_layout_from_keys(tiny) == ("tiny", "diffusers")
    assert vae_layout_from_keys(ldm) == ("kl", "ldm")
    assert vae_layout_from_keys({k[len("first_stage_model."):]: v for k, v in ldm.items()}) == ("kl", "ldm")
    assert vae_layout_from_keys(taesd_state(diffusers_vae(TAESD_DECODER))) == ("tiny", "taesd")
    assert vae_layout_from_keys(["model.diffusion_model.conv_in.weight"]) is None


# --------------------------------------------------------------------------- configs and sizes
SD15_VAE_CONFIG = {  # runwayml/stable-diffusion-v1-5 vae/config.json (no scaling_factor: the default)
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def test_sd15_vae_config():
    assert decoder_config_from_diffusers(SD15_VAE_CONFIG) == SD_KL_DECODER


@pytest.mark.parametrize("cfg", [KL_SMALL, KL_ODD, TINY_SMALL, SD_KL_DECODER, LITE_DECODER, TAESD_DECODER])
def test_config_round_trip(cfg):
    cls_name, kwargs = decoder_config_to_diffusers(cfg)
    d = {"_class_name": cls_name, **{k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}}
    assert decoder_config_from_diffusers(d) == cfg


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("cfg,expected", [(SD_KL_DECODER, 49_490_199), (LITE_DECODER, 9_835_531),
                                          (TINY_LITE_DECODER, 593_867), (TAESD_DECODER, 1_222_531)])
def test_parameter_counts(cfg, expected):
    ours = build_decoder(cfg, device="meta")
    cls_name, kwargs = decoder_config_to_diffusers(cfg)
    with torch.device("meta"):
        vae = getattr(diffusers, cls_name)(**kwargs)
    theirs = n_params(vae.decoder) + (n_params(vae.post_quant_conv) if cls_name == "AutoencoderKL" else 0)
    assert n_params(ours) == theirs == expected


def test_lite_decoder_size_matches_paper():
    n = n_params(build_decoder(LITE_DECODER, device="meta"))
    assert abs(n / 9.8e6 - 1) < 0.05, n  # MobileDiffusion: a 9.8M-parameter lite decoder
    assert n_params(build_decoder(TINY_LITE_DECODER, device="meta")) < 1_000_000


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("shape", [(1, 8, 8, 8), (4, 8, 8)])
def test_wrong_latent_shape(shape):
    dec = build_decoder(KL_SMALL)
    with pytest.raises(ConfigError, match=r"\(B, 4, h, w\).*got \(" + ", ".join(map(str, shape))):
        dec(torch.zeros(shape))


@pytest.mark.parametrize("kwargs,match", [
    ({"block_out_channels": (48, 64)}, "multiples of norm_num_groups"),
    ({"kind": "tiny", "tiny_channels": (64, 32, 32, 32)}, "one repeated width"),
    ({"kind": "tiny", "tiny_blocks": (3, 3)}, "one entry per level"),
    ({"kind": "vq"}, "unknown decoder kind"),
    ({"latent_channels": 0}, "latent_channels"),
    ({"scaling_factor": 0.0}, "scaling_factor"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DecoderConfig(**kwargs)


@pytest.mark.parametrize("d,match", [
    ({"_class_name": "VQModel"}, "AutoencoderKL or AutoencoderTiny"),
    ({"_class_name": "AutoencoderKL", "act_fn": "gelu"}, "act_fn"),
    ({"_class_name": "AutoencoderKL", "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}, "latents_mean"),
    ({"_class_name": "AutoencoderTiny", "upsample_fn": "bilinear"}, "upsample_fn"),
])
def test_bad_diffusers_config(d, match):
    with pytest.raises(ConfigError, match=match):
        decoder_config_from_diffusers(d)


def test_checkpoint_of_other_design_is_refused(tmp_path):
    """A checkpoint with mid attention does not load into a decoder without it (keys named)."""
    vae = diffusers_vae(KL_SMALL)
    vae.save_pretrained(tmp_path)
    state = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="mid.attn"):
        load_state(build_decoder(dataclasses.replace(KL_SMALL, mid_attention=False)), state, DIFFUSERS_KL)
    state["decoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="decoder.extra.weight"):
        load_state(build_decoder(KL_SMALL), state, DIFFUSERS_KL)


def test_half_precision_decoder_takes_fp32_latents(tmp_path):
    vae = diffusers_vae(KL_SMALL)
    vae.save_pretrained(tmp_path)
    ours32, ours16 = load_decoder(tmp_path), load_decoder(tmp_path, dtype=torch.bfloat16)
    latents = torch.randn(1, 4, 8, 8) * KL_SMALL.scaling_factor
    with torch.no_grad():
        out16, out32 = ours16(latents), ours32(latents)
    assert out16.dtype == torch.bfloat16
    assert rel_err(out16.float(), out32) < 3e-2
