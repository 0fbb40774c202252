"""Where training pairs come from, behind one seam: `open_source(spec)` -> an iterable of `Item(key, caption, image)`.

    source = open_source("data/")                       # an image folder (recursive; kohya "N_name" repeat folders)
    source = open_source("data/metadata.jsonl")         # Hugging Face imagefolder metadata (.jsonl / .csv)
    source = open_source("shards/{0000..0009}.tar")     # local webdataset tar shards (image + txt per sample)
    source = open_source("synthetic")                   # the procedurally drawn scenes (train/data.py)
    for item in source:                                 # streams: one image decoded at a time
        item.key, item.caption, item.image              # "sub/cat_01", "a cat", uint8 (H, W, 3)
    source.skipped                                      # Counter: why files were left out, e.g. {"unreadable": 2}
    mine = source.part(rank, world)                     # this process's share (shards split by shard when enough)

Captions: a folder image's sidecar `<stem>.txt` or `<stem>.caption`; in a kohya folder without one, the folder's
name after "N_" (kohya's class token). Keys are paths relative to the root without the extension ("/"-separated),
so the same files give the same keys and pairs in every format. Files that are not images, that cannot be
decoded, or that are smaller than `min_side` are skipped and counted, never raised mid-epoch; images are made RGB
uint8 by images.decode.
"""
from __future__ import annotations

import csv
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .images import UnreadableImage, decode

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
CAPTION_EXTENSIONS = (".txt", ".caption")
SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
SHARD_TEXT_KEYS = ("txt", "caption")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
_KOHYA = re.compile(r"^(\d+)_(.*)$")


@dataclass(frozen=True)
class Item:
    key: str  # the file's path under the root without its extension ("/"-separated), or the shard sample's key
    caption: str
    image: np.ndarray  # uint8 (H, W, 3)
    repeat: int = 0  # which copy of a kohya "N_" folder's image this is (0 .. N-1)
    order: tuple = ()  # its place in the whole source (sorting the items of every share by it gives the source order)


class Source:
    """Iterable of Items; `skipped` counts what was left out, by reason. Each iteration starts afresh."""

    rank, world = 0, 1  # this share of the source (part)

    def __init__(self, min_side: int = 64):
        self.min_side = int(min_side)
        self.skipped: Counter = Counter()

    def part(self, rank: int, world: int) -> "Source":
        """A copy that yields share `rank` of `world`: every world-th candidate (decoded only there), or for tar
        shards every world-th shard when there are at least `world` of them (split by node and worker)."""
        import copy

        if not 0 <= rank < world:
            raise ConfigError(f"share {rank} of {world} does not exist")
        share = copy.copy(self)
        share.rank, share.world, share.skipped = rank, world, Counter()
        return share

    def _turn(self, i: int) -> bool:
        return i % self.world == self.rank

    def _item(self, key: str, caption: str, data, repeat: int = 0, order: tuple = ()) -> Item | None:
        try:
            image = decode(data)
        except UnreadableImage:
            self.skipped["unreadable"] += 1
            return None
        if min(image.shape[:2]) < self.min_side:
            self.skipped[f"smaller than {self.min_side} px"] += 1
            return None
        return Item(key, caption, image, repeat, order)

    def __iter__(self):
        raise NotImplementedError


def _read_caption(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace").strip()


class FolderSource(Source):
    """Images under `root` (recursive, sorted), captions from sidecar files; kohya "N_name" folders directly under
    the root repeat their images N times (and caption them "name" when an image has no sidecar)."""

    def __init__(self, root, min_side: int = 64):
        super().__init__(min_side)
        self.root = Path(root)
        files = sorted(p for p in self.root.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(self.root).parts))
        self.images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        stems = {p.with_suffix("") for p in self.images}
        self.orphans = [p for p in files if p.suffix.lower() in CAPTION_EXTENSIONS and p.with_suffix("") not in stems]

    def caption_of(self, path: Path) -> str:
        for ext in CAPTION_EXTENSIONS:
            side = path.with_suffix(ext)
            if side.is_file():
                return _read_caption(side)
        kohya = _kohya(path.relative_to(self.root))
        return kohya[1] if kohya else ""

    def __iter__(self):
        self.skipped = Counter()
        if self.orphans and self.rank == 0:
            self.skipped["caption without image"] += len(self.orphans)
        for i, path in enumerate(self.images):
            if not self._turn(i):
                continue
            rel = path.relative_to(self.root)
            kohya = _kohya(rel)
            repeats = kohya[0] if kohya else 1
            item = self._item(rel.with_suffix("").as_posix(), self.caption_of(path), path)
            if item is None:
                continue
            for r in range(repeats):
                yield Item(item.key, item.caption, item.image, r, (i, r))


def _kohya(rel: Path) -> tuple[int, str] | None:
    """(repeats, class name) of a kohya "N_name" folder directly under the root, or None."""
    if len(rel.parts) < 2:
        return None
    m = _KOHYA.match(rel.parts[0])
    if not m or int(m.group(1)) < 1:
        return None
    return int(m.group(1)), m.group(2).strip()


