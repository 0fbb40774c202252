"""BundlePipeline: a bundle's prompt -> image with numpy, `tokenizers` and a TFLite interpreter only."""
from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .interpreter import Component
from .manifest import COMPONENTS, BundleError, read_manifest
from .sampler import numpy_noise, sample
from .tokenizer import BundleTokenizer


class BundlePipeline:
    """Runs an exported bundle (a folder or its .zip) the way a phone app would.

        pipe = BundlePipeline("output/mobilediffusion/my-bundle")
        images = pipe("a red circle", seed=0)   # (B, H, W, 3) float32 in [0, 1]

    The manifest and every file's sha256 are checked on load. Shapes, batch, resolution, sampler and
    step count are the ones fixed at export (`self.manifest`). Noise comes from numpy (see `numpy_noise`);
    pass `noise=` (a callable shape -> array) to feed other noise, e.g. to reproduce the torch pipeline.
    """

    def __init__(self, path: str | Path, *, num_threads: int | None = None):
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
        self.components = {name: Component(path / e["file"], e, num_threads=num_threads)
                           for name, e in m["components"].items()}
        self.tokenizer = BundleTokenizer(path, m["tokenizer"])
        self.batch_size = int(m["image"]["batch_size"])

    @property
    def guidance(self) -> float:
        return float(self.manifest["sampler"]["guidance"])

    def encode(self, prompts) -> np.ndarray:
        """Prompts (exactly batch_size of them, or one, repeated) -> context (B, T, D) float32."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) == 1:
            prompts = prompts * self.batch_size
        if len(prompts) != self.batch_size:
            raise BundleError(f"this bundle was exported for batch {self.batch_size}; give one prompt or "
                              f"{self.batch_size}, got {len(prompts)}")
        return self.components["text_encoder"].run(ids=self.tokenizer(prompts))["context"]

    def sample(self, context: np.ndarray, uncond: np.ndarray | None = None, *, seed: int = 0, noise=None,
               callback=None, sampler: dict | None = None) -> np.ndarray:
        """Context (B, T, D) (+ uncond context when the bundle uses guidance) -> sampler-space latents (B, C, h, w).
        `sampler`: a sampler section to run instead of the manifest's (the exporter's bounded check runs
        the first steps of it)."""
        m = self.manifest
        unet = self.components["unet"]
        shape = tuple(m["image"]["latent_shape"])  # (B, C, h, w)
        g = self.guidance
        if g > 1.0:
            if uncond is None:
                raise BundleError(f"this bundle samples with guidance {g:g}; give the negative prompt's context")
            both = np.concatenate([uncond, context])  # (2B, T, D): [uncond, cond], the torch pipeline's order

            def model(x, t):
                xx = np.concatenate([x, x])
                out = unet.run(sample=xx, timestep=np.full(len(xx), t, np.float32), context=both)["output"]
                u, c = out[: len(x)], out[len(x):]
                return u + np.float32(g) * (c - u)
        else:

            def model(x, t):
                return unet.run(sample=x, timestep=np.full(len(x), t, np.float32), context=context)["output"]

        return sample(model, shape, sampler or m["sampler"], noise or numpy_noise(seed), callback)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Sampler-space latents (B, C, h, w) -> images (B, H, W, 3) float32 in [0, 1]."""
        return self.components["decoder"].run(latents=latents)["image"]

    def __call__(self, prompt, negative_prompt: str = "", *, seed: int = 0, noise=None, callback=None) -> np.ndarray:
        """Prompt (or batch_size prompts) -> images (B, H, W, 3) float32 in [0, 1]."""
        context = self.encode(prompt)
        uncond = self.encode(negative_prompt) if self.guidance > 1.0 else None
        return self.decode(self.sample(context, uncond, seed=seed, noise=noise, callback=callback))


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
