"""The UNet's config from the shapes of its tensors in the original LDM layout (an SD single file's
`model.diffusion_model.*`, ComfyUI's diffusion_model state), names without that prefix.

What the shapes cannot say is filled in from the preset whose UNet matches (`with_preset_heads`), else by
SD's conventions: 64-wide heads with linear projections (SD 2.x), 8 heads with 1x1-conv projections (SD 1.x).
"""
from __future__ import annotations

import dataclasses
import re

from ..config import UNetConfig
from ..errors import CheckpointError, ConfigError
from ..presets import PRESETS


def _site(shapes: dict, site: str) -> tuple[int, bool, int | None] | None:
    """(transformer depth, linear projections, context width) of the attention site `site`, or None."""
    proj = shapes.get(f"{site}.proj_in.weight")
    if proj is None:
        return None
    block = re.compile(rf"{re.escape(site)}\.transformer_blocks\.(\d+)\.")
    blocks = {m.group(1) for k in shapes if (m := block.match(k))}
    ctx = shapes.get(f"{site}.transformer_blocks.0.attn2.to_k.weight")
    return len(blocks), len(proj) == 2, ctx[1] if ctx else None


def _indices(shapes: dict, group: str) -> list[int]:
    """Block numbers of `group` (input_blocks, output_blocks): 0, 1, ... without gaps."""
    index = re.compile(rf"{group}\.(\d+)\.")
    found = sorted({int(m.group(1)) for k in shapes if (m := index.match(k))})
    if found != list(range(len(found))):
        raise CheckpointError(f"the UNet's {group} are not numbered 0, 1, ... ({found}); the file is damaged")
    return found


