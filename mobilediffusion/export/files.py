"""The bundle's own files beside the models: the tokenizer, manifest.json, and the .zip of a finished bundle."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from ..runtime.manifest import MANIFEST, sha256_file
from .flatbuffer import ExportError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def write_tokenizer(text_encoder, folder: Path) -> dict:
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


def write_folds(folder: Path, component: str, folds: dict) -> dict:
    """<component>.folds.safetensors: the LayerNorm parameters the converter folded into Linears (weightmap.py),
    which LoRA packs for the bundle need; its manifest entry {file, sha256}."""
    from safetensors.numpy import save_file

    path = folder / f"{component}.folds.safetensors"
    save_file({k: v.astype("float32") for k, v in folds.items()}, str(path))
    return {"file": path.name, "sha256": sha256_file(path)}


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, allow_nan=False) + "\n", encoding="utf-8")


def write_zip(folder: Path, name: str, dest_dir: Path) -> str:
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
