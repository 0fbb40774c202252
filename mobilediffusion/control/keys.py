"""Control-model checkpoints -> our ControlNet / Adapter: key maps and configs from tensor shapes.

ControlNet layouts: diffusers (`controlnet_cond_embedding.*`, `controlnet_down_blocks.k`, `controlnet_mid_block`,
the UNet's own diffusers names for the copied half) and LDM (`control_model.` or no prefix: `input_hint_block.2k`,
`zero_convs.k.0`, `middle_block_out.0`, the UNet's LDM names). T2I-Adapter layouts: diffusers (`adapter.conv_in`,
`adapter.body.i.*`), TencentARC's full (`conv_in`, `body.n.block1` with n = level * blocks + block, `in_conv` and
`down_opt.op` on a level's first block) and light (`body.i.in_conv`, `body.i.body.j.*`, `body.i.out_conv`).
"""
from __future__ import annotations

import re

from ..config import UNetConfig
from ..errors import CheckpointError
from ..weights.keymap import KeyMap
from ..weights.single_file_unet import unet_config_from_ldm
from ..weights.unet_keys import DIFFUSERS_UNET, ldm_unet_keymap
from .adapter import AdapterConfig
from .controlnet import ControlNetConfig

_P = r"(?P<p>weight|bias)"


# --------------------------------------------------------------------------- ControlNet
def diffusers_controlnet_keymap(cfg: ControlNetConfig) -> KeyMap:
    n = len(cfg.hint_widths)
    rules = [(rf"controlnet_cond_embedding\.conv_in\.{_P}", r"hint.convs.0.\g<p>")]
    rules += [(rf"controlnet_cond_embedding\.blocks\.{j}\.{_P}", rf"hint.convs.{j + 1}.\g<p>")
              for j in range(2 * (n - 1))]
    rules += [(rf"controlnet_cond_embedding\.conv_out\.{_P}", rf"hint.convs.{2 * n - 1}.\g<p>"),
              (rf"controlnet_down_blocks\.(?P<k>\d+)\.{_P}", r"zero_convs.\g<k>.\g<p>"),
              (rf"controlnet_mid_block\.{_P}", r"mid_out.\g<p>")]
    return KeyMap("diffusers ControlNetModel", tuple(rules) + DIFFUSERS_UNET.rules)


def ldm_controlnet_keymap(cfg: ControlNetConfig, prefix: str = "control_model.") -> KeyMap:
    pre = re.escape(prefix)
    n = len(cfg.hint_widths)
    rules = [(rf"{pre}input_hint_block\.{2 * k}\.{_P}", rf"hint.convs.{k}.\g<p>") for k in range(2 * n)]
    rules += [(rf"{pre}zero_convs\.(?P<k>\d+)\.0\.{_P}", r"zero_convs.\g<k>.\g<p>"),
              (rf"{pre}middle_block_out\.0\.{_P}", r"mid_out.\g<p>")]
    return KeyMap(f"ControlNet ({prefix or 'no prefix'})", tuple(rules) + ldm_unet_keymap(cfg.unet, prefix).rules)


def ldm_controlnet_tensors(controlnet, prefix: str = "control_model.") -> dict:
    """A ControlNet's tensors as an LDM ControlNet file holds them (what ComfyUI's ControlNetLoader and A1111 read):
    LDM names, and for SD 1.x layouts the transformers' proj_in / proj_out as 1x1 convolutions, as SD's files store
    them (ComfyUI tells the layout from their shapes)."""
    cfg = controlnet.control_config
    out = ldm_controlnet_keymap(cfg, prefix).reverse(controlnet.state_dict())
    conv = not cfg.unet.use_linear_projection
    return {k: (v[:, :, None, None] if conv and v.ndim == 2 and re.search(r"\.proj_(in|out)\.weight$", k) else v)
            .contiguous() for k, v in out.items()}


