"""export_bundle: a Pipeline -> a verified device bundle folder (optionally also a .zip).

The bundle is built in a hidden temporary folder next to the destination and renamed into place only
when every stage succeeded, so an interrupted or failed export leaves nothing behind. Components are
converted one at a time, each straight to its file, and everything a component needed is freed before
the next (see budget.py for the memory this takes). manifest.json:

    schema_version (1, or 2 when inputs/outputs are quantized: runtime/manifest.py), format, created_by
    model       family, latent_channels, latent_scale, latent_shift, scaling_factor (the decoder's),
                prediction_type, resolution [H, W], config (the whole ModelConfig)
    image       height, width, latent_shape [B, C, h, w] (the default size), sizes [[H, W], ...] (every
                size the bundle runs, the default first), batch_size, layout of the decoder's output
    tokenizer   file, files [{file, sha256}], max_length, bos/eos/pad token ids, max_chunks (prompt chunks of
                max_length - 2 tokens the UNet takes: its context lengths are listed per signature)
    sampler     name, steps, guidance, prediction_type, noise, timesteps, c_in, a, b, c (+ d, x0_p, x0_q
                for dpmpp_2m), init_noise_sigma, sigma_start, final_scale (see runtime/sampler.py)
    components  per component: file, sha256, bytes, precision, signature/inputs/outputs (its default signature)
                and signatures [{signature, size, tokens, inputs, outputs}] (one per size and context length,
                over shared weights), inputs/outputs [{name, shape, dtype (+ quantization)}], ops (builtin op
                counts), fp32_bytes (the size at fp32), composites, large_model_form,
                gpu {compatible, unsupported_ops, analyzer, checked_by} (export/gpu.py),
                conversion_seconds, ops_backend, weights (text encoder and UNet: where each parameter lives in
                the file, for LoRA packs: export/weightmap.py), lora_folds {file, sha256} (<component>.folds
                .safetensors: the gamma/beta of LayerNorms the converter folded into the next Linear, which a
                pack needs; written only when there are such folds)
    verification  limits; per component: rel_error (the worst signature) against the torch model in fp32,
                limit, passed, per signature; end_to_end: steps, of_steps, prompt, seed, psnr_db against the
                torch pipeline on the same noise, sampler_rel_error (export/endtoend.py)
    source      (optional) where the weights came from: checkpoint, loras [{file, sha256, strength,
                component}], anything else the caller records (see provenance.check_source)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path

from .. import __version__
from ..atomic import fresh_dir, replace_dir
from ..errors import ConfigError
from ..memory import release_memory
from ..prompts import DEFAULT_CHUNKS, context_lengths
from ..runtime.manifest import ALL_COMPONENTS, COMPONENTS, CONTROL_COMPONENTS, FORMAT, read_manifest, schema_for, \
    sha256_file
from .budget import check_budget, check_memory, component_bytes, estimate, human, parse_bytes
from .components import SPECS, Calibration, Shapes, example_inputs, export_copy
from .convert import convert, require_litert
from .endtoend import DEFAULT_STEPS, PROMPT, SAMPLER_LIMIT, SEED, bundle_image, sampler_check, torch_reference, \
    truncated
from .files import write_folds, write_manifest, write_tokenizer, write_zip
from .flatbuffer import ExportError, composite_counts, large_model_form
from .gpu import gpu_report
from .provenance import check_source
from .quantize import NEEDS_CALIBRATION, check_precision
from .report import component_lines, headline
from .schedule import sampler_section
from .verify import LIMITS, as_feed, check_component, psnr, signature_io, torch_outputs

log = logging.getLogger(__name__)


def export_bundle(
    pipe, out_dir, precision: str = "fp16", *, height: int | None = None, width: int | None = None,
    sizes=None, prompt_chunks: int = DEFAULT_CHUNKS, batch_size: int = 1, steps: int | None = None,
    sampler: str = "auto", guidance: float | None = None, components=COMPONENTS, overwrite: bool = False,
    make_zip: bool = False, verify: bool = True, end_to_end_steps: int = DEFAULT_STEPS, ops_backend: str = "export",
    decoder_latent_space: tuple[float, float] | None = None, source: dict | None = None, budget=None,
    release_model: bool = False, progress=None, control=None, control_source: dict | None = None,
    encoder: bool = False,
) -> Path:
    """Export `pipe` (a Pipeline) to the bundle folder `out_dir`; returns its path.

    Shapes are fixed here: `height` x `width` pixels (default: the model's resolution), or `sizes`, a list of
    (height, width) the bundle runs at (one UNet and decoder signature per size over shared weights; the
    first is the default); prompts of up to `prompt_chunks` chunks of 75 tokens (a UNet signature per context
    length); `batch_size` images per run. The sampler (`auto`: the model's default), its `steps` (default: the
    model's) and `guidance` (default: the model's; > 1 exports the UNet at batch 2B for [uncond, cond]) are
    baked into the manifest. `components` picks a subset of text_encoder/unet/decoder (the runtime needs all
    three). `decoder_latent_space` (scale, shift): when the decoder reads another latent space than the
    UNet's (a separately loaded decoder), latents are mapped x * scale + shift before decoding.
    `verify` runs each signature of each file in the interpreter against torch, and a whole bundle once in a
    fresh process to measure its memory; `end_to_end_steps` (0: off) runs the first steps of the bundle at its
    default size against the torch pipeline (export/endtoend.py).
    `budget` (bytes, or text like "2GB"): what one generation may take on the device; an estimate over it is
    refused before any conversion, naming the precision that fits, and the figure measured after the export with
    `verify` (runtime/memory.py, recorded in the manifest's "memory" with each component's resident bytes) is held
    to it.
    `source`: provenance written to the manifest (see provenance.check_source). `release_model`: the caller
    gives the model up; it is converted in place (no copy) and each component is dropped from `pipe` once
    converted (the CLI, which loaded the model only to export it). `progress(done, total, message)` is called
    at each stage and at each step of the end-to-end check. An existing `out_dir` is replaced only with
    `overwrite=True`. Raises ConfigError (bad request or too little memory, before any work) or ExportError.
    `control`: a ControlNet or T2I-Adapter (control.load_control) written as the `controlnet` / `adapter`
    component, the UNet taking its residuals as inputs (`control_source`: what the manifest records of its file).
    `encoder`: also write the image encoder (img2img and inpainting; always for a 9-channel inpainting UNet).
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
    parts = _Parts(pipe, control)
    concat = getattr(pipe.unet, "concat_channels", 0) if pipe.unet is not None else 0
    optional = optional_components(control, encoder or concat > 0)
    if optional and len(components) != len(COMPONENTS):
        raise ConfigError(f"a bundle with {' and '.join(optional)} is a whole bundle: export components 'all'")
    if "encoder" in optional and getattr(pipe, "encoder", None) is None:
        raise ConfigError("this bundle needs the image encoder (img2img / inpainting), but the pipeline has none: "
                          "load it with load_pipeline(path, encoder=True) or give the VAE")
    if control is not None:
        from ..control.apply import check_fits

        check_fits(control, pipe.unet)
    components = tuple(c for c in ALL_COMPONENTS if c in components or c in optional)
    sizes = _sizes(cfg, height, width, sizes)
    steps = steps or cfg.default_steps
    guidance = cfg.default_guidance if guidance is None else float(guidance)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(prompt_chunks, int) or isinstance(prompt_chunks, bool) or not 1 <= prompt_chunks <= 8:
        raise ConfigError(f"prompt_chunks must be an integer from 1 to 8 (chunks of 75 tokens), got {prompt_chunks!r}")
    if not isinstance(end_to_end_steps, int) or end_to_end_steps < 0:
        raise ConfigError(f"end_to_end_steps must be an integer >= 0 (0 turns the check off), got {end_to_end_steps!r}")
    from ..pipeline import check_request

    for H, W in sizes:
        check_request(cfg, steps=steps, height=H, width=W, sampler=sampler, batch_size=batch_size)
    sampler_info = sampler_section(cfg, sampler, steps, guidance)
    source = check_source(source)
    if out_dir.exists() and not overwrite:
        raise ConfigError(f"{out_dir} already exists; choose another name or allow overwriting")
    zip_path = out_dir.with_name(out_dir.name + ".zip")
    if make_zip and zip_path.exists() and not overwrite:
        raise ConfigError(f"{zip_path} already exists; choose another name or allow overwriting")
    whole = set(COMPONENTS) <= set(components)
    # the end-to-end check runs a prompt alone: an inpainting UNet needs an image and a mask too (its components are
    # still checked one by one, and the runtime's repaint against torch in tests/test_bundle_control.py)
    e2e_steps = min(end_to_end_steps, steps) if verify and whole and not concat else 0
    weights = component_bytes(parts, components)
    pixels = max(H * W for H, W in sizes)
    budget = parse_bytes(budget) if budget is not None else None
    run_need = check_budget(budget, weights, precision, pixels=pixels, batch=batch_size) if budget else None
    check_memory(estimate(weights, precision, pixels=pixels, batch=batch_size, in_place=release_model,
                          end_to_end=e2e_steps > 0),
                 f"exporting the {cfg.family} model ({', '.join(components)}) at {precision}")
    require_litert()
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    B = batch_size
    guided = sampler_info["guidance"] > 1.0
    tokens = pipe.text_encoder.max_length
    shapes = Shapes(batch=B, unet_batch=2 * B if guided else B, tokens=tokens, context_dim=cfg.text.hidden_size,
                    latent_channels=cfg.latent_channels, upscale=cfg.decoder.upscale, sizes=tuple(sizes),
                    context_lengths=tuple(context_lengths(prompt_chunks, tokens, mixed=guided or B > 1)),
                    concat_channels=concat, **control_shapes(control, pipe.unet))
    latent_shape = [B, cfg.latent_channels, *shapes.latent_hw(sizes[0])]
    measure = verify and whole  # a generation runs only on a whole bundle
    total = 2 + len(components) * (1 + verify) + 2 * e2e_steps + measure
    done = 0

    def step(message):
        nonlocal done
        log.info("export: %s", message)
        if progress is not None:
            progress(done, total, message)
        done += 1

    tmp = fresh_dir(out_dir.parent, f".{out_dir.name}.partial-")
    zip_tmp = None
    if release_model:  # the model is ours: into its export form now (contiguous fp32, no packed copies), in place
        for name in components:
            export_copy(SPECS[name].module(parts), ops_backend, in_place=True)
    release_memory()  # what loading and preparing the model left behind
    try:
        # 2. tokenizer; the torch side of the end-to-end check and calibration inputs while the model is whole
        step("tokenizer")
        tokenizer = {**write_tokenizer(pipe.text_encoder, tmp), "max_chunks": prompt_chunks}
        ids = pipe.text_encoder.tokenize([PROMPT] * B)
        section = truncated(sampler_info, e2e_steps)
        reference = None
        if e2e_steps:
            reference = torch_reference(
                pipe, section, batch=B, latent_shape=latent_shape, decoder_space=decoder_latent_space,
                callback=lambda i, k, x: step(f"end-to-end check: torch pipeline, step {i + 1}/{k}"))
        calibration = Calibration(pipe, shapes, sampler_info["timesteps"]) if precision in NEEDS_CALIBRATION else None
        # 3. components, one at a time, the largest first (while the most memory is free): prepare,
        # reference outputs, convert to file, free
        entries, checks = {}, {}
        for name in sorted(components, key=lambda n: -weights[n][0]):
            spec = SPECS[name]
            step(f"converting {name} ({precision})")
            module = spec.wrap(export_copy(spec.module(parts), ops_backend, in_place=release_model),
                               decoder_latent_space, shapes).eval()
            signatures = spec.signatures(shapes)
            examples = {sig.name: example_inputs(name, shapes, sig, ids=ids) for sig in signatures}
            if verify:  # torch's outputs now: the module may be gone once converted
                checks[name] = {s: (as_feed(x), torch_outputs(module, x)) for s, x in examples.items()}
            samples = {sig.name: spec.calibration(calibration, shapes, sig) for sig in signatures} if calibration \
                else None
            # a released model's weights go as soon as the fp32 file is written (module is the caller's own)
            release = (lambda m=module: m.to("meta")) if release_model else None
            entries[name] = _convert_component(name, module, signatures, examples, precision, tmp, samples, release,
                                               spec.lora_prefix)
            entries[name]["ops_backend"] = ops_backend
            del module, examples, release, samples
            if release_model:
                setattr(parts, name, None)
            release_memory()
        entries = {name: entries[name] for name in components}
        # 4. manifest (written before the checks, which load the bundle like a device would)
        H, W = sizes[0]
        manifest = {
            "schema_version": schema_for(entries),
            "format": FORMAT,
            "created_by": f"mobilediffusion {__version__}",
            "model": _model_section(cfg, H, W),
            "image": {"height": H, "width": W, "batch_size": B, "latent_shape": latent_shape,
                      "sizes": [list(s) for s in sizes], "layout": "decoder output (B, H, W, 3) float32 in [0, 1]"},
            "tokenizer": tokenizer,
            "sampler": sampler_info,
            "components": entries,
            "verification": {"limits": LIMITS, "inputs": f"seeded random latents/context, prompt {PROMPT!r}"},
            **({"source": source} if source is not None else {}),
            **_control_section(control, control_source, entries, shapes, sizes[0]),
            **({"inpainting": {"encoder": "encoder", "concat_channels": concat,
                               "mask_blend": "the known region is kept at every step (ComfyUI's noise mask)"
                               if not concat else "mask and masked-image latents are the UNet's concat input"}}
               if "encoder" in entries else {}),
        }
        write_manifest(tmp, manifest)
        # 5. each file against torch, then the bounded end-to-end run, in one set of interpreters
        if verify:
            manifest["verification"].update(_verify(tmp, entries, checks, precision, step, reference, section,
                                                    sampler_info, cfg, latent_shape))
            write_manifest(tmp, manifest)
        # 6. what it takes to run, measured in a fresh process as a device runs it; held to the budget
        if measure:
            step("measuring memory")
            manifest["memory"] = _memory(tmp, budget, run_need)
            write_manifest(tmp, manifest)
        # 7. into place: the zip is built from the finished folder first, so a failure leaves neither
        step("writing the bundle")
        zip_tmp = write_zip(tmp, out_dir.name, zip_path.parent) if make_zip else None
        if out_dir.exists() and not overwrite:
            raise ConfigError(f"{out_dir} appeared during the export; nothing was overwritten")
        replace_dir(tmp, out_dir)
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


class _Parts:
    """What the component table reads the modules from: the pipeline's, and the control model as `control` (the
    `adapter` or `controlnet` component). Dropping a component (release_model) drops it here and in the pipeline."""

    def __init__(self, pipe, control):
        self._pipe, self._control = pipe, control

    def __getattr__(self, name):
        if name == "control":
            return self._control
        return getattr(self._pipe, name)

    def __setattr__(self, name, value):
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        elif name in CONTROL_COMPONENTS:
            self._control = value
        else:
            setattr(self._pipe, name, value)


def control_kind(control) -> str | None:
    """The component a control model becomes: "adapter" (a T2I-Adapter, run once) or "controlnet" (every step)."""
    if control is None:
        return None
    from ..control.adapter import Adapter
    from ..control.controlnet import ControlNet

    if isinstance(control, Adapter):
        return "adapter"
    if isinstance(control, ControlNet):
        return "controlnet"
    raise ConfigError(f"a bundle's control is a ControlNet or T2I-Adapter (control.load_control), got "
                      f"{type(control).__name__}")


def optional_components(control, encoder: bool) -> tuple:
    kind = control_kind(control)
    return tuple(c for c in ALL_COMPONENTS if (c == "encoder" and encoder) or c == kind)


def control_shapes(control, unet) -> dict:
    """The Shapes fields of a control model: hint (channels, factor), the residuals it gives, the UNet's skips."""
    kind = control_kind(control)
    if kind is None:
        return {}
    from ..control.adapter import adapter_skips
    from .components import residual_name

    levels = tuple(adapter_skips(unet))
    if kind == "adapter":
        hint = (control.config.hint_channels, control.config.unshuffle)
        residuals = tuple((residual_name("input", k), k) for k in levels)
    else:
        hint = (control.control_config.hint_channels, control.control_config.hint_factor)
        residuals = ((residual_name("middle"), None),
                     *((residual_name("output", k), k) for k in range(unet.skip_count)))

    def skip_shapes(*hw):  # every skip's (C, h, w), then the bottleneck's (what the middle residual adds to)
        h, w = hw
        for level in unet.down:
            h, w = ((h + 1) // 2, (w + 1) // 2) if level.downsample is not None else (h, w)
        return [*unet.skip_shapes(*hw), (unet.config.block_out_channels[-1], h, w)]

    return {"hint": hint, "residuals": residuals, "skip_shapes": skip_shapes, "levels": levels}


def _control_section(control, source, entries, shapes, size) -> dict:
    kind = control_kind(control)
    if kind is None:
        return {}
    channels, factor = shapes.hint
    cfg = control.config if kind == "adapter" else control.control_config
    return {"control": {
        "component": kind, "kind": "t2i_adapter" if kind == "adapter" else "controlnet",
        "runs": "once per image" if kind == "adapter" else "every step",
        "source": source or {"file": None},
        "hint": {"height": size[0], "width": size[1], "channels": channels, "factor": factor,
                 "layout": "(B, channels, H, W) float32 in [0, 1]; H, W the image's"},
        "residuals": [name for name, _ in shapes.residuals],
        "config": json.loads(json.dumps(dataclasses.asdict(cfg))),  # (tuples as lists, as read back)
        "gpu": entries[kind].get("gpu"),
    }}


def _sizes(cfg, height, width, sizes) -> list[tuple[int, int]]:
    """The (height, width) list of an export: `sizes`, or height x width (each defaulting to the model's)."""
    if sizes is None:
        return [(height or cfg.resolution, width or cfg.resolution)]
    if height or width:
        raise ConfigError("give either height/width or sizes, not both")
    try:
        out = [(int(h), int(w)) for h, w in sizes]
    except (TypeError, ValueError):
        raise ConfigError(f"sizes must be a list of (height, width) pairs, got {sizes!r}") from None
    if not out or len(set(out)) != len(out):
        raise ConfigError(f"sizes must be a non-empty list of different (height, width) pairs, got {out}")
    return out


def _verify(folder, entries, checks, precision, step, reference, section, sampler_info, cfg, latent_shape) -> dict:
    """Component checks, every signature (ExportError past a limit), then the end-to-end run when `reference`
    is given."""
    from ..runtime import BundlePipeline
    from ..runtime.interpreter import Component

    bundle = BundlePipeline(folder) if reference is not None else None
    runners = bundle.components if bundle is not None else {n: Component(folder / e["file"], e)
                                                            for n, e in entries.items()}
    out = {}
    for name in entries:
        step(f"verifying {name}")
        per = {sig: check_component(runners[name], feed, ref, precision) for sig, (feed, ref) in checks[name].items()}
        worst = max(per.values(), key=lambda c: c["rel_error"])
        out[name] = {**worst, **({"signatures": {s: c["rel_error"] for s, c in per.items()}} if len(per) > 1 else {})}
        if not worst["passed"]:
            raise ExportError(
                f"{name}: the {precision} model differs from torch by relative error {worst['rel_error']:.2e} "
                f"(limit {worst['limit']:.0e}); nothing was written. Export in fp32, or report the model")
    if bundle is not None:
        image = bundle_image(bundle, section,
                             callback=lambda i, k, x: step(f"end-to-end check: bundle, step {i + 1}/{k}"))
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


def _memory(folder, budget, estimate) -> dict:
    """The manifest's "memory" section (runtime/memory.py); ExportError when the measured peak is over `budget`."""
    from ..runtime.memory import measure

    measured = measure(folder)
    peak = measured["generation_peak_bytes"]
    if budget is not None and peak is not None and peak > budget:
        raise ExportError(f"one generation of this bundle measured {human(peak)}, over the budget of {human(budget)} "
                          f"(estimated {human(estimate)}); nothing was written. Export at a smaller precision, size or "
                          "batch")
    return {**measured, "budget_bytes": budget, "estimate_bytes": round(estimate) if estimate else None,
            "measured_by": "a fresh Python process running the bundle: resident memory (VmRSS) per component "
                           "after loading and after its first run, and the high-water mark (VmHWM) of one generation "
                           "over the process's own"}


def summary(path) -> str:
    """Lines describing a written bundle (what the export node shows and the CLI prints); see report.py."""
    m = read_manifest(path)
    return "\n".join([f"wrote {path} {headline(m)}", *component_lines(m)])


def _convert_component(name, module, signatures, examples, precision, folder: Path, calibration, release,
                       weights_prefix) -> dict:
    """Convert one component (every signature) into folder/<name>.tflite; its manifest entry."""
    t0 = time.perf_counter()
    path = folder / f"{name}.tflite"
    info = convert(name, module, examples, precision, path, calibration=calibration, release=release,
                   weights_prefix=weights_prefix)
    seconds = time.perf_counter() - t0
    listed = []
    for sig in signatures:
        ins, outs = signature_io(path, sig.name)
        listed.append({**sig.manifest(), "inputs": ins, "outputs": outs})
    weights, folds = info.pop("weights", None), info.pop("folds", None)
    return {
        "file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size,
        "signature": listed[0]["signature"], "precision": precision, "inputs": listed[0]["inputs"],
        "outputs": listed[0]["outputs"], "signatures": listed, **info,
        "composites": dict(composite_counts(path)), "large_model_form": large_model_form(path),
        "gpu": gpu_report(path), "conversion_seconds": round(seconds, 2),
        **({"weights": weights} if weights is not None else {}),
        **({"lora_folds": write_folds(folder, name, folds)} if folds else {}),
    }


def _model_section(cfg, height: int, width: int) -> dict:
    return {
        "family": cfg.family, "latent_channels": cfg.latent_channels, "latent_scale": cfg.latent_scale,
        "latent_shift": cfg.latent_shift, "scaling_factor": cfg.decoder.scaling_factor,
        "prediction_type": cfg.prediction_type, "resolution": [height, width], "config": json.loads(cfg.to_json()),
    }
