"""Where a LoRA's module names point: a table from every spelling a LoRA file may use to the module's
OWN weight, built from the module's own parameter names (never by parsing underscores back into dots).

UNet: each weight's diffusers name D (DIFFUSERS_UNET run backwards) and, for SD layouts, its LDM name L
(ldm_unet_keymap run backwards, `model.diffusion_model.` dropped) give
    lora_unet_<D with _>  lora_unet_<L with _>  lycoris_<D with _>        kohya / LyCORIS
    unet.D  D  base_model.model.D                                        diffusers, PEFT
    unet.D'  D'  (D' = D with .processor.to_q, .to_out.0 -> .to_out)      diffusers attention processors
    diffusion_model.L                                                    ComfyUI
    lora_unet_<M with _>   (M: our own module path)  only for weights diffusers cannot name (MobileDiffusion's
                           shared key/value projection, to_kv), as `train lora` writes them
Text encoder (transformers CLIPTextModel): with T = text_model.<name> (transformers 5 drops the prefix
in the module, the files keep it)
    lora_te_<T with _>  lora_te1_<T with _>                               kohya
    text_encoder.T  text_encoder.T'  (T' = self_attn.to_q for q_proj...)  diffusers
    base_model.model.T  T                                                PEFT
    text_encoders.clip_l.transformer.T  text_encoders.clip_h.transformer.T   ComfyUI
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..weights.keymap import KeyMap

TEXT_PREFIXES = ("lora_te_", "lora_te1_", "text_encoder.", "text_encoders.", "base_model.model.text_model.",
                 "text_model.")  # keys with these are text-encoder keys; every other key is a UNet key


@dataclass(frozen=True)
class Target:
    """A module a LoRA name points at."""

    component: str  # "unet" or "text_encoder"
    module: str  # its path in the patched object (UNet or TextEncoder), without ".weight"
    naming: str  # the LoRA layout that spells it so: kohya, lycoris, diffusers, peft, comfyui
    spelling: str  # the diffusers/PEFT spelling, which PEFT alpha patterns match against


def component_of(key: str) -> str:
    """"text_encoder" or "unet", from a LoRA key's prefix."""
    return "text_encoder" if key.startswith(TEXT_PREFIXES) else "unet"


def unet_names(unet) -> dict[str, Target]:
    """LoRA module name -> Target for every weight of our UNet (see the module docstring)."""
    from ..weights.unet_keys import DIFFUSERS_UNET, LDM_PREFIX, ldm_unet_keymap

    own = [n[: -len(".weight")] for n, _ in unet.named_parameters() if n.endswith(".weight")]
    diffusers = _reverse_each(DIFFUSERS_UNET, own)
    try:
        ldm = {m: name[len(LDM_PREFIX):] for m, name in _reverse_each(ldm_unet_keymap(unet.config), own).items()}
    except ConfigError:  # a MobileDiffusion layout has no LDM spelling
        ldm = {}
    table = _Table()
    for m in own:
        d, L = diffusers.get(m), ldm.get(m)
        spelling = d or m
        if d is not None:
            table.add(f"lora_unet_{_us(d)}", m, "kohya", spelling)
            table.add(f"lycoris_{_us(d)}", m, "lycoris", spelling)
            for name, naming in ((d, "diffusers"), (f"unet.{d}", "diffusers"), (f"base_model.model.{d}", "peft")):
                table.add(name, m, naming, spelling)
            old = _processor_name(d)
            if old is not None:
                table.add(old, m, "diffusers", spelling)
                table.add(f"unet.{old}", m, "diffusers", spelling)
        if L is not None:
            table.add(f"lora_unet_{_us(L)}", m, "kohya", spelling)
            table.add(f"diffusion_model.{L}", m, "comfyui", spelling)
        if d is None and L is None:  # no other spelling: kohya's prefix on our own path (what train lora writes)
            table.add(f"lora_unet_{_us(m)}", m, "kohya", spelling)
    return table.done("unet")


def text_names(encoder) -> dict[str, Target]:
    """LoRA module name -> Target for every weight of a TextEncoder (its `model`, a CLIPTextModel)."""
    prefix = encoder.key_prefix  # "text_model." (transformers 4) or "" (5)
    table = _Table()
    for n, _ in encoder.model.named_parameters():
        if not n.endswith(".weight"):
            continue
        m = "model." + n[: -len(".weight")]
        t = "text_model." + n[len(prefix): -len(".weight")]
        table.add(f"lora_te_{_us(t)}", m, "kohya", t)
        table.add(f"lora_te1_{_us(t)}", m, "kohya", t)
        table.add(f"text_encoder.{t}", m, "diffusers", t)
        for old, new in (("self_attn.q_proj", "self_attn.to_q"), ("self_attn.k_proj", "self_attn.to_k"),
                         ("self_attn.v_proj", "self_attn.to_v"), ("self_attn.out_proj", "self_attn.to_out")):
            if t.endswith(old):
                table.add(f"text_encoder.{t[: -len(old)]}{new}", m, "diffusers", t)
        table.add(t, m, "peft", t)
        table.add(f"base_model.model.{t}", m, "peft", t)
        for clip in ("clip_l", "clip_h"):
            table.add(f"text_encoders.{clip}.transformer.{t}", m, "comfyui", t)
    return table.done("text_encoder")


class _Table:
    """Collects name -> (module, naming, spelling); a name two modules claim is dropped (and so reported
    as matching nothing) rather than guessed."""

    def __init__(self):
        self.entries, self.clashes = {}, set()

    def add(self, name, module, naming, spelling):
        old = self.entries.get(name)
        if old is not None and old[0] != module:
            self.clashes.add(name)
        self.entries.setdefault(name, (module, naming, spelling))

    def done(self, component: str) -> dict[str, Target]:
        return {k: Target(component, *v) for k, v in self.entries.items() if k not in self.clashes}


def _us(name: str) -> str:
    return name.replace(".", "_")


def _processor_name(d: str) -> str | None:
    """diffusers' attention-processor spelling of an attention projection (`attn1.processor.to_q`,
    `attn1.processor.to_out`), or None for other modules."""
    if ".to_" not in d or not (".attn1." in d or ".attn2." in d):
        return None
    d = d.replace(".to_", ".processor.to_")
    return d[: -len(".0")] if d.endswith(".to_out.0") else d


def _reverse_each(keymap: KeyMap, modules: list[str]) -> dict[str, str]:
    """own module path -> the key map's source name (without `.weight`) for each module it can write."""
    def one(names):
        state = {f"{m}.weight": m for m in names}
        return {m: src[: -len(".weight")] for src, m in keymap.reverse(state).items()}

    try:
        return one(modules)
    except ConfigError:  # some weights have no place in this layout: take the others one by one
        out = {}
        for m in modules:
            try:
                out.update(one([m]))
            except ConfigError:
                continue
        return out


__all__ = ["Target", "component_of", "unet_names", "text_names", "TEXT_PREFIXES"]
