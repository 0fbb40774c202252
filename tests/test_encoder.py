"""Image encoders against diffusers on the same random weights, through every checkpoint layout we read,
and the shipped default's lite encoder + decoder round trip.

Reference: what a diffusers img2img pipeline does with an image x in [0, 1]: AutoencoderKL ->
(vae.encode(2x - 1).latent_dist.mean - shift_factor) * scaling_factor; AutoencoderTiny ->
(vae.encode(2x - 1).latents - shift_factor) * scaling_factor (TAESD: scaling 1, shift 0).
"""
import dataclasses
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import diffusers
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from mobilediffusion import load_decoder, load_encoder
from mobilediffusion.config import EncoderConfig, UNetConfig
from mobilediffusion.encoder import build_encoder, lite_encoder_config
from mobilediffusion.errors import CheckpointError, ConfigError
from mobilediffusion.loading import encoder_from_state, has_encoder
from mobilediffusion.pipeline import DEFAULT_WEIGHTS
from mobilediffusion.presets import SD_KL_ENCODER, TAESD_ENCODER
from mobilediffusion.unet import UNet
from mobilediffusion.weights.encoder_keys import (DIFFUSERS_KL_ENC, DIFFUSERS_TINY_ENC, LDM_KL_ENC,
                                                  TAESD_ENC, encoder_config_from_diffusers,
                                                  encoder_config_from_state, encoder_config_to_diffusers,
                                                  encoder_layout_from_keys)
from mobilediffusion.weights.single_file import single_file_tensors
from test_decoder_parity import randomize, rel_err

TOL = 1e-5

KL_SMALL = EncoderConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8)
KL_ODD = EncoderConfig(scaling_factor=1.5, shift_factor=0.1, block_out_channels=(8, 16, 16), layers_per_block=2,
                       mid_attention=False, quant_conv=False, norm_num_groups=4)
KL_SD32 = EncoderConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1)  # SD's 32 groups: read from keys
TINY_SMALL = EncoderConfig(kind="tiny", scaling_factor=1.0, tiny_channels=(16,) * 4, tiny_blocks=(1, 2, 1, 1))
SHAPES = [(1, 16, 16), (2, 24, 16)]  # (batch, H, W) of the images


def diffusers_vae(cfg, seed=0):
    cls_name, kwargs = encoder_config_to_diffusers(cfg)
    return randomize(getattr(diffusers, cls_name)(**kwargs), seed).eval()


@torch.no_grad()
def reference(vae, cfg, images):
    x = images * 2 - 1
    raw = vae.encode(x).latent_dist.mean if cfg.kind == "kl" else vae.encode(x).latents
    return (raw - cfg.shift_factor) * cfg.scaling_factor


