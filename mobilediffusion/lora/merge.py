"""Merging LoRAs into a UNet / TextEncoder / Pipeline, removing them exactly, and LoRA'd copies.

A patched parameter always equals its original weight with every applied LoRA's patches added in
order, computed in float32 from the ORIGINAL and cast once (what ComfyUI's patch_weight_to_device
and diffusers' fuse_lora do). The original Parameter objects are kept (as ComfyUI's backup), so
removing the last LoRA from a weight puts the very same tensor back: bit-exact. Patched weights are
NEW tensors, never written in place, so
- a module that shares tensors with another (with_lora's copies, a cached model) never changes the
  other one, and tensors loaded under torch.inference_mode (ComfyUI) are never written to;
- the packed oneDNN copies of the CPU fast path are dropped for the changed modules (fast.forget_packed:
  a new tensor may reuse a freed one's address, so the address alone cannot tell them apart);
- a module compiled with compile=True is not patched in place (inductor freezing may have folded its
  weights into the compiled graph, depending on the torch version): apply_lora/remove_lora refuse it;
  merge LoRAs before compiling (load_pipeline(..., loras=..., compile=True)), or use with_lora, whose
  copy gets its own torch.compile wrapper and is compiled on its first call.
Everything is read and checked before the first parameter changes: an error leaves the target as it was.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import fast
from ..errors import ConfigError
from .files import LoraFile, check_strength, read_lora
from .names import text_names, unet_names
from .parse import plan


@dataclass(frozen=True)
class LoraRecord:
    """One application of a LoRA file, as listed in `module.applied_loras` and export manifests."""

    name: str  # file name
    path: str  # absolute path it was read from
    sha256: str  # of the file's bytes
    strength: float  # the user's multiplier m in m * alpha / rank
    components: tuple  # the parts it changed: "unet", "text_encoder"
    modules: int  # how many parameters it changed (weights and biases, all components)
    naming: tuple = ()  # key layouts found in the file: kohya, lycoris, diffusers, peft, comfyui
    unused_keys: int = 0  # keys for a component that was not given (or that matched nothing, strict=False)


class _State:
    """LoRA bookkeeping of one patched module (its `_lora_state`; `applied_loras` is `records`)."""

    def __init__(self):
        self.records = []  # LoraRecord, in application order
        self.entries = []  # (record, strength, [Patch]) in the same order
        self.originals = {}  # parameter name -> the Parameter before any LoRA
        self.current = {}  # parameter name -> the Parameter this state set

    def copy(self) -> "_State":
        new = _State()
        new.records, new.entries = list(self.records), list(self.entries)
        new.originals, new.current = dict(self.originals), dict(self.current)
        return new


# --------------------------------------------------------------------------- public
def apply_lora(target, lora, strength: float = 1.0, *, strict: bool = True) -> LoraRecord:
    """Merge a LoRA file (path or LoraFile) into `target` in place: a Pipeline (UNet and text encoder),
    a UNet or a TextEncoder (not a compiled one: see the module docstring). Returns the record, also
    appended to each patched module's `applied_loras`.

    strict: every key of the file must match a weight of the given components (keys of a component that
    was not given are counted in `unused_keys`); strict=False skips keys that match nothing (pruned
    UNets such as BK-SDM), counting them too. Raises CheckpointError / ConfigError, changing nothing."""
    record, _ = _apply(_components(target), lora, strength, strict, fork=False)
    return record


def with_lora(target, lora, strength: float = 1.0, *, strict: bool = True):
    """A new Pipeline / UNet / TextEncoder with the LoRA merged; `target` is not changed. The result shares
    every parameter the LoRA does not touch with `target` (a Pipeline also its untouched components)."""
    _, modules = _apply(_components(target), lora, strength, strict, fork=True)
    if _is_pipeline(target):
        return dataclasses.replace(target, unet=modules["unet"], text_encoder=modules["text_encoder"])
    return next(iter(modules.values()))


def remove_lora(target, record_or_path) -> LoraRecord:
    """Undo one apply_lora (a LoraRecord, or a file path: its latest application) in place. Weights no other
    LoRA touches get their original tensors back (bit-exact); the others are merged again without it."""
    components = _components(target)
    _refuse_compiled(components)
    found = {}
    for component, module in components:
        state = module.__dict__.get("_lora_state")
        i = _find(state, record_or_path) if state is not None else None
        if i is not None:
            found[component] = (module, state, i)
    if not found:
        what = record_or_path.name if isinstance(record_or_path, LoraRecord) else str(record_or_path)
        raise ConfigError(f"the LoRA {what} is not applied to this {type(target).__name__}; nothing to remove "
                          "(see its applied_loras)")
    record = None
    updates = {}
    for component, (module, state, i) in found.items():
        _check_untouched(module, state)
        record, _, patches = state.entries[i]
        new_state = state.copy()
        del new_state.entries[i], new_state.records[i]
        params = {p.param for p in patches}
        updates[component] = (module, new_state, {name: _merged(module, new_state, name) for name in params})
    for module, new_state, params in updates.values():
        _commit(module, new_state, params)
    return record


def without_loras(module: nn.Module) -> nn.Module:
    """A copy of a UNet / TextEncoder with every LoRA this package merged into it taken off (its original tensors:
    bit-exact); `module` is not changed, and one without LoRAs comes back as it is."""
    state = module.__dict__.get("_lora_state")
    if state is None or not state.records:
        return module
    _check_untouched(module, state)
    copy_ = _fork(module)
    new = copy_.__dict__["_lora_state"]
    for name, original in new.originals.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = copy_.get_submodule(owner_name)
        setattr(owner, leaf, original)
        fast.forget_packed(owner)
    del copy_._lora_state
    copy_.applied_loras = []
    return copy_


# --------------------------------------------------------------------------- core
def _refuse_compiled(components) -> None:
    for component, module in components:
        if any(fast.is_compiled(m) for m in module.modules()):
            raise ConfigError(
                f"this {component} was compiled (compile=True), and a compiled graph may hold its weights as "
                "constants; apply LoRAs before compiling (load_pipeline(..., loras=[...], compile=True)), or use "
                "with_lora, which makes a LoRA'd copy that compiles afresh")


def _refuse_int8(components) -> None:
    from ..ops.int8 import Int8Conv2d, Int8Linear

    for component, module in components:
        if any(isinstance(m, (Int8Conv2d, Int8Linear)) for m in module.modules()):
            raise ConfigError(
                f"this {component} runs at precision int8, whose packed int8 weights cannot take a LoRA; give the "
                "LoRAs when loading (load_pipeline(..., dtype=\"int8\", loras=[...]) merges them before quantizing), "
                "or load it at bf16 to apply LoRAs afterwards")


def _apply(components, lora, strength, strict, *, fork: bool):
    strength = check_strength(strength)
    _refuse_int8(components)
    if not fork:
        _refuse_compiled(components)
    lora = read_lora(lora)
    names = {c: unet_names(m) if c == "unet" else text_names(m) for c, m in components}
    shapes = {c: {n: tuple(p.shape) for n, p in m.named_parameters()} for c, m in components}
    todo = plan(lora, names, shapes, strict=strict)
    record = LoraRecord(
        name=lora.name, path=str(lora.path), sha256=lora.sha256, strength=strength,
        components=tuple(c for c, _ in components if todo.patches.get(c)),
        modules=sum(len(p) for p in todo.patches.values()), naming=tuple(sorted(todo.namings)),
        unused_keys=todo.unused)
    # 1. compute every new weight first: an error here changes nothing
    updates, modules = {}, {}
    for component, module in components:
        patches = todo.patches.get(component)
        if not patches:
            modules[component] = module
            continue
        module = _fork(module) if fork else module
        state = module.__dict__.get("_lora_state")
        state = state.copy() if state is not None else _State()
        _check_untouched(module, state)
        state.entries.append((record, strength, patches))
        state.records.append(record)
        updates[component] = (module, state, {p.param: _merged(module, state, p.param) for p in patches})
        modules[component] = module
    # 2. swap them in
    for module, state, params in updates.values():
        _commit(module, state, params)
    return record, modules


def _merged(module: nn.Module, state: _State, name: str):
    """The parameter `name` for `state`'s entries: a new Parameter (original + patches in float32, cast once),
    or the original Parameter when no entry patches it."""
    current = module.get_parameter(name)
    original = state.originals.get(name, current)
    patches = [(s, p) for _, s, ps in state.entries for p in ps if p.param == name]
    if not patches:
        if (original.dtype, original.device) == (current.dtype, current.device):
            return original
        return nn.Parameter(original.detach().to(current.device, current.dtype), original.requires_grad)
    with torch.no_grad():
        w = original.detach().to(current.device, torch.float32)
        for strength, patch in patches:
            w = patch.apply(w, strength)
        out = torch.empty_like(current)  # the parameter's dtype, device and memory layout (channels_last)
        out.copy_(w)
    return nn.Parameter(out, requires_grad=original.requires_grad)


def _commit(module: nn.Module, state: _State, params: dict) -> None:
    """Install new parameters and the state; drop the packed copies of the changed modules."""
    for name, param in params.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        state.originals.setdefault(name, getattr(owner, leaf))
        setattr(owner, leaf, param)
        fast.forget_packed(owner)
        if param is state.originals[name]:
            del state.originals[name]
            state.current.pop(name, None)
        else:
            state.current[name] = param
    module._lora_state = state
    module.applied_loras = state.records


def _check_untouched(module: nn.Module, state: _State) -> None:
    """A parameter a LoRA set must still be there: merging again starts from the kept original."""
    changed = [n for n, p in state.current.items() if module.get_parameter(n) is not p]
    if changed:
        raise ConfigError(f"{len(changed)} LoRA-patched parameters were replaced since (e.g. {changed[0]}); "
                          "reload the model before applying or removing LoRAs")


def _find(state: _State, record_or_path):
    if isinstance(record_or_path, LoraRecord):
        hits = [i for i, r in enumerate(state.records) if r is record_or_path] or \
               [i for i, r in enumerate(state.records) if r == record_or_path]
    else:
        path = str(Path(record_or_path.path if isinstance(record_or_path, LoraFile) else record_or_path)
                   .expanduser().resolve())
        hits = [i for i, r in enumerate(state.records) if r.path == path]
    return hits[-1] if hits else None


def _fork(module: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter and buffer (and the tokenizer) with `module`;
    LoRA state containers are copied, a compiled module is compiled afresh for the copy."""
    memo, recompile = {}, []
    for t in itertools.chain(module.parameters(), module.buffers()):
        memo[id(t)] = t
    for name, m in module.named_modules():
        state = m.__dict__.get("_lora_state")
        if state is not None:
            memo[id(state)] = new = state.copy()
            memo[id(state.records)] = new.records
        if m.__dict__.get("_tokenizer") is not None:
            memo[id(m._tokenizer)] = m._tokenizer
        if fast.is_compiled(m):  # the wrapper is bound to `module`'s own forward: the copy needs its own
            memo[id(m._compiled_call_impl)] = None
            recompile.append(name)
    new = copy.deepcopy(module, memo)
    for name in recompile:
        fast.compile_module(new.get_submodule(name))
    return new


def _is_pipeline(target) -> bool:
    """A Pipeline, known by its fields (mobilediffusion.pipeline imports this package, not the other way)."""
    return dataclasses.is_dataclass(target) and hasattr(target, "unet") and hasattr(target, "text_encoder")


def _components(target) -> list:
    from ..text_encoder import TextEncoder
    from ..unet import UNet

    if _is_pipeline(target):
        return [("unet", target.unet), ("text_encoder", target.text_encoder)]
    if isinstance(target, UNet):
        return [("unet", target)]
    if isinstance(target, TextEncoder):
        return [("text_encoder", target)]
    raise ConfigError(f"a LoRA applies to a Pipeline, a UNet or a TextEncoder, not a {type(target).__name__}")


__all__ = ["LoraRecord", "apply_lora", "remove_lora", "with_lora", "without_loras"]
