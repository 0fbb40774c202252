"""Every preset builds, its UNet has the parameter count of the architecture it names, and its
parts fit together (context width, latent channels, schedule spacing)."""
import dataclasses

import pytest
import torch

from mobilediffusion.config import ModelConfig
from mobilediffusion.presets import PRESETS
from mobilediffusion.unet import UNet
from mobilediffusion.weights.unet_keys import unet_config_from_diffusers, unet_config_to_diffusers

# architectures diffusers' UNet2DConditionModel can express (the rest use MobileDiffusion-only parts)
DIFFUSERS_EXPRESSIBLE = ["sd15", "sd21-base", "sd-turbo", "bk-sdm-base", "bk-sdm-small", "bk-sdm-tiny", "sdxs-512"]
# UNet tensor counts of the released checkpoints (summed from their safetensors headers)
RELEASED = {"bk-sdm-base": 579_384_964, "bk-sdm-small": 482_346_884, "bk-sdm-tiny": 323_384_964}
ONE_STEP = {"mobilediffusion-512", "sd-turbo", "sdxs-512", "tiny", "md-shapes", "md-shapes-128"}


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _ours(name) -> int:
    return _count(UNet(PRESETS[name].unet, device=torch.device("meta")))


def test_expected_presets_exist():
    assert set(DIFFUSERS_EXPRESSIBLE) | {"mobilediffusion-512", "tiny", "md-shapes", "md-shapes-128"} == set(PRESETS)


@pytest.mark.parametrize("name", DIFFUSERS_EXPRESSIBLE)
def test_unet_parameter_count_equals_diffusers(name):
    diffusers = pytest.importorskip("diffusers")
    d = {k: v for k, v in unet_config_to_diffusers(PRESETS[name].unet).items() if not k.startswith("_")}
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**d)
    assert _ours(name) == _count(ref)


@pytest.mark.parametrize("name", list(RELEASED))
def test_unet_parameter_count_equals_released_checkpoint(name):
    assert _ours(name) == RELEASED[name]


def test_mobilediffusion_unet_is_386m():
    assert abs(_ours("mobilediffusion-512") / 386e6 - 1) <= 0.05


def test_tiny_unet_is_a_few_million():
    assert 1e6 <= _ours("tiny") <= 10e6


@pytest.mark.parametrize("name", DIFFUSERS_EXPRESSIBLE)
def test_diffusers_config_round_trip(name):
    cfg = PRESETS[name].unet
    back = unet_config_from_diffusers(unet_config_to_diffusers(cfg))
    assert back == dataclasses.replace(cfg, prediction_type="epsilon")  # prediction lives in the scheduler


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parts_fit(name):
    p = PRESETS[name]
    assert p.text.hidden_size == p.unet.cross_attention_dim
    assert p.decoder.latent_channels == p.unet.in_channels == p.unet.out_channels
    assert p.resolution % (8 * p.unet.size_multiple) == 0
    assert ModelConfig.from_json(p.to_json()) == p
    if name in ONE_STEP:
        assert p.schedule.timestep_spacing == "trailing"
        assert (p.default_steps, p.default_guidance, p.default_sampler) == (1, 0.0, "onestep")
    else:
        assert p.schedule.timestep_spacing == "leading"
        assert p.default_steps > 1 and p.default_guidance > 1


def test_mobilediffusion_preset_follows_the_paper():
    p = PRESETS["mobilediffusion-512"]
    u = p.unet
    assert p.latent_channels == 8 and p.text.hidden_size == 768
    assert u.attention[0] == "none" and "cross" in u.attention and u.mid_block
    assert (u.ff_mult, u.ff_activation, u.shared_kv) == (6, "swish", True)
    assert any(u.separable_flags)
