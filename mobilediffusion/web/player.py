"""write_player: the page (player/), its npm runtime files and the sampler tables, into <bundle>/web/.

<bundle>/web/ after writing:
    index.html, view.js (the DOM), player.js (a run from a user's settings), bundle.js, runtime.js, sampler.js,
    noise.js, tokenizer.js, prompt.js, lora.js, conditioning.js                        the page (player/)
    player.json   packages (name -> version), lock_sha256, created_by, and `schedules`: sampler name ->
                  steps -> a manifest sampler section, so the page offers other samplers and step counts
                  (the manifest's own section is used for the exported sampler and steps)
    vendor/       files copied from the lockfile's node_modules (see VENDOR)
The page reads the bundle from the folder above (manifest.json, the .tflite files, tokenizer files).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .. import __version__
from ..atomic import fresh_dir, replace_dir
from ..runtime.lora_pack import write_index
from ..runtime.manifest import read_manifest
from .install import WebPlayerError, lock_hash, npm_ci

PLAYER_DIR = Path(__file__).resolve().parent / "player"
PAGE_FILES = ("index.html", "view.js", "player.js", "bundle.js", "runtime.js", "sampler.js", "noise.js", "tokenizer.js",
              "prompt.js", "lora.js", "conditioning.js")
WEB_FOLDER = "web"
# node_modules path -> vendor/ path. The wasm builds: relaxed SIMD (default), threaded (cross-origin isolated
# pages, as served by serve-bundle), compat (browsers without relaxed SIMD). JSPI/WebNN builds are not used.
_WASM = [f"litert_wasm{v}_internal.{ext}" for v in ("", "_threaded", "_compat") for ext in ("js", "wasm")]
VENDOR = {
    "@litertjs/core/dist/index.js": "litertjs-core/index.js",
    "@litertjs/core/package.json": "litertjs-core/package.json",
    **{f"@litertjs/core/wasm/{f}": f"litertjs-core/wasm/{f}" for f in _WASM},
    "@litertjs/wasm-utils/dist/index.js": "litertjs-wasm-utils/index.js",
    "@litertjs/wasm-utils/package.json": "litertjs-wasm-utils/package.json",
    "@huggingface/tokenizers/dist/tokenizers.mjs": "huggingface-tokenizers/tokenizers.mjs",
    "@huggingface/tokenizers/package.json": "huggingface-tokenizers/package.json",
    "@huggingface/tokenizers/LICENSE": "huggingface-tokenizers/LICENSE",
}
PACKAGES = ("@litertjs/core", "@litertjs/wasm-utils", "@huggingface/tokenizers")
# the tensor types the page passes to and from LiteRT.js (player/bundle.js TENSOR_TYPES): @litertjs/core 2.5.3 has
# float32, int32 and uint8 only, so the int16 inputs and outputs of int8_a16 bundles cannot run in the page
TENSOR_TYPES = ("float32", "int32")
NOT_FOR_THE_WEB = ("int8_a16",)  # export precisions whose bundles have int16 inputs/outputs (manifest schema 2)
WEB_EXPORT_HINT = ("export the bundle for the web at precision fp16, or int8_dynamic for int8 weights with float "
                   "inputs and outputs; the Python runtime runs int8_a16 bundles (`mobilediffusion run-bundle`)")
# what a page holds (player/bundle.js LIMITS): LiteRT.js's WebAssembly memory is at most 2 GiB in every build, and
# some browsers refuse an ArrayBuffer over 2 GiB
HEAP_BYTES = 2**31
FILE_BYTES = 2**31
# step counts offered in the page for every sampler that accepts them (plus the bundle's own)
STEP_CHOICES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50)


def prepare_player() -> Path:
    """Install the player's npm packages from its lockfile into the cache (once per lockfile), so that a later
    write_player cannot fail on npm; the cache folder. WebPlayerError when node/npm are missing or npm fails."""
    return npm_ci(PLAYER_DIR, "web")


def write_player(bundle_dir: str | Path) -> Path:
    """Write (or replace) the web player in bundle_dir/web; returns that folder.

    The bundle is checked first (read_manifest: schema, every file's sha256; check_tensor_types: no int16
    inputs/outputs). Needs node and npm the first time a lockfile is used (WebPlayerError names what to
    install); later runs copy from the cache.
    """
    folder = Path(bundle_dir)
    manifest = read_manifest(folder)
    check_tensor_types(manifest)
    check_browser_limits(manifest)
    modules = prepare_player() / "node_modules"
    tmp = fresh_dir(folder, f".{WEB_FOLDER}.partial-")
    try:
        for name in PAGE_FILES:
            shutil.copyfile(PLAYER_DIR / name, tmp / name)
        for src, dst in VENDOR.items():
            if not (modules / src).is_file():
                raise WebPlayerError(f"{modules / src} is missing after `npm ci`; delete {modules.parent} and try "
                                     "again")
            (tmp / "vendor" / dst).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(modules / src, tmp / "vendor" / dst)
        versions = {p: json.loads((modules / p / "package.json").read_text(encoding="utf-8"))["version"]
                    for p in PACKAGES}
        info = {"created_by": f"mobilediffusion {__version__}", "packages": versions,
                "lock_sha256": lock_hash(PLAYER_DIR), "schedules": schedules(manifest)}
        (tmp / "player.json").write_text(json.dumps(info, indent=1, allow_nan=False) + "\n", encoding="utf-8")
        replace_dir(tmp, folder / WEB_FOLDER)
        write_index(folder)  # loras/index.json, the packs the page offers (none yet: export-lora adds them)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder / WEB_FOLDER


def check_web_precision(precision: str) -> None:
    """WebPlayerError when bundles of this export precision cannot run in the page (before any export work)."""
    if precision in NOT_FOR_THE_WEB:
        raise WebPlayerError(f"the web player cannot run {precision} bundles: their inputs and outputs are int16 "
                             f"tensors, which LiteRT.js cannot pass in or out of a model; {WEB_EXPORT_HINT}")


def check_tensor_types(manifest: dict) -> None:
    """WebPlayerError naming the precision and the tensors when a component input or output is of a type the
    page cannot pass to LiteRT.js (the page refuses such a bundle the same way)."""
    found, precisions = [], set()
    for name, entry in manifest["components"].items():
        for t in [*entry["inputs"], *entry["outputs"]]:
            if t["dtype"] not in TENSOR_TYPES:
                found.append(f"{name} {t['name']} ({t['dtype']})")
                precisions.add(entry["precision"])
    if found:
        raise WebPlayerError(f"the web player cannot run this bundle: it was exported at precision "
                             f"{'/'.join(sorted(precisions))}, and its tensors {', '.join(found)} are of a type "
                             f"LiteRT.js cannot pass in or out of a model; {WEB_EXPORT_HINT}")


def check_browser_limits(manifest: dict) -> None:
    """WebPlayerError when the bundle cannot run in a page (the page refuses it the same way): a file over a
    browser's buffer limit, or more memory than LiteRT.js's WebAssembly heap (the manifest's measured figure)."""
    hint = ("export a smaller bundle for the web: mobilediffusion export --precision int8_dynamic --web (with --budget "
            "1.8GB to check it at export), or a smaller size")
    for entry in manifest["components"].values():
        if entry["bytes"] >= FILE_BYTES:
            raise WebPlayerError(f"{entry['file']} is {entry['bytes'] / 1e9:.2f} GB, more than a browser holds in one "
                                 f"buffer ({FILE_BYTES / 1e9:.2f} GB); {hint}")
    files = sum(e["bytes"] for e in manifest["components"].values())
    measured = (manifest.get("memory") or {}).get("generation_peak_bytes")
    need = measured if measured is not None else 2 * files
    if need >= HEAP_BYTES:
        raise WebPlayerError(f"this bundle needs about {need / 1e9:.2f} GB while it runs ("
                             f"{'measured at export' if measured is not None else 'estimated from its files'}), more "
                             f"than the {HEAP_BYTES / 1e9:.2f} GB a page's WebAssembly memory holds (LiteRT.js); {hint}")


def schedules(manifest: dict) -> dict:
    """{sampler: {steps: sampler section}} for the bundle's model: every bundle sampler at STEP_CHOICES (and
    the bundle's own steps), skipping counts a sampler refuses (onestep takes 1 step only)."""
    from ..config import ModelConfig
    from ..errors import ConfigError
    from ..export.schedule import sampler_section
    from ..runtime.sampler import SAMPLERS

    cfg = ModelConfig.from_json(json.dumps(manifest["model"]["config"]))
    own = manifest["sampler"]
    out = {}
    for name in SAMPLERS:
        counts = sorted(set(STEP_CHOICES) | ({own["steps"]} if name == own["name"] else set()))
        for steps in counts:
            try:
                section = sampler_section(cfg, name, steps, own["guidance"])
            except ConfigError:
                continue
            out.setdefault(name, {})[str(steps)] = json.loads(json.dumps(section))  # as stored in JSON
    return out
