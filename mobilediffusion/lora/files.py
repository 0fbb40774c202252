"""Reading a LoRA file: tensors (safetensors, or a pickle through torch.load(weights_only=True), which
never runs code from the file), the file's sha256 for manifests, and the PEFT adapter config that gives
`lora_A`/`lora_B` keys their alpha (safetensors metadata `lora_adapter_metadata`, or an
adapter_config.json beside the file). Also the check of a user's strength.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError
from ..lora_strength import STRENGTH_LIMIT, check_strength  # noqa: F401  (re-exported by mobilediffusion.lora)
from ..weights.io import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, check_exists, read_metadata, read_tensors

PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
PEFT_CONFIG_FILE = "adapter_config.json"  # what PEFT's save_pretrained writes beside the weights


@dataclass(frozen=True)
class PeftAlpha:
    """The alpha rule of a PEFT LoraConfig: scale = alpha / r (alpha / sqrt(r) with rsLoRA)."""

    lora_alpha: float | None  # the config's lora_alpha; None: not given (PEFT's default alpha = r, factor 1)
    alpha_pattern: dict = field(default_factory=dict)  # module-name pattern -> alpha for matching modules
    use_rslora: bool = False  # rank-stabilised LoRA: divide by sqrt(r)

    def alpha_for(self, module: str) -> float | None:
        """Alpha for a module name (diffusers/PEFT spelling); PEFT's rule: the pattern that matches the
        end of the name (`(.*\\.)?pattern$`) wins over lora_alpha."""
        for pattern, value in self.alpha_pattern.items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                return float(value)
        return self.lora_alpha

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "PeftAlpha":
        try:
            alpha = d.get("lora_alpha")
            return cls(lora_alpha=None if alpha is None else float(alpha),
                       alpha_pattern={str(k): float(v) for k, v in (d.get("alpha_pattern") or {}).items()},
                       use_rslora=bool(d.get("use_rslora", False)))
        except (TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"the PEFT config in {where} is malformed ({e}); fix or remove it") from e


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file read into memory. Pass it to apply_lora/with_lora instead of a path to read it once."""

    path: Path  # where it was read from (absolute)
    sha256: str  # of the file's bytes
    tensors: dict  # key -> tensor, as stored
    peft: dict  # component ("unet", "text_encoder") or None (all) -> PeftAlpha, from the adapter config

    @property
    def name(self) -> str:
        return self.path.name

    def peft_alpha(self, component: str) -> PeftAlpha | None:
        return self.peft.get(component, self.peft.get(None))


def read_lora(path) -> LoraFile:
    """Read a LoRA file (.safetensors, or .pt/.ckpt/.bin/.pth as plain tensors only). CheckpointError for a
    missing, truncated or corrupt file, a pickle that holds code, or a file that holds no tensors."""
    if isinstance(path, LoraFile):
        return path
    p = check_exists(path).resolve()
    if p.is_dir():
        raise CheckpointError(f"{p} is a folder; a LoRA is one weights file (.safetensors)")
    suffix = p.suffix.lower()
    if suffix not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        raise CheckpointError(f"{p}: {suffix or 'no suffix'} is not a LoRA file type; use .safetensors "
                              f"(or {', '.join(PICKLE_SUFFIXES)}, read as plain tensors only)")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p} is empty; re-download or re-save the LoRA")
    tensors = read_tensors(p)  # raises for truncated/corrupt files and for pickles that are not plain tensors
    if not tensors:
        raise CheckpointError(f"{p} holds no tensors; it is not a LoRA")
    metadata = read_metadata(p) if suffix in SAFETENSORS_SUFFIXES else {}
    return LoraFile(path=p, sha256=file_sha256(p), tensors=tensors, peft=_peft_config(p, metadata))


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _peft_config(path: Path, metadata: dict) -> dict:
    """component or None -> PeftAlpha. diffusers' pipeline saves prefix each field with the component
    ("unet.lora_alpha"); a model's own save and PEFT's adapter_config.json do not (None: every component)."""
    raw, where = metadata.get(PEFT_METADATA_KEY), f"{path.name}'s {PEFT_METADATA_KEY} metadata"
    if raw is None:
        config_file = path.parent / PEFT_CONFIG_FILE
        if not config_file.is_file():
            return {}
        raw, where = config_file.read_text(), str(config_file)
    try:
        d = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"the PEFT config in {where} is not valid JSON ({e}); fix or remove it") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"the PEFT config in {where} is not a JSON object; fix or remove it")
    out, prefixed = {}, {}
    for key, value in d.items():
        component, dot, rest = key.partition(".")
        if dot and component in ("unet", "text_encoder"):
            prefixed.setdefault(component, {})[rest] = value
    for component, sub in prefixed.items():
        out[component] = PeftAlpha.from_dict(sub, where)
    if not prefixed:
        out[None] = PeftAlpha.from_dict(d, where)
    return out


__all__ = ["LoraFile", "PeftAlpha", "read_lora", "check_strength", "file_sha256", "STRENGTH_LIMIT"]
