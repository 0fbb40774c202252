"""Where the bundle nodes write and read bundles: output/mobilediffusion and models/mobilediffusion, bundle names
confined to those folders."""
from __future__ import annotations

import os
import re
import zipfile

from ._common import MODEL_FOLDER, folder_paths

BUNDLE_FOLDER = "mobilediffusion"  # under ComfyUI's output folder
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._ -]{0,99}")


def bundle_root() -> str:
    """ComfyUI's output folder + mobilediffusion/ (outside ComfyUI: ./output/mobilediffusion)."""
    fp = folder_paths()
    base = fp.get_output_directory() if fp is not None else os.path.join(os.getcwd(), "output")
    return os.path.join(base, BUNDLE_FOLDER)


def bundle_roots() -> dict[str, list[str]]:
    """Where Run TFLite Bundle reads bundles: {"output": [output/mobilediffusion], "models": [models/mobilediffusion
    folders]} (outside ComfyUI: ./output/mobilediffusion and ./models/mobilediffusion)."""
    fp = folder_paths()
    if fp is not None and MODEL_FOLDER in fp.folder_names_and_paths:
        models = list(fp.get_folder_paths(MODEL_FOLDER))
    else:
        models = [os.path.join(fp.models_dir if fp is not None else os.path.join(os.getcwd(), "models"), MODEL_FOLDER)]
    return {"output": [bundle_root()], "models": models}


def _inside(path: str, base: str) -> bool:
    """path, with every link followed, is base or below it."""
    real, root = os.path.realpath(path), os.path.realpath(base)
    return os.path.commonpath([real, root]) == root


def _is_bundle(path: str) -> bool:
    """A folder holding manifest.json, or a .zip holding <name>/manifest.json or manifest.json."""
    from ..mobilediffusion.runtime.manifest import MANIFEST

    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, MANIFEST))
    if path.endswith(".zip") and os.path.isfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                return any(n == MANIFEST or n.endswith("/" + MANIFEST) for n in zf.namelist())
        except (OSError, zipfile.BadZipFile):
            return False
    return False


def bundle_choices() -> list[str]:
    """The bundles Run TFLite Bundle offers: 'output/<name>' and 'models/<name>' (folders and .zip files found
    there; hidden entries and links that lead outside their folder are left out)."""
    found = []
    for prefix, bases in bundle_roots().items():
        for base in bases:
            if not os.path.isdir(base):
                continue
            for name in sorted(os.listdir(base)):
                path = os.path.join(base, name)
                if _NAME.fullmatch(name) and _inside(path, base) and _is_bundle(path):
                    found.append(f"{prefix}/{name}")
    return list(dict.fromkeys(found))  # a name in two model folders once


def check_name(name: str) -> str:
    """A bundle name is one plain folder name: no path separators, no '..', not hidden."""
    from ..mobilediffusion.errors import ConfigError

    name = name.strip()
    if not _NAME.fullmatch(name) or ".." in name or name.endswith((".", " ")):
        raise ConfigError(f"bundle name {name!r} is not allowed: use letters, digits, '-', '_', '.' and spaces "
                          "(no path separators, no '..'); the bundle is written under the output folder")
    return name


def resolve_bundle(choice: str) -> str:
    """'output/<name>' or 'models/<name>' (a bundle_choices() entry) -> the bundle's real path. Anything else
    (a path, '..', a link leading outside its folder) is a ConfigError: the node reads only these folders."""
    from ..mobilediffusion.errors import ConfigError

    roots = bundle_roots()
    prefix, _, name = choice.strip().partition("/")
    where = " or ".join(f"{p}/mobilediffusion" for p in roots)
    if prefix not in roots or not _NAME.fullmatch(name) or ".." in name:
        raise ConfigError(f"bundle {choice!r} is not a bundle name from the list ('output/<name>' or 'models/<name>' "
                          f"under {where}); this node reads bundles only from those folders. Export one with Export "
                          "TFLite Bundle (or copy it into models/mobilediffusion) and refresh; to run a bundle "
                          "elsewhere use `mobilediffusion run-bundle PATH`")
    for base in roots[prefix]:
        path = os.path.join(base, name)
        if os.path.lexists(path):
            if not _inside(path, base):
                raise ConfigError(f"bundle {choice!r} is a link to {os.path.realpath(path)}, outside {base}; move the "
                                  "bundle itself into the folder")
            if not _is_bundle(path):
                raise ConfigError(f"{path} is not a bundle (no manifest.json); export one with Export TFLite Bundle")
            return os.path.realpath(path)
    raise ConfigError(f"bundle {choice!r} was not found (looked in {', '.join(roots[prefix])}); export one with "
                      "Export TFLite Bundle first and refresh the list")


def pack_choices() -> list[str]:
    """The LoRA packs Run TFLite Bundle offers: '<bundle choice>/<pack file>' for each pack in a listed bundle
    folder's loras/ (a pack of another bundle is refused when run, naming the bundle it is for)."""
    from ..mobilediffusion.runtime.lora_pack import FOLDER, SUFFIX

    found = []
    for choice in bundle_choices():
        try:
            folder = os.path.join(resolve_bundle(choice), FOLDER)
        except Exception:  # a bundle that went away between listing and now: nothing to offer
            continue
        if os.path.isdir(folder):
            found += [f"{choice}/{f}" for f in sorted(os.listdir(folder)) if f.endswith(SUFFIX) and _NAME.fullmatch(f)]
    return found


def resolve_pack(bundle: str, choice: str) -> str:
    """A pack_choices() entry of this bundle -> its path; ConfigError for anything else (another bundle's pack
    names the bundle to pick; a path is refused: the node reads only the bundles' own loras/ folders)."""
    from ..mobilediffusion.errors import ConfigError
    from ..mobilediffusion.runtime.lora_pack import FOLDER

    owner, _, file = choice.rpartition("/")
    if owner != bundle:
        raise ConfigError(f"LoRA pack {choice!r} belongs to bundle {owner or '?'!r}, not {bundle!r}; pick a pack of "
                          f"{bundle} (its loras/ folder), or make one: mobilediffusion export-lora LORA --bundle DIR")
    path = os.path.join(resolve_bundle(bundle), FOLDER, file)
    if not _NAME.fullmatch(file) or not os.path.isfile(path):
        raise ConfigError(f"LoRA pack {choice!r} was not found; make it with `mobilediffusion export-lora` and refresh")
    return path
