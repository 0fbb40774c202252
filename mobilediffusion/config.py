"""Frozen dataclass configs for each component (the named presets are in mobilediffusion.presets).

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
    `down_block_types`. A down level is `layers_per_block` blocks (a resnet, then an
    attention site unless the level's kind is "none"), followed by a 2x downsample when
    `downsample` says so. The mirrored up level has one block more (diffusers convention).
    `up_*` fields run innermost first (diffusers' `up_block_types` order); None mirrors the
    down path. Fields left None keep their derived default, so two equal architectures
    compare equal whichever way they were written.
    """

    in_channels: int = 4  # latent channels in (SD: 4, MobileDiffusion lite VAE: 8)
    out_channels: int = 4  # latent channels out
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # width per level
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)  # blocks per down level; up levels get one more
    # 2x downsample after each down level; None: every level but the last (SD). False keeps the
    # resolution, so two levels can share one (MobileDiffusion's "outer" and "inner" 16x16)
    downsample: tuple[bool, ...] | None = None
    # attention per down level: "none" (conv only), "cross" (cross-attention only, no
    # self-attention: MobileDiffusion at high resolution), "full" (self + cross: the SD block)
    attention: tuple[str, ...] = ("full", "full", "full", "none")
    up_attention: tuple[str, ...] | None = None  # per up level, innermost first; None mirrors `attention`
    transformer_depth: tuple[int, ...] = (1, 1, 1, 1)  # transformer blocks per attention site, per level
    up_transformer_depth: tuple[int, ...] | None = None  # per up level, innermost first; None mirrors
    num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)  # heads per level (SD1.5: 8; SD2: width / 64)
    mid_block: bool = True  # resnet, full transformer, resnet at the bottleneck; False for BK-SDM small/tiny, SDXS
    mid_transformer_depth: int | None = None  # transformer blocks in the mid block; None: the innermost level's
    mid_num_attention_heads: int | None = None  # None: the innermost level's heads
    cross_attention_dim: int = 768  # text context width D (CLIP ViT-L/14: 768, OpenCLIP-H: 1024)
    use_linear_projection: bool = False  # SD2 stores transformer proj_in/out as Linear, SD1 as 1x1 conv (same math)
    upcast_attention: bool = False  # attention in fp32 for half-precision inputs (SD2.1-v)
    separable: tuple[bool, ...] | None = None  # depthwise 3x3 + pointwise 1x1 resnet convs per level (mid
    # block: the innermost level's flag); None: regular 3x3 convs everywhere
    ff_mult: int = 4  # feed-forward hidden width / model width (MobileDiffusion: 6)
    ff_activation: str = "geglu"  # "geglu" (SD, gated) | "gelu" | "swish" (MobileDiffusion, not gated)
    shared_kv: bool = False  # one projection for key and value in cross-attention (MobileDiffusion option)
    norm_num_groups: int = 32  # GroupNorm groups in resnets and transformer input norms
    norm_eps: float = 1e-5  # GroupNorm eps in resnets and the output norm
    flip_sin_to_cos: bool = True  # timestep embedding as [cos, sin] (SD) instead of [sin, cos]
    freq_shift: int = 0  # timestep embedding frequency shift (diffusers downscale_freq_shift)
    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction" | "sample"
    sample_size: int = 64  # native latent size (image size / 8)

    def __post_init__(self):
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _check_choice("ff_activation", self.ff_activation, ("geglu", "gelu", "swish"))
        n = len(self.block_out_channels)
        if n < 1:
            raise ConfigError("UNetConfig.block_out_channels needs at least one level")
        per_level = ["layers_per_block", "attention", "transformer_depth", "num_attention_heads"]
        per_level += [f for f in ("downsample", "up_attention", "up_transformer_depth", "separable")
                      if getattr(self, f) is not None]
        for name in per_level:
            if len(getattr(self, name)) != n:
                raise ConfigError(f"UNetConfig.{name} needs one entry per level ({n}), got {getattr(self, name)!r}")
        for a in self.attention + (self.up_attention or ()):
            _check_choice("attention kind", a, ATTENTION_KINDS)
        if self.downsample is not None and self.downsample[-1]:
            raise ConfigError("UNetConfig.downsample: the innermost level cannot downsample; set its entry to False")
        for name in ("block_out_channels", "layers_per_block", "transformer_depth", "up_transformer_depth",
                     "num_attention_heads"):
            values = getattr(self, name) or ()
            if any(not isinstance(v, int) or v < 1 for v in values):
                raise ConfigError(f"UNetConfig.{name} must hold integers >= 1, got {values!r}")
        for name in ("mid_transformer_depth", "mid_num_attention_heads"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"UNetConfig.{name} must be None or an integer >= 1, got {v!r}")
        for name in ("in_channels", "out_channels", "cross_attention_dim", "ff_mult", "norm_num_groups"):
            if getattr(self, name) < 1:
                raise ConfigError(f"UNetConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ConfigError(
                    f"UNetConfig.block_out_channels {self.block_out_channels} must be multiples of "
                    f"norm_num_groups ({self.norm_num_groups})"
                )
        for i, (c, h) in enumerate(zip(self.block_out_channels, self.num_attention_heads)):
            if (self.attention[i] != "none" or self.up_attention_kinds[n - 1 - i] != "none") and c % h:
                raise ConfigError(f"level {i}: width {c} is not divisible by its {h} attention heads")
        if self.mid_block and self.block_out_channels[-1] % self.mid_heads:
            raise ConfigError(
                f"mid block: width {self.block_out_channels[-1]} is not divisible by its {self.mid_heads} heads"
            )

    # resolved views of the fields that default to "mirror" or "like the innermost level"
    @property
    def down_flags(self) -> tuple[bool, ...]:
        """Whether each down level ends with a 2x downsample."""
        n = len(self.block_out_channels)
        return self.downsample if self.downsample is not None else (True,) * (n - 1) + (False,)

    @property
    def up_attention_kinds(self) -> tuple[str, ...]:
        return self.up_attention if self.up_attention is not None else tuple(reversed(self.attention))

    @property
    def up_depths(self) -> tuple[int, ...]:
        return self.up_transformer_depth if self.up_transformer_depth is not None else tuple(reversed(self.transformer_depth))

    @property
    def separable_flags(self) -> tuple[bool, ...]:
        return self.separable if self.separable is not None else (False,) * len(self.block_out_channels)

    @property
    def mid_depth(self) -> int:
        return self.mid_transformer_depth if self.mid_transformer_depth is not None else self.transformer_depth[-1]

    @property
    def mid_heads(self) -> int:
        return self.mid_num_attention_heads if self.mid_num_attention_heads is not None else self.num_attention_heads[-1]

    @property
    def size_multiple(self) -> int:
        """Latent height and width must be multiples of this (2 ** number of downsamples)."""
        return 2 ** sum(self.down_flags)


