"""Components from in-memory state dicts in the layouts ComfyUI's MODEL / CLIP / VAE hold (the bridge's package
side). The state dicts are our tiny models written under single-file names with the component prefix cut off,
which is what ComfyUI's objects hold (COMFY-MODELS.md 1.4); the real objects are checked in the opt-in
ComfyUI integration test (tests/comfy/bridge_check.py)."""
import dataclasses

import pytest
import torch

from mobilediffusion import from_state as fs
from mobilediffusion.config import TextEncoderConfig, UNetConfig
from mobilediffusion.decoder import build_decoder
from mobilediffusion.errors import CheckpointError, ConfigError
from mobilediffusion.presets import OPENCLIP_H_TEXT, SD_KL_DECODER, TAESD_DECODER
from mobilediffusion.text_encoder import TextEncoder
from mobilediffusion.unet import UNet
from mobilediffusion.weights.single_file import single_file_tensors

UNET = UNetConfig(block_out_channels=(32, 64), layers_per_block=(1, 1), attention=("full", "none"),
                  transformer_depth=(1, 1), num_attention_heads=(2, 4), cross_attention_dim=32)
TEXT = TextEncoderConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)
VAE = dataclasses.replace(SD_KL_DECODER, block_out_channels=(32, 32, 64, 64), layers_per_block=1)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def cut(tensors: dict, prefix: str, new: str = "") -> dict:
    return {new + k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    unet, text, vae = UNet(UNET).eval(), TextEncoder(TEXT).eval(), build_decoder(VAE).eval()
    tensors = single_file_tensors({"unet": unet, "text_encoder": text, "decoder": vae})
    return {"unet": unet, "text": text, "vae": vae,
            "unet_sd": cut(tensors, "model.diffusion_model."),  # a MODEL's diffusion_model.* without the prefix
            "text_sd": cut(tensors, "cond_stage_model.transformer."),  # a CLIP's clip_l.transformer.* likewise
            "vae_sd": cut(tensors, "first_stage_model.")}  # vae.get_sd()


def test_unet_from_ldm_state_equals_source(parts):
    shapes = fs.shapes_of(parts["unet_sd"])
    cfg, preset = fs.unet_config_from_state(shapes, prediction_type="v_prediction", head_channels=16)
    assert preset is None and cfg.prediction_type == "v_prediction" and cfg.num_attention_heads == (2, 4)
    assert fs.unet_config_from_state(shapes, num_heads=4)[0].num_attention_heads == (4, 4)
    assert fs.unet_config_from_state(shapes)[0].num_attention_heads == (8, 8)  # SD 1.x's convention
    ours = fs.build_unet(parts["unet_sd"], cfg)
    x, t, c = torch.randn(1, 4, 16, 16), torch.tensor([400]), torch.randn(1, 7, 32)
    with torch.no_grad():
        assert rel(ours(x, t, c), parts["unet"](x, t, c)) <= 1e-5


def test_unet_preset_override_must_fit(parts):
    with pytest.raises(ConfigError, match="preset 'sd15' does not fit this UNet.*choose auto"):
        fs.unet_config_from_state(fs.shapes_of(parts["unet_sd"]), preset="sd15")


def test_text_layers_follow_comfy_layer_index(parts):
    shapes = fs.shapes_of(parts["text_sd"])
    total = fs.text_layer_count(shapes)
    assert total == 3
    assert [fs.layers_used(total, i) for i in (None, -1, -2, -3, 0, 1, -24)] == [3, 3, 2, 1, 1, 2, 3]
    ids = parts["text"].tokenize(["a red circle"])
    for layer_idx in (-1, -2):
        cfg = fs.text_config_from_state(shapes, base=TextEncoderConfig(), layers=fs.layers_used(total, layer_idx),
                                        heads=2)
        ours = fs.build_text_encoder(parts["text_sd"], cfg)
        # the reference: the source encoder's hidden state after that layer, then its final layer norm
        with torch.no_grad():
            out = parts["text"].model(input_ids=ids, output_hidden_states=True)
            inner = getattr(parts["text"].model, "text_model", parts["text"].model)  # transformers 4 / 5
            ref = inner.final_layer_norm(out.hidden_states[total + layer_idx + 1])
            assert rel(ours.encode(ids), ref) <= 1e-5


def test_text_config_keeps_what_the_caller_read(parts):
    cfg = fs.text_config_from_state(fs.shapes_of(parts["text_sd"]), base=OPENCLIP_H_TEXT, layers=2,
                                    hidden_act="quick_gelu", heads=4)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (32, 64, 2, 4)
    assert cfg.hidden_act == "quick_gelu" and cfg.pad_token == "!"  # the base's padding stays


def test_decoder_from_vae_state(parts):
    shapes = fs.shapes_of(parts["vae_sd"])
    assert fs.vae_kind(shapes) == "kl"
    ours = fs.build_decoder_from_state(parts["vae_sd"], fs.decoder_config_from_state(shapes))
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert rel(ours(z), parts["vae"](z)) <= 1e-5


def test_taesd_vae_state_with_comfy_prefixes():
    torch.manual_seed(1)
    taesd = build_decoder(TAESD_DECODER).eval()
    state = {"taesd_decoder." + k.removeprefix("layers."): v for k, v in taesd.state_dict().items()}
    state.update({"taesd_encoder.0.weight": torch.zeros(64, 3, 3, 3), "vae_scale": torch.tensor(1.0),
                  "vae_shift": torch.tensor(0.0)})
    shapes = fs.shapes_of(state)
    assert fs.vae_kind(shapes) == "taesd"
    ours = fs.build_decoder_from_state(state, fs.decoder_config_from_state(shapes))
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():  # before the [0, 1] clamp: a random TAESD can map everything below 0
        assert rel(ours.layers(z), taesd.layers(z)) <= 1e-5 and taesd.layers(z).abs().max() > 0


def test_unknown_vae_is_refused():
    with pytest.raises(CheckpointError, match="neither an SD VAE nor TAESD"):
        fs.vae_kind({"encoder.layers.0.weight": (1,)})


def test_model_config_defaults_and_overrides(parts):
    cfg, _ = fs.unet_config_from_state(fs.shapes_of(parts["unet_sd"]))
    m = fs.model_config(cfg, None, latent_scale=0.5)
    assert (m.default_steps, m.default_sampler, m.latent_scale) == (20, "dpmpp_2m", 0.5)
    lcm = fs.model_config(cfg, None, default_sampler="lcm", default_steps=4, default_guidance=1.0)
    assert (lcm.default_steps, lcm.default_sampler, lcm.default_guidance) == (4, "lcm", 1.0)
