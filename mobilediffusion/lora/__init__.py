"""LoRAs for MobileDiffusion models: merge, remove, or make a LoRA'd copy.

    from mobilediffusion.lora import apply_lora, remove_lora, with_lora
    record = apply_lora(pipe, "style.safetensors", 0.8)   # in place: UNet and text encoder
    remove_lora(pipe, record)                              # the original weights again, bit-exact
    unet2 = with_lora(unet, "lcm-lora.safetensors")        # a new UNet; `unet` is unchanged

Formats: kohya/A1111 (`lora_unet_*`, `lora_te_*`, diffusers or LDM module names), LoCon (3x3 down,
Tucker `lora_mid`), LyCORIS LoHa, LoKr and DoRA (`dora_scale`, as ComfyUI applies it), full diffs
(`.diff`, `.diff_b`, `.w_norm`, `.b_norm`), diffusers (attention processors `.to_q_lora.`, PEFT-backend
`.lora.down.`, `lora_linear_layer`), raw PEFT (`lora_A`/`lora_B`, alpha from `lora_adapter_metadata` or
adapter_config.json) and ComfyUI's own (`diffusion_model.*`, `text_encoders.clip_l|clip_h.transformer.*`).
Scale: strength * alpha / rank (rank = rows of down; no alpha: factor 1, as ComfyUI).
Modules: files (reading, sha256, PEFT config), names (the target's own names -> LoRA spellings),
parse (keys -> checked patches), delta (the update math), merge (apply/remove/copies).
"""
from .files import STRENGTH_LIMIT, LoraFile, check_strength, read_lora
from .merge import LoraRecord, apply_lora, remove_lora, with_lora, without_loras
from .names import component_of


def lora_components(lora) -> set[str]:
    """Which components ("unet", "text_encoder") a LoRA file (path or LoraFile) has keys for, judged by
    the keys' prefixes (whether they fit a model is checked when applying)."""
    return {component_of(k) for k in read_lora(lora).tensors}


__all__ = ["apply_lora", "remove_lora", "with_lora", "without_loras", "read_lora", "lora_components", "check_strength",
           "LoraRecord", "LoraFile", "STRENGTH_LIMIT"]