ATTENTION_KINDS = ("none", "cross", "full")


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
    """Latent -> image decoder (see mobilediffusion.decoder).

    kind "kl": the SD VAE decoder (diffusers AutoencoderKL's post_quant_conv + decoder); the
    MobileDiffusion lite decoder is this architecture, narrower, without mid attention, 8-ch latents.
    kind "tiny": TAESD / diffusers AutoencoderTiny's decoder.
    The decoder takes sampler-space latents and undoes the scaling itself.
    """

    kind: str = "kl"  # "kl" | "tiny"
    latent_channels: int = 4  # SD: 4; MobileDiffusion lite decoder: 8 (paper sec. 3.3)
    scaling_factor: float = 0.18215  # sampler latents = (raw latents - shift_factor) * scaling_factor
    shift_factor: float = 0.0  # 0 for SD 1.x/2.x (diffusers stores None)
    # kl only
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # width per level, diffusers order (full res first)
    layers_per_block: int = 2  # diffusers convention: each up level has layers_per_block + 1 resnets
    mid_attention: bool = True  # the mid block's single-head self-attention (lite decoder: False)
    post_quant_conv: bool = True  # 1x1 latent conv before the decoder (diffusers use_post_quant_conv)
    norm_num_groups: int = 32  # GroupNorm groups; every width must be a multiple
    # tiny (TAESD) only
    tiny_channels: tuple[int, ...] = (64, 64, 64, 64)  # decoder_block_out_channels; one shared width
    tiny_blocks: tuple[int, ...] = (3, 3, 3, 1)  # num_decoder_blocks per level (TAESD: 3, 3, 3, 1)

    def __post_init__(self):
        _check_choice("decoder kind", self.kind, ("kl", "tiny"))
        if self.latent_channels < 1:
            raise ConfigError(f"DecoderConfig.latent_channels must be >= 1, got {self.latent_channels}")
        if not self.scaling_factor > 0:
            raise ConfigError(f"DecoderConfig.scaling_factor must be > 0, got {self.scaling_factor}")
        if self.kind == "kl":
            widths = self.block_out_channels
            if not widths or any(w < 1 or w % self.norm_num_groups for w in widths):
                raise ConfigError(
                    f"DecoderConfig.block_out_channels {widths!r} must be non-empty multiples of "
                    f"norm_num_groups ({self.norm_num_groups})"
                )
            if self.layers_per_block < 0:
                raise ConfigError(f"DecoderConfig.layers_per_block must be >= 0, got {self.layers_per_block}")
        else:
            if not self.tiny_channels or len(self.tiny_channels) != len(self.tiny_blocks):
                raise ConfigError(
                    f"DecoderConfig.tiny_channels {self.tiny_channels!r} and tiny_blocks {self.tiny_blocks!r} "
                    "need one entry per level (at least one)"
                )
            # diffusers' DecoderTiny gives each level's width only to that level's blocks, so the levels
            # can only chain when they share one width (true of every TAESD release)
            if len(set(self.tiny_channels)) != 1 or self.tiny_channels[0] < 1:
                raise ConfigError(f"DecoderConfig.tiny_channels must be one repeated width, got {self.tiny_channels!r}")
            if any(n < 0 for n in self.tiny_blocks):
                raise ConfigError(f"DecoderConfig.tiny_blocks must be >= 0, got {self.tiny_blocks!r}")

    @property
    def upscale(self) -> int:
        """Image pixels per latent pixel along each side (8 for 4 levels)."""
        levels = len(self.block_out_channels if self.kind == "kl" else self.tiny_channels)
        return 2 ** (levels - 1)


