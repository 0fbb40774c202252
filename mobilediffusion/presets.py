"""The named presets (one place): every component and model this package knows by name, and `get_preset`.

Pure Python: importing this module does not import torch.
"""
from __future__ import annotations

import dataclasses

from .config import DecoderConfig, EncoderConfig, ModelConfig, ScheduleConfig, TextEncoderConfig, UNetConfig
from .errors import ConfigError

SD_TEXT = TextEncoderConfig()  # CLIP ViT-L/14
OPENCLIP_H_TEXT = TextEncoderConfig(  # OpenCLIP ViT-H/14 text tower as diffusers stores it (23 layers)
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    hidden_act="gelu", eos_token_id=2, pad_token_id=1, pad_token="!",
)
SD_KL_DECODER = DecoderConfig()  # the SD 1.x/2.x VAE decoder, 4-channel latents, 49.5M params
TAESD_DECODER = DecoderConfig(kind="tiny", scaling_factor=1.0)  # TAESD consumes sampler latents as they are; 1.2M
SD_KL_ENCODER = EncoderConfig()  # the SD 1.x/2.x VAE encoder (+ quant_conv), 4-channel latents, 34.2M params
TAESD_ENCODER = EncoderConfig(kind="tiny", scaling_factor=1.0)  # TAESD makes sampler latents itself; 1.2M
# MobileDiffusion's lite decoder (paper: 8-channel latents, 9.8M params): the KL decoder without mid
# attention, one resnet fewer per level, narrower; 64 wide at full resolution to keep its cost low there.
# 9,835,531 params (+0.4%). scaling_factor 1.0: no trained weights (hence no latent statistics) exist;
# set it from the latents' std once an encoder/decoder pair is trained.
LITE_DECODER = DecoderConfig(
    latent_channels=8, scaling_factor=1.0, block_out_channels=(64, 160, 256, 256), layers_per_block=1,
    mid_attention=False,
)
# the same design at test/demo size (8-channel latents, 593,867 params), for the `tiny` preset
TINY_LITE_DECODER = DecoderConfig(
    latent_channels=8, scaling_factor=1.0, block_out_channels=(16, 32, 64, 64), layers_per_block=1,
    mid_attention=False, norm_num_groups=8,
)

