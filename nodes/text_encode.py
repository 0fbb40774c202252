"""Text Encode: MD_CLIP + prompt -> CONDITIONING (ComfyUI's list format)."""
from __future__ import annotations

from ._common import CATEGORY


class MobileDiffusionTextEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("MD_CLIP", {"tooltip": "The text encoder from Load MobileDiffusion Model."}),
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                    "tooltip": "The prompt, read as CLIPTextEncode reads it: any length (in chunks of "
                                               "75 tokens), (word:1.2) or (word) for emphasis, \\( for a literal "
                                               "parenthesis."}),
            }
        }

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("Standard CONDITIONING: ComfyUI's combine / zero-out nodes work on it.",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Encodes a prompt with the model's CLIP text encoder, as ComfyUI's CLIPTextEncode does (long "
                   "prompts, emphasis weights).")

    def encode(self, clip, text):
        context = clip.encode_prompts([text]).float().cpu()  # (1, 77 k, D): k chunks of 75 tokens
        return ([[context, {}]],)
