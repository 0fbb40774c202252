"""Reading ComfyUI's MODEL / CLIP / VAE objects for the bridge (only imported inside ComfyUI).

Weights are taken with every weight patch applied (LoRAs and their strengths, merges) the way
ComfyUI's own merge nodes read them: `get_key_patches()` gives each key's unpatched tensor and its
patch list, which `comfy.lora.calculate_weight` applies on a float32 CPU copy. Nothing is loaded to
a GPU and ComfyUI's objects are not changed; the result is right whether ComfyUI holds the model
unloaded, fully loaded (patched in place, original in `backup`) or partly loaded (lowvram).
Facts about these objects: ../shared/design/COMFY-MODELS.md, Part 1.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger("mobilediffusion.nodes")

UNET_PREFIX = "diffusion_model."
_DROP_UNET = ("model_sampling.",)  # schedule buffers: the sampler's, not weights
_SCALED_FP8 = (".scale_weight", ".scale_input")  # scaled-fp8 layers: folded in by their convert function
_FLOAT8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


class BridgeError(Exception):
    """Raised with a message for the user (the node turns it into a ConfigError)."""


# --------------------------------------------------------------------------- the three inputs
@dataclass(frozen=True)
class Input:
    """Where a MODEL / CLIP / VAE keeps its weights and their patches (COMFY-MODELS.md, Part 1)."""

    module: Callable  # the object -> the torch module holding its weights
    patcher: Callable  # the object -> the ModelPatcher over that module (a new patches_uuid with every patch)
    key_patches: Callable  # the object -> get_key_patches() as ComfyUI's merge nodes call it


INPUTS = {
    "model": Input(lambda m: m.model, lambda m: m, lambda m: m.get_key_patches(UNET_PREFIX)),
    "clip": Input(lambda c: c.cond_stage_model, lambda c: c.patcher, lambda c: c.get_key_patches()),
    "vae": Input(lambda v: v.first_stage_model, lambda v: v.patcher, lambda v: v.patcher.get_key_patches()),
}


def weights_module(obj, socket: str):
    """The torch module that holds the weights of a MODEL / CLIP / VAE (`socket`: "model", "clip", "vae")."""
    return INPUTS[socket].module(obj)


def version(obj, socket: str) -> tuple:
    """(id of the weights' module, its patcher's patches_uuid): equal while the weights and their patches are."""
    part = INPUTS[socket]
    return id(part.module(obj)), part.patcher(obj).patches_uuid


def patched_weights(obj, socket: str, prefix: str, dtype, notes: list) -> dict:
    """{name without prefix: patched tensor in `dtype` on the CPU} of a MODEL / CLIP / VAE (see patched_state)."""
    return patched_state(INPUTS[socket].key_patches(obj), prefix, dtype, notes)


# --------------------------------------------------------------------------- patched weights
def patched_state(key_patches: dict, prefix: str, dtype, notes: list) -> dict:
    """{name without prefix: patched tensor in `dtype` on the CPU} from `get_key_patches()`' result.

    Each tensor is copied to float32 first (calculate_weight works in place), patched, then cast once,
    so peak memory is the result plus one float32 tensor. Layouts are kept: the CPU fast path packs conv
    weights of either layout (mobilediffusion.fast), so nothing is copied again."""
    import comfy.lora
    import comfy.model_management as mm

    cpu, out = torch.device("cpu"), {}
    upcast = False
    for key, (first, *patches) in key_patches.items():
        if not key.startswith(prefix) or key.endswith(_SCALED_FP8) or key.endswith("scaled_fp8"):
            continue
        name = key[len(prefix):]
        if name.startswith(_DROP_UNET):
            continue
        weight, convert = first
        _check_tensor(key, weight)
        fp8 = weight.dtype in _FLOAT8
        upcast |= fp8
        if patches or fp8:  # merged in float32, cast once (more exact than ComfyUI's rounded patched copy)
            w = convert(mm.cast_to_device(weight, cpu, torch.float32, copy=True), inplace=True)
            if patches:
                w = _calculate_weight(comfy.lora, patches, w, key, key_patches)
            w = w.to(dtype)
        else:  # one conversion; always a copy, so nothing we do later can reach ComfyUI's tensor
            w = convert(mm.cast_to_device(weight, cpu, dtype, copy=True), inplace=True)
        out[name] = w
    if upcast:
        notes.append("float8 weights were upcast exactly (as ComfyUI computes with them)")
    return out


def _check_tensor(key, t) -> None:
    if not isinstance(t, torch.Tensor) or type(t) not in (torch.Tensor, torch.nn.Parameter):
        raise BridgeError(f"weight {key} is a {type(t).__name__}, not a plain tensor (GGUF or another quantized "
                          "format); load the model from a .safetensors checkpoint to carry it over")
    if t.is_meta:
        raise BridgeError(f"weight {key} has no data (meta tensor); run the graph once so ComfyUI loads the model")
    if not (t.is_floating_point() or t.dtype in _FLOAT8):
        raise BridgeError(f"weight {key} is stored as {t.dtype}; only float weights can be carried over")


def _calculate_weight(lora_module, patches, weight, key, originals):
    """comfy.lora.calculate_weight, looked up at call time (custom nodes replace it); some replaced
    versions do not take `original_weights`."""
    try:
        return lora_module.calculate_weight(patches, weight, key, intermediate_dtype=torch.float32,
                                            original_weights=originals)
    except TypeError as e:
        if "original_weights" not in str(e):
            raise
        return lora_module.calculate_weight(patches, weight, key, intermediate_dtype=torch.float32)


# --------------------------------------------------------------------------- MODEL
@dataclass(frozen=True)
class ModelFacts:
    family: str  # ComfyUI's model config class name ("SD15", "SD20")
    prediction_type: str  # "epsilon" | "v_prediction" | "sample"
    lcm: bool  # ModelSamplingDiscrete(sampling="lcm"): LCM boundary condition, 50-step grid
    latent_scale: float
    latent_shift: float
    num_heads: int | None  # the UNet's attention heads: not in the weights, ComfyUI's unet_config says
    head_channels: int | None  # or its channels per head


def check_model(model) -> ModelFacts:
    """Refuse what cannot be carried over (by name); return what the weights do not say."""
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    import comfy.supported_models as sm

    base = getattr(model, "model", None)
    mc = getattr(base, "model_config", None)
    if mc is None:
        raise BridgeError(f"the MODEL input is a {type(model).__name__} without a model config; connect a MODEL "
                          "from Load Checkpoint")
    if type(mc) not in (sm.SD15, sm.SD20):
        raise BridgeError(f"the MODEL is a {type(mc).__name__} model; only SD 1.x and SD 2.x UNets (incl. BK-SDM, "
                          "SDXS-style) can be carried over, not SDXL/SD3/Flux or other families")
    if mc.unet_config.get("in_channels", 4) not in (4, 9) or getattr(base, "adm_channels", 0):
        raise BridgeError("the MODEL is an image-conditioned UNet (input channels other than 4 or SD inpainting's "
                          "9, or an extra embedding); only text-to-image and SD inpainting UNets can be carried over")
    if not isinstance(base.diffusion_model, openaimodel.UNetModel):
        raise BridgeError(f"the MODEL's UNet is a {type(base.diffusion_model).__name__} (replaced by another "
                          "custom node); connect the MODEL straight from Load Checkpoint / LoRA loaders")
    if getattr(model, "hook_patches", None):
        raise BridgeError("the MODEL carries hook LoRAs / scheduled weight hooks (Create Hook LoRA); their "
                          "weights change per step and cannot be baked: use LoraLoader instead")
    prediction, lcm = _prediction(model, mc)
    fmt = model.get_model_object("latent_format")
    return ModelFacts(type(mc).__name__, prediction, lcm, float(fmt.scale_factor),
                      float(getattr(fmt, "shift_factor", 0.0) or 0.0), mc.unet_config.get("num_heads"),
                      mc.unet_config.get("num_head_channels"))


def _prediction(model, mc) -> tuple[str, bool]:
    import comfy.model_sampling as cms

    ms = model.get_model_object("model_sampling")
    names = [c.__name__ for c in type(ms).__mro__]
    if not isinstance(ms, cms.ModelSamplingDiscrete) or isinstance(ms, cms.ModelSamplingDiscreteEDM):
        raise BridgeError(f"the MODEL samples with {type(ms).__name__} ({', '.join(names[1:3])}); only SD's "
                          "discrete schedule (ModelSamplingDiscrete eps / v_prediction / lcm / x0) is supported")
    if getattr(ms, "zsnr", False):
        raise BridgeError("the MODEL uses a zero-terminal-SNR schedule (ModelSamplingDiscrete zsnr); it is not "
                          "supported here: switch zsnr off")
    settings = getattr(mc, "sampling_settings", {}) or {}
    schedule = (settings.get("beta_schedule", "linear"), ms.linear_start, ms.linear_end, ms.num_timesteps)
    if schedule[0] != "linear" or abs(schedule[1] - 0.00085) > 1e-9 or abs(schedule[2] - 0.012) > 1e-9 \
            or schedule[3] != 1000:
        raise BridgeError(f"the MODEL's noise schedule {schedule} is not SD's (linear 0.00085..0.012, 1000 steps)")
    if "LCM" in names:
        return "epsilon", True
    if isinstance(ms, (cms.EDM, cms.IMG_TO_IMG)) or not isinstance(ms, cms.EPS):
        raise BridgeError(f"the MODEL's prediction type {type(ms).__name__} is not supported; use eps, "
                          "v_prediction, lcm or x0 in ModelSamplingDiscrete")
    if isinstance(ms, cms.V_PREDICTION):
        return "v_prediction", False
    if isinstance(ms, cms.X0):
        return "sample", False
    return "epsilon", False


def uncarried(model) -> list[str]:
    """What ComfyUI applies to this MODEL while sampling that the weights cannot carry, by name."""
    found = []
    opts = getattr(model, "model_options", {}) or {}
    for key in ("sampler_cfg_function", "sampler_post_cfg_function", "sampler_pre_cfg_function",
                "sampler_calc_cond_batch_function", "model_function_wrapper", "denoise_mask_function"):
        value = opts.get(key)
        if value:
            found.append(f"{key} ({_names(value)})")
    transformer = opts.get("transformer_options", {}) or {}
    for kind, patches in (transformer.get("patches") or {}).items():
        if patches:
            found.append(f"{kind} ({_names(patches)})")  # e.g. output_block_patch: FreeU
    for kind, blocks in (transformer.get("patches_replace") or {}).items():
        if blocks:
            found.append(f"{kind} replacing {len(blocks)} block(s) ({_names(list(blocks.values()))})")  # IPAdapter
    for what in ("wrappers", "callbacks"):
        for kind, entries in (getattr(model, what, None) or {}).items():
            if any(entries.values()) if isinstance(entries, dict) else entries:
                found.append(f"{what[:-1]} {kind}")
    extra = sorted(set(getattr(model, "object_patches", {}) or {}) - {"model_sampling", "latent_format"})
    found += [f"object patch {name}" for name in extra]
    if getattr(model, "weight_wrapper_patches", None):
        found.append("weight wrapper patches")
    for what in ("additional_models", "injections", "attachments"):
        if getattr(model, what, None):
            found.append(f"{what.replace('_', ' ')} ({', '.join(map(str, getattr(model, what)))})")
    return found


def _names(value) -> str:
    items = value if isinstance(value, (list, tuple)) else [value]
    names = []
    for v in items:
        v = v[0] if isinstance(v, (list, tuple)) and v else v
        owner = getattr(v, "__self__", None)
        names.append(getattr(v, "__qualname__", None) or type(owner or v).__name__)
    return ", ".join(dict.fromkeys(names))


# --------------------------------------------------------------------------- CLIP
@dataclass(frozen=True)
class ClipFacts:
    prefix: str  # "clip_l.transformer." or "clip_h.transformer."
    layer_idx: int | None  # the hidden layer ComfyUI reads (None: the last)
    hidden_act: str
    heads: int
    pad_token: str  # what the tokenizer pads with ("<|endoftext|>" SD1, "!" SD2)


def check_clip(clip) -> ClipFacts:
    import comfy.clip_model
    import comfy.sd1_clip
    import comfy.text_encoders.sd2_clip

    cond = getattr(clip, "cond_stage_model", None)
    if type(cond) not in (comfy.sd1_clip.SD1ClipModel, comfy.text_encoders.sd2_clip.SD2ClipModel):
        raise BridgeError(f"the CLIP input is a {type(cond).__name__}; only the SD 1.x (CLIP ViT-L/14) and SD 2.x "
                          "(OpenCLIP-H) text encoders can be carried over")
    patcher = clip.patcher
    if getattr(patcher, "hook_patches", None) or getattr(patcher, "forced_hooks", None):
        raise BridgeError("the CLIP carries hook LoRAs / scheduled CLIP hooks; use LoraLoader instead")
    inner = getattr(cond, cond.clip)
    layer_idx = clip.layer_idx
    if layer_idx is None:  # the encoder's own default (SD1 "last", SD2 the penultimate layer)
        layer, idx, _ = inner.options_default
        layer_idx = None if layer == "last" else idx
    first = inner.transformer.text_model.encoder.layers[0]
    acts = {id(f): name for name, f in comfy.clip_model.ACTIVATIONS.items()}
    act = acts.get(id(first.mlp.activation))
    if act not in ("quick_gelu", "gelu"):
        raise BridgeError(f"the CLIP's activation {act or first.mlp.activation!r} is not CLIP's quick_gelu / gelu")
    pad = inner.special_tokens.get("pad")
    pad_token = {49407: "<|endoftext|>", 0: "!"}.get(pad)
    if pad_token is None:
        raise BridgeError(f"the CLIP pads prompts with token {pad}; only SD's padding (end token or '!') is known")
    return ClipFacts(f"{cond.clip}.transformer.", layer_idx, act, int(first.self_attn.heads), pad_token)


# --------------------------------------------------------------------------- VAE
@dataclass(frozen=True)
class VaeFacts:
    kind: str  # "kl" | "taesd"
    latent_channels: int
    latent_scale: float | None  # TAESD's own (vae_scale); None: the MODEL's latent format decides
    latent_shift: float | None


def check_vae(vae) -> VaeFacts:
    import comfy.ldm.models.autoencoder as autoencoder
    import comfy.taesd.taesd as taesd

    fsm = getattr(vae, "first_stage_model", None)
    if isinstance(fsm, taesd.TAESD):
        return VaeFacts("taesd", int(vae.latent_channels), float(fsm.vae_scale), float(fsm.vae_shift))
    image_vae = isinstance(fsm, autoencoder.AutoencodingEngine) and type(fsm.decoder).__name__ == "Decoder"
    if not image_vae or getattr(vae, "latent_dim", 2) != 2:
        raise BridgeError(f"the VAE is a {type(fsm).__name__}; only SD 1.x/2.x VAEs (AutoencoderKL) and TAESD can "
                          "be carried over")
    if int(vae.latent_channels) != 4:
        raise BridgeError(f"the VAE makes {vae.latent_channels}-channel latents (an SD3/Flux-style VAE); SD 1.x/2.x "
                          "VAEs have 4")
    return VaeFacts("kl", 4, None, None)


# --------------------------------------------------------------------------- CONTROL_NET in CONDITIONING
@dataclass(frozen=True)
class ControlFacts:
    """One control of a chain that ComfyUI's ControlNetApply(Advanced) put in a CONDITIONING entry."""

    kind: str  # "controlnet" | "t2i_adapter"
    module: torch.nn.Module  # ComfyUI's control model: its state_dict has LDM (ControlNet) / TencentARC names
    hint: torch.Tensor  # cond_hint_original (B, C, H, W) in [0, 1]
    strength: float
    start: float  # timestep_percent_range
    end: float
    global_pool: bool  # "shuffle" ControlNets: residuals averaged over space


