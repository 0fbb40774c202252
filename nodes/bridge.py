"""From ComfyUI Model: ComfyUI's MODEL / CLIP / VAE -> MD_UNET, MD_CLIP, MD_DECODER, weight patches applied.

What the user built in the graph (Load Checkpoint, LoraLoader, CLIPSetLastLayer, ModelSamplingDiscrete)
reaches the MobileDiffusion sampler and the TFLite export: the weights with every patch merged, the
prediction type from the MODEL's sampling object, the CLIP layer from the CLIP, the latent space from
the MODEL / VAE. What cannot be carried is refused or listed in a warning by name (nodes/comfy_reader.py).
"""
from __future__ import annotations

import logging
import weakref

from ._common import (
    CACHE, CATEGORY, DEVICES, DTYPES, DecoderHandle, EncoderHandle, Missing, UNetHandle, memory_guard, torch_device,
    torch_dtype,
)

log = logging.getLogger("mobilediffusion.nodes")

LORA_NODES = {"LoraLoader": ("strength_model", "strength_clip"), "LoraLoaderModelOnly": ("strength_model", None)}
CHECKPOINT_INPUTS = ("ckpt_name", "unet_name", "clip_name", "clip_name1", "vae_name")


class MobileDiffusionFromComfy:
    @classmethod
    def INPUT_TYPES(cls):
        from ..mobilediffusion.presets import PRESETS

        return {
            "required": {
                "preset": (["auto", *PRESETS], {"default": "auto", "tooltip": "auto reads the architecture from the "
                           "weights and picks sampling defaults from the preset it matches. SD-Turbo's UNet equals SD "
                           "2.1-base's: choose sd-turbo for its 1-step defaults."}),
                "dtype": (DTYPES, {"default": "auto", "tooltip": "Weight precision of the copy. auto: fp32 on CPU, "
                          "fp16 on GPU; bf16 is about 2x faster than fp32 on recent CPUs."}),
                "device": (DEVICES, {"default": "auto", "tooltip": "auto follows ComfyUI's device choice."}),
            },
            "optional": {
                "model": ("MODEL", {"tooltip": "A MODEL from Load Checkpoint (LoRAs, merges and ModelSamplingDiscrete "
                          "applied). SD 1.x / 2.x, BK-SDM, SDXS-style UNets."}),
                "clip": ("CLIP", {"tooltip": "A CLIP from Load Checkpoint (LoRAs and CLIP Set Last Layer applied)."}),
                "vae": ("VAE", {"tooltip": "A VAE from Load Checkpoint or Load VAE (SD VAE or TAESD)."}),
            },
            "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("MD_UNET", "MD_CLIP", "MD_DECODER", "MD_ENCODER")
    RETURN_NAMES = ("unet", "clip", "decoder", "encoder")
    OUTPUT_TOOLTIPS = ("The UNet with every weight patch merged, and its sampling config.",
                       "The text encoder at the CLIP's last-layer setting.", "The VAE's decoder.",
                       "The VAE's image encoder, for Lite Encode (img2img from a picture).")
    FUNCTION = "bridge"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Carries a model built with ComfyUI's own nodes (checkpoint, LoRAs, CLIP layer, sampling type) "
                   "over to the MobileDiffusion sampler and the TFLite export, without changing ComfyUI's model.")

    def bridge(self, preset="auto", dtype="auto", device="auto", model=None, clip=None, vae=None, prompt=None,
               unique_id=None):
        from ..mobilediffusion.errors import ConfigError
        from .comfy_reader import BridgeError

        if model is None and clip is None and vae is None:
            raise ConfigError("From ComfyUI Model needs at least one of MODEL, CLIP, VAE connected")
        dev = torch_device(device)
        dt = torch_dtype(dtype, dev)
        source = graph_source(prompt, unique_id)
        try:
            with memory_guard("the bridged model", dev):
                return bridge_components(model, clip, vae, preset=None if preset == "auto" else preset, dtype=dt,
                                         device=dev, source=source)
        except BridgeError as e:
            raise ConfigError(str(e)) from None


def bridge_components(model, clip, vae, *, preset, dtype, device, source=None):
    """(MD_UNET, MD_CLIP, MD_DECODER, MD_ENCODER) from ComfyUI objects; a missing input gives a handle that says
    so when it is used."""
    from .comfy_reader import check_clip, check_model, check_vae, uncarried, version, weights_module

    # 1. checks and the facts the weights do not hold (re-read every run: object patches do not change uuids)
    facts = check_model(model) if model is not None else None
    clip_facts = check_clip(clip) if clip is not None else None
    vae_facts = check_vae(vae) if vae is not None else None
    if model is not None:
        dropped = uncarried(model)
        if dropped:
            log.warning("From ComfyUI Model: these MODEL patches act while ComfyUI samples and are NOT carried over "
                        "(the bridged UNet runs without them): %s", "; ".join(dropped))
    options = (preset, str(dtype), str(device))
    keys = {
        "unet": model is not None and ("unet", *version(model, "model"), facts, *options),
        "clip": clip is not None and ("clip", *version(clip, "clip"), clip_facts, *options),
        "vae": vae is not None and ("vae", *version(vae, "vae"), vae_facts, facts and facts.latent_scale, *options),
    }
    key = ("bridge", tuple(keys.values()))
    built = CACHE.get(key, lambda: _build_all(model, clip, vae, facts, clip_facts, vae_facts, keys, preset, dtype,
                                               device, source))
    for obj, socket in ((model, "model"), (clip, "clip"), (vae, "vae")):
        if obj is not None:
            _drop_with(weights_module(obj, socket), key)
    return built["handles"]