def _hint_from(shapes: dict, first: str, convs: list[str]) -> tuple[int, tuple[int, ...]]:
    """(hint channels, widths) from the hint stack's conv shapes: the first conv and the stride-2 ones' outputs."""
    hint = shapes[first][1]
    widths = [shapes[first][0]] + [shapes[k][0] for k in convs[1::2]]
    return hint, tuple(widths)


def controlnet_config_from_ldm(shapes: dict, prefix: str, unet: UNetConfig | None = None) -> ControlNetConfig:
    """ControlNetConfig from LDM-named shapes under `prefix`; `unet` (the base model's, when known) gives the heads
    that shapes cannot."""
    own = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    hint_keys = sorted((k for k in own if re.fullmatch(r"input_hint_block\.\d+\.weight", k)),
                       key=lambda k: int(k.split(".")[1]))
    if not hint_keys:
        raise CheckpointError("this ControlNet has no input_hint_block: not a ControlNet file")
    half = {k: v for k, v in own.items() if k.startswith(("input_blocks.", "middle_block.", "time_embed."))}
    cfg = unet_config_from_ldm(half, down_half=True, norm_num_groups=_groups(unet))
    hint, widths = _hint_from(own, hint_keys[0], hint_keys[1:-1])
    return ControlNetConfig(_heads_from(cfg, unet), hint, widths)


def controlnet_config_from_diffusers_keys(shapes: dict, unet: UNetConfig | None = None) -> ControlNetConfig:
    """ControlNetConfig from a diffusers-named single file (no config.json): the down half read as LDM would be."""
    cfg = _down_half_from_diffusers(shapes, _groups(unet))
    convs = sorted((k for k in shapes if re.fullmatch(r"controlnet_cond_embedding\.blocks\.\d+\.weight", k)),
                   key=lambda k: int(k.split(".")[2]))
    hint, widths = _hint_from(shapes, "controlnet_cond_embedding.conv_in.weight", convs)
    return ControlNetConfig(_heads_from(cfg, unet), hint, widths)


def _heads_from(cfg: UNetConfig, unet: UNetConfig | None) -> UNetConfig:
    import dataclasses

    from ..weights.single_file_unet import with_preset_heads

    if unet is not None and unet.block_out_channels == cfg.block_out_channels:
        return dataclasses.replace(cfg, num_attention_heads=unet.num_attention_heads,
                                   mid_num_attention_heads=unet.mid_num_attention_heads)
    return with_preset_heads(cfg)[0]


def _groups(unet: UNetConfig | None) -> int:
    """GroupNorm groups are not in the weights: the base UNet's when known, else SD's 32."""
    return 32 if unet is None else unet.norm_num_groups