# UNets of the presets. Parameter counts (checked in tests/test_presets.py against diffusers'
# UNet2DConditionModel where diffusers can express the architecture):
SD15_UNET = UNetConfig()  # 859,520,964
SD21_BASE_UNET = UNetConfig(  # SD 2.x 512 (also SD-Turbo): OpenCLIP-H context, 64-wide heads; 865,910,724
    num_attention_heads=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
)
# BK-SDM (Nota AI, arXiv 2305.15798): SD1.4 with one resnet+attention pair fewer per down level
# (nota-ai/bk-sdm-*/unet/config.json); small also drops the mid block, tiny the innermost level.
BK_SDM_BASE_UNET = UNetConfig(layers_per_block=(1, 1, 1, 1))  # 579,384,964
BK_SDM_SMALL_UNET = UNetConfig(layers_per_block=(1, 1, 1, 1), mid_block=False)  # 482,346,884
BK_SDM_TINY_UNET = UNetConfig(  # 323,384,964
    block_out_channels=(320, 640, 1280), layers_per_block=(1, 1, 1), attention=("full", "full", "full"),
    transformer_depth=(1, 1, 1), num_attention_heads=(8, 8, 8), mid_block=False,
)
# SDXS-512-0.9 (IDKiro, arXiv 2403.16627): block-removed SD2.1-base, one block per level, no attention at
# 64x64, no mid block. Layout as in IDKiro/sdxs-512-dreamshaper's unet/config.json (3 levels 320/640/1280,
# DownBlock2D + 2 CrossAttnDownBlock2D, layers_per_block 1, mid_block_type null); sdxs-512-0.9 itself was
# distilled from SD2.1-base, so it takes OpenCLIP-H context (1024) with SD2's linear projections and
# 64-wide heads. 318,695,364 params, the paper's "0.32B" / 319M UNet.
SDXS_512_UNET = UNetConfig(
    block_out_channels=(320, 640, 1280), layers_per_block=(1, 1, 1), attention=("none", "full", "full"),
    transformer_depth=(1, 1, 1), num_attention_heads=(5, 10, 20), mid_block=False, cross_attention_dim=1024,
    use_linear_projection=True,
)
# MobileDiffusion (arXiv 2311.16567). Paper: 8-channel latents; transformers concentrated at the 16x16
# bottleneck; none at 64x64; cross-attention only (self-attention removed) at 32x32 and the outer 16x16;
# full transformer blocks at the inner 16x16 and the bottleneck stack; shared key/value projections;
# swish feed-forward with expansion 6; separable convolutions in the deeper levels; 386M UNet params.
# The paper gives no config file, so this is our reading: widths 320/640/1024, "outer" and "inner" 16x16
# as two levels at one resolution (downsample False between them), 7 full blocks in the bottleneck,
# separable convs at 16x16. 386,550,152 params (+0.14%). v-prediction keeps x0 well conditioned at the
# last timestep, where one-step sampling starts (epsilon-prediction divides by sqrt(alpha_bar) ~ 0.07).
MOBILEDIFFUSION_UNET = UNetConfig(
    in_channels=8, out_channels=8, block_out_channels=(320, 640, 1024, 1024), layers_per_block=(2, 1, 1, 1),
    downsample=(True, True, False, False), attention=("none", "cross", "cross", "full"),
    transformer_depth=(1, 1, 1, 1), num_attention_heads=(5, 10, 16, 16), mid_transformer_depth=7,
    separable=(False, False, True, True), ff_mult=6, ff_activation="swish", shared_kv=True,
    prediction_type="v_prediction",
)
# the same layout at test/demo size: 4,049,736 params, 64-wide context, 256x256 images
TINY_UNET = UNetConfig(
    in_channels=8, out_channels=8, block_out_channels=(32, 64, 128, 128), layers_per_block=(2, 1, 1, 1),
    downsample=(True, True, False, False), attention=("none", "cross", "cross", "full"),
    transformer_depth=(1, 1, 1, 1), num_attention_heads=(1, 2, 4, 4), mid_transformer_depth=2,
    cross_attention_dim=64, separable=(False, False, True, True), ff_mult=6, ff_activation="swish",
    shared_kv=True, prediction_type="v_prediction", sample_size=32,
)
TINY_TEXT = TextEncoderConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2)
# md-shapes: the first embedded default (its recipe: train/configs/md-shapes/), trained on the synthetic scenes
# (mobilediffusion.train) in minutes on a CPU. The MobileDiffusion layout scaled down to 64x64 images: a 3-level lite autoencoder (upscale 4, 8-channel
# 16x16 latents; 408,715 decoder params), a UNet with no attention at 16x16, cross-attention only at 8x8 and full
# transformers + separable convs at the 4x4 bottleneck (1,599,624 params), and a 2-layer, 32-wide CLIP text
# encoder with the packaged tokenizer (1,608,992 params, 98% of them the 49408-token embedding table).
# scaling_factor 1.0 here; a trained file states the value its latents need.
SHAPES_DECODER = DecoderConfig(
    latent_channels=8, scaling_factor=1.0, block_out_channels=(16, 32, 64), layers_per_block=1, mid_attention=False,
    norm_num_groups=8,
)
SHAPES_UNET = UNetConfig(
    in_channels=8, out_channels=8, block_out_channels=(32, 64, 96), layers_per_block=(1, 1, 1),
    downsample=(True, True, False), attention=("none", "cross", "full"), transformer_depth=(1, 1, 1),
    num_attention_heads=(1, 2, 2), mid_transformer_depth=1, cross_attention_dim=32, separable=(False, False, True),
    ff_mult=4, ff_activation="swish", shared_kv=True, norm_num_groups=8, prediction_type="v_prediction",
    sample_size=16,
)
SHAPES_TEXT = TextEncoderConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
# md-shapes-128: the embedded default (train/configs/*.json): the scenes at 128x128 with one object or two in a
# relation ("a red circle left of a blue square"). The same latent geometry as md-shapes (16x16, 8 channels) from a
# 4-level lite autoencoder (upscale 8; 593,867 decoder params), a wider UNet (3,170,488 params) and a 3-layer,
# 64-wide CLIP text encoder (3,317,120 params; word order decides which object is where).
SHAPES128_DECODER = DecoderConfig(
    latent_channels=8, scaling_factor=1.0, block_out_channels=(16, 32, 64, 64), layers_per_block=1,
    mid_attention=False, norm_num_groups=8,
)
SHAPES128_UNET = dataclasses.replace(SHAPES_UNET, block_out_channels=(48, 96, 128), num_attention_heads=(1, 2, 4),
                                     cross_attention_dim=64)
