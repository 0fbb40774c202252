"""LoRA files for the tests, written from a model's module names as the trainers write them.

`kohya_factors` draws random factors for every Linear / Conv2d of a diffusers UNet and a transformers
CLIPTextModel (3x3 convs get a LoCon 3x3 down + 1x1 up), keyed by (component, module name);
`kohya_file` spells them as kohya/A1111 keys; `rule` patches a copy of the reference model by the scale
rule directly (W + m * alpha / r * up @ down), independent of any LoRA loader.
"""
import copy

import torch
from safetensors.torch import save_file

PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


def te_name(name: str) -> str:
    """transformers 5 names CLIPTextModel's modules without `text_model.`; LoRA files keep it."""
    return name if name.startswith("text_model.") else "text_model." + name


def kohya_factors(unet, text_encoder, *, rank=4, seed=0, scale=0.1, keep=lambda component, name: True):
    """(component, diffusers/transformers module name) -> (up, down) for every Linear and Conv2d."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for component, model in (("unet", unet), ("text_encoder", text_encoder)):
        if model is None:
            continue
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear):
                down, up = (rank, m.in_features), (m.out_features, rank)
            elif isinstance(m, torch.nn.Conv2d):
                down, up = (rank, m.in_channels, *m.kernel_size), (m.out_channels, rank, 1, 1)
            else:
                continue
            name = te_name(name) if component == "text_encoder" else name
            if keep(component, name):
                out[component, name] = (torch.randn(up, generator=g) * scale, torch.randn(down, generator=g) * scale)
    return out


def kohya_state(factors, alpha=None):
    """kohya/A1111 keys: lora_unet_<name with _>.lora_up.weight / .lora_down.weight (/.alpha)."""
    sd = {}
    for (component, name), (up, down) in factors.items():
        k = PREFIX[component] + name.replace(".", "_")
        sd[k + ".lora_up.weight"], sd[k + ".lora_down.weight"] = up, down
        if alpha is not None:
            sd[k + ".alpha"] = torch.tensor(float(alpha))
    return sd


def save(sd, path, metadata=None):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def rule(model, factors, component, strength, alpha=None, rslora=False):
    """A copy of `model` with W + strength * alpha / r * (up @ down) for each of `component`'s factors."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for (c, name), (up, down) in factors.items():
            if c != component:
                continue
            own = name if component == "unet" or hasattr(model, "text_model") else name[len("text_model."):]
            module = model.get_submodule(own)
            r = down.shape[0]
            factor = 1.0 if alpha is None else alpha(name) / (r ** 0.5 if rslora else r)
            delta = (up.flatten(1) @ down.flatten(1)).reshape(module.weight.shape)
            module.weight += strength * factor * delta
    return model


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def own_factors(pipe=None, *, unet=None, text=None, rank=2, seed=0, scale=0.2, keep=lambda component, name: True):
    """Random factors for every matrix / conv weight of OUR modules, keyed by the diffusers / transformers name
    (DIFFUSERS_UNET backwards; weights diffusers cannot name are left out), for kohya_state."""
    from mobilediffusion.errors import ConfigError
    from mobilediffusion.weights.unet_keys import DIFFUSERS_UNET

    unet = pipe.unet if pipe is not None else unet
    text = pipe.text_encoder if pipe is not None else text
    g = torch.Generator().manual_seed(seed)
    shapes = {}
    if unet is not None:
        for n, p in unet.named_parameters():
            if n.endswith(".weight") and p.ndim in (2, 4):
                try:
                    (d,) = DIFFUSERS_UNET.reverse({n: n})
                except ConfigError:
                    continue
                shapes["unet", d[: -len(".weight")]] = tuple(p.shape)
    if text is not None:
        for n, p in text.model.named_parameters():
            if n.endswith(".weight") and p.ndim == 2 and "embedding" not in n:
                shapes["text_encoder", te_name(n[: -len(".weight")])] = tuple(p.shape)
    out = {}
    for (component, name), shape in shapes.items():
        if keep(component, name):
            up, down = (shape[0], rank, *[1] * (len(shape) - 2)), (rank, *shape[1:])
            out[component, name] = (torch.randn(up, generator=g) * scale, torch.randn(down, generator=g) * scale)
    return out
