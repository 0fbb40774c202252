"""FSDP for the distillation stage (`train distill --fsdp` under `accelerate launch`): the student, its feature
projections, their EMA copy and the frozen teacher are sharded over the processes with torch's `fully_shard` (FSDP2).
Each process holds 1/world of every weight, gradient and Adam moment and gathers one UNet block at a time for a
forward or backward. accelerate's FSDP plugin runs on GPUs only; this runs wherever torch.distributed does (gloo on
CPU, nccl on GPUs), so `accelerate launch --use_fsdp` and `--fsdp` both come here.

Checkpoints hold full (unsharded) state in the layout of a run without FSDP: a run resumes on any number of
processes, with or without --fsdp.

    mesh = device_mesh(acc)
    shard_unet(student, mesh)                        # each block, then the rest (in place)
    state = full_model_state(student)                # unsharded, on the main process; every process calls it
    opt_state = full_optimizer_state(student, opt)   # numbered as opt.state_dict() numbers parameters
    load_full_model_state(student, state)            # each process keeps its shard
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def wanted(cfg, acc) -> bool:
    """Shard this run: --fsdp (or accelerate's own FSDP setting) with more than one process."""
    if acc is None or acc.num_processes < 2:
        return False
    return bool(getattr(cfg, "fsdp", False)) or str(acc.distributed_type).endswith("FSDP")


def device_mesh(acc):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(acc.device.type, (acc.num_processes,))


def shard_unet(unet: nn.Module, mesh) -> nn.Module:
    """fully_shard each block of a UNet (its resnet + transformer, and the mid block: the modules the UNet's forward
    calls, one all-gather each), then the root (conv_in, time embedding, samplers, conv_out). In place; returns the
    UNet, now an FSDPModule whose parameters are sharded DTensors."""
    from torch.distributed.fsdp import fully_shard

    from ..unet import Recomputed

    for block in reversed([m for m in unet.modules() if isinstance(m, Recomputed)]):  # (innermost first)
        fully_shard(block, mesh=mesh)
    return fully_shard(unet, mesh=mesh)


def shard_each(modules: nn.ModuleList, mesh) -> nn.ModuleList:
    """fully_shard every module of a list that is called one by one (its own forward never runs)."""
    from torch.distributed.fsdp import fully_shard

    for m in modules:
        fully_shard(m, mesh=mesh)
    return modules


def summary(modules: list[nn.Module]) -> str:
    """One line: how much of the modules' weights this process holds."""
    held = total = 0
    for m in modules:
        for p in m.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            held, total = held + local.numel() * local.element_size(), total + p.numel() * p.element_size()
    return (f"FSDP: student, projections, EMA copy and teacher sharded over the processes; this one holds "
            f"{held / 2**20:.1f} of {total / 2**20:.1f} MiB of their weights")


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


@contextlib.contextmanager
def gradient_sync_off(module: nn.Module):
    """Accumulate gradients unreduced in every FSDP unit under `module` (all but the last pass of a step)."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for m in units:
            m.set_requires_gradient_sync(True, recurse=False)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on the main process (CPU tensors), {} elsewhere. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options(cpu_offload=True))


def full_optimizer_state(module: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The optimizer's unsharded state as `opt.state_dict()` gives it without FSDP (parameters numbered in the
    optimizer's order), on the main process; {} elsewhere. Every process must call it. `opt` optimizes exactly
    module.parameters(), in that order."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(module, opt, options=_options(cpu_offload=True))
    if not state:
        return {}
    number = {fqn: i for i, (fqn, _) in enumerate(module.named_parameters())}
    return {"state": {number[fqn]: v for fqn, v in state["state"].items()},
            "param_groups": [{**g, "params": [number[f] for f in g["params"]]} for g in state["param_groups"]]}


def load_full_model_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load an unsharded state dict (every process holds it) into a sharded module: each keeps its shard."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    missing, unexpected = set_model_state_dict(module, state, options=_options(strict=True))
    if missing or unexpected:
        from ..errors import CheckpointError

        raise CheckpointError(f"checkpoint does not fit the sharded model: missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}; resume with the same config")


def load_full_optimizer_state(module: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """The inverse of full_optimizer_state: `state` numbered as opt.state_dict() numbers parameters."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    fqns = [fqn for fqn, _ in module.named_parameters()]
    named = {"state": {fqns[int(i)]: v for i, v in state["state"].items()},
             "param_groups": [{**g, "params": [fqns[int(i)] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(module, opt, named, options=_options())


__all__ = ["wanted", "device_mesh", "shard_unet", "shard_each", "summary", "is_sharded", "gradient_sync_off",
           "full_model_state", "full_optimizer_state", "load_full_model_state", "load_full_optimizer_state"]
