"""BundlePipeline: a bundle's prompt -> image with numpy, `tokenizers` and a TFLite interpreter only."""
from __future__ import annotations

import math
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .interpreter import Component
from ..lora_strength import check_strength
from .lora_pack import LoraPack, check_for, patched, read_pack
from .manifest import COMPONENTS, BundleError, image_sizes, read_manifest
from .sampler import numpy_noise, sample
from .tokenizer import BundleTokenizer


class BundlePipeline:
    """Runs an exported bundle (a folder or its .zip) the way a phone app would.

        pipe = BundlePipeline("output/mobilediffusion/my-bundle")
        images = pipe("a red circle", seed=0)                     # (B, H, W, 3) float32 in [0, 1]
        images = pipe("a red circle", seed=0, height=768, width=512)   # another size the bundle holds

    The manifest and every file's sha256 are checked on load. Batch, sampler and step count are the ones fixed
    at export (`self.manifest`); the image size is one of `self.sizes`; prompts are read in chunks of 75 tokens
    with emphasis weights, up to the bundle's `max_chunks`. Noise comes from numpy (see `numpy_noise`); pass
    `noise=` (a callable shape -> array) to feed other noise, e.g. to reproduce the torch pipeline.
    """

    def __init__(self, path: str | Path, *, num_threads: int | None = None, loras=()):
        path = Path(path)
        self._tmp = None
        if path.is_file() and path.suffix == ".zip":
            self._tmp = tempfile.TemporaryDirectory(prefix="md-bundle-")
            _extract(path, Path(self._tmp.name))
            path = Path(self._tmp.name)
        elif not path.is_dir():
            raise BundleError(f"bundle {path} does not exist; give the bundle folder (or its .zip)")
        self.path = path
        self.manifest = m = read_manifest(path)
        absent = [c for c in COMPONENTS if c not in m["components"]]
        if absent:
            raise BundleError(f"this bundle holds only {sorted(m['components'])}; running it needs all of "
                              f"{list(COMPONENTS)} (missing {absent}): export with components 'all'")
        self.num_threads = num_threads
        self.components = {name: self._load(name, e) for name, e in m["components"].items()}
        self.tokenizer = BundleTokenizer(path, m["tokenizer"])
        self.batch_size = int(m["image"]["batch_size"])
        self.sizes = image_sizes(m)
        self.loras = []  # [(LoraPack, strength)] patched into the weights
        if loras:
            self.set_loras(loras)

    def _load(self, name: str, entry: dict, content: bytes | None = None) -> Component:
        """One component's interpreter (from its file, or from `content`: the file's bytes patched)."""
        return Component(self.path / entry["file"], entry, num_threads=self.num_threads, content=content)

    def set_loras(self, loras) -> None:
        """Run with these LoRA packs at these strengths ([(pack file or LoraPack, strength)], replacing the ones set
        before; [] for none): the touched files are patched in memory and loaded again, nothing is exported.
        Every pack is read and checked first (another bundle's pack, a damaged one, a strength out of range are
        BundleErrors); on any error the bundle keeps running as it was. Strength 0 runs the files as they are."""
        packs = []
        for item in loras:
            try:
                pack, strength = item
            except (TypeError, ValueError):
                raise BundleError(f"each LoRA is a (pack, strength) pair, got {item!r}") from None
            pack = pack if isinstance(pack, LoraPack) else read_pack(pack)
            check_for(pack, self.manifest)
            packs.append((pack, check_strength(strength)))
        touched = {t["component"] for pack, _ in packs + self.loras for t in pack.info["targets"]}
        fresh = {}
        for name in sorted(touched):
            entry = self.manifest["components"][name]
            content = patched(self.path / entry["file"], name, packs)  # None: the file as it is
            fresh[name] = self._load(name, entry, content)
        self.components.update(fresh)
        self.loras = packs

    @property
    def guidance(self) -> float:
        return float(self.manifest["sampler"]["guidance"])

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple:
        """(B, C, h, w) of an image size the bundle holds (default: its first); BundleError naming the sizes."""
        size = self.sizes[0] if height is None and width is None else (height, width)
        if size not in self.sizes:
            have = ", ".join(f"{w}x{h}" for h, w in self.sizes)
            raise BundleError(f"this bundle has no {size[1]}x{size[0]} (width x height) signature; it holds {have}. "
                              "Export it with that size too (export --sizes)")
        B, C, h, w = self.manifest["image"]["latent_shape"]
        f = self.sizes[0][0] // h
        return (B, C, size[0] // f, size[1] // f)

    def encode(self, prompts) -> np.ndarray:
        """Prompts (exactly batch_size of them, or one, repeated) -> context (B, 77 k, D) float32: each prompt's
        chunks through the text encoder, emphasis applied against the empty prompt, prompts of different lengths
        repeated to a common one (as the torch pipeline does)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) == 1:
            prompts = prompts * self.batch_size
        if len(prompts) != self.batch_size:
            raise BundleError(f"this bundle was exported for batch {self.batch_size}; give one prompt or "
                              f"{self.batch_size}, got {len(prompts)}")
        chunked = [self.tokenizer.chunks(p) for p in prompts]  # [(ids (k, 77), weights (k, 77))]
        weighted = any((w != 1.0).any() for _, w in chunked)
        rows = np.concatenate([ids for ids, _ in chunked] + ([self.tokenizer.empty()[None]] if weighted else []))
        z = self._encode_rows(rows)  # (rows, 77, D)
        contexts, at = [], 0
        for ids, w in chunked:
            k = len(ids)
            c = z[at:at + k]
            if weighted:  # empty + w * (c - empty), float32 at each operation (numpy, as torch computes it)
                empty = z[-1]
                c = np.where(w[..., None] != 1.0, (c - empty) * w[..., None] + empty, c)
            contexts.append(c.reshape(1, k * c.shape[1], -1))
            at += k
        return batch_contexts(contexts)

    def _encode_rows(self, rows: np.ndarray) -> np.ndarray:
        """Token id rows (N, 77) -> (N, 77, D): the text encoder's batch-B signature run over them B at a time."""
        B = self.batch_size
        n = len(rows)
        padded = np.concatenate([rows, np.repeat(rows[:1], -n % B, axis=0)])
        out = [self.components["text_encoder"].run(ids=padded[i:i + B])["context"] for i in range(0, len(padded), B)]
        return np.concatenate(out)[:n]

    def sample(self, context: np.ndarray, uncond: np.ndarray | None = None, *, seed: int = 0, noise=None,
               callback=None, sampler: dict | None = None, height: int | None = None,
               width: int | None = None) -> np.ndarray:
        """Context (B, T, D) (+ uncond context when the bundle uses guidance) -> sampler-space latents (B, C, h, w)
        at one of the bundle's sizes. `sampler`: a sampler section to run instead of the manifest's (the
        exporter's bounded check runs the first steps of it)."""
        unet = self.components["unet"]
        shape = self.latent_shape(height, width)
        g = self.guidance
        if g > 1.0:
            if uncond is None:
                raise BundleError(f"this bundle samples with guidance {g:g}; give the negative prompt's context")
            both = batch_contexts([uncond, context])  # (2B, T, D): [uncond, cond], the torch pipeline's order

            def model(x, t):
                xx = np.concatenate([x, x])
                out = unet.run(sample=xx, timestep=np.full(len(xx), t, np.float32), context=both)["output"]
                u, c = out[: len(x)], out[len(x):]
                return u + np.float32(g) * (c - u)
        else:

            def model(x, t):
                return unet.run(sample=x, timestep=np.full(len(x), t, np.float32), context=context)["output"]

        return sample(model, shape, sampler or self.manifest["sampler"], noise or numpy_noise(seed), callback)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Sampler-space latents (B, C, h, w) -> images (B, H, W, 3) float32 in [0, 1]."""
        return self.components["decoder"].run(latents=latents)["image"]

    def __call__(self, prompt, negative_prompt: str = "", *, seed: int = 0, noise=None, callback=None,
                 height: int | None = None, width: int | None = None) -> np.ndarray:
        """Prompt (or batch_size prompts) -> images (B, H, W, 3) float32 in [0, 1] at one of `self.sizes`."""
        self.latent_shape(height, width)  # a size the bundle lacks fails before any work
        context = self.encode(prompt)
        uncond = self.encode(negative_prompt) if self.guidance > 1.0 else None
        return self.decode(self.sample(context, uncond, seed=seed, noise=noise, callback=callback, height=height,
                                       width=width))


def batch_contexts(contexts: list[np.ndarray]) -> np.ndarray:
    """Contexts (b_i, T_i, D) -> (sum b_i, T, D), each repeated along T to their least common multiple
    (guidance.batch_contexts, in numpy)."""
    T = math.lcm(*(c.shape[1] for c in contexts))
    return np.concatenate([np.tile(c, (1, T // c.shape[1], 1)) for c in contexts])


def to_pil(images: np.ndarray) -> list:
    """(B, H, W, 3) float in [0, 1] -> list of PIL RGB images (needs pillow)."""
    from PIL import Image

    arr = (np.asarray(images) * 255.0).round().clip(0, 255).astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def _extract(zip_path: Path, dest: Path) -> None:
    """Unpack a bundle .zip; members must be plain file names (nothing can land outside `dest`)."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for info in zf.infolist():
                name = info.filename.split("/", 1)[-1] if "/" in info.filename else info.filename
                if info.is_dir() or not name:
                    continue
                if Path(name).name != name or name in (".", ".."):
                    raise BundleError(f"{zip_path} holds {info.filename!r}, which is not a bundle file; refusing it")
                with zf.open(info) as src, open(dest / name, "wb") as out:
                    out.write(src.read())
    except zipfile.BadZipFile as e:
        raise BundleError(f"{zip_path} is not a readable zip ({e}); re-export the bundle") from None
