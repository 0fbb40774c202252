"""Frozen dataclass configs for each component, and the named presets (one place).

Pure Python: importing this module does not import torch.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from .errors import ConfigError


# --------------------------------------------------------------------------- UNet
@dataclass(frozen=True)
class UNetConfig:
    """Conditional UNet covering the SD family, BK-SDM, SDXS and the MobileDiffusion layout.

    Per-level tuples run outermost (highest resolution) first, as in diffusers'
    `down_block_types`; the up path mirrors the down path unless `up_*` fields say otherwise.
    """

    in_channels: int = 4  # latent channels in
    out_channels: int = 4  # latent channels out
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # width per level
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)  # resnets per down level; up levels get one more
    # attention per down level: "none" (conv only), "cross" (cross-attention only, MobileDiffusion),
    # "full" (self + cross, the SD transformer block)
    attention: tuple[str, ...] = ("full", "full", "full", "none")
    up_attention: tuple[str, ...] | None = None  # per up level, innermost first; None mirrors `attention`
    transformer_depth: tuple[int, ...] = (1, 1, 1, 1)  # transformer blocks per attention site, per level
    up_transformer_depth: tuple[int, ...] | None = None  # per up level, innermost first; None mirrors
    num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)  # heads per level (SD1.5: head dim = width / 8)
    mid_block: bool = True  # diffusers mid_block_type None -> False (BK-SDM small/tiny, SDXS)
    mid_transformer_depth: int = 1  # transformer blocks in the mid block
    mid_num_attention_heads: int | None = None  # None: the innermost level's heads
    cross_attention_dim: int = 768  # text context width (CLIP ViT-L/14: 768, OpenCLIP-H: 1024)
    use_linear_projection: bool = False  # transformer proj_in/out as Linear (SD2) instead of 1x1 conv
    upcast_attention: bool = False  # attention scores in fp32 (SD2.1)
    separable: tuple[bool, ...] = (False, False, False, False)  # depthwise-separable 3x3 convs per level
    ff_mult: int = 4  # feed-forward expansion (MobileDiffusion: 6)
    ff_activation: str = "geglu"  # "geglu" (SD) | "gelu" | "swish" (MobileDiffusion)
    shared_kv: bool = False  # one projection for key and value in cross-attention (MobileDiffusion option)
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True  # diffusers timestep embedding convention for SD
    freq_shift: int = 0
    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction" | "sample"
    sample_size: int = 64  # native latent size (image size / 8)

    def __post_init__(self):
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        n = len(self.block_out_channels)
        for name in ("layers_per_block", "attention", "transformer_depth", "num_attention_heads", "separable"):
            if len(getattr(self, name)) != n:
                raise ConfigError(f"UNetConfig.{name} needs one entry per level ({n}), got {getattr(self, name)!r}")
        for a in self.attention + (self.up_attention or ()):
            _check_choice("attention", a, ("none", "cross", "full"))
        _check_choice("ff_activation", self.ff_activation, ("geglu", "gelu", "swish"))


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# --------------------------------------------------------------------------- text encoder
@dataclass(frozen=True)
class TextEncoderConfig:
    """CLIP text transformer (transformers' CLIPTextModel). Defaults: OpenAI CLIP ViT-L/14."""

    vocab_size: int = 49408
    hidden_size: int = 768  # context width D handed to the UNet
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77  # tokens per prompt, including BOS/EOS
    hidden_act: str = "quick_gelu"  # ViT-L/14: quick_gelu; OpenCLIP-H (SD2): gelu
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 0
    eos_token_id: int = 49407  # 2 in older OpenCLIP exports; only used for pooled output
    pad_token_id: int = 1
    pad_token: str = "<|endoftext|>"  # SD2's tokenizer pads with "!"

    def to_transformers(self):
        """The equivalent transformers.CLIPTextConfig."""
        from transformers import CLIPTextConfig

        fields = dataclasses.asdict(self)
        fields.pop("pad_token")
        return CLIPTextConfig(**fields)


# --------------------------------------------------------------------------- decoders
@dataclass(frozen=True)
class DecoderConfig:
    """Latent -> image decoder.

    kind "kl": the SD VAE decoder (diffusers AutoencoderKL's decoder + post_quant_conv);
    the MobileDiffusion lite decoder is this architecture, narrower and without mid attention.
    kind "tiny": TAESD / diffusers AutoencoderTiny's decoder.
    """

    kind: str = "kl"
    latent_channels: int = 4
    scaling_factor: float = 0.18215  # sampler latents = (raw latents - shift_factor) * scaling_factor
    shift_factor: float = 0.0
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # diffusers order (outermost first)
    layers_per_block: int = 2  # diffusers convention: each up level has layers_per_block + 1 resnets
    mid_attention: bool = True  # the KL decoder's mid-block self-attention (lite: False)
    norm_num_groups: int = 32
    out_channels: int = 3
    # tiny (TAESD) only
    tiny_channels: tuple[int, ...] = (64, 64, 64, 64)  # decoder_block_out_channels
    tiny_blocks: tuple[int, ...] = (3, 3, 3, 1)  # num_decoder_blocks per level
    tiny_latent_magnitude: float = 3.0  # input clamp: tanh(x / m) * m

    def __post_init__(self):
        _check_choice("decoder kind", self.kind, ("kl", "tiny"))


# --------------------------------------------------------------------------- noise schedule
@dataclass(frozen=True)
class ScheduleConfig:
    """Training noise schedule and inference timestep spacing (diffusers scheduler_config names)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # "scaled_linear" (SD) | "linear"
    timestep_spacing: str = "leading"  # "leading" (SD1.5) | "trailing" (SD-Turbo, SDXS) | "linspace"
    steps_offset: int = 1  # SD1.x/2.x schedulers add 1 to leading timesteps
    original_inference_steps: int = 50  # LCM's skipping grid

    def __post_init__(self):
        _check_choice("beta_schedule", self.beta_schedule, ("scaled_linear", "linear"))
        _check_choice("timestep_spacing", self.timestep_spacing, ("leading", "trailing", "linspace"))


# --------------------------------------------------------------------------- whole model
@dataclass(frozen=True)
class ModelConfig:
    """A whole text-to-image model: its components and how to sample it by default."""

    family: str  # "mobilediffusion", "sd1", "sd2", "bk-sdm", "sdxs", "tiny"
    unet: UNetConfig
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    resolution: int = 512  # native image size in pixels
    default_steps: int = 20
    default_guidance: float = 7.5
    default_sampler: str = "dpmpp_2m"

    @property
    def latent_channels(self) -> int:
        return self.unet.in_channels

    @property
    def prediction_type(self) -> str:
        return self.unet.prediction_type

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        """Inverse of to_json; unknown keys are an error (a config from a newer version)."""
        d = json.loads(text)
        return cls(
            family=d["family"],
            unet=_from_dict(UNetConfig, d["unet"]),
            text=_from_dict(TextEncoderConfig, d["text"]),
            decoder=_from_dict(DecoderConfig, d["decoder"]),
            schedule=_from_dict(ScheduleConfig, d["schedule"]),
            **{k: d[k] for k in ("resolution", "default_steps", "default_guidance", "default_sampler")},
        )


def _from_dict(cls, d: dict):
    """Build a frozen config from a dict; lists become tuples; unknown keys are refused by name."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys {unknown}; known keys: {sorted(names)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _check_choice(what: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {what} {value!r}; expected one of {', '.join(map(repr, choices))}")


# --------------------------------------------------------------------------- presets
SD_TEXT = TextEncoderConfig()  # CLIP ViT-L/14
OPENCLIP_H_TEXT = TextEncoderConfig(  # OpenCLIP ViT-H/14 text tower as diffusers stores it (23 layers)
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    hidden_act="gelu", eos_token_id=2, pad_token_id=1, pad_token="!",
)
SD_KL_DECODER = DecoderConfig()  # the SD 1.x/2.x VAE decoder, 4-channel latents
TAESD_DECODER = DecoderConfig(kind="tiny", scaling_factor=1.0)  # TAESD consumes sampler latents as they are

PRESETS: dict[str, ModelConfig] = {
    "sd15": ModelConfig(family="sd1", unet=UNetConfig()),
}


def get_preset(name: str) -> ModelConfig:
    """The named preset; an unknown name lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
