"""The bundle manifest: schema, reading, and the integrity checks a runner does before loading.

Pure Python (json, hashlib): the torch-free runtime and the exporter share it.

Layout of a bundle folder:
    manifest.json        this schema (see `MANIFEST_KEYS` and docs in export/bundle.py)
    text_encoder.tflite  ids (B, T) int32 -> context (B, T, D) float32
    unet.tflite          sample (N, C, h, w), timestep (N,), context (N, T, D) float32 [+ concat, res_*]
                         -> output (N, C, h, w)
    decoder.tflite       latents (B, C, h, w) sampler space -> image (B, H, W, 3) float32 in [0, 1]
    encoder.tflite       (optional) image (B, H, W, 3) in [0, 1] -> latents (B, C, h, w) sampler space
    adapter.tflite       (optional) hint (B, c, H, W) in [0, 1] -> res_input_k ... (run once)
    controlnet.tflite    (optional) sample, timestep, context, hint (N, c, H, W) -> res_middle, res_output_k ...
    tokenizer.json       a `tokenizers` tokenizer (+ tokenizer_config.json)

Schema versions (the exporter writes the lowest that describes the bundle; this runtime reads both):
    1  every component input and output is float32 (ids int32), as listed above
    2  some inputs/outputs are integer-quantized (precision int8_a16: int16 tensors): their manifest
       entry has "quantization": {"scale", "zero_point"}; a runner feeds round(x / scale) + zero_point
       clipped to the type's range, and reads outputs as (q - zero_point) * scale. A schema-1 reader
       would feed such a file wrong values, hence the new version.
Optional sections added without a version change (readers ignore what they do not know): per
component "gpu" (GPU-delegate verdict), "large_model_form", "signatures" (one per image size and context
length over shared weights; the entry's own signature/inputs/outputs are the first: the default size and
one prompt chunk, what a reader that knows no other runs), "weights" (where each parameter lives, for LoRA
packs); image "sizes"; tokenizer "max_chunks"; top-level "source" (provenance); the optional components
"encoder", "adapter", "controlnet" with the UNet inputs they feed ("concat", "res_*": a reader that runs no
control feeds zeros) and top-level "control" {component, kind, source, hint {height, width, channels, factor},
residuals, gpu} and "inpainting" {encoder, concat_channels, mask_blend}; sampler "sigmas" (every sampler).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import MobileDiffusionError

SCHEMA_VERSION = 2  # the newest version this code writes and reads
READABLE_SCHEMAS = (1, 2)
FORMAT = "mobilediffusion-tflite-bundle"
MANIFEST = "manifest.json"
COMPONENTS = ("text_encoder", "unet", "decoder")  # what every run needs
OPTIONAL = ("encoder", "adapter", "controlnet")  # image input (img2img, inpainting) and a control model
ALL_COMPONENTS = ("text_encoder", "encoder", "adapter", "controlnet", "unet", "decoder")  # the order a run uses them
CONTROL_COMPONENTS = ("adapter", "controlnet")
PRECISIONS = ("fp32", "fp16", "int8_dynamic", "int8_weight_only", "int8_a16")
QUANTIZED_IO_SCHEMA = 2  # the version a bundle with integer-quantized inputs/outputs needs
MANIFEST_KEYS = ("schema_version", "format", "model", "image", "tokenizer", "sampler", "components", "verification")


class BundleError(MobileDiffusionError):
    """A bundle that cannot be used as it is (missing, altered, or of another schema)."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a bundle folder, after checking its schema version and every file's sha256.

    Raises BundleError naming the problem: no manifest, unreadable JSON, another schema version or
    format, a component or tokenizer file missing or whose sha256 differs from the manifest.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise BundleError(f"{folder} is not a bundle: it has no {MANIFEST}; export one with "
                          "`mobilediffusion export` or the Export TFLite Bundle node")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON ({e}); re-export the bundle") from None
    found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
    if found != FORMAT:
        raise BundleError(f"{path} is not a {FORMAT} manifest (format {found!r}); re-export the bundle")
    version = manifest.get("schema_version")
    if version not in READABLE_SCHEMAS:
        raise BundleError(
            f"{folder} has bundle schema version {version!r}, but this runtime reads versions "
            f"{', '.join(map(str, READABLE_SCHEMAS))}; re-export the bundle with this version of mobilediffusion "
            "(or run it with the version that wrote it)"
        )
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"{path} lacks the keys {missing}; the bundle is incomplete, re-export it")
    for what, entry in _files(manifest):
        check_file(folder, entry, what)
    return manifest


def signatures_of(entry: dict) -> list[dict]:
    """A component's signatures [{signature, size, tokens, inputs, outputs}], the default first (a bundle from
    before multi-size exports lists none: its one signature)."""
    return entry.get("signatures") or [{"signature": entry["signature"], "size": None, "tokens": None,
                                        "inputs": entry["inputs"], "outputs": entry["outputs"]}]


def image_sizes(manifest: dict) -> list[tuple[int, int]]:
    """The (height, width) sizes a bundle runs at, the default first."""
    image = manifest["image"]
    return [tuple(s) for s in image.get("sizes") or [[image["height"], image["width"]]]]


def schema_for(components: dict) -> int:
    """The schema version a manifest with these component entries needs (see the module docstring)."""
    quantized = any("quantization" in t for e in components.values() for t in [*e["inputs"], *e["outputs"]])
    return QUANTIZED_IO_SCHEMA if quantized else 1


def _files(manifest: dict):
    for name, entry in manifest["components"].items():
        yield name, entry
    for entry in manifest["tokenizer"]["files"]:
        yield "tokenizer", entry


def check_file(folder: Path, entry: dict, what: str) -> None:
    """A file named by the manifest exists inside the bundle and has the recorded sha256."""
    name = entry.get("file", "")
    if not name or Path(name).name != name:  # a bare file name: nothing outside the bundle is read
        raise BundleError(f"the manifest names {what} file {name!r}; only plain file names inside the bundle "
                          "are allowed")
    path = folder / name
    if not path.is_file():
        raise BundleError(f"{what}: {name} is missing from {folder}; the bundle is incomplete, re-export it")
    digest = sha256_file(path)
    if digest != entry.get("sha256"):
        raise BundleError(
            f"{what}: {name} does not match the manifest (sha256 {digest[:12]}..., expected "
            f"{str(entry.get('sha256'))[:12]}...); the file was changed or damaged, re-export the bundle"
        )
