"""Key maps for CLIP text encoders -> transformers' CLIPTextModel (our TextEncoder.model).

Layouts:
- transformers (diffusers' text_encoder/ folders): `text_model.embeddings...` (transformers 4.x and
  every released SD checkpoint) or `embeddings...` (transformers 5 saves CLIPTextModel without the
  wrapper). The same names sit under `cond_stage_model.transformer.` in SD 1.x single files.
- OpenCLIP (SD 2.x single files, `cond_stage_model.model.*`): token_embedding, positional_embedding,
  transformer.resblocks.N.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}, ln_final,
  text_projection, logit_scale. The fused in_proj (q, k, v stacked along dim 0) is split into
  q_proj / k_proj / v_proj. SD 2.x conditions on the penultimate layer, so diffusers keeps 23 of
  OpenCLIP-H's 24 layers: the last resblock is declared unused, as are text_projection and
  logit_scale (they only make the pooled embedding, which SD does not use).
`module_prefix` is the module's own prefix ("text_model." in transformers 4, "" in 5: see
TextEncoder.key_prefix).
"""
from __future__ import annotations

import re

from .keymap import KeyMap

CLIP_SINGLE_FILE_PREFIX = "cond_stage_model.transformer."  # SD 1.x: transformers CLIPTextModel names
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP names

_P = r"(?P<p>weight|bias)"


def clip_text_keymap(module_prefix: str, source_prefix: str = "") -> KeyMap:
    """Keys `source_prefix` + (with or without `text_model.`) -> the module's own names."""
    sp = re.escape(source_prefix)
    name = f"CLIP text encoder ({source_prefix}*)" if source_prefix else "transformers CLIPTextModel"
    return KeyMap(
        name,
        (
            (rf"{sp}(?:text_model\.)?embeddings\.position_ids", None),  # a constant buffer older exports saved
            (rf"{sp}(?:text_model\.)?((?:embeddings|encoder|final_layer_norm)\..+)", module_prefix + r"\1"),
        ),
    )


def open_clip_keymap(module_prefix: str, num_layers: int, source_prefix: str = OPEN_CLIP_PREFIX) -> KeyMap:
    """OpenCLIP text tower keys -> a CLIPTextModel with `num_layers` layers; resblock `num_layers`
    (the last one of the file, which SD 2.x skips) is declared unused, as are the projection heads."""
    sp, mp = re.escape(source_prefix), module_prefix
    block = rf"{sp}transformer\.resblocks\.(?P<l>\d+)\."
    layer = mp + r"encoder.layers.\g<l>."
    return KeyMap(
        f"OpenCLIP text encoder ({source_prefix}*)",
        (
            (rf"{sp}(?:text_projection|logit_scale)", None),  # pooled-embedding head: unused by SD
            (rf"{sp}transformer\.resblocks\.{num_layers}\..+", None),  # the last layer: SD 2.x reads the one before
            (rf"{sp}token_embedding\.weight", mp + "embeddings.token_embedding.weight"),
            (rf"{sp}positional_embedding", mp + "embeddings.position_embedding.weight"),
            (rf"{sp}ln_final\.{_P}", mp + r"final_layer_norm.\g<p>"),
            (rf"{block}ln_1\.{_P}", layer + r"layer_norm1.\g<p>"),
            (rf"{block}ln_2\.{_P}", layer + r"layer_norm2.\g<p>"),
            (rf"{block}attn\.in_proj_{_P}", tuple(layer + rf"self_attn.{w}_proj.\g<p>" for w in "qkv")),
            (rf"{block}attn\.out_proj\.{_P}", layer + r"self_attn.out_proj.\g<p>"),
            (rf"{block}mlp\.c_fc\.{_P}", layer + r"mlp.fc1.\g<p>"),
            (rf"{block}mlp\.c_proj\.{_P}", layer + r"mlp.fc2.\g<p>"),
        ),
    )


__all__ = ["CLIP_SINGLE_FILE_PREFIX", "OPEN_CLIP_PREFIX", "clip_text_keymap", "open_clip_keymap"]