SHAPES128_TEXT = TextEncoderConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2)
# DDPM's linear schedule: alpha_bar(T-1) = 4e-5 (scaled_linear: 4.7e-3) leaves almost no image signal at the
# step one-step sampling starts from; with more left, a small model reads an object's place from the noise
# instead of from the prompt, and places objects at random when sampling starts from pure noise.
SHAPES_SCHEDULE = ScheduleConfig(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, timestep_spacing="trailing")

# multi-step SD-family schedules use "leading" spacing; one-step models start at the last timestep
LEADING = ScheduleConfig(timestep_spacing="leading")
TRAILING = ScheduleConfig(timestep_spacing="trailing")
ONE_STEP = dict(default_steps=1, default_guidance=0.0, default_sampler="onestep")

PRESETS: dict[str, ModelConfig] = {
    "mobilediffusion-512": ModelConfig(
        family="mobilediffusion", unet=MOBILEDIFFUSION_UNET, text=SD_TEXT, decoder=LITE_DECODER, schedule=TRAILING,
        latent_scale=LITE_DECODER.scaling_factor, **ONE_STEP,
    ),
    "sd15": ModelConfig(family="sd1", unet=SD15_UNET, text=SD_TEXT, decoder=SD_KL_DECODER, schedule=LEADING),
    "sd21-base": ModelConfig(
        family="sd2", unet=SD21_BASE_UNET, text=OPENCLIP_H_TEXT, decoder=SD_KL_DECODER, schedule=LEADING,
    ),
    "sd-turbo": ModelConfig(  # ADD-distilled SD2.1: 1-4 steps without CFG
        family="sd2", unet=SD21_BASE_UNET, text=OPENCLIP_H_TEXT, decoder=SD_KL_DECODER, schedule=TRAILING,
        **ONE_STEP,
    ),
    "bk-sdm-base": ModelConfig(
        family="bk-sdm", unet=BK_SDM_BASE_UNET, text=SD_TEXT, decoder=SD_KL_DECODER, schedule=LEADING,
        default_steps=25,
    ),
    "bk-sdm-small": ModelConfig(
        family="bk-sdm", unet=BK_SDM_SMALL_UNET, text=SD_TEXT, decoder=SD_KL_DECODER, schedule=LEADING,
        default_steps=25,
    ),
    "bk-sdm-tiny": ModelConfig(
        family="bk-sdm", unet=BK_SDM_TINY_UNET, text=SD_TEXT, decoder=SD_KL_DECODER, schedule=LEADING,
        default_steps=25,
    ),
    "sdxs-512": ModelConfig(
        family="sdxs", unet=SDXS_512_UNET, text=OPENCLIP_H_TEXT, decoder=TAESD_DECODER, schedule=TRAILING,
        **ONE_STEP,
    ),
    "tiny": ModelConfig(
        family="tiny", unet=TINY_UNET, text=TINY_TEXT, decoder=TINY_LITE_DECODER, schedule=TRAILING,
        resolution=256, latent_scale=TINY_LITE_DECODER.scaling_factor, **ONE_STEP,
    ),
    "md-shapes": ModelConfig(
        family="mobilediffusion", unet=SHAPES_UNET, text=SHAPES_TEXT, decoder=SHAPES_DECODER, schedule=SHAPES_SCHEDULE,
        resolution=64, latent_scale=SHAPES_DECODER.scaling_factor, **ONE_STEP,
    ),
    "md-shapes-128": ModelConfig(
        family="mobilediffusion", unet=SHAPES128_UNET, text=SHAPES128_TEXT, decoder=SHAPES128_DECODER,
        schedule=SHAPES_SCHEDULE, resolution=128, latent_scale=SHAPES128_DECODER.scaling_factor, **ONE_STEP,
    ),
}


def get_preset(name: str) -> ModelConfig:
    """The named preset; an unknown name lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
