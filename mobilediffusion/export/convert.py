"""One component -> a .tflite file: litert-torch conversion, then the precision (export/quantize.py),
then the builtin-ops check.

The fp32 flatbuffer goes from the converter straight to a file (never held as bytes in Python); a
quantized precision maps that file and writes the final one, and the fp32 file is removed. Files over
the 2 GB flatbuffer limit are written in LiteRT's large-model form (see flatbuffer.py).
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
from pathlib import Path

from ..errors import ConfigError
from ..ops.backend import EXPORT_INSTALL
from ..memory import release_memory
from .failure import failed_op, first_line
from .flatbuffer import ExportError, check_builtin_only
from .quantize import check_precision, quantize

log = logging.getLogger(__name__)


def require_litert():
    """The litert_torch module, or ConfigError with the exact install command."""
    try:
        return importlib.import_module("litert_torch")
    except ImportError:
        raise ConfigError(f"TFLite export needs litert-torch (no TensorFlow needed); install it with: "
                          f"{EXPORT_INSTALL}") from None


@contextlib.contextmanager
def _quiet_litert():
    """litert-torch prints a progress tree per conversion; the exporter reports its own stages."""
    old = os.environ.get("LITERT_TORCH_SHOW_PROGRESS")
    os.environ["LITERT_TORCH_SHOW_PROGRESS"] = "n"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LITERT_TORCH_SHOW_PROGRESS", None)
        else:
            os.environ["LITERT_TORCH_SHOW_PROGRESS"] = old


def convert(name: str, module, signatures: dict[str, dict], precision: str, path, *,
            calibration: dict[str, list[dict]] | None = None, release=None, weights_prefix: str | None = None) -> dict:
    """Convert `module` into the file `path` in `precision`, one TFLite signature per entry of `signatures`
    ({signature name: example inputs}; the signatures share the weights); returns {"ops": builtin op counts,
    "fp32_bytes": size of the fp32 file it came from} and, with `weights_prefix`, "weights": where each parameter
    under that prefix lives in the file and "folds", the LayerNorm parameters folded into it (export/weightmap.py,
    for LoRA packs). `calibration`: sample inputs per
    signature for int8_a16 (see quantize.quantize). `release()`, when given, is called as soon as the fp32 file
    is written and mapped, before the precision is applied: the torch module is not needed past that point.

    Raises ExportError naming the component and the op that failed to convert, or the non-builtin ops.
    """
    import torch

    litert_torch = require_litert()
    check_precision(precision)
    path = Path(path)
    fp32 = path if precision == "fp32" else path.with_name(f".{path.stem}.fp32{path.suffix}")
    info = {}
    try:
        # 1. trace and convert (int64 inputs become int32); the converter writes the file itself
        try:
            with _quiet_litert(), torch.no_grad():
                converter = litert_torch
                for signature, inputs in signatures.items():
                    converter = converter.signature(signature, module, sample_kwargs=inputs)
                converter.convert().export(str(fp32))
        except Exception as e:  # any converter failure: report which op, keep the cause chained
            raise ExportError(f"converting the {name} failed at {failed_op(e)}: {first_line(e)}") from e
        if weights_prefix is not None:  # the torch weights are needed to find them in the file
            from .weightmap import weight_map

            info["weights"], info["folds"] = weight_map(module, fp32, weights_prefix, next(iter(signatures.values())))
        if release is not None:
            release()
        release_memory()  # the traced program and the converter's IR go now, before the quantizer maps the file
        fp32_bytes = fp32.stat().st_size
        # 2. precision
        if precision != "fp32":
            quantize(fp32, path, precision, name, calibration)
    finally:
        if fp32 != path and fp32.exists():
            fp32.unlink()
    # 3. builtin ops only
    ops = check_builtin_only(path, name)
    return {"ops": dict(sorted(ops.items())), "fp32_bytes": fp32_bytes, **info}