# --------------------------------------------------------------------------- encoders
@dataclass(frozen=True)
class EncoderConfig:
    """Image -> latent encoder (see mobilediffusion.encoder): images in [0, 1] -> sampler-space latents.

    kind "kl": the SD VAE encoder (diffusers AutoencoderKL's encoder + quant_conv); the posterior mean
    is the latent. MobileDiffusion's lite encoder is this design, narrower, without mid attention and
    with symmetric stride-2 padding: the mirror of its lite decoder (encoder.lite_encoder_config).
    kind "tiny": TAESD's encoder (diffusers AutoencoderTiny's): 3x3 convs with ReLU, residual blocks,
    stride-2 convs; it outputs sampler-space latents itself (scaling_factor 1, shift_factor 0).
    """

    kind: str = "kl"  # "kl" | "tiny"
    latent_channels: int = 4  # latent channels out (SD: 4, MobileDiffusion: 8, taesd3 / taef1: 16)
    scaling_factor: float = 0.18215  # sampler latents = (raw latents - shift_factor) * scaling_factor
    shift_factor: float = 0.0  # 0 for SD 1.x/2.x (diffusers stores None)
    # kl only
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # width per level, full resolution first
    layers_per_block: int = 2  # resnets per down level (diffusers' layers_per_block; the decoder has one more)
    mid_attention: bool = True  # the mid block's single-head self-attention (lite encoder: False)
    quant_conv: bool = True  # 1x1 conv on the (mean, logvar) moments (diffusers use_quant_conv)
    norm_num_groups: int = 32  # GroupNorm groups; every width must be a multiple
    # how a stride-2 conv pads: "asymmetric" (SD, diffusers, ldm: one zero row/column right and bottom,
    # conv padding 0) or "symmetric" (the lite encoder: conv padding 1). Same shapes, different sums.
    downsample_padding: str = "asymmetric"
    # tiny (TAESD) only
    tiny_channels: tuple[int, ...] = (64, 64, 64, 64)  # encoder_block_out_channels; one shared width
    tiny_blocks: tuple[int, ...] = (1, 3, 3, 3)  # num_encoder_blocks per level (TAESD: 1, 3, 3, 3)

    def __post_init__(self):
        _check_choice("encoder kind", self.kind, ("kl", "tiny"))
        _check_choice("downsample_padding", self.downsample_padding, ("asymmetric", "symmetric"))
        if self.latent_channels < 1:
            raise ConfigError(f"EncoderConfig.latent_channels must be >= 1, got {self.latent_channels}")
        if not self.scaling_factor > 0:
            raise ConfigError(f"EncoderConfig.scaling_factor must be > 0, got {self.scaling_factor}")
        if self.kind == "kl":
            widths = self.block_out_channels
            if not widths or any(w < 1 or w % self.norm_num_groups for w in widths):
                raise ConfigError(f"EncoderConfig.block_out_channels {widths!r} must be non-empty multiples of "
                                  f"norm_num_groups ({self.norm_num_groups})")
            if self.layers_per_block < 0:
                raise ConfigError(f"EncoderConfig.layers_per_block must be >= 0, got {self.layers_per_block}")
        else:
            if not self.tiny_channels or len(self.tiny_channels) != len(self.tiny_blocks):
                raise ConfigError(f"EncoderConfig.tiny_channels {self.tiny_channels!r} and tiny_blocks "
                                  f"{self.tiny_blocks!r} need one entry per level (at least one)")
            # diffusers' EncoderTiny gives each level's width to that level's stride conv as input and output,
            # so the levels only chain with one width (true of every TAESD release)
            if len(set(self.tiny_channels)) != 1 or self.tiny_channels[0] < 1:
                raise ConfigError(f"EncoderConfig.tiny_channels must be one repeated width, "
                                  f"got {self.tiny_channels!r}")
            if any(n < 0 for n in self.tiny_blocks):
                raise ConfigError(f"EncoderConfig.tiny_blocks must be >= 0, got {self.tiny_blocks!r}")

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel along each side (8 for 4 levels); image sides must be multiples."""
        levels = len(self.block_out_channels if self.kind == "kl" else self.tiny_channels)
        return 2 ** (levels - 1)


# --------------------------------------------------------------------------- noise schedule
@dataclass(frozen=True)
class ScheduleConfig:
    """Training noise schedule and inference timestep spacing (diffusers scheduler_config names).

    Defaults are SD1.5's scheduler_config. Samplers that diffusers implements without a given
    option ignore it as diffusers does (LCM ignores spacing and offset; only DDIM reads
    set_alpha_to_one). Thresholding and x0 clipping are not supported (latent models use neither).
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # "scaled_linear" (SD) | "linear"
    timestep_spacing: str = "leading"  # "leading" (SD1.5) | "trailing" (SD-Turbo, SDXS) | "linspace"
    steps_offset: int = 1  # SD1.x/2.x schedulers add 1 to leading timesteps
    set_alpha_to_one: bool = False  # DDIM's last step lands on alpha_bar 1 (True) or alpha_bar[0] (SD: False)
    original_inference_steps: int = 50  # LCM's distillation grid (steps picked from its timesteps)
    timestep_scaling: float = 10.0  # LCM boundary condition: c_skip, c_out of (t * timestep_scaling)

    def __post_init__(self):
        _check_choice("beta_schedule", self.beta_schedule, ("scaled_linear", "linear"))
        _check_choice("timestep_spacing", self.timestep_spacing, ("leading", "trailing", "linspace"))
        if not 1 <= self.original_inference_steps <= self.num_train_timesteps:
            raise ConfigError(
                f"original_inference_steps must be in [1, num_train_timesteps={self.num_train_timesteps}], "
                f"got {self.original_inference_steps}"
            )


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
    # the latent space: sampler latents = (raw VAE latents - latent_shift) * latent_scale. ComfyUI's LATENT
    # holds raw latents. For a KL decoder these equal its scaling/shift factors; a TAESD decoder consumes
    # sampler latents, so a model decoded by TAESD (SDXS) still states its latent space here.
    latent_scale: float = 0.18215
    latent_shift: float = 0.0
    default_steps: int = 20
    default_guidance: float = 7.5
    default_sampler: str = "dpmpp_2m"

    def __post_init__(self):
        d = self.decoder
        if d.kind == "kl" and (d.scaling_factor, d.shift_factor) != (self.latent_scale, self.latent_shift):
            raise ConfigError(
                f"latent_scale/latent_shift ({self.latent_scale}, {self.latent_shift}) differ from the KL decoder's "
                f"scaling/shift factors ({d.scaling_factor}, {d.shift_factor}); they describe the same latent space"
            )

    @property
    def latent_channels(self) -> int:
        """The latent space's channels: what the UNet makes (an inpainting UNet takes more in: see concat_channels)."""
        return self.unet.out_channels

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
            **{k: d[k] for k in ("resolution", "latent_scale", "latent_shift", "default_steps", "default_guidance",
                                 "default_sampler") if k in d},
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
