"""export_bundle: a Pipeline -> a verified device bundle folder (optionally also a .zip).

The bundle is built in a hidden temporary folder next to the destination and renamed into place only
when every stage succeeded, so an interrupted or failed export leaves nothing behind. Components are
converted one at a time, each straight to its file, and everything a component needed is freed before
the next (see budget.py for the memory this takes). manifest.json:

    schema_version (1, or 2 when inputs/outputs are quantized: runtime/manifest.py), format, created_by
    model       family, latent_channels, latent_scale, latent_shift, scaling_factor (the decoder's),
                prediction_type, resolution [H, W], config (the whole ModelConfig)
    image       height, width, batch_size, latent_shape [B, C, h, w], layout of the decoder's output
    tokenizer   file, files [{file, sha256}], max_length, bos/eos/pad token ids
    sampler     name, steps, guidance, prediction_type, noise, timesteps, c_in, a, b, c (+ d, x0_p, x0_q
                for dpmpp_2m), init_noise_sigma, sigma_start, final_scale (see runtime/sampler.py)
    components  per component: file, sha256, bytes, signature, precision, inputs/outputs [{name, shape,
                dtype (+ quantization)}], ops (builtin op counts), fp32_bytes (the size at fp32),
                composites, large_model_form,
                gpu {compatible, unsupported_ops, analyzer, checked_by} (export/gpu.py),
                conversion_seconds, ops_backend
    verification  limits; per component: rel_error against the torch model in fp32, limit, passed;
                end_to_end: steps, of_steps, prompt, seed, psnr_db against the torch pipeline on the same
                noise, sampler_rel_error (export/endtoend.py)
    source      (optional) where the weights came from: checkpoint, loras [{file, sha256, strength,
                component}], anything else the caller records (see `check_source`)
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from .. import __version__
from ..errors import ConfigError
from ..runtime.manifest import COMPONENTS, FORMAT, MANIFEST, read_manifest, schema_for, sha256_file
from ..memory import release_memory
from .budget import check_memory, component_bytes, estimate
from .components import (DecoderExport, Shapes, TextEncoderExport, UNetExport, calibration_inputs, export_copy,
                         sample_inputs)
from .convert import convert, require_litert
from .endtoend import DEFAULT_STEPS, PROMPT, SAMPLER_LIMIT, SEED, bundle_image, sampler_check, torch_reference, \
    truncated
from .flatbuffer import ExportError, composite_counts, large_model_form
from .gpu import gpu_report
from .quantize import NEEDS_CALIBRATION, check_precision
from .report import component_lines, headline
from .schedule import sampler_section
from .verify import LIMITS, as_feed, check_component, psnr, signature_io, torch_outputs

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
LORA_KEYS = ("file", "sha256", "strength", "component")


def export_bundle(
    pipe, out_dir, precision: str = "fp16", *, height: int | None = None, width: int | None = None,
    batch_size: int = 1, steps: int | None = None, sampler: str = "auto", guidance: float | None = None,
    components=COMPONENTS, overwrite: bool = False, make_zip: bool = False, verify: bool = True,
    end_to_end_steps: int = DEFAULT_STEPS, ops_backend: str = "export",
    decoder_latent_space: tuple[float, float] | None = None, source: dict | None = None,
    release_model: bool = False, progress=None,
) -> Path:
    """Export `pipe` (a Pipeline) to the bundle folder `out_dir`; returns its path.

    Shapes are fixed here: `height` x `width` pixels (default: the model's resolution), `batch_size`
    images per run; the sampler (`auto`: the model's default), its `steps` (default: the model's) and
    `guidance` (default: the model's; > 1 exports the UNet at batch 2B for [uncond, cond]) are baked
    into the manifest. `components` picks a subset of text_encoder/unet/decoder (the runtime needs all
    three). `decoder_latent_space` (scale, shift): when the decoder reads another latent space than the
    UNet's (a separately loaded decoder), latents are mapped x * scale + shift before decoding.
    `verify` runs each file in the interpreter against torch; `end_to_end_steps` (0: off) runs the
    first steps of the bundle against the torch pipeline (export/endtoend.py). `source`: provenance
    written to the manifest (see `check_source`). `release_model`: the caller gives the model up; it is
    converted in place (no copy) and each component is dropped from `pipe` once converted (the CLI,
    which loaded the model only to export it). `progress(done, total, message)` is called at each stage
    and at each step of the end-to-end check. An existing `out_dir` is replaced only with
    `overwrite=True`. Raises ConfigError (bad request or too little memory, before any work) or ExportError.
    """
    cfg = pipe.config
    out_dir = Path(out_dir)
    # 1. everything checkable before heavy work
    check_precision(precision)
    components = tuple(components)
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown or not components or len(set(components)) != len(components):
        raise ConfigError(f"components must be a non-empty subset of {list(COMPONENTS)}, got {list(components)}")
    components = tuple(c for c in COMPONENTS if c in components)
    height = height or cfg.resolution
    width = width or cfg.resolution
    steps = steps or cfg.default_steps
    guidance = cfg.default_guidance if guidance is None else float(guidance)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(end_to_end_steps, int) or end_to_end_steps < 0:
        raise ConfigError(f"end_to_end_steps must be an integer >= 0 (0 turns the check off), got {end_to_end_steps!r}")
    from ..pipeline import check_request

    check_request(cfg, steps=steps, height=height, width=width, sampler=sampler, batch_size=batch_size)
    sampler_info = sampler_section(cfg, sampler, steps, guidance)
    source = check_source(source)
    if out_dir.exists() and not overwrite:
        raise ConfigError(f"{out_dir} already exists; choose another name or allow overwriting")
    zip_path = out_dir.with_name(out_dir.name + ".zip")
    if make_zip and zip_path.exists() and not overwrite:
        raise ConfigError(f"{zip_path} already exists; choose another name or allow overwriting")
    e2e_steps = min(end_to_end_steps, steps) if verify and len(components) == len(COMPONENTS) else 0
    sizes = component_bytes(pipe, components)
    check_memory(estimate(sizes, precision, pixels=height * width, batch=batch_size,
                          in_place=release_model, end_to_end=e2e_steps > 0),
                 f"exporting the {cfg.family} model ({', '.join(components)}) at {precision}")
    require_litert()
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    f = cfg.decoder.upscale
    B = batch_size
    shapes = Shapes(batch=B, unet_batch=2 * B if sampler_info["guidance"] > 1.0 else B,
                    tokens=pipe.text_encoder.max_length, context_dim=cfg.text.hidden_size,
                    latent_channels=cfg.latent_channels, latent_hw=(height // f, width // f), image_hw=(height, width))
    latent_shape = [B, cfg.latent_channels, height // f, width // f]
    n = len(components)
    total = 2 + n * (1 + verify) + 2 * e2e_steps
    done = 0

    def step(message):
        nonlocal done
        log.info("export: %s", message)
        if progress is not None:
            progress(done, total, message)
        done += 1

    tmp = _fresh_dir(out_dir.parent, f".{out_dir.name}.partial-")
    zip_tmp = None
    if release_model:  # the model is ours: into its export form now (contiguous fp32, no packed copies), in place
        for name in components:
            export_copy(getattr(pipe, name), ops_backend, in_place=True)
    release_memory()  # what loading and preparing the model left behind
    try:
        # 2. tokenizer; the torch side of the end-to-end check and calibration inputs while the model is whole
        step("tokenizer")
        tokenizer = _write_tokenizer(pipe.text_encoder, tmp)
        ids = pipe.text_encoder.tokenize([PROMPT] * B)
        section = truncated(sampler_info, e2e_steps)
        reference = None
        if e2e_steps:
            reference = torch_reference(
                pipe, section, batch=B, latent_shape=latent_shape, decoder_space=decoder_latent_space,
                callback=lambda i, k, x: step(f"end-to-end check: torch pipeline, step {i + 1}/{k}"))
        calibration = (calibration_inputs(pipe, shapes, sampler_info["timesteps"])
                       if precision in NEEDS_CALIBRATION else {})
        # 3. components, one at a time, the largest first (while the most memory is free): prepare,
        # reference outputs, convert to file, free
        entries, references, feeds = {}, {}, {}
        for name in sorted(components, key=lambda n: -sizes[n][0]):
            step(f"converting {name} ({precision})")
            module = _export_module(pipe, name, ops_backend, decoder_latent_space, in_place=release_model)
            inputs = sample_inputs(name, shapes, ids=ids)
            if verify:
                references[name], feeds[name] = torch_outputs(module, inputs), as_feed(inputs)
            # a released model's weights go as soon as the fp32 file is written (module is the caller's own)
            release = (lambda m=module: m.to("meta")) if release_model else None
            entries[name] = _convert_component(name, module, inputs, precision, tmp, calibration.get(name), release)
            entries[name]["ops_backend"] = ops_backend
            del module, inputs, release
            if release_model:
                setattr(pipe, name, None)
            release_memory()
        entries = {name: entries[name] for name in components}
        # 4. manifest (written before the checks, which load the bundle like a device would)
        manifest = {
            "schema_version": schema_for(entries),
            "format": FORMAT,
            "created_by": f"mobilediffusion {__version__}",
            "model": _model_section(cfg, height, width),
            "image": {"height": height, "width": width, "batch_size": B, "latent_shape": latent_shape,
                      "layout": "decoder output (B, H, W, 3) float32 in [0, 1]"},
            "tokenizer": tokenizer,
            "sampler": sampler_info,
            "components": entries,
            "verification": {"limits": LIMITS, "inputs": f"seeded random latents/context, prompt {PROMPT!r}"},
            **({"source": source} if source is not None else {}),
        }
        _write_manifest(tmp, manifest)
        # 5. each file against torch, then the bounded end-to-end run, in one set of interpreters
        if verify:
            manifest["verification"].update(_verify(tmp, entries, feeds, references, precision, step,
                                                    reference, section, sampler_info, cfg, latent_shape))
            _write_manifest(tmp, manifest)
        # 6. into place: the zip is built from the finished folder first, so a failure leaves neither
        step("writing the bundle")
        zip_tmp = _write_zip(tmp, out_dir.name, zip_path.parent) if make_zip else None
        _move_into_place(tmp, out_dir, overwrite)
        if zip_tmp is not None:
            os.replace(zip_tmp, zip_path)
        if progress is not None:
            progress(total, total, "done")
        return out_dir
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if zip_tmp is not None and os.path.exists(zip_tmp):
            os.remove(zip_tmp)


def _verify(folder, entries, feeds, references, precision, step, reference, section, sampler_info, cfg,
            latent_shape) -> dict:
    """Component checks (ExportError past a limit), then the end-to-end run when `reference` is given."""
    from ..runtime import BundlePipeline
    from ..runtime.interpreter import Component

    bundle = BundlePipeline(folder) if reference is not None else None
    runners = bundle.components if bundle is not None else {n: Component(folder / e["file"], e)
                                                            for n, e in entries.items()}
    out = {}
    for name in entries:
        step(f"verifying {name}")
        out[name] = check_component(runners[name], feeds[name], references[name], precision)
        if not out[name]["passed"]:
            raise ExportError(
                f"{name}: the {precision} model differs from torch by relative error {out[name]['rel_error']:.2e} "
                f"(limit {out[name]['limit']:.0e}); nothing was written. Export in fp32, or report the model")
    if bundle is not None:
        image = bundle_image(bundle, section, callback=lambda i, k, x: step(f"end-to-end check: bundle, step {i + 1}/{k}"))
        out["end_to_end"] = {
            "steps": len(section["timesteps"]), "of_steps": sampler_info["steps"], "prompt": PROMPT, "seed": SEED,
            "psnr_db": round(psnr(image, reference), 2),
            "sampler_rel_error": sampler_check(cfg, sampler_info, latent_shape), "sampler_limit": SAMPLER_LIMIT,
            "noise": "numpy_noise(seed) (the runtime's), the same on both sides",
        }
        if not out["end_to_end"]["sampler_rel_error"] <= SAMPLER_LIMIT:
            raise ExportError(f"the bundle's sampler coefficients differ from the torch sampler by relative error "
                              f"{out['end_to_end']['sampler_rel_error']:.2e} (limit {SAMPLER_LIMIT:.0e}); "
                              "nothing was written. Report the sampler and model")
    return out


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


def summary(path) -> str:
    """Lines describing a written bundle (what the export node shows and the CLI prints); see report.py."""
    m = read_manifest(path)
    return "\n".join([f"wrote {path} {headline(m)}", *component_lines(m)])


def _convert_component(name, module, inputs, precision, folder: Path, calibration, release) -> dict:
    """Convert one component into folder/<name>.tflite; its manifest entry."""
    t0 = time.perf_counter()
    path = folder / f"{name}.tflite"
    info = convert(name, module, inputs, precision, path, calibration=calibration, release=release)
    seconds = time.perf_counter() - t0
    ins, outs = signature_io(path, name)
    return {
        "file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size, "signature": name,
        "precision": precision, "inputs": ins, "outputs": outs, **info,
        "composites": dict(composite_counts(path)), "large_model_form": large_model_form(path),
        "gpu": gpu_report(path), "conversion_seconds": round(seconds, 2),
    }


def _model_section(cfg, height: int, width: int) -> dict:
    return {
        "family": cfg.family, "latent_channels": cfg.latent_channels, "latent_scale": cfg.latent_scale,
        "latent_shift": cfg.latent_shift, "scaling_factor": cfg.decoder.scaling_factor,
        "prediction_type": cfg.prediction_type, "resolution": [height, width], "config": json.loads(cfg.to_json()),
    }


def _export_module(pipe, name: str, ops_backend, decoder_latent_space, *, in_place: bool):
    """The component `name` of `pipe` wrapped for conversion (export/components.py)."""
    if name == "text_encoder":
        return TextEncoderExport(export_copy(pipe.text_encoder, ops_backend, in_place=in_place)).eval()
    if name == "unet":
        return UNetExport(export_copy(pipe.unet, ops_backend, in_place=in_place)).eval()
    scale, shift = decoder_latent_space or (1.0, 0.0)
    return DecoderExport(export_copy(pipe.decoder, ops_backend, in_place=in_place), scale, shift).eval()


def _write_tokenizer(text_encoder, folder: Path) -> dict:
    """tokenizer.json (+ config) of the text encoder's tokenizer, and its manifest entry."""
    tok = text_encoder.tokenizer
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        if not (Path(d) / "tokenizer.json").is_file():
            raise ExportError("the text encoder's tokenizer could not be saved as tokenizer.json (a slow "
                              "tokenizer?); install transformers >= 5 or tokenizers, which write it")
        files = []
        for name in TOKENIZER_FILES:
            if (Path(d) / name).is_file():
                shutil.copyfile(Path(d) / name, folder / name)
                files.append({"file": name, "sha256": sha256_file(folder / name)})
    return {"file": "tokenizer.json", "files": files, "max_length": text_encoder.max_length,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def _write_manifest(folder: Path, manifest: dict) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, allow_nan=False) + "\n", encoding="utf-8")


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished temporary folder to out_dir; an old bundle is moved aside first, then removed."""
    old = None
    if out_dir.exists():
        if not overwrite:
            raise ConfigError(f"{out_dir} appeared during the export; nothing was overwritten")
        old = _fresh_dir(out_dir.parent, f".{out_dir.name}.old-")
        os.replace(out_dir, old / "bundle")
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fresh_dir(parent: Path, prefix: str) -> Path:
    """A new empty folder parent/<prefix><random>, with the permissions the umask gives (unlike mkdtemp's 0700)."""
    while True:
        path = parent / f"{prefix}{uuid.uuid4().hex[:8]}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _write_zip(folder: Path, name: str, dest_dir: Path) -> str:
    """folder -> a temporary .zip in dest_dir with the files under `name/`; returns its path."""
    import zipfile

    tmp = str(dest_dir / f".{name}.{uuid.uuid4().hex[:8]}.zip.partial")
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(folder.iterdir()):
                zf.write(path, f"{name}/{path.name}")
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return tmp
