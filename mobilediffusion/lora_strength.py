"""The strength a LoRA is applied at: one rule for the torch LoRA loader (mobilediffusion.lora) and the torch-free
bundle runtime's LoRA packs (runtime/lora_pack.py)."""
from __future__ import annotations

import math

from .errors import ConfigError

STRENGTH_LIMIT = 100.0  # |strength| allowed, as ComfyUI's LoraLoader (-100..100)


def check_strength(strength) -> float:
    """The strength as a float; ConfigError for a non-number, NaN/inf or |strength| > 100."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)):
        raise ConfigError(f"a LoRA strength must be a number, got {strength!r}")
    s = float(strength)
    if not math.isfinite(s) or abs(s) > STRENGTH_LIMIT:
        raise ConfigError(f"LoRA strength {strength!r} is out of range; use a number from "
                          f"{-STRENGTH_LIMIT:g} to {STRENGTH_LIMIT:g} (1.0 applies the LoRA as trained)")
    return s