_WATCHED: set = set()  # (id of a ComfyUI object, cache key) pairs with a finalizer


def _drop_with(obj, key) -> None:
    """A ComfyUI object that goes away takes its cached copies with it (its id() may be reused); one
    finalizer per object and key."""
    tag = (id(obj), key)
    if tag not in _WATCHED:
        _WATCHED.add(tag)
        weakref.finalize(obj, _forget, tag)


def _forget(tag) -> None:
    _WATCHED.discard(tag)
    CACHE.discard(tag[1])


def _reuse(part_key) -> dict | None:
    """The parts built for an earlier combination of inputs that shares this part, if still cached."""
    for value in CACHE.values():
        if isinstance(value, dict) and value.get("keys", {}).get(part_key[0]) == part_key:
            return value
    return None


def _build_all(model, clip, vae, facts, clip_facts, vae_facts, keys, preset, dtype, device, source) -> dict:
    """The three parts (reusing any still cached) and their handles."""
    from ..mobilediffusion import from_state as fs

    notes, parts = [], {"keys": keys}
    # 1. the modules: copies with every patch merged
    for name, given in (("unet", model), ("clip", clip), ("vae", vae)):
        if given is None:
            continue
        old = _reuse(keys[name])
        if old is not None:
            parts[name] = old[name]
            continue
        if name == "unet":
            parts[name] = _unet_part(model, facts, preset, dtype, device, notes, fs)
        elif name == "clip":
            parts[name] = _text_part(clip, clip_facts, dtype, device, notes, fs)
        else:
            parts[name] = _vae_part(vae, vae_facts, facts, dtype, device, notes, fs)
    if notes:
        log.warning("From ComfyUI Model: %s", "; ".join(dict.fromkeys(notes)))
    # 2. the handles
    text = parts.get("clip")
    vae_part = parts.get("vae")
    decoder = DecoderHandle(vae_part["module"], vae_part["scale"], vae_part["shift"], _name(source, "vae")) \
        if vae_part else None
    encoder = EncoderHandle(vae_part["encoder"], vae_part["scale"], vae_part["shift"], _name(source, "vae"),
                            missing="holds no image encoder (a decoder-only VAE)") if vae_part else \
        EncoderHandle(None, 1.0, 0.0, "From ComfyUI Model", missing="has no VAE connected")
    unet = None
    if "unet" in parts:
        module, preset_name = parts["unet"]["module"], parts["unet"]["preset"]
        if decoder is not None and decoder.decoder.config.latent_channels != module.config.out_channels:
            from ..mobilediffusion.errors import ConfigError

            raise ConfigError(f"the VAE makes {decoder.decoder.config.latent_channels}-channel latents but the "
                              f"MODEL's UNet takes {module.config.out_channels}; connect the VAE of the same model")
        lcm = dict(default_sampler="lcm", default_steps=4, default_guidance=1.0) if facts.lcm else {}
        config = fs.model_config(module.config, preset_name, text=text.config if text is not None else None,
                                 decoder=decoder.decoder.config if decoder is not None else None,
                                 latent_scale=facts.latent_scale, latent_shift=facts.latent_shift, **lcm)
        unet = UNetHandle(module, config, _name(source, "model"))
    for module in (unet and unet.unet, text, decoder and decoder.decoder):
        if module is not None:
            module.source = source  # provenance for the export manifest
    parts["handles"] = (unet or Missing("unet", "connect a MODEL to From ComfyUI Model"),
                        text or Missing("clip", "connect a CLIP to From ComfyUI Model"),
                        decoder or Missing("decoder", "connect a VAE to From ComfyUI Model"), encoder)
    return parts


def _unet_part(model, facts, preset, dtype, device, notes, fs) -> dict:
    from .comfy_reader import UNET_PREFIX, patched_weights

    state = patched_weights(model, "model", UNET_PREFIX, dtype, notes)
    cfg, preset_name = fs.unet_config_from_state(fs.shapes_of(state), preset=preset,
                                                 prediction_type=facts.prediction_type, num_heads=facts.num_heads,
                                                 head_channels=facts.head_channels)
    return {"module": fs.build_unet(state, cfg, device=device, dtype=dtype), "preset": preset_name}


