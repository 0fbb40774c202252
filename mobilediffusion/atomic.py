"""Files and folders written so that a reader finds the old one or the new one whole, never a part.

    with atomic_file(path) as tmp:   # a hidden temporary beside path
        save_file(tensors, tmp)      # renamed onto path when the block ends; removed if it raises

    tmp = fresh_dir(out.parent, f".{out.name}.partial-")   # fill it, then
    replace_dir(tmp, out)                                  # swap it in for what was there
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path


def _suffix() -> str:
    return uuid.uuid4().hex[:8]


@contextlib.contextmanager
def atomic_file(path):
    """Yield a temporary path in `path`'s folder (`.<name>.<random>.tmp`, not created) for the block to write;
    when the block ends it is renamed onto `path` (os.replace: atomic on one file system). If the block (or
    the rename) raises, the temporary is removed and the exception goes on; `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{_suffix()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def fresh_dir(parent, prefix: str) -> Path:
    """A new empty folder parent/<prefix><random>, with the permissions the umask gives (unlike mkdtemp's 0700)."""
    while True:
        path = Path(parent) / f"{prefix}{_suffix()}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def replace_dir(tmp, dest) -> None:
    """Rename the folder `tmp` to `dest`; an existing `dest` is moved aside first (into a fresh hidden folder
    beside it), then removed."""
    tmp, dest = Path(tmp), Path(dest)
    old = None
    if dest.exists():
        old = fresh_dir(dest.parent, f".{dest.name}.old-")
        os.replace(dest, old / dest.name)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["atomic_file", "fresh_dir", "replace_dir"]