def _down_half_from_diffusers(shapes: dict, norm_num_groups: int = 32) -> UNetConfig:
    """The down half's UNetConfig from diffusers names (down_blocks.i.resnets.j / attentions.j, mid_block)."""
    levels = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"down_blocks\.(\d+)\.", k))})
    if not levels or levels != list(range(len(levels))):
        raise CheckpointError("this ControlNet's down_blocks are missing or not numbered 0, 1, ...")
    widths, layers, attention, depth, linear, ctx = [], [], [], [], set(), set()
    for i in levels:
        blocks = sorted({int(m.group(1)) for k in shapes if (m := re.match(rf"down_blocks\.{i}\.resnets\.(\d+)\.", k))})
        widths.append(shapes[f"down_blocks.{i}.resnets.0.conv1.weight"][0])
        layers.append(len(blocks))
        site = f"down_blocks.{i}.attentions.0"
        if f"{site}.proj_in.weight" in shapes:
            attention.append("full")
            depth.append(len({m.group(1) for k in shapes
                              if (m := re.match(rf"{re.escape(site)}\.transformer_blocks\.(\d+)\.", k))}))
            linear.add(len(shapes[f"{site}.proj_in.weight"]) == 2)
            ctx.add(shapes[f"{site}.transformer_blocks.0.attn2.to_k.weight"][1])
        else:
            attention.append("none")
            depth.append(1)
    mid = "mid_block.resnets.0.conv1.weight" in shapes
    lin = linear.pop() if len(linear) == 1 else False
    return UNetConfig(in_channels=shapes["conv_in.weight"][1], out_channels=shapes["conv_in.weight"][1],
                      block_out_channels=tuple(widths), layers_per_block=tuple(layers), attention=tuple(attention),
                      transformer_depth=tuple(depth), num_attention_heads=tuple(max(1, w // 64) if lin else 8
                                                                                for w in widths),
                      mid_block=mid, cross_attention_dim=ctx.pop() if ctx else 768, use_linear_projection=lin,
                      norm_num_groups=norm_num_groups)


def controlnet_config_from_diffusers(d: dict) -> ControlNetConfig:
    """ControlNetConfig from a diffusers ControlNetModel config.json."""
    from ..weights.unet_keys import unet_config_from_diffusers

    down = list(d.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
    up = [{"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}.get(t, t) for t in down[::-1]]
    unsupported = {k: d[k] for k in ("class_embed_type", "addition_embed_type", "num_class_embeds")
                   if d.get(k) is not None}
    if unsupported or d.get("controlnet_conditioning_channel_order", "rgb") != "rgb":
        raise CheckpointError(f"this ControlNet uses options MobileDiffusion does not run: {unsupported or 'bgr hint'} "
                              "(SDXL-style or BGR ControlNets); use an SD 1.x/2.x ControlNet")
    fields = {k: v for k, v in d.items() if not k.startswith(("controlnet_", "conditioning_", "global_pool"))}
    unet = unet_config_from_diffusers({**fields, "up_block_types": up, "out_channels": d.get("in_channels", 4)})
    return ControlNetConfig(unet, int(d.get("conditioning_channels", 3)),
                            tuple(d.get("conditioning_embedding_out_channels", (16, 32, 96, 256))),
                            bool(d.get("global_pool_conditions", False)))


# --------------------------------------------------------------------------- T2I-Adapter
DIFFUSERS_ADAPTER = KeyMap("diffusers T2IAdapter", (
    (rf"adapter\.conv_in\.{_P}", r"conv_in.\g<p>"),
    (rf"adapter\.body\.(?P<i>\d+)\.(?P<n>in_conv|out_conv)\.{_P}", r"levels.\g<i>.\g<n>.\g<p>"),
    (rf"adapter\.body\.(?P<i>\d+)\.resnets\.(?P<j>\d+)\.(?P<b>block[12])\.{_P}", r"levels.\g<i>.resnets.\g<j>.\g<b>.\g<p>"),
))
LIGHT_ADAPTER = KeyMap("T2I-Adapter light", (
    (rf"body\.(?P<i>\d+)\.(?P<n>in_conv|out_conv)\.{_P}", r"levels.\g<i>.\g<n>.\g<p>"),
    (rf"body\.(?P<i>\d+)\.body\.(?P<j>\d+)\.(?P<b>block[12])\.{_P}", r"levels.\g<i>.resnets.\g<j>.\g<b>.\g<p>"),
))


def full_adapter_keymap(cfg: AdapterConfig) -> KeyMap:
    """TencentARC's full layout: body.n with n = level * blocks_per_level + block."""
    rules = [(rf"conv_in\.{_P}", r"conv_in.\g<p>")]
    b = cfg.blocks_per_level
    for i in range(len(cfg.channels)):
        rules += [(rf"body\.{i * b}\.in_conv\.{_P}", rf"levels.{i}.in_conv.\g<p>"),
                  (rf"body\.{i * b}\.down_opt\.op\.{_P}", rf"levels.{i}.down.op.\g<p>")]
        rules += [(rf"body\.{i * b + j}\.(?P<k>block[12])\.{_P}", rf"levels.{i}.resnets.{j}.\g<k>.\g<p>")
                  for j in range(b)]
    return KeyMap("T2I-Adapter (TencentARC full)", tuple(rules))


def adapter_config_from_keys(shapes: dict) -> tuple[AdapterConfig, KeyMap]:
    """(config, key map) of a T2I-Adapter state by its keys: diffusers, original full, or light. SDXL adapters
    (unshuffle 16) and style adapters are refused by name."""
    def levels(pattern):
        return sorted({int(m.group(1)) for k in shapes if (m := re.match(pattern, k))})

    if "adapter.conv_in.weight" in shapes or "adapter.body.0.in_conv.weight" in shapes:
        light = "adapter.body.0.out_conv.weight" in shapes
        body = levels(r"adapter\.body\.(\d+)\.")
        blocks = levels(r"adapter\.body\.0\.resnets\.(\d+)\.")
        if light:
            cin, chans = shapes["adapter.body.0.in_conv.weight"][1], [shapes[f"adapter.body.{i}.out_conv.weight"][0] for i in body]
        else:
            cin = shapes["adapter.conv_in.weight"][1]
            chans = [shapes[f"adapter.body.{i}.resnets.0.block1.weight"][0] for i in body]
        kernel = 3 if light else shapes["adapter.body.0.resnets.0.block2.weight"][2]
        cfg = _adapter(cin, "light" if light else "full", chans, len(blocks), kernel, False)
        return cfg, DIFFUSERS_ADAPTER
    if "body.0.in_conv.weight" in shapes and "body.0.out_conv.weight" in shapes:
        body = levels(r"body\.(\d+)\.")
        cfg = _adapter(shapes["body.0.in_conv.weight"][1], "light", [shapes[f"body.{i}.out_conv.weight"][0] for i in body],
                       len(levels(r"body\.0\.body\.(\d+)\.")), 3, False)
        return cfg, LIGHT_ADAPTER
    if "conv_in.weight" in shapes and "body.0.block1.weight" in shapes:
        _hint_channels(shapes["conv_in.weight"][1])
        n = len(levels(r"body\.(\d+)\."))
        if n % 4:
            raise CheckpointError(f"this T2I-Adapter has {n} body blocks; the SD layout has 4 levels of equal blocks")
        b = n // 4  # 4 levels of b blocks (the layout ComfyUI reads)
        chans = [shapes[f"body.{i * b}.block1.weight"][0] for i in range(4)]
        kernel = shapes["body.0.block2.weight"][2]
        conv_down = any(".down_opt.op." in k for k in shapes)
        cfg = _adapter(shapes["conv_in.weight"][1], "full", chans, b, kernel, conv_down)
        return cfg, full_adapter_keymap(cfg)
    if any(k.startswith("backbone.") for k in shapes):
        raise CheckpointError("this is a T2I style adapter (CLIP-vision tokens), which MobileDiffusion does not run")
    raise CheckpointError("these keys are no T2I-Adapter layout this package reads (diffusers, TencentARC full or light)")


def _adapter(cin: int, kind: str, channels, blocks: int, kernel: int, conv_down: bool) -> AdapterConfig:
    return AdapterConfig(kind, _hint_channels(cin), tuple(channels), blocks, kernel, conv_down, 8)


def _hint_channels(cin: int) -> int:
    """The hint's channels from the first conv's input (the hint pixel-unshuffled by 8)."""
    for hint in (1, 3):
        if cin == hint * 64:
            return hint
    if cin in (256, 768):
        raise CheckpointError("this T2I-Adapter is an SDXL one (pixel-unshuffle 16); MobileDiffusion runs SD 1.x/2.x "
                              "adapters")
    raise CheckpointError(f"this T2I-Adapter's first conv takes {cin} channels; SD adapters take 64 (sketch) or 192 "
                          "(RGB hints)")