def control_chain(control) -> list[ControlFacts]:
    """A CONDITIONING entry's "control" (ComfyUI's ControlBase, chained through previous_controlnet) -> its
    controls, the first applied first. BridgeError naming what MobileDiffusion does not run (Control-LoRA, union
    types, SD3/Flux-style control models, strengths that ramp)."""
    out, seen = [], set()
    while control is not None:
        if id(control) in seen:
            raise BridgeError("the conditioning's ControlNet chain loops back on itself")
        seen.add(id(control))
        name = type(control).__name__
        if name == "ControlLora" or hasattr(control, "control_weights"):
            raise BridgeError("the conditioning carries a Control-LoRA, which MobileDiffusion does not run (Stability's "
                              "are SDXL only); use an SD 1.x/2.x ControlNet or T2I-Adapter")
        if hasattr(control, "t2i_model"):
            kind, module = "t2i_adapter", control.t2i_model
        elif hasattr(control, "control_model"):
            kind, module = "controlnet", control.control_model
        else:
            raise BridgeError(f"the conditioning carries a {name} control, which MobileDiffusion does not run; use "
                              "an SD 1.x/2.x ControlNet or T2I-Adapter")
        strength_type = getattr(getattr(control, "strength_type", None), "name", "CONSTANT")
        if strength_type != "CONSTANT":
            raise BridgeError(f"the ControlNet's strength type is {strength_type}; only constant strength is run here")
        # ("y", the class/ADM embedding every ComfyUI ControlNet asks for, is absent from SD 1.x/2.x conditioning)
        extra = sorted(getattr(control, "extra_args", None) or {}) + \
            sorted(set(getattr(control, "extra_conds", None) or ()) - {"y"})
        if extra:
            raise BridgeError(f"the conditioning carries a union / extra-input ControlNet ({', '.join(extra)}), "
                              "which MobileDiffusion does not run")
        if getattr(control, "latent_format", None) is not None or getattr(control, "extra_concat_orig", None) \
                or getattr(control, "concat_mask", False):
            raise BridgeError("the conditioning carries an SD3/Flux-style ControlNet (its own latent format or extra "
                              "inputs), which MobileDiffusion does not run")
        if module is None or getattr(control, "cond_hint_original", None) is None:
            raise BridgeError(f"the {name} in the conditioning has no model or no image; connect it through "
                              "ControlNetApplyAdvanced with an image")
        start, end = getattr(control, "timestep_percent_range", (0.0, 1.0))
        out.append(ControlFacts(kind, module, control.cond_hint_original, float(control.strength), float(start),
                                float(end), bool(getattr(control, "global_average_pooling", False))))
        control = getattr(control, "previous_controlnet", None)
    return out[::-1]
