"""UNet checkpoints -> our UNet: state-dict key maps, and diffusers config conversion.

diffusers map: `down_blocks.i.resnets.j` / `attentions.j` become our `down.i.blocks.j.res` /
`.attn` (a block is a resnet and its attention site); `up_blocks` keep diffusers' innermost-first
index as `up.i`; `mid_block.resnets.j` -> `mid.res.j`. Inside a site, `transformer_blocks.k` ->
`blocks.k`, `to_out.0` -> `to_out`, `ff.net.0.proj` / `ff.net.2` -> `ff.fc1` / `ff.fc2`.

Single-file (original Stable Diffusion / LDM) map: `model.diffusion_model.input_blocks.n`,
`middle_block.n`, `output_blocks.n` number the blocks consecutively, so the table is built
for a config (`ldm_unet_keymap(cfg)`); attention sites use the same inner names as diffusers.
"""
from __future__ import annotations

import re

from ..config import UNetConfig
from ..errors import ConfigError
from .keymap import KeyMap

_P = r"(?P<p>weight|bias)"

# what is inside a resnet / attention site: (checkpoint suffix, our suffix)
_DIFFUSERS_RESNET = (
    (r"(?P<n>norm1|conv1|norm2|conv2)", r"\g<n>"),
    (r"time_emb_proj", r"time_proj"),
    (r"conv_shortcut", r"shortcut"),
)
_LDM_RESNET = (
    (r"in_layers\.0", r"norm1"),
    (r"in_layers\.2", r"conv1"),
    (r"emb_layers\.1", r"time_proj"),
    (r"out_layers\.0", r"norm2"),
    (r"out_layers\.3", r"conv2"),
    (r"skip_connection", r"shortcut"),
)
_ATTENTION = (  # diffusers and LDM name the inside of a transformer alike
    (r"(?P<n>norm|proj_in|proj_out)", r"\g<n>"),
    (r"transformer_blocks\.(?P<k>\d+)\.(?P<n>norm[123])", r"blocks.\g<k>.\g<n>"),
    (r"transformer_blocks\.(?P<k>\d+)\.(?P<a>attn[12])\.(?P<w>to_q|to_k|to_v)", r"blocks.\g<k>.\g<a>.\g<w>"),
    (r"transformer_blocks\.(?P<k>\d+)\.(?P<a>attn[12])\.to_out\.0", r"blocks.\g<k>.\g<a>.to_out"),
    (r"transformer_blocks\.(?P<k>\d+)\.ff\.net\.0\.proj", r"blocks.\g<k>.ff.fc1"),
    (r"transformer_blocks\.(?P<k>\d+)\.ff\.net\.2", r"blocks.\g<k>.ff.fc2"),
)


def _compose(plain, resnets, attentions, resnet_parts) -> tuple:
    """Full-key rules: each plain (src, dst) layer, and every site x part pair of resnets/attentions."""
    rules = [(rf"{src}\.{_P}", rf"{dst}.\g<p>") for src, dst in plain]
    for sites, parts in ((resnets, resnet_parts), (attentions, _ATTENTION)):
        for site_src, site_dst in sites:
            for part_src, part_dst in parts:
                rules.append((rf"{site_src}\.{part_src}\.{_P}", rf"{site_dst}.{part_dst}.\g<p>"))
    return tuple(rules)


DIFFUSERS_UNET = KeyMap("diffusers UNet2DConditionModel", _compose(
    plain=(
        (r"time_embedding\.linear_1", r"time_embed.fc1"),
        (r"time_embedding\.linear_2", r"time_embed.fc2"),
        (r"conv_in", r"conv_in"),
        (r"conv_norm_out", r"norm_out"),
        (r"conv_out", r"conv_out"),
        (r"down_blocks\.(?P<i>\d+)\.downsamplers\.0\.conv", r"down.\g<i>.downsample"),
        (r"up_blocks\.(?P<i>\d+)\.upsamplers\.0\.conv", r"up.\g<i>.upsample.conv"),
    ),
    resnets=(
        (r"down_blocks\.(?P<i>\d+)\.resnets\.(?P<j>\d+)", r"down.\g<i>.blocks.\g<j>.res"),
        (r"up_blocks\.(?P<i>\d+)\.resnets\.(?P<j>\d+)", r"up.\g<i>.blocks.\g<j>.res"),
        (r"mid_block\.resnets\.(?P<j>\d+)", r"mid.res.\g<j>"),
    ),
    attentions=(
        (r"down_blocks\.(?P<i>\d+)\.attentions\.(?P<j>\d+)", r"down.\g<i>.blocks.\g<j>.attn"),
        (r"up_blocks\.(?P<i>\d+)\.attentions\.(?P<j>\d+)", r"up.\g<i>.blocks.\g<j>.attn"),
        (r"mid_block\.attentions\.0", r"mid.attn"),
    ),
    resnet_parts=_DIFFUSERS_RESNET,
))


