"""Training a LoRA on a UNet, and writing it as kohya/A1111 keys (what ComfyUI's LoraLoader, our loader, the bridge
and the bundle packs read).

    net = LoraNetwork(unet, rank=16)          # parametrizes the target weights: W + alpha / rank * up @ down
    ... train net.parameters() (the UNet's own weights are frozen) ...
    save_kohya(net, "lora.safetensors")       # lora_unet_<diffusers name>.lora_down/.lora_up/.alpha

Targets: "transformer" (kohya's default: every Linear of the transformer blocks: proj_in/out, attention projections,
feed-forward) or "all" (also the ResNet, sampling and time-embedding layers, 3x3 convs as LoCon: a k x k down and a
1x1 up). Each target is spelled by its diffusers name; a weight diffusers cannot name (the MobileDiffusion layout's
shared cross-attention key/value projection, to_kv: k = v = to_kv(context)) by kohya's prefix on our own module
path (lora_unet_<path with _>), which our loader, the nodes and the bundle packs read (lora.names); ComfyUI's
LoraLoader cannot load a MobileDiffusion layout in the first place. `LoraNetwork.skipped` lists weights left out
(none today).
Init as kohya's: down Kaiming-uniform, up zero (the network starts as the identity).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ConfigError

TARGETS = ("transformer", "all")
KOHYA_PREFIX = "lora_unet_"


@dataclass(frozen=True)
class Part:
    """One kohya LoRA pair: its name and the rows of the parametrized weight it updates (all of them today; a fused
    weight would take one pair per part)."""

    name: str  # lora_unet_<diffusers name with _>
    start: int
    stop: int


class LoraDelta(nn.Module):
    """weight -> weight + alpha / rank * cat_parts(up_p @ down_p), reshaped to the weight (a parametrization)."""

    def __init__(self, weight: torch.Tensor, parts: list[Part], rank: int, alpha: float):
        super().__init__()
        self.parts, self.scale = parts, alpha / rank
        fan_in = weight[0].numel()  # in * k * k
        kernel = weight.shape[2:]
        self.down, self.up = nn.ParameterList(), nn.ParameterList()
        for p in parts:
            down = torch.empty(rank, weight.shape[1], *kernel)  # (r, in[, k, k])
            nn.init.kaiming_uniform_(down.view(rank, fan_in), a=math.sqrt(5))
            self.down.append(nn.Parameter(down))
            self.up.append(nn.Parameter(torch.zeros(p.stop - p.start, rank, *([1] * len(kernel)))))  # (rows, r[,1,1])

    def delta(self) -> torch.Tensor:
        """(out, in * k * k) update, unscaled by the weight's shape."""
        return torch.cat([u.flatten(1) @ d.flatten(1) for u, d in zip(self.up, self.down)])

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * self.delta().reshape(weight.shape).to(weight.dtype)


class LoraNetwork(nn.Module):
    """LoRA pairs on a UNet's target weights. Attaching parametrizes the UNet in place (its forward then uses
    W + delta) and freezes its own weights; `parameters()` are the LoRA factors only; `detach_from()` merges nothing
    and restores the plain weights."""

    def __init__(self, unet: nn.Module, *, rank: int, alpha: float | None = None, targets: str = "transformer"):
        super().__init__()
        if targets not in TARGETS:
            raise ConfigError(f"unknown LoRA targets {targets!r}; choose one of: {', '.join(TARGETS)}")
        if not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"LoRA rank must be an integer >= 1, got {rank!r}")
        self.rank, self.alpha = rank, float(alpha if alpha else rank)
        plan, self.skipped = lora_plan(unet, targets)
        if not plan:
            raise ConfigError(f"this UNet has no weight a kohya LoRA can name among the {targets!r} targets; "
                              "try targets 'all' or a full fine-tune (no --lora-rank)")
        too_big = [f"{m} ({min(w.shape[0], w[0].numel())})" for m, _ in plan
                   for w in [unet.get_submodule(m).weight] if rank > min(w.shape[0], w[0].numel())]
        if too_big:
            raise ConfigError(f"LoRA rank {rank} is larger than {len(too_big)} target layers (their largest useful rank "
                              f"in brackets: {', '.join(too_big[:4])}{' ...' if len(too_big) > 4 else ''}); choose "
                              f"--lora-rank <= {min(int(t.rsplit('(', 1)[1][:-1]) for t in too_big)}")
        self.deltas = nn.ModuleDict()
        self.modules_of: dict[str, str] = {}  # ModuleDict key -> the UNet module path
        for module, parts in plan:
            key = module.replace(".", "__")
            self.deltas[key] = LoraDelta(unet.get_submodule(module).weight, parts, rank, self.alpha)
            self.modules_of[key] = module
        self.attach(unet)

    def attach(self, unet: nn.Module) -> None:
        unet.requires_grad_(False)
        for key, module in self.modules_of.items():
            parametrize.register_parametrization(unet.get_submodule(module), "weight", self.deltas[key])

    def detach_from(self, unet: nn.Module) -> None:
        for module in self.modules_of.values():
            parametrize.remove_parametrizations(unet.get_submodule(module), "weight", leave_parametrized=False)

    def kohya_state(self) -> dict[str, torch.Tensor]:
        """lora_unet_<name>.lora_down.weight / .lora_up.weight / .alpha for every pair."""
        out = {}
        for delta in self.deltas.values():
            for part, up, down in zip(delta.parts, delta.up, delta.down):
                out[f"{part.name}.lora_down.weight"] = down.detach().float().contiguous().cpu()
                out[f"{part.name}.lora_up.weight"] = up.detach().float().contiguous().cpu()
                out[f"{part.name}.alpha"] = torch.tensor(self.alpha)
        return out


def lora_plan(unet: nn.Module, targets: str) -> tuple[list[tuple[str, list[Part]]], list[str]]:
    """([(our module path, its kohya parts)], [module paths left out]) for a UNet."""
    from ..lora.names import _reverse_each
    from ..weights.unet_keys import DIFFUSERS_UNET

    wanted = [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
              and (targets == "all" or ".attn." in f".{n}")]  # a transformer: .attn.proj_in, .attn.blocks.*
    diffusers = _reverse_each(DIFFUSERS_UNET, wanted)
    plan, skipped = [], []
    for m in wanted:
        rows = unet.get_submodule(m).weight.shape[0]
        name = diffusers.get(m, m)  # no diffusers name (to_kv): our own path, as lora.names reads it
        plan.append((m, [Part(KOHYA_PREFIX + name.replace(".", "_"), 0, rows)]))
    return plan, skipped


def save_kohya(network: LoraNetwork, path, *, metadata: dict | None = None):
    """Write the network as a kohya LoRA .safetensors (atomic), with sd-scripts' ss_* metadata."""
    from pathlib import Path

    from safetensors.torch import save_file

    from ..atomic import atomic_file

    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(network.rank),
            "ss_network_alpha": str(network.alpha), "ss_network_args": "{}", **(metadata or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        save_file(network.kohya_state(), tmp, metadata={k: str(v) for k, v in meta.items()})
    return path


__all__ = ["LoraNetwork", "LoraDelta", "Part", "lora_plan", "save_kohya", "TARGETS"]