class MetadataSource(Source):
    """A Hugging Face imagefolder metadata file: `metadata.jsonl` (one JSON object per line) or `metadata.csv`, each
    row with `file_name` (relative to the file's folder) and the caption in `text` (or `caption`)."""

    def __init__(self, path, min_side: int = 64):
        super().__init__(min_side)
        self.path = Path(path)
        self.rows = list(_metadata_rows(self.path))

    def __iter__(self):
        self.skipped = Counter()
        base = self.path.parent
        for i, (name, caption) in enumerate(self.rows):
            if not self._turn(i):
                continue
            file = (base / name).resolve()
            if base.resolve() not in file.parents:
                self.skipped["file_name outside the folder"] += 1
                continue
            if not file.is_file():
                self.skipped["missing file"] += 1
                continue
            item = self._item(Path(name).with_suffix("").as_posix(), caption, file, order=(i,))
            if item is not None:
                yield item


def _metadata_rows(path: Path):
    if path.suffix == ".jsonl":
        lines = path.read_text(encoding="utf-8").splitlines()
        rows = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} line {n} is not JSON ({e}); each line is an object with file_name and "
                                  "text") from None
    elif path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        raise ConfigError(f"{path} is no metadata file; give metadata.jsonl or metadata.csv")
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not row.get("file_name"):
            raise ConfigError(f"{path} row {n} has no file_name; each row names its image in file_name and its "
                              "caption in text")
        yield str(row["file_name"]), str(row.get("text", row.get("caption", "")) or "").strip()


class ShardSource(Source):
    """Local webdataset tar shards (a path, or a pattern with braces: shards/{0000..0099}.tar): per sample an image
    (jpg/jpeg/png/webp) and a caption (txt/caption). A damaged shard is counted and the rest read on."""

    def __init__(self, pattern: str, min_side: int = 64):
        super().__init__(min_side)
        try:
            from webdataset.shardlists import expand_urls
        except ImportError:
            raise ConfigError("reading tar shards needs the webdataset package: pip install webdataset") from None
        self.urls = expand_urls(str(pattern))
        missing = [u for u in self.urls if not Path(u).is_file()]
        if missing:
            raise ConfigError(f"{len(missing)} shard(s) of {pattern} do not exist (first: {missing[0]}); give local "
                              ".tar files")

    def __iter__(self):
        import tarfile

        self.skipped = Counter()
        by_shard = len(self.urls) >= self.world  # whole shards per share; else samples of every shard in turn
        count = -1
        for j, url in enumerate(self.urls):
            if by_shard and not self._turn(j):
                continue
            try:
                samples = list(_tar_samples(url))
            except (tarfile.TarError, OSError, EOFError):
                if by_shard or self.rank == 0:
                    self.skipped["damaged shard"] += 1
                continue
            for n, (key, parts) in enumerate(samples):
                count += 1
                if not by_shard and not self._turn(count):
                    continue
                image = next((parts[k] for k in SHARD_IMAGE_KEYS if k in parts), None)
                if image is None:
                    self.skipped["sample without image"] += 1
                    continue
                text = next((parts[k] for k in SHARD_TEXT_KEYS if k in parts), b"")
                item = self._item(key, text.decode("utf-8", errors="replace").strip(), image, order=(j, n))
                if item is not None:
                    yield item


def _tar_samples(url: str):
    """[(key, {extension: bytes})] of one shard, grouped as webdataset groups them (by the name before the first dot
    of the file name), through webdataset's own tar reader."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    def reraise(e):
        raise e

    with open(url, "rb") as stream:
        files = tar_file_expander([{"stream": stream, "url": url}], handler=reraise)
        out = []
        for sample in group_by_keys(files, handler=reraise):
            out.append((sample["__key__"], {k: v for k, v in sample.items() if not k.startswith("__")}))
        return out


class SyntheticSource(Source):
    """The drawn scenes of train/data.py as a source (items 0..length-1 of a split)."""

    def __init__(self, cfg=None, split: str = "train", length: int = 4096):
        super().__init__(min_side=1)
        from .data import SceneConfig, SyntheticScenes

        self.scenes = SyntheticScenes(cfg or SceneConfig(), split, length=length)

    def __iter__(self):
        self.skipped = Counter()
        for i in range(len(self.scenes)):
            if self._turn(i):
                image, caption, _ = self.scenes[i]
                yield Item(f"{self.scenes.split}/{i:06d}", caption, image, 0, (i,))


def open_source(spec, *, min_side: int = 64) -> Source:
    """The source `spec` names: "synthetic", a folder (its metadata.jsonl / .csv when it has one, else its images),
    a metadata file, or a tar shard / shard pattern. ConfigError when it names nothing readable or holds no image."""
    text = str(spec)
    if text == "synthetic":
        return SyntheticSource()
    if text.endswith(".tar") or ("{" in text and ".tar" in text):
        return ShardSource(text, min_side)
    path = Path(text)
    if not path.exists():
        raise ConfigError(f"training data {text} does not exist; give an image folder, a metadata.jsonl / .csv, or "
                          "tar shards (shards/{0000..0009}.tar)")
    if path.is_file():
        return MetadataSource(path, min_side)
    for name in METADATA_FILES:
        if (path / name).is_file():
            return MetadataSource(path / name, min_side)
    source = FolderSource(path, min_side)
    if not source.images:
        more = f" ({len(source.orphans)} caption files without their images)" if source.orphans else ""
        raise ConfigError(f"{path} holds no images{more}; put .png / .jpg / .webp files there (captions beside them "
                          "as <name>.txt)")
    return source