def unet_keymap(cfg: UNetConfig | None = None) -> KeyMap:
    """The key map for a diffusers UNet checkpoint; the table is the same for every config."""
    return DIFFUSERS_UNET


LDM_PREFIX = "model.diffusion_model."  # where a single-file SD checkpoint keeps its UNet


def ldm_unet_keymap(cfg: UNetConfig, prefix: str = LDM_PREFIX) -> KeyMap:
    """Key map for the UNet of a single-file SD checkpoint (keys `model.diffusion_model.*`).

    Block numbers depend on the layout, hence on `cfg`; other components' keys in the file
    (cond_stage_model.*, first_stage_model.*) are not part of this map: read the UNet with
    `read_tensors(path, prefix=LDM_PREFIX)`. Raises ConfigError for layouts SD checkpoints cannot have.
    """
    bad = _non_sd_features(cfg)
    if bad:
        raise ConfigError(f"a single-file SD checkpoint cannot hold this UNet layout: {', '.join(bad)}")
    pre = re.escape(prefix)
    plain = [(r"time_embed\.0", "time_embed.fc1"), (r"time_embed\.2", "time_embed.fc2"),
             (r"input_blocks\.0\.0", "conv_in"), (r"out\.0", "norm_out"), (r"out\.2", "conv_out")]
    resnets, attentions = [], []
    # 1. input blocks: one per block, one per downsample
    n = 1
    for i, count in enumerate(cfg.layers_per_block):
        for j in range(count):
            resnets.append((rf"input_blocks\.{n}\.0", f"down.{i}.blocks.{j}.res"))
            if cfg.attention[i] != "none":
                attentions.append((rf"input_blocks\.{n}\.1", f"down.{i}.blocks.{j}.attn"))
            n += 1
        if cfg.down_flags[i]:
            plain.append((rf"input_blocks\.{n}\.0\.op", f"down.{i}.downsample"))
            n += 1
    # 2. middle block: resnet, transformer, resnet
    if cfg.mid_block:
        resnets += [(r"middle_block\.0", "mid.res.0"), (r"middle_block\.2", "mid.res.1")]
        attentions.append((r"middle_block\.1", "mid.attn"))
    # 3. output blocks, innermost level first; the upsample sits in the level's last block
    n, levels = 0, len(cfg.block_out_channels)
    for u in range(levels):
        i = levels - 1 - u
        has_attn = cfg.up_attention_kinds[u] != "none"
        count = cfg.layers_per_block[i] + 1
        for j in range(count):
            resnets.append((rf"output_blocks\.{n}\.0", f"up.{u}.blocks.{j}.res"))
            if has_attn:
                attentions.append((rf"output_blocks\.{n}\.1", f"up.{u}.blocks.{j}.attn"))
            if j == count - 1 and i > 0 and cfg.down_flags[i - 1]:
                plain.append((rf"output_blocks\.{n}\.{2 if has_attn else 1}\.conv", f"up.{u}.upsample.conv"))
            n += 1
    rules = _compose(plain, resnets, attentions, _LDM_RESNET)
    return KeyMap(f"single-file SD UNet ({prefix}*)", tuple((pre + src, dst) for src, dst in rules))


