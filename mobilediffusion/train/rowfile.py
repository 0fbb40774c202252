"""Row-streamed safetensors files: written one row at a time, read memory-mapped.

A latent cache can be larger than memory, so its files are never held whole: `RowWriter` appends rows of each
tensor to raw side files and then writes the safetensors file (header, then each tensor's bytes, copied in blocks);
`read_rows` maps a file's tensors from disk (numpy memmap, copy-on-write) so that indexing rows reads only those
rows. The files are ordinary safetensors files (safetensors.torch.load_file reads them); the safetensors package
has no API for either direction, hence this module.

    w = RowWriter(folder, "bucket_64x64", {"latents": (4, 8, 8), "contexts": (77, 768)})
    w.add(latents=z, contexts=c)              # float32 tensors of those row shapes, as many rows as wanted
    w.finish(folder / "bucket_64x64.safetensors")
    t = read_rows(folder / "bucket_64x64.safetensors")    # {"latents": (N, 4, 8, 8) tensor on the mapped file, ...}
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_file

_BLOCK = 1 << 24  # bytes copied at a time


class RowWriter:
    """Rows of float32 tensors with fixed row shapes, appended to raw files in `folder` until `finish`."""

    def __init__(self, folder, name: str, row_shapes: dict[str, tuple[int, ...]]):
        self.folder, self.name, self.shapes, self.rows = Path(folder), name, dict(row_shapes), 0
        self.files = {k: open(self._raw(k), "wb") for k in self.shapes}

    def _raw(self, key: str) -> Path:
        return self.folder / f".{self.name}.{key}.raw"

    def add(self, **rows: torch.Tensor) -> None:
        """One row of every tensor (each of its row shape, float32 after conversion)."""
        if rows.keys() != self.shapes.keys():
            raise ValueError(f"RowWriter.add needs rows of {sorted(self.shapes)}, got {sorted(rows)}")
        for k, x in rows.items():
            x = x.detach().to("cpu", torch.float32).contiguous()
            if tuple(x.shape) != self.shapes[k]:
                raise ValueError(f"row of {k!r} has shape {tuple(x.shape)}, expected {self.shapes[k]}")
            self.files[k].write(x.numpy().tobytes())
        self.rows += 1

    def finish(self, path) -> Path:
        """Write the safetensors file at `path` (atomically) and remove the raw files."""
        for f in self.files.values():
            f.close()
        header, start = {}, 0
        for k, shape in self.shapes.items():
            size = self.rows * int(np.prod(shape)) * 4
            header[k] = {"dtype": "F32", "shape": [self.rows, *shape], "data_offsets": [start, start + size]}
            start += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        with atomic_file(Path(path)) as tmp, open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(text)) + text)
            for k in self.shapes:
                with open(self._raw(k), "rb") as raw:
                    shutil.copyfileobj(raw, out, _BLOCK)
        self.discard()
        return Path(path)

    def discard(self) -> None:
        for k, f in self.files.items():
            f.close()
            self._raw(k).unlink(missing_ok=True)


def read_rows(path) -> dict[str, torch.Tensor]:
    """The float32 tensors of a safetensors file, mapped from disk (rows are read when indexed; writes to them stay
    in memory and never reach the file)."""
    path = Path(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    out = {}
    for k, meta in header.items():
        if k == "__metadata__":
            continue
        if meta["dtype"] != "F32":
            raise ValueError(f"{path}: tensor {k!r} is {meta['dtype']}; row files hold float32 only")
        start, end = meta["data_offsets"]
        shape = tuple(meta["shape"])
        if end == start:
            out[k] = torch.zeros(shape)
            continue
        mapped = np.memmap(path, dtype=np.float32, mode="c", offset=8 + n + start, shape=shape)
        out[k] = torch.from_numpy(mapped)
    return out


__all__ = ["RowWriter", "read_rows"]
