"""Key map for CLIP text encoders saved by transformers (diffusers' text_encoder/ folders).

Checkpoints name the weights `text_model.embeddings...` (transformers 4.x and every released
SD checkpoint) or `embeddings...` (transformers 5 saves CLIPTextModel without the wrapper);
the installed transformers decides which prefix the module itself uses.
"""
from .keymap import KeyMap


def clip_text_keymap(module_prefix: str) -> KeyMap:
    """Checkpoint keys with or without `text_model.` -> the module's own names (`module_prefix` + rest)."""
    return KeyMap(
        "transformers CLIPTextModel",
        (
            (r"(?:text_model\.)?embeddings\.position_ids", None),  # a constant buffer older exports saved
            (r"(?:text_model\.)?((?:embeddings|encoder|final_layer_norm)\..+)", module_prefix + r"\1"),
        ),
    )