def _text_part(clip, facts, dtype, device, notes, fs):
    import dataclasses

    from ..mobilediffusion.presets import OPENCLIP_H_TEXT, SD_TEXT
    from .comfy_reader import patched_weights

    state = patched_weights(clip, "clip", facts.prefix, dtype, notes)
    shapes = fs.shapes_of(state)
    layers = fs.layers_used(fs.text_layer_count(shapes), facts.layer_idx)
    base = OPENCLIP_H_TEXT if facts.pad_token == "!" else SD_TEXT
    cfg = fs.text_config_from_state(shapes, base=base, layers=layers, hidden_act=facts.hidden_act, heads=facts.heads)
    return fs.build_text_encoder(state, dataclasses.replace(cfg, pad_token=facts.pad_token), device=device,
                                 dtype=dtype)


def _vae_part(vae, vae_facts, facts, dtype, device, notes, fs) -> dict:
    """The decoder, the encoder (if the VAE holds one) and the latent space of the LATENTs they read and write:
    TAESD's own scale/shift, else the MODEL's latent format (SD's 0.18215 without a MODEL)."""
    import dataclasses

    from ..mobilediffusion.loading import encoder_from_state
    from ..mobilediffusion.weights.encoder_keys import encoder_config_from_state, encoder_layout_from_keys
    from .comfy_reader import patched_weights

    state = patched_weights(vae, "vae", "", dtype, notes)
    cfg = fs.decoder_config_from_state(fs.shapes_of(state))
    if vae_facts.kind == "kl":
        scale = facts.latent_scale if facts else cfg.scaling_factor
        shift = facts.latent_shift if facts else 0.0
        cfg = dataclasses.replace(cfg, scaling_factor=scale, shift_factor=shift)
    else:
        scale, shift = vae_facts.latent_scale, vae_facts.latent_shift
    encoder = None
    layout = encoder_layout_from_keys(state)
    if layout is not None:
        fmt = layout[1]
        enc_cfg = encoder_config_from_state(fs.shapes_of(state), fmt, scaling_factor=scale, shift_factor=shift) \
            if vae_facts.kind == "kl" else None
        encoder = encoder_from_state(state, fmt, enc_cfg, device=device, dtype=dtype)
    return {"module": fs.build_decoder_from_state(state, cfg, device=device, dtype=dtype), "encoder": encoder,
            "scale": scale, "shift": shift}


# --------------------------------------------------------------------------- provenance from the graph
def graph_source(prompt, node_id) -> dict:
    """Where the bridged inputs come from, read from the queued graph (ComfyUI's MODEL/CLIP objects do not
    know their files): {"model": [...], "clip": [...], "vae": [...]}, each a chain of steps from this node
    upstream, e.g. [{"node": "LoraLoader", "lora": "lcm.safetensors", "strength": 1.0, "sha256": ...},
    {"node": "CheckpointLoaderSimple", "checkpoint": "sd15.safetensors"}]."""
    if not isinstance(prompt, dict) or str(node_id) not in prompt:
        return {}
    out = {}
    for socket in ("model", "clip", "vae"):
        link = prompt[str(node_id)].get("inputs", {}).get(socket)
        chain, seen = [], set()
        while isinstance(link, list) and len(link) == 2 and str(link[0]) in prompt and str(link[0]) not in seen:
            seen.add(str(link[0]))
            node = prompt[str(link[0])]
            kind, inputs = node.get("class_type", "?"), node.get("inputs", {})
            step = {"node": kind}
            if kind in LORA_NODES:
                strength_key = LORA_NODES[kind][0 if socket == "model" else 1]
                step.update(lora=inputs.get("lora_name"), strength=inputs.get(strength_key) if strength_key else None)
                step["sha256"] = _lora_sha256(inputs.get("lora_name"))
            for name in CHECKPOINT_INPUTS:
                if isinstance(inputs.get(name), str):
                    step["checkpoint"] = inputs[name]
            chain.append(step)
            link = inputs.get(socket) if socket in inputs else None
        if chain:
            out[socket] = chain
    return out


def _lora_sha256(name):
    from ._common import folder_paths

    fp = folder_paths()
    path = fp.get_full_path("loras", name) if fp is not None and isinstance(name, str) else None
    if not path:
        return None
    from ..mobilediffusion.runtime.manifest import sha256_file

    return sha256_file(path)


def _name(source: dict, socket: str) -> str:
    """A readable name of a bridged part: its checkpoint and LoRAs, from the graph."""
    chain = (source or {}).get(socket, [])
    ckpt = next((s["checkpoint"] for s in chain if "checkpoint" in s), None)
    loras = [f"{s['lora']}:{s['strength']:g}" for s in chain if s.get("lora") and isinstance(s.get("strength"),
                                                                                            (int, float))]
    return " + ".join([ckpt or f"ComfyUI {socket.upper()}", *loras])