@torch.no_grad()
def check_parity(ours, vae, cfg, shape, seed=1):
    B, H, W = shape
    images = torch.rand(B, 3, H, W, generator=torch.Generator().manual_seed(seed))
    ref, out = reference(vae, cfg, images), ours(images)
    f = cfg.downscale
    assert out.shape == (B, cfg.latent_channels, H // f, W // f) == ref.shape
    assert out.dtype == torch.float32 and ref.std() > 0.05  # not a degenerate (all-zero) comparison
    err = rel_err(out, ref)
    assert err <= TOL, err
    return err


# --------------------------------------------------------------------------- diffusers folders
@pytest.mark.parametrize("cfg", [KL_SMALL, KL_ODD, TINY_SMALL, TAESD_ENCODER],
                         ids=["kl", "kl-shift-noqc-nomid-3lvl", "tiny-small", "taesd"])
def test_diffusers_folder_parity(cfg, tmp_path):
    vae = diffusers_vae(cfg)
    vae.save_pretrained(tmp_path / "vae")
    ours = load_encoder(tmp_path / "vae")
    assert ours.config == cfg
    for shape in SHAPES:
        check_parity(ours, vae, cfg, shape)
    # the same VAE inside a pipeline folder: its vae/ is read
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    check_parity(load_encoder(tmp_path), vae, cfg, SHAPES[0])


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
    assert any(k.startswith("encoder.") and ".proj_attn." in k for k in state)
    save_file(state, f)
    check_parity(load_encoder(tmp_path), vae, KL_SMALL, SHAPES[0])


# --------------------------------------------------------------------------- ldm: single files, VAE files, ComfyUI
def ldm_name(k):
    """diffusers AutoencoderKL encoder key -> the original (ldm) SD VAE key, written out independently."""
    k = k.replace("encoder.mid_block.resnets.0.", "encoder.mid.block_1.")
    k = k.replace("encoder.mid_block.resnets.1.", "encoder.mid.block_2.")
    k = k.replace("encoder.mid_block.attentions.0.", "encoder.mid.attn_1.")
    for new, old in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
        k = k.replace(f"attn_1.{new}.", f"attn_1.{old}.")
    k = k.replace("encoder.conv_norm_out.", "encoder.norm_out.").replace("conv_shortcut", "nin_shortcut")
    k = k.replace("encoder.down_blocks.", "encoder.down.").replace(".resnets.", ".block.")
    return k.replace(".downsamplers.0.", ".downsample.")


def ldm_state(vae, prefix=""):
    """The encoder half (encoder.*, quant_conv.*) of a diffusers AutoencoderKL in ldm names; checked
    against diffusers' own ldm -> diffusers converter."""
    dstate = {k: v for k, v in vae.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}
    ldm = {}
    for k, v in dstate.items():
        v = v[:, :, None, None] if ".attentions.0.to_" in k and k.endswith("weight") else v  # ldm: 1x1 convs
        ldm[prefix + ldm_name(k)] = v
    n = len(vae.config.block_out_channels)
    back = convert_ldm_vae_checkpoint(ldm, {"down_block_types": [None] * n, "up_block_types": []})
    assert back.keys() == dstate.keys() and all(torch.equal(back[k], dstate[k]) for k in dstate)
    return ldm


def test_ldm_single_file_parity(tmp_path):
    """An SD single file: model.diffusion_model.* (a small UNet), first_stage_model.encoder.* + quant_conv."""
    vae = diffusers_vae(KL_SD32, seed=5)
    unet = UNet(UNetConfig(block_out_channels=(32, 64), layers_per_block=(1, 1), attention=("full", "none"),
                           transformer_depth=(1, 1), num_attention_heads=(8, 8), cross_attention_dim=32))
    tensors = single_file_tensors({"unet": unet}) | ldm_state(vae, "first_stage_model.")
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    assert has_encoder(path)
    ours = load_encoder(path)
    assert ours.config == KL_SD32
    for shape in SHAPES:
        check_parity(ours, vae, KL_SD32, shape)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_ldm_vae_file_and_comfyui_state_parity(suffix, tmp_path):
    """A standalone SD VAE file (models/vae) and ComfyUI's VAE.get_sd(): bare ldm names, both halves."""
    vae = diffusers_vae(KL_SD32, seed=6)
    state = ldm_state(vae)
    state["decoder.conv_in.weight"] = torch.zeros(64, 4, 3, 3)  # the decoder half: skipped by name
    state["post_quant_conv.weight"] = torch.zeros(4, 4, 1, 1)
    assert encoder_layout_from_keys(state) == ("kl", "ldm")
    check_parity(encoder_from_state(state, "ldm"), vae, KL_SD32, SHAPES[1])  # the bridge's path
    path = tmp_path / f"vae{suffix}"
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    check_parity(load_encoder(path), vae, KL_SD32, SHAPES[0])


# --------------------------------------------------------------------------- TAESD files
def taesd_state(vae):
    """A diffusers AutoencoderTiny's encoder in taesd_encoder.pth keys (the same stage indices)."""
    return {k[len("encoder.layers."):]: v.clone() for k, v in vae.state_dict().items() if k.startswith("encoder.")}


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_taesd_file_parity(suffix, tmp_path):
    vae = diffusers_vae(TAESD_ENCODER, seed=3)
    state = taesd_state(vae)
    assert "0.weight" in state and "1.conv.0.weight" in state and "14.bias" in state and "2.bias" not in state
    f = tmp_path / f"taesd_encoder{suffix}"
    save_file(state, f) if suffix == ".safetensors" else torch.save(state, f)
    assert has_encoder(f)
    ours = load_encoder(f)
    assert ours.config == TAESD_ENCODER
    for shape in SHAPES:
        check_parity(ours, vae, TAESD_ENCODER, shape)


@pytest.mark.parametrize("layout", ["encoder.", "comfyui"])
def test_taesd_prefixed_state_parity(layout, tmp_path):
    """A whole TAESD module's state (encoder. + decoder.) and ComfyUI's TAESD VAE state
    (taesd_encoder. + taesd_decoder. + vae_scale/vae_shift) read with the same map."""
    vae = diffusers_vae(TAESD_ENCODER, seed=4)
    enc_prefix, dec_prefix = ("encoder.", "decoder.") if layout == "encoder." else ("taesd_encoder.", "taesd_decoder.")
    state = {f"{enc_prefix}{k}": v for k, v in taesd_state(vae).items()}
    state[f"{dec_prefix}1.weight"] = torch.zeros(64, 4, 3, 3)
    if layout == "comfyui":
        state |= {"vae_scale": torch.tensor(0.18215), "vae_shift": torch.tensor(0.0)}
    assert encoder_layout_from_keys(state) == ("tiny", "taesd")
    check_parity(encoder_from_state(state, "taesd"), vae, TAESD_ENCODER, SHAPES[1])
    save_file(state, tmp_path / "taesd.safetensors")
    check_parity(load_encoder(tmp_path / "taesd.safetensors"), vae, TAESD_ENCODER, SHAPES[0])


def test_config_from_tensors():
    taesd3 = taesd_state(diffusers_vae(dataclasses.replace(TAESD_ENCODER, latent_channels=16)))
    assert encoder_config_from_state(taesd3, "taesd").latent_channels == 16  # taesd3 / taef1
    assert encoder_config_from_state(taesd_state(diffusers_vae(TINY_SMALL)), "taesd") == TINY_SMALL
    kl = diffusers_vae(KL_SMALL).state_dict()
    assert encoder_config_from_state(kl, "diffusers", norm_num_groups=8) == KL_SMALL
    odd = encoder_config_from_state(diffusers_vae(KL_ODD).state_dict(), "diffusers", scaling_factor=1.5,
                                    shift_factor=0.1, norm_num_groups=4)
    assert odd == KL_ODD
    shapes = {k: tuple(v.shape) for k, v in ldm_state(diffusers_vae(KL_SD32)).items()}  # shapes alone do
    assert encoder_config_from_state(shapes, "ldm") == KL_SD32


# --------------------------------------------------------------------------- the lite encoder
def scenes(n=6):
    from mobilediffusion.train.data import SceneConfig, SyntheticScenes

    data = SyntheticScenes(SceneConfig(resolution=128, relations=("left of", "above"), pair_fraction=0.5), "train",
                           length=n)
    images = np.stack([data[i].image for i in range(n)])  # (n, 128, 128, 3) uint8
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # (n, 3, 128, 128) in [0, 1]


def psnr(a, b):
    return 10 * math.log10(1 / ((a - b) ** 2).mean().item())


def test_shipped_default_round_trip():
    """Lite encoder -> lite decoder of the shipped default (md-shapes-128) reconstructs its scenes."""
    enc, dec = load_encoder(DEFAULT_WEIGHTS), load_decoder(DEFAULT_WEIGHTS)
    assert enc.config == lite_encoder_config(dec.config) and enc.config.downsample_padding == "symmetric"
    x = scenes()
    with torch.no_grad():
        latents = enc(x)
        y = dec(latents)
    assert latents.shape == (6, 8, 16, 16)
    assert 0.5 < latents.std().item() < 2  # the stored scaling_factor brings the latents to about unit scale
    quality = psnr(y, x)
    print(f"\nshipped default: lite encode -> decode of 6 scenes, PSNR {quality:.2f} dB")
    assert quality > 30, quality
    noise = psnr(dec(torch.randn_like(latents)), x)  # a decoder that ignored its input would not get there
    assert noise < 20, noise


def test_bf16_encoder_on_the_fast_path():
    fp32 = load_encoder(DEFAULT_WEIGHTS)
    bf16 = load_encoder(DEFAULT_WEIGHTS, dtype=torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16
    x = scenes(2)
    with torch.no_grad():
        a, b = fp32(x), bf16(x)
    assert b.dtype == torch.float32 and rel_err(b, a) < 3e-2, rel_err(b, a)


def test_moments_sample_and_mean():
    enc = randomize(build_encoder(KL_SMALL)).eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        mean, logvar = enc.moments(x)
        g = torch.Generator().manual_seed(0)
        sample = enc(x, generator=g)
        assert torch.allclose(enc(x), mean * KL_SMALL.scaling_factor)
    assert not torch.allclose(sample, enc(x)) and logvar.max() <= 20
    with pytest.raises(ConfigError, match="no posterior moments"):
        build_encoder(TINY_SMALL).moments(x)


# --------------------------------------------------------------------------- tables, configs, sizes
@pytest.mark.parametrize("km,cfg", [(DIFFUSERS_KL_ENC, SD_KL_ENCODER), (LDM_KL_ENC, SD_KL_ENCODER),
                                    (DIFFUSERS_TINY_ENC, TAESD_ENCODER), (TAESD_ENC, TAESD_ENCODER)],
                         ids=lambda v: getattr(v, "name", "") or getattr(v, "kind", ""))
def test_tables_round_trip(km, cfg):
    state = build_encoder(cfg, device="meta").state_dict()
    back = km.apply(km.reverse(state))
    assert set(back) == set(state) and all(back[k].shape == state[k].shape for k in state)


@pytest.mark.parametrize("cfg", [KL_SMALL, KL_ODD, TINY_SMALL, SD_KL_ENCODER, TAESD_ENCODER])
def test_config_round_trip(cfg):
    cls_name, kwargs = encoder_config_to_diffusers(cfg)
    d = {"_class_name": cls_name, **{k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}}
    assert encoder_config_from_diffusers(d) == cfg


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("cfg,expected", [(SD_KL_ENCODER, 34_163_664), (TAESD_ENCODER, 1_222_532)])
def test_parameter_counts(cfg, expected):
    cls_name, kwargs = encoder_config_to_diffusers(cfg)
    with torch.device("meta"):
        vae = getattr(diffusers, cls_name)(**kwargs)
    theirs = n_params(vae.encoder) + (n_params(vae.quant_conv) if cls_name == "AutoencoderKL" else 0)
    assert n_params(build_encoder(cfg, device="meta")) == theirs == expected


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("cfg,size,sizes", [(KL_SMALL, (30, 32), "24x32 or 32x32"),
                                            (TAESD_ENCODER, (64, 100), "64x96 or 64x104"),
                                            (KL_SMALL, (4, 8), "8x8 or 8x8")])
def test_image_size_the_encoder_cannot_take(cfg, size, sizes):
    enc = build_encoder(cfg)
    with pytest.raises(ConfigError, match=rf"multiples of 8 .* got {size[0]}x{size[1]} .*{sizes}"):
        enc(torch.rand(1, 3, *size))
    with pytest.raises(ConfigError, match=r"RGB images \(B, 3, H, W\), got shape \(1, 4, 32, 32\)"):
        enc(torch.rand(1, 4, 32, 32))


def test_wrong_files(tmp_path):
    from mobilediffusion.weights.native import save_native
    from mobilediffusion.loading import load_model_config, load_text_encoder, load_unet

    # 1. a TAESD decoder where an encoder is wanted (and the other way round)
    dec = {"1.weight": torch.zeros(64, 4, 3, 3), "3.conv.0.weight": torch.zeros(64, 64, 3, 3)}
    save_file(dec, tmp_path / "taesd_decoder.safetensors")
    assert not has_encoder(tmp_path / "taesd_decoder.safetensors")
    with pytest.raises(CheckpointError, match=r"TAESD decoder: pick the \*_encoder file"):
        load_encoder(tmp_path / "taesd_decoder.safetensors")
    with pytest.raises(CheckpointError, match="TAESD decoder"):
        encoder_from_state(dec, "taesd")
    save_file(taesd_state(diffusers_vae(TINY_SMALL)), tmp_path / "taesd_encoder.safetensors")
    with pytest.raises(CheckpointError, match="holds an image encoder but no decoder"):
        load_decoder(tmp_path / "taesd_encoder.safetensors")
    # 2. a native file saved without its encoder
    m = DEFAULT_WEIGHTS
    path = save_native(tmp_path / "no-encoder.safetensors", load_model_config(m), load_unet(m), load_text_encoder(m),
                       load_decoder(m))
    assert has_encoder(DEFAULT_WEIGHTS) and not has_encoder(path)
    with pytest.raises(CheckpointError, match="saved without its lite encoder"):
        load_encoder(path)
    # 3. not a VAE at all, and a key that belongs to no encoder
    save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(1)}, tmp_path / "lora.safetensors")
    with pytest.raises(CheckpointError, match="is a LoRA"):
        load_encoder(tmp_path / "lora.safetensors")
    state = ldm_state(diffusers_vae(KL_SD32))
    state["encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="encoder.extra.weight"):
        encoder_from_state(state, "ldm")
    with pytest.raises(CheckpointError, match="unknown encoder state layout 'comfy'"):
        encoder_from_state(state, "comfy")
    with pytest.raises(CheckpointError, match="expected a taesd encoder state, found a ldm encoder"):
        encoder_from_state(state, "taesd")


@pytest.mark.parametrize("kwargs,match", [
    ({"block_out_channels": (48, 64)}, "multiples of norm_num_groups"),
    ({"kind": "tiny", "tiny_channels": (64, 32, 32, 32)}, "one repeated width"),
    ({"kind": "tiny", "tiny_blocks": (3, 3)}, "one entry per level"),
    ({"downsample_padding": "reflect"}, "unknown downsample_padding"),
    ({"kind": "vq"}, "unknown encoder kind"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        EncoderConfig(**kwargs)


def test_lite_encoder_has_no_diffusers_twin():
    with pytest.raises(ConfigError, match="symmetric padding"):
        encoder_config_to_diffusers(lite_encoder_config(load_decoder(DEFAULT_WEIGHTS).config))
