"""load_control(path) -> ControlNet or Adapter, the layout told by the keys, loaded strictly.

Reads diffusers folders (config.json + weights: ControlNetModel, T2IAdapter), single files in diffusers names, LDM
ControlNets (`control_model.*` or bare), "diff" ControlNets (a `difference` key: the base UNet's weights are
added, so `base=` the UNet they were made against is needed), and T2I-Adapters (diffusers, TencentARC full and
light). Pickles only through torch.load(weights_only=True). What ComfyUI reads but we do not run (Control-LoRA,
union ControlNets, SDXL adapters and ControlNets, style adapters) is refused by name.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from ..weights.formats import component_weights
from ..weights.io import check_exists, read_json, read_metadata, read_tensors
from ..weights.keymap import load_state
from .adapter import Adapter, AdapterConfig
from .controlnet import ControlNet, ControlNetConfig, check_controlnet_fits
from .keys import (
    DIFFUSERS_ADAPTER,
    adapter_config_from_keys,
    controlnet_config_from_diffusers,
    controlnet_config_from_diffusers_keys,
    controlnet_config_from_ldm,
    diffusers_controlnet_keymap,
    ldm_controlnet_keymap,
)

_REFUSED = {  # a key that marks a control model we do not run -> what it is
    "lora_controlnet": "a Control-LoRA (Stability's are SDXL only)",
    "control_add_embedding.linear_1.weight": "a union ControlNet (several control types in one model)",
    "task_embedding": "a union ControlNet (several control types in one model)",
    "control_model.task_embedding": "a union ControlNet (several control types in one model)",
    "add_embedding.linear_1.weight": "an SDXL ControlNet",
    "control_model.label_emb.0.0.weight": "an SDXL ControlNet",
    "label_emb.0.0.weight": "an SDXL ControlNet",
}


NATIVE_CONTROL_KEY = "mobilediffusion_control"  # safetensors metadata of this package's own control files
SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "controls"  # control plugins shipped in the package


def shipped_controls() -> dict[str, Path]:
    """{name: file} of the control plugins that ship with the package (e.g. md-shapes-scribble)."""
    return {p.stem: p for p in sorted(SHIPPED.glob("*.safetensors"))}


def resolve_control(spec) -> Path:
    """A control model's path: `spec` itself when it exists, else the shipped plugin of that name."""
    p = Path(spec)
    if p.exists():
        return p
    shipped = shipped_controls()
    if str(spec) in shipped:
        return shipped[str(spec)]
    raise ConfigError(f"control model {spec} does not exist; give a ControlNet / T2I-Adapter file or folder, or one "
                      f"of the shipped plugins: {', '.join(shipped) or '(none)'}")


def load_control(path, *, base=None, device="cpu", dtype=torch.float32):
    """A ControlNet or T2I-Adapter from `path` (file or diffusers folder). `base`: the UNet the control model is
    meant for (its heads fill what LDM shapes do not say; a diff ControlNet needs it). CheckpointError /
    ConfigError naming what is wrong."""
    p = check_exists(path)
    if p.is_dir():
        model = _load_folder(p, base, device, dtype)
    elif p.suffix == ".safetensors" and NATIVE_CONTROL_KEY in read_metadata(p):
        model = _load_native(p, device, dtype)
    else:
        model = control_from_state(read_tensors(p), base=base, device=device, dtype=dtype, name=p.name)
    if base is not None:
        from .apply import check_fits

        check_fits(model, base)
    return model


def save_native_control(path, adapter: Adapter, *, model: str, hint: str) -> Path:
    """Write an Adapter in this package's own form: its tensors under their module names and, in the metadata, its
    config, the model (preset) it was made for and what hint it reads. For layouts no other format describes (the
    default model's plugin: pixel-unshuffle 8, three levels); written atomically."""
    import dataclasses
    import json

    from safetensors.torch import save_file

    from ..atomic import atomic_file

    path = Path(path)
    meta = {"kind": "t2i_adapter", "config": dataclasses.asdict(adapter.config), "model": model, "hint": hint}
    tensors = {k: v.detach().cpu().contiguous() for k, v in adapter.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata={NATIVE_CONTROL_KEY: json.dumps(meta), "format": "pt"})
    return path


def native_control_info(path) -> dict | None:
    """The metadata of a native control file ({kind, config, model, hint}), None for other files."""
    import json

    p = Path(path)
    if p.suffix != ".safetensors" or not p.is_file():
        return None
    raw = read_metadata(p).get(NATIVE_CONTROL_KEY)
    try:
        return None if raw is None else json.loads(raw)
    except json.JSONDecodeError:
        raise CheckpointError(f"{p.name} has unreadable {NATIVE_CONTROL_KEY} metadata; the file is damaged") from None


