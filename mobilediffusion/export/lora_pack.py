"""export-lora: a LoRA file -> a LoRA pack for one bundle (runtime/lora_pack.py), so a bundle switches LoRAs
and strengths at load instead of being exported again.

The LoRA is read and checked the way it is merged into a torch model (mobilediffusion.lora: every key must fit
a weight of the bundle's model, strictly), against the model the bundle's manifest describes (built on the meta
device: names and shapes only). Each patched parameter is found in the bundle's files through the manifest's
weight map (export/weightmap.py), and its update is written in the file's layout with every factor folded in:
plain LoRA / LoCon as low-rank factors (a [out, r] @ b [r, rest], Tucker mid folded into b), other adapters
(LoHa, LoKr, full diffs) as a dense update. DoRA is refused: its update depends on the base weight's norm.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..lora_strength import check_strength
from ..runtime.lora_pack import FOLDER, FORMAT, METADATA_KEY, SUFFIX, VERSION, write_index
from ..runtime.manifest import BundleError, read_manifest
from .flatbuffer import buffer_span, mapped, scale_span
from .weightmap import LAYOUTS, to_file_layout

KIND_OF = {"FLOAT32": "float32", "FLOAT16": "float16", "INT8": "int8"}


def export_lora_pack(lora, bundle, out=None, *, overwrite: bool = False, strength: float = 1.0) -> Path:
    """Write the pack of `lora` (a LoRA file any loader of this package reads) for the bundle folder `bundle`;
    returns its path (default <bundle>/loras/<lora name>.lorapack, listed in <bundle>/loras/index.json).
    `strength`: what the pack is meant at (the web player's slider starts there). ConfigError / CheckpointError /
    BundleError, with nothing written, when the LoRA does not fit the bundle."""
    from ..atomic import atomic_file
    from ..lora import read_lora

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    lora = read_lora(lora)
    out = Path(out) if out is not None else bundle / FOLDER / default_pack_name(lora.name)
    if out.suffix != SUFFIX:
        raise ConfigError(f"a LoRA pack's file name ends in {SUFFIX}, got {out.name!r}")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another name (-o) or allow overwriting")
    targets, tensors, namings = pack_targets(lora, bundle, manifest)
    info = {"format": FORMAT, "version": VERSION, "name": lora.name, "lora_sha256": lora.sha256, "naming": namings,
            "strength": check_strength(strength),
            "bundle": {c: {"file": manifest["components"][c]["file"], "sha256": manifest["components"][c]["sha256"]}
                       for c in sorted({t["component"] for t in targets})},
            "targets": targets}
    from safetensors.numpy import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(info)})
    if out.parent.resolve() == (bundle / FOLDER).resolve():
        write_index(bundle)
    return out


def pack_targets(lora, bundle: Path, manifest: dict) -> tuple[list[dict], dict, list[str]]:
    """(targets, tensors, the LoRA's key layouts) of the pack (runtime/lora_pack.py) for a read LoraFile."""
    import torch

    from ..config import ModelConfig
    from ..lora.names import text_names, unet_names
    from ..lora.parse import plan
    from ..text_encoder import TextEncoder
    from ..unet import UNet

    cfg = ModelConfig.from_json(json.dumps(manifest["model"]["config"]))
    with torch.device("meta"):
        modules = {"unet": UNet(cfg.unet), "text_encoder": TextEncoder(cfg.text)}
    present = {c: m for c, m in modules.items() if c in manifest["components"]}
    names = {c: unet_names(m) if c == "unet" else text_names(m) for c, m in present.items()}
    shapes = {c: {n: tuple(p.shape) for n, p in m.named_parameters()} for c, m in present.items()}
    todo = plan(lora, names, shapes, strict=True)
    if not any(todo.patches.values()):
        raise ConfigError(f"{lora.name} changes nothing this bundle holds ({', '.join(sorted(present))}); nothing "
                          "was written")
    targets, tensors = [], {}

    def add(component, param, where, form, arrays):
        key = str(len(targets))
        tensors.update({f"{key}.{k}": v for k, v in arrays.items()})
        targets.append({"key": key, "component": component, "param": param, "tensor": where["tensor"],
                        "dtype": where["dtype"], "shape": where["shape"], "offset": where["offset"],
                        "scale_offset": where["scale_offset"], "axis": where["axis"], "form": form})

    for component, patches in todo.patches.items():
        entry = manifest["components"][component]
        weights = entry.get("weights") or {}
        # a Linear the converter folded a LayerNorm into: its bias in the file moves with its weight (c dW beta)
        folded = [p.param for p in patches if "norm" in weights.get(p.param, {})]
        folds = _folds(bundle, entry) if folded else {}
        biases = {w: w[: -len("weight")] + "bias" for w in folded  # (none when beta is 0 and there was no bias)
                  if w[: -len("weight")] + "bias" in weights or np.any(folds[f"{weights[w]['norm']}.bias"])}
        located = _locate(bundle / entry["file"], entry, [p.param for p in patches] + list(biases.values()), component)
        for patch in patches:
            where = located[patch.param]
            shape = shapes[component].get(patch.param, (where["shape"][0],))  # a bias the converter made: (out,)
            gamma = folds[f"{where['norm']}.weight"] if patch.param in folded else None
            add(component, patch.param, where, *_update(patch, shape, where, gamma))
            if patch.param in biases:
                bias = located[biases[patch.param]]
                dw = _dense(patch, shape)  # (out, in), in the parameter's layout
                beta = folds[f"{where['norm']}.bias"]
                add(component, biases[patch.param], bias, "dense",
                    {"delta": (dw @ beta * np.float32(bias["scale"])).astype(np.float32)})
    return targets, tensors, sorted(todo.namings)


def _folds(bundle: Path, entry: dict) -> dict:
    """The LayerNorm parameters folded into the component's Linears (export/files.write_folds), sha256 checked."""
    from safetensors.numpy import load_file

    from ..runtime.manifest import check_file

    spec = entry.get("lora_folds")
    if spec is None:
        raise BundleError(f"{entry['file']}'s weight map names LayerNorms folded into it, but the bundle has no "
                          "folds file; export the bundle again")
    check_file(bundle, spec, f"{entry['file']} folds")
    return load_file(str(bundle / spec["file"]))


def _dense(patch, param_shape) -> np.ndarray:
    """The patch's update in the parameter's layout, alpha / rank in (float32)."""
    return patch.update().reshape(param_shape).numpy().astype(np.float32) * np.float32(patch.scale())


def _update(patch, param_shape, where, gamma=None) -> tuple[str, dict]:
    """The patch's update in the file's layout, every factor folded in: ("lowrank", {a, b}) or ("dense", {delta});
    `gamma`: the LayerNorm scale the converter folded into the weight's columns."""
    if patch.dora_scale is not None:
        raise ConfigError(f"{patch.keys[0]}: DoRA's update depends on the base weight's norm, which a pack does not "
                          "carry; bake this LoRA into the bundle instead (export --lora)")
    factor = patch.scale() * where["scale"]
    layout = where["layout"]
    if patch.kind == "lora" and layout in ("same", "ohwi"):  # the output channels stay the first dimension
        import torch

        f = {k: v.float() for k, v in patch.factors.items()}
        up, down = f["up"].flatten(1), f["down"]
        if "mid" in f:  # Tucker: mid [r, r, kh, kw] . down [r, in] -> [r, in, kh, kw] (lora/delta.py)
            down = torch.einsum("abhw,bc->achw", f["mid"], down.flatten(1))
        r = up.shape[1]
        down = down.reshape(r, *param_shape[1:]).numpy()  # (r, in[, kh, kw]) as the parameter's trailing dims
        if gamma is not None:
            down = down * gamma  # W diag(gamma): the norm's scale on the input columns
        if layout == "ohwi":
            down = down.transpose(0, 2, 3, 1)  # (r, kh, kw, in)
        return "lowrank", {"a": np.ascontiguousarray(up.numpy() * np.float32(factor), np.float32),
                           "b": np.ascontiguousarray(down.reshape(r, -1), np.float32)}
    dense = _dense(patch, param_shape) * np.float32(where["scale"])
    if gamma is not None:
        dense = dense * gamma
    return "dense", {"delta": to_file_layout(dense, layout)}


def _locate(path: Path, entry: dict, params: list[str], component: str) -> dict:
    """Where each parameter's tensor is in the final file: {param: {tensor, layout, scale, dtype, shape, offset,
    scale_offset, axis}}; ConfigError naming a parameter the bundle cannot patch."""
    from ai_edge_litert import schema_py_generated as schema

    weights = entry.get("weights")
    if weights is None:
        raise BundleError(f"this bundle's {entry['file']} records no weight map (exported before LoRA packs, or "
                          "a component LoRAs do not patch); export the bundle again to make packs for it")
    missing = [p for p in params if p not in weights]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConfigError(f"the {component} file {entry['file']} has no tensor of its own for {missing[0]}{more}: the "
                          "converter folded or shared it, so a pack cannot patch it; bake this LoRA into the bundle "
                          "instead (export --lora)")
    types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    out = {}
    with mapped(path) as data:
        flat = schema.Model.GetRootAs(data, 0)
        for param in params:
            w = weights[param]
            graph = flat.Subgraphs(w["subgraph"])
            tensor = next((graph.Tensors(t) for t in range(graph.TensorsLength())
                           if graph.Tensors(t).Name().decode() == w["tensor"]), None)
            if tensor is None or w["layout"] not in LAYOUTS:
                raise BundleError(f"{entry['file']} has no tensor {w['tensor']!r} that its manifest names; the bundle "
                                  "is damaged, export it again")
            kind = KIND_OF.get(types.get(tensor.Type()))
            span = buffer_span(flat, tensor.Buffer())
            if kind is None or span is None:
                raise ConfigError(f"{param} is stored as {types.get(tensor.Type())} in {entry['file']} "
                                  f"({entry['precision']}); packs patch float32, float16 and int8 weights only: bake "
                                  "this LoRA into the bundle (export --lora)")
            scales = scale_span(tensor) if kind == "int8" else None
            q = tensor.Quantization()
            if kind == "int8" and (scales is None or q.ZeroPointLength() and np.any(q.ZeroPointAsNumpy() != 0)):
                raise ConfigError(f"{param} is int8 without symmetric per-channel scales in {entry['file']}; bake "
                                  "this LoRA into the bundle (export --lora)")
            out[param] = {**w, "dtype": kind, "shape": [int(d) for d in tensor.ShapeAsNumpy()], "offset": span[0],
                          "scale_offset": scales[0] if scales else None,
                          "axis": int(q.QuantizedDimension()) if scales else None}
    return out


def split_loras(pipe, resolve=None):
    """(`pipe` without the LoRAs merged into its UNet and text encoder, [(LoRA file, strength)] to write as packs):
    what exporting "LoRAs as packs" needs. LoRAs this package merged come off exactly (their original tensors);
    LoRAs a ComfyUI graph merged (the bridge's `source` chains, e.g. LoraLoader) are subtracted at their strength,
    W - s * dW in float32, which is what ComfyUI added (exact to float32 rounding), their files found by
    `resolve(name) -> path` (ComfyUI's models/loras; it raises for a file that is gone). ConfigError when a LoRA is
    DoRA (not linear in its strength) or one file has different strengths on the UNet and the text encoder (a pack
    has one)."""
    import dataclasses

    from ..lora import read_lora, with_lora, without_loras

    found = {}  # path -> {component: strength}
    parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    base = {c: without_loras(m) for c, m in parts.items()}
    for component, module in parts.items():
        for record in getattr(module, "applied_loras", ()) or ():
            found.setdefault(record.path, {})[component] = record.strength
    graph = next((m.source for m in parts.values() if getattr(m, "source", None)), None) or {}
    for socket, component in (("model", "unet"), ("clip", "text_encoder")):
        for step in reversed(graph.get(socket, [])):
            if not step.get("lora") or not step.get("strength"):
                continue
            if resolve is None:
                raise ConfigError(f"LoRA {step['lora']} of the graph cannot be found without ComfyUI's models/loras; "
                                  "export with the LoRA baked in")
            path = resolve(step["lora"])  # an error naming the file when it is gone
            found.setdefault(str(path), {})[component] = float(step["strength"])
            base[component] = with_lora(base[component], path, -float(step["strength"]), strict=False)
    out = []
    for path, strengths in found.items():
        if len(set(strengths.values())) > 1:
            raise ConfigError(f"{Path(path).name} is applied at {strengths['unet']:g} to the UNet and "
                              f"{strengths['text_encoder']:g} to the text encoder; a pack has one strength: use the same "
                              "for both, or export with the LoRA baked in")
        if any(k.endswith(".dora_scale") for k in read_lora(path).tensors):
            raise ConfigError(f"{Path(path).name} is a DoRA, whose update is not linear in its strength: it cannot be "
                              "switched at run time; export with the LoRA baked in")
        out.append((path, next(iter(strengths.values()))))
    for module in base.values():
        module.applied_loras = []  # the LoRAs are not baked in any more: the packs carry them
    return dataclasses.replace(pipe, unet=base["unet"], text_encoder=base["text_encoder"]), out


def default_pack_name(lora_name: str) -> str:
    """'style.v2.safetensors' -> 'style.v2.lorapack'."""
    return Path(lora_name).stem + SUFFIX
