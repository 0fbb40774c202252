"""A LoRA file's keys -> Patches on the target's parameters, strictly.

A key is `<module name><suffix>`: the suffix families ComfyUI reads (comfy/lora.py load_lora and the
weight adapters) and PEFT's `lora_A`/`lora_B`; the module name must be one of the target's own
spellings (names.py). Every key is used, or the keys that match nothing are named in the error;
keys for a component that was not given (text-encoder keys when patching only a UNet) are counted as
unused. Formats that are recognised but not implemented are refused by name.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import CheckpointError, ConfigError
from .delta import KINDS, Patch
from .files import LoraFile
from .names import Target, component_of

# suffix -> (family, role, PEFT-style: takes alpha from the PEFT config when the file has no .alpha)
SUFFIXES = {
    ".lora_up.weight": ("lora", "up", False), ".lora_down.weight": ("lora", "down", False),
    ".lora_mid.weight": ("lora", "mid", False),
    "_lora.up.weight": ("lora", "up", False), "_lora.down.weight": ("lora", "down", False),  # diffusers processors
    ".lora.up.weight": ("lora", "up", True), ".lora.down.weight": ("lora", "down", True),  # diffusers (PEFT backend)
    ".lora_linear_layer.up.weight": ("lora", "up", True), ".lora_linear_layer.down.weight": ("lora", "down", True),
    ".lora_B.weight": ("lora", "up", True), ".lora_A.weight": ("lora", "down", True),  # PEFT
    ".lora_B.default.weight": ("lora", "up", True), ".lora_A.default.weight": ("lora", "down", True),
    ".lora_B": ("lora", "up", True), ".lora_A": ("lora", "down", True),
    ".hada_w1_a": ("loha", "w1a", False), ".hada_w1_b": ("loha", "w1b", False),
    ".hada_w2_a": ("loha", "w2a", False), ".hada_w2_b": ("loha", "w2b", False),
    ".hada_t1": ("loha", "t1", False), ".hada_t2": ("loha", "t2", False),
    ".lokr_w1": ("lokr", "w1", False), ".lokr_w1_a": ("lokr", "w1a", False), ".lokr_w1_b": ("lokr", "w1b", False),
    ".lokr_w2": ("lokr", "w2", False), ".lokr_w2_a": ("lokr", "w2a", False), ".lokr_w2_b": ("lokr", "w2b", False),
    ".lokr_t2": ("lokr", "t2", False),
    ".diff": ("diff", "diff", False), ".w_norm": ("diff", "diff", False),
    ".diff_b": ("diff_b", "diff", False), ".b_norm": ("diff_b", "diff", False),
    ".alpha": ("meta", "alpha", False), ".dora_scale": ("meta", "dora_scale", False),
}
# key endings of formats this package recognises but does not apply
REFUSED = {
    ".on_input": "IA3", ".lora_magnitude_vector": "PEFT DoRA (lora_magnitude_vector)",
    ".oft_blocks": "OFT", ".oft_diag": "OFT", ".rescale": "OFT/BOFT", ".a1.weight": "GLoRA", ".b1.weight": "GLoRA",
    ".set_weight": "full weight replacement (set_weight)", ".reshape_weight": "padded LoRA (reshape_weight)",
    ".lora_B.bias": "LoRA with bias (PEFT lora_bias)", ".lora_up.bias": "LoRA with bias",
}
LABELS = {"unet": "UNet", "text_encoder": "text encoder"}
# the factors each adapter needs (alternatives: one of the tuples), and the ones it may have
REQUIRED = {"lora": [("up", "down")], "loha": [("w1a", "w1b", "w2a", "w2b")],
            "lokr": [("w1", "w2"), ("w1a", "w1b", "w2"), ("w1", "w2a", "w2b"), ("w1a", "w1b", "w2a", "w2b")],
            "diff": [("diff",)]}
OPTIONAL = {"lora": ("mid",), "loha": ("t1", "t2"), "lokr": ("t2",), "diff": ()}


@dataclass
class Plan:
    """What one LoRA file does to the given components."""

    patches: dict = field(default_factory=dict)  # component -> [Patch]
    namings: set = field(default_factory=set)  # key layouts seen (kohya, diffusers, ...)
    unused: int = 0  # keys left unused: another component's, or unmatched with strict=False


def plan(lora: LoraFile, names: dict, shapes: dict, *, strict: bool = True) -> Plan:
    """names: component -> {LoRA module name: Target}; shapes: component -> {parameter: shape}."""
    keys = list(lora.tensors)
    _refuse(lora, keys)
    out, groups, unmatched = Plan(), {}, []
    for key in keys:
        component = component_of(key)
        if component not in names:
            out.unused += 1
            continue
        hit = _split(key, names[component])
        if hit is None:
            unmatched.append(key)
            continue
        alias, target, suffix = hit
        groups.setdefault((component, target.module), []).append((key, alias, target, suffix))
    matched = sum(len(g) for g in groups.values())
    if not matched:
        given = " and ".join(LABELS[c] for c in sorted(names, reverse=True))
        if not unmatched:  # every key belongs to a component that was not given
            others = " and ".join(LABELS[c] for c in sorted({component_of(k) for k in keys}, reverse=True))
            raise ConfigError(f"{lora.name} has no weights for the {given}: all its keys are for the {others}; "
                              "apply it to that component or to the whole pipeline")
        raise CheckpointError(
            f"{lora.name}: none of its {len(keys)} keys fits this model's {given}, so this LoRA is for another base "
            f"model (found e.g. {_few(_stems(unmatched or keys), 3)}); use a LoRA trained for this model family")
    problems = []
    if unmatched and strict:
        problems.append(f"{len(unmatched)} of its keys match no weight of this model: {_few(unmatched)}")
    out.unused += 0 if strict else len(unmatched)
    for (component, module), entries in groups.items():
        try:
            patches = _patches(lora, component, module, entries, shapes[component])
        except CheckpointError as e:
            problems.append(str(e))
            continue
        out.patches.setdefault(component, []).extend(patches)
        out.namings.update(t.naming for _, _, t, _ in entries)
    if problems:
        raise CheckpointError(f"{lora.name} cannot be applied: " + "; ".join(problems[:4])
                              + (f" (+{len(problems) - 4} more problems)" if len(problems) > 4 else "")
                              + ". Use a LoRA made for this model (same family and size)")
    return out


def _refuse(lora: LoraFile, keys: list) -> None:
    found = {}
    for key in keys:
        for suffix, what in REFUSED.items():
            if key.endswith(suffix):
                found.setdefault(what, key)
    if found:
        raise CheckpointError(f"{lora.name} is a {', '.join(found)} adapter (e.g. {', '.join(found.values())}), "
                              "which MobileDiffusion does not apply; supported are LoRA/LoCon, LoHa, LoKr, DoRA "
                              "(dora_scale) and full diffs. Convert it to a LoRA or merge it into the checkpoint")
    if not any(key.endswith(s) for key in keys for s in SUFFIXES):
        raise CheckpointError(f"{lora.name} holds no LoRA tensors (keys like {_few(keys, 3)}); it looks like a model "
                              "checkpoint, not a LoRA: load it with the model loader, or pick a LoRA file")


def _split(key: str, names: dict):
    """(module name, Target, suffix) for a key, or None when no suffix leaves a known module name."""
    for suffix in SUFFIXES:
        if key.endswith(suffix):
            target = names.get(key[: -len(suffix)])
            if target is not None:
                return key[: -len(suffix)], target, suffix
    return None


def _patches(lora: LoraFile, component: str, module: str, entries: list, shapes: dict) -> list[Patch]:
    """The Patches for one module (a weight adapter and/or a bias diff), checked against the shapes."""
    aliases = sorted({alias for _, alias, _, _ in entries})
    if len(aliases) > 1:
        raise CheckpointError(f"{' and '.join(aliases)} both name {module}; a LoRA holds one of them: "
                              "the file is damaged or two LoRAs were concatenated")
    roles, peft_style = {}, False
    for key, _, _, suffix in entries:
        family, role, peft = SUFFIXES[suffix]
        if (family, role) in roles:
            raise CheckpointError(f"{roles[family, role][0]} and {key} are the same tensor for {module}; "
                                  "remove the duplicate")
        roles[family, role] = (key, lora.tensors[key])
        peft_style |= peft
    kinds = sorted({f for f, _ in roles} & set(KINDS))
    if len(kinds) > 1:
        raise CheckpointError(f"{aliases[0]} mixes {' and '.join(kinds)} adapters on one weight")
    patches, used = [], set()
    target = entries[0][2]
    if kinds:
        patches.append(_weight_patch(lora, component, kinds[0], roles, target, peft_style, used))
    if ("diff_b", "diff") in roles:
        key, t = roles["diff_b", "diff"]
        patches.append(Patch(param=f"{module}.bias", kind="diff", factors={"diff": t}, alpha=None, keys=(key,)))
        used.add(key)
    left = [key for key, _ in roles.values() if key not in used]
    if left:
        raise CheckpointError(f"{_few(left)} belong to no complete adapter (missing its up/down or other factors)")
    for p in patches:
        if p.param not in shapes:
            raise CheckpointError(f"{p.keys[0]} changes {p.param}, which this model does not have")
        p.check(shapes[p.param])
    return patches


def _weight_patch(lora, component, kind, roles, target: Target, peft_style, used) -> Patch:
    have = {role: v for (family, role), v in roles.items() if family == kind}
    options = REQUIRED[kind]
    need = next((o for o in options if all(r in have for r in o)), None)
    extra = set(have) - set(need or ()) - set(OPTIONAL[kind])
    if need is None or extra or (kind == "loha" and ("t1" in have) != ("t2" in have)) \
            or (kind == "lokr" and "t2" in have and "w2a" not in have):
        sets = " or ".join("/".join(o) for o in options)
        raise CheckpointError(f"{next(iter(have.values()))[0]}: an incomplete or inconsistent {kind} adapter "
                              f"(has {'/'.join(sorted(have))}, needs {sets}); the LoRA file is damaged")
    used.update(key for key, _ in have.values())
    alpha, rslora = None, False
    if ("meta", "alpha") in roles:
        key, t = roles["meta", "alpha"]
        if t.numel() != 1 or not t.float().isfinite().all():
            raise CheckpointError(f"{key} must be one finite number, got shape {tuple(t.shape)}")
        alpha = float(t.float().reshape(()))
        used.add(key)
    elif peft_style and lora.peft_alpha(component) is not None:
        config = lora.peft_alpha(component)
        alpha, rslora = config.alpha_for(target.spelling), config.use_rslora
    dora, keys = None, [key for key, _ in have.values()]  # in the order of the factors, then dora_scale
    if ("meta", "dora_scale") in roles:
        key, dora = roles["meta", "dora_scale"]
        if kind == "diff":
            raise CheckpointError(f"{key}: DoRA needs a low-rank adapter, this module has a full diff")
        used.add(key)
        keys.append(key)
    return Patch(param=f"{target.module}.weight", kind=kind, factors={r: t for r, (_, t) in have.items()},
                 alpha=alpha, rslora=rslora, dora_scale=dora, keys=tuple(keys))


def _stems(keys) -> list[str]:
    """The module names of keys (suffix dropped), each once, in file order."""
    out = {}
    for key in keys:
        suffix = next((x for x in SUFFIXES if key.endswith(x)), "")
        out.setdefault(key[: len(key) - len(suffix)], None)
    return list(out)


def _few(items, n: int = 5) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f" ... (+{len(items) - n} more)" if len(items) > n else "")


__all__ = ["plan", "Plan", "SUFFIXES", "REFUSED"]
