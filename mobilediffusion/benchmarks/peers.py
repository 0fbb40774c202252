"""Peers: what a user could run instead of this package, on the same weights and inputs.

- diffusers: the reference (UNet2DConditionModel / AutoencoderKL / CLIPTextModel), in the rows' `vs ms`.
- comfyui: ComfyUI's own UNet (comfy.ldm UNetModel behind its ModelPatcher, what the native KSampler
  runs), in a worker process on ComfyUI's Python (comfyui_peer.py).
- openvino: `openvino.convert_model` of the same UNet on OpenVINO's CPU plugin (openvino_peer.py).
- sdcpp: stable-diffusion.cpp on the same SD1.5 weights, in f16 and q8_0: a whole image, so it runs in the
  end-to-end section (--end-to-end) beside ours' SD1.5 case, per step, text encoder and decoder (sdcpp_peer.py).

A peer module has `run(shared, precisions, args) -> list[PeerRow]`: it times itself alternating with
ours eager at each precision (a fresh copy from `shared.make_ours`) and fills its rows with
`rows.peer_row`. A peer that cannot run here is skipped with one line saying how to install it.
"""
from __future__ import annotations

import importlib.util
import os

from ..errors import ConfigError
from .rows import PeerRow

PEERS = ("diffusers", "comfyui", "openvino", "sdcpp")
IMAGE_PEERS = ("sdcpp",)  # whole images only: the end-to-end section runs them, not the component rows
INSTALL = {
    "diffusers": "pip install diffusers",
    "openvino": "pip install openvino (or the bench extra: pip install 'comfyui-mobilediffusion[bench]')",
}


def add_arguments(parser) -> None:
    parser.add_argument("--peers", action="append", default=None,
                        help=f"which of {', '.join(PEERS)} to time against ours, comma-separated, or none "
                             "(default: all; one that cannot run here is skipped with one line)")
    parser.add_argument("--no-reference", action="store_true", help="time ours only (same as --peers none)")
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_DIR"), metavar="DIR",
                        help="a ComfyUI checkout for the comfyui peer (default: $COMFYUI_DIR)")
    parser.add_argument("--comfyui-python", default=os.environ.get("COMFYUI_PYTHON"), metavar="PYTHON",
                        help="the Python that runs ComfyUI, e.g. its venv's bin/python (default: $COMFYUI_PYTHON, "
                             "else this Python)")
    parser.add_argument("--comfyui-args", default="", metavar="ARGS",
                        help="ComfyUI command-line options for the peer besides --cpu, written with '=', e.g. "
                             "--comfyui-args=--use-pytorch-cross-attention (default: none: ComfyUI's CPU defaults)")


def requested(args) -> list[str]:
    """The peer names asked for (all by default); ConfigError for unknown names."""
    if args.no_reference:
        if args.peers:
            raise ConfigError("give --peers or --no-reference, not both")
        return []
    names = [p for spec in (args.peers or [",".join(PEERS)]) for p in spec.split(",") if p]
    if names == ["none"]:
        return []
    for p in names:
        if p not in PEERS:
            raise ConfigError(f"unknown peer {p!r}; choose from {', '.join(PEERS)} or none")
    return list(dict.fromkeys(names))


def check(args) -> None:
    requested(args)


def available(args) -> tuple[list[str], dict[str, str], dict[str, dict]]:
    """(peers that can run here, {peer: why not and how to fix it}, {peer: facts about it, e.g. versions})."""
    ok, skipped, info = [], {}, {}
    for name in requested(args):
        if name in ("diffusers", "openvino"):
            if importlib.util.find_spec(name) is None:
                skipped[name] = f"not installed; install it with: {INSTALL[name]}"
                continue
            info[name] = {"version": importlib.import_module(name).__version__}
        elif name in ("comfyui", "sdcpp"):
            from . import comfyui_peer, sdcpp_peer

            why, facts = comfyui_peer.probe(args) if name == "comfyui" else sdcpp_peer.probe()
            if why:
                skipped[name] = why
                continue
            info[name] = facts
        ok.append(name)
    return ok, skipped, info


def run(name: str, shared, precisions, args) -> list[PeerRow]:
    from . import comfyui_peer, openvino_peer

    return {"comfyui": comfyui_peer, "openvino": openvino_peer}[name].run(shared, precisions, args)