# --------------------------------------------------------------------------- configs
_DOWN_TYPES = {"CrossAttnDownBlock2D": "full", "DownBlock2D": "none"}
_UP_TYPES = {"CrossAttnUpBlock2D": "full", "UpBlock2D": "none"}
_MID_TYPES = {None: False, "UNetMidBlock2DCrossAttn": True}

# diffusers options this UNet does not implement, with the value that means "off" (null is off too)
_UNSUPPORTED_OFF = {
    "class_embed_type": None,
    "num_class_embeds": None,
    "addition_embed_type": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_cond_proj_dim": None,
    "timestep_post_act": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "projection_class_embeddings_input_dim": None,
    "cross_attention_norm": None,
    "dual_cross_attention": False,
    "class_embeddings_concat": False,
    "center_input_sample": False,
    "resnet_skip_time_act": False,
    "mid_block_only_cross_attention": None,
    "act_fn": "silu",
    "time_embedding_type": "positional",
    "resnet_time_scale_shift": "default",
    "attention_type": "default",
    "resnet_out_scale_factor": 1.0,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
}


def unet_config_from_diffusers(d: dict) -> UNetConfig:
    """UNetConfig from a diffusers UNet2DConditionModel config.json dict (any SD-family UNet).

    The prediction type is not part of a UNet config (it lives in the scheduler config), so it
    stays "epsilon". Raises ConfigError naming any option this UNet does not implement.
    """
    # 1. refuse what we do not implement
    bad = [f"{k}={d[k]!r}" for k, off in _UNSUPPORTED_OFF.items() if d.get(k) is not None and d[k] != off]
    oca = d.get("only_cross_attention", False)
    if oca is True or (isinstance(oca, (list, tuple)) and any(oca)):
        bad.append(f"only_cross_attention={oca!r}")
    down_types = list(d.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
    up_types = list(d.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
    mid_type = d.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    bad += [f"down block {t!r}" for t in down_types if t not in _DOWN_TYPES]
    bad += [f"up block {t!r}" for t in up_types if t not in _UP_TYPES]
    if mid_type not in _MID_TYPES:
        bad.append(f"mid_block_type={mid_type!r}")
    if bad:
        raise ConfigError(
            f"this UNet config uses options MobileDiffusion does not implement: {', '.join(bad)}; "
            "supported are SD 1.x/2.x-style UNets (CrossAttnDownBlock2D/DownBlock2D, UNetMidBlock2DCrossAttn or none)"
        )
    n = len(down_types)
    if len(up_types) != n:
        raise ConfigError(f"the UNet config has {n} down blocks but {len(up_types)} up blocks")

    # 2. per-level values (int or list in diffusers)
    channels = _per_level(d, "block_out_channels", (320, 640, 1280, 1280), n)
    layers = _per_level(d, "layers_per_block", 2, n)
    # SD1/SD2 quirk: with num_attention_heads unset, `attention_head_dim` holds the head COUNT
    heads = d.get("num_attention_heads")
    heads = _per_level(d, "attention_head_dim" if heads is None else "num_attention_heads", 8, n)
    depth = _per_level(d, "transformer_layers_per_block", 1, n)
    up_depth = d.get("reverse_transformer_layers_per_block")
    if up_depth is not None:
        up_depth = _per_level(d, "reverse_transformer_layers_per_block", 1, n)
    cross = d.get("cross_attention_dim", 1280)
    if isinstance(cross, (list, tuple)):
        if len(set(cross)) != 1:
            raise ConfigError(f"per-level cross_attention_dim {cross} is not supported; all levels must share one")
        cross = cross[0]
    size = d.get("sample_size") or 64
    size = size[0] if isinstance(size, (list, tuple)) else size

    # 3. canonical form: fields equal to their derived default stay None
    attention = tuple(_DOWN_TYPES[t] for t in down_types)
    up_attention = tuple(_UP_TYPES[t] for t in up_types)
    return UNetConfig(
        in_channels=d.get("in_channels", 4),
        out_channels=d.get("out_channels", 4),
        block_out_channels=channels,
        layers_per_block=layers,
        attention=attention,
        up_attention=None if up_attention == attention[::-1] else up_attention,
        transformer_depth=depth,
        up_transformer_depth=None if up_depth is None or up_depth == depth[::-1] else up_depth,
        num_attention_heads=heads,
        mid_block=_MID_TYPES[mid_type],
        cross_attention_dim=cross,
        use_linear_projection=bool(d.get("use_linear_projection", False)),
        upcast_attention=bool(d.get("upcast_attention", False)),
        norm_num_groups=d.get("norm_num_groups", 32),
        norm_eps=d.get("norm_eps", 1e-5),
        flip_sin_to_cos=d.get("flip_sin_to_cos", True),
        freq_shift=d.get("freq_shift", 0),
        sample_size=size,
    )


def _per_level(d: dict, key: str, default, n: int) -> tuple[int, ...]:
    v = d.get(key)
    v = default if v is None else v
    if isinstance(v, (list, tuple)):
        if any(isinstance(x, (list, tuple)) for x in v):
            raise ConfigError(f"nested (per-block) {key} {v} is not supported; give one value per level")
        if len(v) != n:
            raise ConfigError(f"{key} has {len(v)} entries but the UNet has {n} levels")
        return tuple(v)
    return (v,) * n


def _non_sd_features(cfg: UNetConfig) -> list[str]:
    """What in `cfg` the SD UNet (diffusers UNet2DConditionModel, LDM checkpoints) cannot express."""
    n = len(cfg.block_out_channels)
    bad = []
    if "cross" in cfg.attention + cfg.up_attention_kinds:
        bad.append('attention kind "cross"')
    if any(cfg.separable_flags):
        bad.append("separable convolutions")
    if (cfg.ff_activation, cfg.ff_mult) != ("geglu", 4):
        bad.append(f"feed-forward {cfg.ff_activation} x{cfg.ff_mult} (SD: geglu x4)")
    if cfg.shared_kv:
        bad.append("shared key/value projection")
    if cfg.down_flags != (True,) * (n - 1) + (False,):
        bad.append(f"downsample pattern {cfg.down_flags}")
    if cfg.mid_block and cfg.mid_depth != cfg.transformer_depth[-1]:
        bad.append(f"mid depth {cfg.mid_depth} != innermost depth {cfg.transformer_depth[-1]}")
    if cfg.mid_block and cfg.mid_heads != cfg.num_attention_heads[-1]:
        bad.append(f"mid heads {cfg.mid_heads} != innermost heads {cfg.num_attention_heads[-1]}")
    return bad


def unet_config_to_diffusers(cfg: UNetConfig) -> dict:
    """The diffusers UNet2DConditionModel config for an architecture diffusers can express.

    Raises ConfigError for MobileDiffusion-only features (cross-only attention, separable convs,
    swish/plain feed-forward, shared key/value, levels without downsampling, a mid block whose
    depth or heads differ from the innermost level).
    """
    bad = _non_sd_features(cfg)
    if bad:
        raise ConfigError(f"diffusers' UNet2DConditionModel cannot express: {', '.join(bad)}")
    down = {v: k for k, v in _DOWN_TYPES.items()}
    up = {v: k for k, v in _UP_TYPES.items()}
    d = {
        "_class_name": "UNet2DConditionModel",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "block_out_channels": list(cfg.block_out_channels),
        "layers_per_block": list(cfg.layers_per_block),
        "down_block_types": [down[a] for a in cfg.attention],
        "up_block_types": [up[a] for a in cfg.up_attention_kinds],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if cfg.mid_block else None,
        "attention_head_dim": list(cfg.num_attention_heads),  # diffusers' name for the head count
        "transformer_layers_per_block": list(cfg.transformer_depth),
        "cross_attention_dim": cfg.cross_attention_dim,
        "use_linear_projection": cfg.use_linear_projection,
        "upcast_attention": cfg.upcast_attention,
        "norm_num_groups": cfg.norm_num_groups,
        "norm_eps": cfg.norm_eps,
        "flip_sin_to_cos": cfg.flip_sin_to_cos,
        "freq_shift": cfg.freq_shift,
        "sample_size": cfg.sample_size,
    }
    if cfg.up_transformer_depth is not None:
        d["reverse_transformer_layers_per_block"] = list(cfg.up_transformer_depth)
    return d