def unet_config_from_ldm(shapes: dict, *, down_half: bool = False, norm_num_groups: int = 32) -> UNetConfig:
    """UNetConfig of an LDM UNet from its tensor shapes (names without `model.diffusion_model.`).

    Levels are split at the downsample blocks (`input_blocks.n.0.op`); each level's width, block
    count, attention and transformer depth come from its blocks, the up path is read the same way
    (mirrored fields stay None). Heads follow SD's conventions (see the module docstring).
    `down_half`: the shapes hold only the input and middle blocks (a ControlNet's copy of its UNet); the up
    path is taken as the mirror and the output channels as the input's. `norm_num_groups`: not in the weights
    (SD: 32); a control model takes its base UNet's.
    """
    if "input_blocks.0.0.weight" not in shapes or ("out.2.weight" not in shapes and not down_half):
        raise CheckpointError("the model.diffusion_model.* keys hold no SD UNet (no input_blocks.0.0 / out.2 conv)")
    in_ch = shapes["input_blocks.0.0.weight"][1]
    out_ch = in_ch if down_half else shapes["out.2.weight"][0]
    if in_ch != out_ch and in_ch != out_ch + 5:  # + 5: SD inpainting (mask + masked-image latents)
        raise CheckpointError(
            f"this UNet takes {in_ch} input channels but makes {out_ch} (an instruct-pix2pix or other image-"
            "conditioned model); text-to-image and SD inpainting (out + 5 channels) checkpoints are supported"
        )
    sites = []  # (depth, linear, context) of every attention site, to check they agree
    # 1. input blocks -> down levels (a level ends at its downsample block)
    levels, current = [], []
    for n in _indices(shapes, "input_blocks")[1:]:
        if f"input_blocks.{n}.0.op.weight" in shapes:
            if not current:
                raise CheckpointError(f"input block {n} downsamples a level without blocks; unsupported layout")
            levels.append(current)
            current = []
            continue
        res = shapes.get(f"input_blocks.{n}.0.in_layers.2.weight")
        if res is None:
            raise CheckpointError(f"input block {n} is neither a resnet nor a downsample; not an SD UNet")
        site = _site(shapes, f"input_blocks.{n}.1")
        sites += [site] if site else []
        current.append((res[0], site[0] if site else None))
    if not current:
        raise CheckpointError("the UNet's last input block is a downsample; unsupported layout")
    levels.append(current)
    widths, layers, attention, depth = [], [], [], []
    for i, blocks in enumerate(levels):
        kinds = {d for _, d in blocks}
        if len({w for w, _ in blocks}) != 1 or len(kinds) != 1:
            raise CheckpointError(f"down level {i} mixes widths or attention between its blocks: {blocks}")
        widths.append(blocks[0][0])
        layers.append(len(blocks))
        attention.append("none" if blocks[0][1] is None else "full")
        depth.append(blocks[0][1] or 1)
    # 2. output blocks -> up levels, innermost first, layers + 1 blocks each (a down half mirrors the down path)
    up_attention, up_depth = (attention[::-1], depth[::-1]) if down_half else _up_levels(shapes, layers, sites)
    # 3. mid block
    mid = "middle_block.0.in_layers.2.weight" in shapes
    mid_site = _site(shapes, "middle_block.1") if mid else None
    if mid and mid_site is None:
        raise CheckpointError("the UNet's middle block has no transformer (middle_block.1); unsupported layout")
    sites += [mid_site] if mid_site else []
    # 4. attention details shared by every site
    linear = {s[1] for s in sites}
    contexts = {s[2] for s in sites if s[2] is not None}
    if len(linear) > 1 or len(contexts) > 1:
        raise CheckpointError(f"the UNet's attention sites disagree (projections {linear}, context widths {contexts})")
    linear = linear.pop() if linear else False
    fields = dict(
        in_channels=in_ch,
        out_channels=out_ch,
        block_out_channels=tuple(widths),
        layers_per_block=tuple(layers),
        attention=tuple(attention),
        up_attention=None if up_attention == attention[::-1] else tuple(up_attention),
        transformer_depth=tuple(depth),
        up_transformer_depth=None if up_depth == depth[::-1] else tuple(up_depth),
        num_attention_heads=tuple(max(1, w // 64) if linear else 8 for w in widths),  # SD 2.x / SD 1.x convention
        mid_block=mid,
        mid_transformer_depth=None if not mid or mid_site[0] == depth[-1] else mid_site[0],
        cross_attention_dim=contexts.pop() if contexts else 768,
        use_linear_projection=linear,
        norm_num_groups=norm_num_groups,
    )
    try:
        return UNetConfig(**fields)
    except ConfigError as e:  # e.g. widths that are not multiples of SD's 32 GroupNorm groups
        raise CheckpointError(f"the UNet in this file has a layout this package cannot build: {e}") from None


def _up_levels(shapes: dict, layers: list[int], sites: list) -> tuple[list[str], list[int]]:
    """(attention kind, transformer depth) per up level from the output blocks; their sites join `sites`."""
    outputs = _indices(shapes, "output_blocks")
    if len(outputs) != sum(layers) + len(layers):
        raise CheckpointError(
            f"the UNet has {len(outputs)} output blocks but its input blocks imply {sum(layers) + len(layers)}; "
            "unsupported layout"
        )
    up_attention, up_depth, n = [], [], 0
    for i in reversed(range(len(layers))):
        found = []
        for _ in range(layers[i] + 1):
            site = _site(shapes, f"output_blocks.{n}.1")
            sites += [site] if site else []
            found.append(site[0] if site else None)
            n += 1
        if len(set(found)) != 1:
            raise CheckpointError(f"up level {len(up_attention)} mixes attention between its blocks")
        up_attention.append("none" if found[0] is None else "full")
        up_depth.append(found[0] or 1)
    return up_attention, up_depth


def with_preset_heads(cfg: UNetConfig) -> tuple[UNetConfig, str | None]:
    """(cfg with the heads of the preset it matches, preset name) or (cfg, None). Heads, prediction
    type and sample size are not in the weights, so they are left out of the comparison."""
    free = {"prediction_type": "epsilon", "sample_size": 64}
    for name, preset in PRESETS.items():
        if preset.unet.block_out_channels != cfg.block_out_channels:
            continue
        heads = {"num_attention_heads": preset.unet.num_attention_heads,
                 "mid_num_attention_heads": preset.unet.mid_num_attention_heads}
        if dataclasses.replace(cfg, **free, **heads) == dataclasses.replace(preset.unet, **free):
            return dataclasses.replace(cfg, **heads), name
    return cfg, None


__all__ = ["unet_config_from_ldm", "with_preset_heads"]
