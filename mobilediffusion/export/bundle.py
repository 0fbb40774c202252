"""export_bundle: a Pipeline -> a verified device bundle folder (optionally also a .zip).

The bundle is built in a hidden temporary folder next to the destination and renamed into place only
when every stage succeeded, so an interrupted or failed export leaves nothing behind. manifest.json:

    schema_version, format, created_by
    model       family, latent_channels, latent_scale, latent_shift, scaling_factor (the decoder's),
                prediction_type, resolution [H, W], config (the whole ModelConfig)
    image       height, width, batch_size, latent_shape [B, C, h, w], layout of the decoder's output
    tokenizer   file, files [{file, sha256}], max_length, bos/eos/pad token ids
    sampler     name, steps, guidance, prediction_type, noise, timesteps, c_in, a, b, c (+ d, x0_p, x0_q
                for dpmpp_2m), init_noise_sigma, sigma_start, final_scale (see runtime/sampler.py)
    components  per component: file, sha256, bytes, signature, precision, inputs/outputs [{name, shape,
                dtype}], ops (builtin op counts), composites, conversion_seconds, ops_backend
    verification  per component: rel_error, limit, passed; end_to_end: prompt, seed, psnr_db
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import torch

from .. import __version__
from ..errors import ConfigError
from ..runtime.manifest import COMPONENTS, FORMAT, MANIFEST, SCHEMA_VERSION, read_manifest, sha256_file
from .components import DecoderExport, Shapes, TextEncoderExport, UNetExport, export_copy, sample_inputs
from .convert import check_precision, convert, require_litert
from .flatbuffer import ExportError, composite_counts
from .schedule import sampler_section
from .verify import LIMITS, psnr, signature_io, verify_component

log = logging.getLogger(__name__)

VERIFY_PROMPT = "a photo of a red fox in the snow, highly detailed"
VERIFY_SEED = 0
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def export_bundle(
    pipe, out_dir, precision: str = "fp16", *, height: int | None = None, width: int | None = None,
    batch_size: int = 1, steps: int | None = None, sampler: str = "auto", guidance: float | None = None,
    components=COMPONENTS, overwrite: bool = False, make_zip: bool = False, verify: bool = True,
    ops_backend: str = "export", decoder_latent_space: tuple[float, float] | None = None, progress=None,
) -> Path:
    """Export `pipe` (a Pipeline) to the bundle folder `out_dir`; returns its path.

    Shapes are fixed here: `height` x `width` pixels (default: the model's resolution), `batch_size`
    images per run; the sampler (`auto`: the model's default), its `steps` (default: the model's) and
    `guidance` (default: the model's; > 1 exports the UNet at batch 2B for [uncond, cond]) are baked
    into the manifest. `components` picks a subset of text_encoder/unet/decoder (the runtime needs all
    three). `decoder_latent_space` (scale, shift): when the decoder reads another latent space than the
    UNet's (a separately loaded decoder), latents are mapped x * scale + shift before decoding.
    `progress(done, total, message)` is called at each stage. An existing `out_dir` is replaced only
    with `overwrite=True`. Raises ConfigError (bad request, before any work) or ExportError.
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
    from ..pipeline import check_request

    check_request(cfg, steps=steps, height=height, width=width, sampler=sampler, batch_size=batch_size)
    sampler_info = sampler_section(cfg, sampler, steps, guidance)
    if out_dir.exists() and not overwrite:
        raise ConfigError(f"{out_dir} already exists; choose another name or allow overwriting")
    zip_path = out_dir.with_name(out_dir.name + ".zip")
    if make_zip and zip_path.exists() and not overwrite:
        raise ConfigError(f"{zip_path} already exists; choose another name or allow overwriting")
    require_litert()
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    f = cfg.decoder.upscale
    B = batch_size
    shapes = Shapes(batch=B, unet_batch=2 * B if sampler_info["guidance"] > 1.0 else B,
                    tokens=pipe.text_encoder.max_length, context_dim=cfg.text.hidden_size,
                    latent_channels=cfg.latent_channels, latent_hw=(height // f, width // f), image_hw=(height, width))
    total = 2 * len(components) + 2 + (verify and len(components) == 3)
    done = 0

    def step(message):
        nonlocal done
        log.info("export: %s", message)
        if progress is not None:
            progress(done, total, message)
        done += 1

    tmp = _fresh_dir(out_dir.parent, f".{out_dir.name}.partial-")
    zip_tmp = None
    try:
        # 2. tokenizer
        step("tokenizer")
        tokenizer = _write_tokenizer(pipe.text_encoder, tmp)
        ids = pipe.text_encoder.tokenize([VERIFY_PROMPT] * B)
        # 3. components: convert, write, verify
        modules = _export_modules(pipe, ops_backend, decoder_latent_space)
        entries, checks = {}, {}
        for name in components:
            step(f"converting {name} ({precision})")
            module, inputs = modules[name], sample_inputs(name, shapes, ids=ids)
            model, entries[name] = _convert_component(name, module, inputs, precision, tmp)
            entries[name]["ops_backend"] = ops_backend
            step(f"verifying {name}" if verify else f"wrote {name}")
            if verify:
                checks[name] = verify_component(model, name, module, inputs, precision)
                if not checks[name]["passed"]:
                    raise ExportError(
                        f"{name}: the {precision} model differs from torch by relative error "
                        f"{checks[name]['rel_error']:.2e} (limit {checks[name]['limit']:.0e}); nothing was written. "
                        "Export in fp32, or report the model"
                    )
        # 4. manifest (written before the end-to-end check, which loads the bundle like a device would)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "format": FORMAT,
            "created_by": f"mobilediffusion {__version__}",
            "model": _model_section(cfg, height, width),
            "image": {"height": height, "width": width, "batch_size": B,
                      "latent_shape": [B, cfg.latent_channels, height // f, width // f],
                      "layout": "decoder output (B, H, W, 3) float32 in [0, 1]"},
            "tokenizer": tokenizer,
            "sampler": sampler_info,
            "components": entries,
            "verification": {"limits": LIMITS, "inputs": f"seeded random latents/context, prompt {VERIFY_PROMPT!r}",
                             **checks},
        }
        _write_manifest(tmp, manifest)
        if verify and len(components) == 3:
            step("end-to-end check against the torch pipeline")
            manifest["verification"]["end_to_end"] = end_to_end(tmp, pipe, modules, cfg, sampler_info, height, width, B)
            _write_manifest(tmp, manifest)
        # 5. into place: the zip is built from the finished folder first, so a failure leaves neither
        step("writing the bundle")
        zip_tmp = _write_zip(tmp, out_dir.name, zip_path.parent) if make_zip else None
        _move_into_place(tmp, out_dir, overwrite)
        if zip_tmp is not None:
            os.replace(zip_tmp, zip_path)
        step("done")
        return out_dir
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if zip_tmp is not None and os.path.exists(zip_tmp):
            os.remove(zip_tmp)


def summary(path) -> str:
    """Lines describing a written bundle: path, files and sizes, verification errors, PSNR."""
    m = read_manifest(path)
    img, s = m["image"], m["sampler"]
    lines = [f"wrote {path} ({img['width']}x{img['height']}, batch {img['batch_size']}, {s['name']} "
             f"{s['steps']} step{'s' * (s['steps'] != 1)}{', guidance %g' % s['guidance'] if s['guidance'] else ''})"]
    v = m["verification"]
    for name, e in m["components"].items():
        check = v.get(name)
        if check is None:
            err = "not verified"
        else:
            limit = f"limit {check['limit']:.0e}" if check["limit"] else "no limit for int8: reported"
            err = f"rel. error {check['rel_error']:.2e} ({limit})"
        kept = f", {len(e['kept_float'])} layer(s) kept float" if e.get("kept_float") else ""
        lines.append(f"  {e['file']}: {e['bytes'] / 2**20:.2f} MiB, {e['precision']}{kept}, {err}")
    if "end_to_end" in v:
        lines.append(f"  end to end vs torch: PSNR {v['end_to_end']['psnr_db']:.1f} dB")
    return "\n".join(lines)


def _convert_component(name, module, inputs, precision, folder: Path) -> tuple[bytes, dict]:
    """Convert one component into folder/<name>.tflite; (flatbuffer, its manifest entry)."""
    t0 = time.perf_counter()
    model, info = convert(name, module, inputs, precision)
    seconds = time.perf_counter() - t0
    path = folder / f"{name}.tflite"
    path.write_bytes(model)
    ins, outs = signature_io(model, name)
    return model, {
        "file": path.name, "sha256": sha256_file(path), "bytes": len(model), "signature": name,
        "precision": precision, "inputs": ins, "outputs": outs, **info,
        "composites": dict(composite_counts(model)), "conversion_seconds": round(seconds, 2),
    }


def _model_section(cfg, height: int, width: int) -> dict:
    return {
        "family": cfg.family, "latent_channels": cfg.latent_channels, "latent_scale": cfg.latent_scale,
        "latent_shift": cfg.latent_shift, "scaling_factor": cfg.decoder.scaling_factor,
        "prediction_type": cfg.prediction_type, "resolution": [height, width], "config": json.loads(cfg.to_json()),
    }


def _export_modules(pipe, ops_backend, decoder_latent_space) -> dict:
    scale, shift = decoder_latent_space or (1.0, 0.0)
    return {
        "text_encoder": TextEncoderExport(export_copy(pipe.text_encoder, ops_backend)).eval(),
        "unet": UNetExport(export_copy(pipe.unet, ops_backend)).eval(),
        "decoder": DecoderExport(export_copy(pipe.decoder, ops_backend), scale, shift).eval(),
    }


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


def end_to_end(folder: Path, pipe, modules, cfg, sampler_info, height, width, batch) -> dict:
    """The bundle run by the torch-free runtime vs the torch pipeline, same prompt and same noise."""
    from ..pipeline import sample_latents
    from ..runtime import BundlePipeline

    def torch_noise(seed):
        gen = torch.Generator().manual_seed(seed)
        return lambda shape: torch.randn(tuple(shape), generator=gen).numpy()

    g = sampler_info["guidance"]
    prompts = [VERIFY_PROMPT] * batch
    with torch.no_grad():
        text = modules["text_encoder"].text_encoder
        context = text.encode_prompts(prompts)
        uncond = text.encode_prompts([""] * batch) if g > 1.0 else None
        latents = sample_latents(modules["unet"].unet, cfg, context, uncond, steps=sampler_info["steps"], guidance=g,
                                 seed=VERIFY_SEED, height=height, width=width, sampler=sampler_info["name"],
                                 batch_size=batch)
        ref = modules["decoder"](latents)["image"].numpy()
    got = BundlePipeline(folder)(prompts, "", seed=VERIFY_SEED, noise=torch_noise(VERIFY_SEED))
    return {"prompt": VERIFY_PROMPT, "seed": VERIFY_SEED, "psnr_db": round(psnr(got, ref), 2),
            "noise": "the torch pipeline's (torch.Generator(seed)), fed to the runtime"}


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
