"""Keep third-party chatter out of the CLI's and ComfyUI's output unless asked for (`-v`).

With the export extra installed, importing transformers pulls in torchao, which logs "Failed to load
... .so" for its CUDA kernels; torch's pytree logs deprecations when litert-torch registers its
types; litert-torch and ai-edge-litert log through the root logger and their C++ parts print INFO lines
(absl / TensorFlow Lite). None of it concerns the user. Our own `mobilediffusion` loggers are never
silenced.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "absl")  # named loggers of libraries we import
NOISY_PACKAGES = ("torchao", "litert_torch", "ai_edge_litert", "ai_edge_quantizer", "ai_edge_torch")  # root loggers
C_LOG_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "GLOG_minloglevel": "2"}  # TFLite converter / interpreter C++ logs


class ThirdPartyFilter(logging.Filter):
    """Drops records logged straight on the root logger from inside NOISY_PACKAGES."""

    def filter(self, record: logging.LogRecord) -> bool:
        path = record.pathname.replace("\\", "/")
        return not any(f"/{p}/" in path for p in NOISY_PACKAGES)


def silence_c_logs() -> None:
    """Ask the C++ logging of TensorFlow Lite / absl for warnings and errors only (before they load; a
    value the user set wins)."""
    for key, value in C_LOG_ENV.items():
        os.environ.setdefault(key, value)


@contextlib.contextmanager
def quiet_third_party():
    """For a block that imports or runs litert-torch / ai-edge-litert (e.g. inside ComfyUI): their
    warnings are dropped for its duration; everything else is left as it was afterwards."""
    silence_c_logs()
    root, dropped = logging.getLogger(), ThirdPartyFilter()
    levels = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    root.addFilter(dropped)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        root.removeFilter(dropped)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def detach_c_stderr() -> None:
    """Send what native code writes to file descriptor 2 (absl / TensorFlow Lite INFO lines, which no
    setting turns off) to /dev/null, while Python's sys.stderr keeps writing to the real stderr. For the
    console-script process only (never inside ComfyUI or a test runner); every Python-level error and
    warning still shows."""
    try:
        sys.stderr.flush()
        real = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        sys.stderr = os.fdopen(real, "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                               errors="backslashreplace")
    except (OSError, ValueError, AttributeError):  # no real fd 2 (embedded, captured): leave it
        pass


def configure_cli_logging(verbose: bool) -> None:
    """The CLI's logging: our warnings (and INFO with -v) as `level: message`; third-party chatter only
    with -v."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    if verbose:
        logging.basicConfig(level=logging.INFO, handlers=[handler])
        return
    silence_c_logs()
    handler.addFilter(ThirdPartyFilter())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.simplefilter("ignore", FutureWarning)
    warnings.simplefilter("ignore", DeprecationWarning)


__all__ = ["quiet_third_party", "configure_cli_logging", "silence_c_logs", "detach_c_stderr", "ThirdPartyFilter"]