def _load_native(p: Path, device, dtype) -> Adapter:
    info = native_control_info(p)
    if info.get("kind") != "t2i_adapter":
        raise CheckpointError(f"{p.name} is a MobileDiffusion control file of kind {info.get('kind')!r}, which this "
                              "version does not read; update mobilediffusion")
    c = dict(info["config"])
    try:
        cfg = AdapterConfig(**{**c, "channels": tuple(c["channels"])})
    except (TypeError, KeyError) as e:
        raise CheckpointError(f"{p.name} has an adapter config this version does not read ({e})") from None
    model = Adapter(cfg, device=device, dtype=dtype)
    load_state(model, read_tensors(p), what=f"T2I-Adapter ({p.name})")
    return model.eval()


def control_from_state(state: dict, *, base=None, device="cpu", dtype=torch.float32, name: str = "the state"):
    """load_control for tensors already in memory (e.g. a ComfyUI CONTROL_NET's weights)."""
    for key, what in _REFUSED.items():
        if key in state:
            raise ConfigError(f"{name} is {what}, which MobileDiffusion does not run; use an SD 1.x/2.x ControlNet "
                              "or T2I-Adapter")
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    base_cfg = None if base is None else base.config
    if "controlnet_cond_embedding.conv_in.weight" in shapes:
        cfg = controlnet_config_from_diffusers_keys(shapes, base_cfg)
        return _controlnet(cfg, state, diffusers_controlnet_keymap(cfg), base, device, dtype, name)
    for prefix in ("control_model.", ""):
        if f"{prefix}input_hint_block.0.weight" in shapes:
            cfg = controlnet_config_from_ldm(shapes, prefix, base_cfg)
            return _controlnet(cfg, state, ldm_controlnet_keymap(cfg, prefix), base, device, dtype, name)
    if any(k.startswith(("zero_convs.", "control_model.zero_convs.")) for k in shapes):
        raise CheckpointError(f"{name} has ControlNet zero convolutions but no input_hint_block; the file is "
                              "incomplete")
    cfg, keymap = adapter_config_from_keys(shapes)
    model = Adapter(cfg, device=device, dtype=dtype)
    load_state(model, state, keymap, what=f"T2I-Adapter ({name})")
    return model.eval()


def _controlnet(cfg: ControlNetConfig, state: dict, keymap, base, device, dtype, name: str) -> ControlNet:
    if base is not None:
        check_controlnet_fits(cfg.unet, base.config, name)
    diff = state.pop("difference", None) is not None
    model = ControlNet(cfg, device=device, dtype=dtype)
    if diff:
        if base is None:
            raise ConfigError(f"{name} is a diff ControlNet: it holds differences from its base model; load it "
                              "with the model it was made for (base=UNet; DiffControlNetLoader in ComfyUI)")
        renamed = keymap.apply(state)
        own = base.state_dict()
        state = {k: v + own[k].to(v.dtype) if k in own and own[k].shape == v.shape else v for k, v in renamed.items()}
        keymap = None
    load_state(model, state, keymap, what=f"ControlNet ({name})")
    return model.eval()


def _load_folder(p: Path, base, device, dtype):
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{p} is a folder without config.json; give a diffusers ControlNet / T2IAdapter folder "
                              "or the weights file")
    d = read_json(cfg_path)
    kind = d.get("_class_name")
    state = read_tensors(component_weights(p))
    if kind == "ControlNetModel":
        cfg = controlnet_config_from_diffusers(d)
        return _controlnet(cfg, state, diffusers_controlnet_keymap(cfg), base, device, dtype, p.name)
    if kind == "T2IAdapter":
        cfg = adapter_config_from_diffusers(d)
        model = Adapter(cfg, device=device, dtype=dtype)
        load_state(model, state, DIFFUSERS_ADAPTER, what=f"T2I-Adapter ({p.name})")
        return model.eval()
    raise CheckpointError(f"{p}/config.json describes a {kind!r}; load_control reads ControlNetModel and T2IAdapter "
                          "folders")


def adapter_config_from_diffusers(d: dict) -> AdapterConfig:
    kind = {"full_adapter": "full", "light_adapter": "light"}.get(d.get("adapter_type", "full_adapter"))
    if kind is None:
        raise ConfigError(f"this T2IAdapter is a {d.get('adapter_type')!r} (SDXL); MobileDiffusion runs SD 1.x/2.x "
                          "adapters")
    channels = list(d.get("channels", (320, 640, 1280, 1280)))
    if kind == "light":
        channels.append(channels[-1])  # its last block repeats the last width
    factor = int(d.get("downscale_factor", 8))
    if factor != 8:
        raise ConfigError(f"this T2IAdapter unshuffles by {factor}; SD adapters use 8")
    return AdapterConfig(kind, int(d.get("in_channels", 3)), tuple(channels),
                         int(d.get("num_res_blocks", 2 if kind == "full" else 4)), 1 if kind == "full" else 3, False, 8)
