"""Where an exported model's weights came from: the manifest's "source" section (see `check_source`).

Two things carry it on the modules themselves, so any caller (the CLI, the export node) gets it the
same way:
  module.applied_loras   LoraRecords of LoRAs merged by this package (apply_lora, load_pipeline(loras=),
                         the MobileDiffusion LoRA node)
  module.source          a ComfyUI graph's chains, set by the From ComfyUI Model node:
                         {"model"|"clip"|"vae": [step, ...]} from the bridge upstream, a step being
                         {"node": class_type, "checkpoint"?: name, "lora"?: name, "strength"?, "sha256"?}
"""
from __future__ import annotations

import json
import math
import os

from ..errors import ConfigError

COMPONENT_OF_SOCKET = {"model": "unet", "clip": "text_encoder"}  # a LoRA on the VAE does not exist in ComfyUI
LORA_KEYS = ("file", "sha256", "strength", "component")


def pipeline_source(pipe, checkpoint: str | None = None) -> dict | None:
    """The provenance of `pipe`'s modules as a manifest "source" dict, or None when nothing is known.

    checkpoint: the file name the caller loaded (used when no ComfyUI graph names one). LoRAs are listed
    in the order they were applied, ComfyUI's LoraLoader steps first (they are merged into the weights the
    bridge read), then the ones this package merged."""
    parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "decoder": pipe.decoder}
    graph = next((m.source for m in parts.values() if getattr(m, "source", None)), None) or {}
    source, loras = {}, []
    ckpt = _graph_checkpoint(graph) or (os.path.basename(checkpoint) if checkpoint else None)
    if ckpt:
        source["checkpoint"] = ckpt
    for socket, component in COMPONENT_OF_SOCKET.items():
        for step in reversed(graph.get(socket, [])):  # upstream first: the order ComfyUI patched them in
            if step.get("lora") and step.get("strength") not in (None, 0):
                if not step.get("sha256"):  # the file is gone from models/loras: say so, do not invent a digest
                    source.setdefault("unhashed_loras", []).append(
                        {"file": step["lora"], "strength": step["strength"], "component": component})
                    continue
                loras.append({"file": step["lora"], "sha256": step["sha256"], "strength": float(step["strength"]),
                              "component": component})
    for component, module in parts.items():
        for record in getattr(module, "applied_loras", ()) or ():
            loras.append({"file": record.name, "sha256": record.sha256, "strength": float(record.strength),
                          "component": component})
    if loras:
        source["loras"] = loras
    if graph:
        source["comfyui_graph"] = {socket: [s["node"] for s in reversed(chain)] for socket, chain in graph.items()}
    return source or None


def _graph_checkpoint(graph: dict) -> str | None:
    for socket in ("model", "clip", "vae"):
        for step in graph.get(socket, []):
            if step.get("checkpoint"):
                return step["checkpoint"]
    return None


def check_source(source: dict | None) -> dict | None:
    """The provenance section as written: a JSON-serialisable dict; its "loras", when present, a list of
    {"file": str, "sha256": 64 hex digits, "strength": number, "component": str}. ConfigError otherwise."""
    if source is None:
        return None
    if not isinstance(source, dict):
        raise ConfigError(f"source must be a dict (e.g. {{'checkpoint': name, 'loras': [...]}}), got "
                          f"{type(source).__name__}")
    for i, lora in enumerate(source.get("loras", [])):
        keys = sorted(lora) if isinstance(lora, dict) else None
        if keys != sorted(LORA_KEYS):
            raise ConfigError(f"source['loras'][{i}] must have exactly the keys {list(LORA_KEYS)}, got {keys}")
        digest = lora["sha256"]
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise ConfigError(f"source['loras'][{i}]['sha256'] must be 64 lowercase hex digits, got {digest!r}")
        strength = lora["strength"]
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
            raise ConfigError(f"source['loras'][{i}]['strength'] must be a finite number, got {strength!r}")
        if not isinstance(lora["file"], str) or not isinstance(lora["component"], str):
            raise ConfigError(f"source['loras'][{i}]: file and component must be strings")
    try:
        return json.loads(json.dumps(source, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"source must hold only JSON values (str, numbers, lists, dicts): {e}") from None
