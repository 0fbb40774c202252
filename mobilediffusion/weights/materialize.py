"""Modules that take a checkpoint's tensors instead of initialising their own.

    module = build_on_meta(UNet, cfg, dtype=torch.bfloat16)   # no memory, no random init
    load_state(module, state, keymap, what="UNet", assign=True)  # the checkpoint's tensors become the weights
    materialize_buffers(module)  # buffers no checkpoint holds, derived from their shape

A checkpoint tensor already in the target dtype is used as it is: from a .safetensors file (or a pickle
read with mmap) that is a copy-on-write view of the file's pages, so loading reads the file once and copies
nothing; another dtype is cast once (fp16 -> bf16 directly, never through fp32).
"""
from __future__ import annotations

import torch

from ..errors import CheckpointError

# buffers a module derives from its config rather than reading them from checkpoints (non-persistent),
# by attribute name -> how to make one of a shape
DERIVED_BUFFERS = {
    "position_ids": lambda shape: torch.arange(shape[-1]).expand(shape),  # transformers' CLIP embeddings
}


def build_on_meta(factory, *args, **kwargs):
    """factory(*args, **kwargs) with every parameter and buffer on the meta device (no memory, no init).
    The factory is called without a device, so a model choosing its ops backend from the device it is
    built for chooses the CPU's; move the loaded module and choose again for another device."""
    with torch.device("meta"):
        return factory(*args, **kwargs)


def materialize_buffers(module: torch.nn.Module, device="cpu") -> torch.nn.Module:
    """Give every buffer still on the meta device (not in the checkpoint) its derived value (DERIVED_BUFFERS);
    raises CheckpointError naming any parameter or buffer that is still empty. Returns the module."""
    left = []
    for owner_name, owner in module.named_modules():
        for name, buf in list(owner.named_buffers(recurse=False)):
            if buf is None or buf.device.type != "meta":
                continue
            make = DERIVED_BUFFERS.get(name)
            if make is None:
                left.append(f"{owner_name}.{name}".lstrip("."))
                continue
            owner._buffers[name] = make(tuple(buf.shape)).to(device=device, dtype=buf.dtype)
    left += [n for n, p in module.named_parameters() if p.device.type == "meta"]
    if left:
        raise CheckpointError(f"{type(module).__name__}: {', '.join(left[:6])} have no value after loading (neither "
                              "in the checkpoint nor derivable); load it with a config that matches the checkpoint")
    return module


__all__ = ["DERIVED_BUFFERS", "build_on_meta", "materialize_buffers"]
