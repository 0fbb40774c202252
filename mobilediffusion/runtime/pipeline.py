"""BundlePipeline: a bundle's prompt -> image with numpy, `tokenizers` and a TFLite interpreter only."""
from __future__ import annotations

import math
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .conditioning import control_problem, control_window, prepare_hint, prepare_known
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
        images = pipe("a red circle", control_image="edges.png", control_strength=0.8)   # a bundle with a control
        images = pipe("a red circle", image="photo.png", mask="mask.png")   # a bundle with an encoder: inpainting

    The manifest and every file's sha256 are checked on load. Batch, sampler and step count are the ones fixed
    at export (`self.manifest`); the image size is one of `self.sizes`; prompts are read in chunks of 75 tokens
    with emphasis weights, up to the bundle's `max_chunks`. Noise comes from numpy (see `numpy_noise`); pass
    `noise=` (a callable shape -> array) to feed other noise, e.g. to reproduce the torch pipeline.

    A bundle exported with a control model (`manifest["control"]`) takes a control image, fitted to the picture as
    the torch pipeline fits it (centre crop, nearest-exact resize), at `control_strength` between the
    `control_start` and `control_end` fractions of the schedule; without one its UNet gets zero residuals. A
    bundle with an encoder repaints the white part of `mask` in `image` (an ordinary UNet keeps the rest at every
    step as ComfyUI's noise mask does; an inpainting UNet reads mask and masked image).
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
        absent = [c for c in COMPONENTS if c not in m["components"]]  # the optional ones may be absent
        if absent:
            raise BundleError(f"this bundle holds only {sorted(m['components'])}; running it needs all of "
                              f"{list(COMPONENTS)} (missing {absent}): export with components 'all'")
        self.num_threads = num_threads
        self.components = {name: self._load(name, e) for name, e in m["components"].items()}
        self.tokenizer = BundleTokenizer(path, m["tokenizer"])
        self.batch_size = int(m["image"]["batch_size"])
        self.sizes = image_sizes(m)
        self.control = m.get("control")  # None: the bundle runs no control model
        control_names = {self.control["component"]} if self.control else set()
        unknown = set(m["components"]) - set(COMPONENTS) - {"encoder"} - control_names
        if unknown:
            raise BundleError(f"this bundle has components {sorted(unknown)} this runtime does not know; run it with "
                              "the mobilediffusion version that exported it")
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
        B, C = self.manifest["image"]["latent_shape"][:2]
        return (B, C, size[0] // self.upscale, size[1] // self.upscale)

    @property
    def upscale(self) -> int:
        """Image pixels per latent pixel."""
        return self.sizes[0][0] // self.manifest["image"]["latent_shape"][2]

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
               width: int | None = None, hint: np.ndarray | None = None, control_strength: float = 1.0,
               control_start: float = 0.0, control_end: float = 1.0, known=None, concat=None) -> np.ndarray:
        """Context (B, T, D) (+ uncond context when the bundle uses guidance) -> sampler-space latents (B, C, h, w)
        at one of the bundle's sizes. `sampler`: a sampler section to run instead of the manifest's (the
        exporter's bounded check runs the first steps of it). `hint` (1 or B, c, H, W): the fitted control image;
        `known`: (latents, latent mask) to keep (runtime/sampler.py); `concat` (B, 5, h, w): an inpainting UNet's
        mask and masked-image latents."""
        unet = self.components["unet"]
        shape = self.latent_shape(height, width)
        g = self.guidance
        k = 2 if g > 1.0 else 1  # the UNet batch: [uncond, cond] with guidance
        if k == 2:
            if uncond is None:
                raise BundleError(f"this bundle samples with guidance {g:g}; give the negative prompt's context")
            ctx = batch_contexts([uncond, context])  # (2B, T, D): [uncond, cond], the torch pipeline's order
        else:
            ctx = context
        N = k * shape[0]
        base = {"sample": (N, *shape[1:]), "context": ctx.shape}
        extra = {}  # the UNet's other inputs, constant over the steps
        if "concat" in unet.inputs:
            if concat is None:
                raise BundleError("this bundle's UNet is an inpainting UNet: give image= and mask=")
            extra["concat"] = np.concatenate([concat] * k)
        residual_names = [n for n in unet.inputs if n.startswith("res_")]
        zeros = {n: np.zeros(unet.input_shape(n, **base), np.float32) for n in residual_names}
        window = self._control_window(control_strength, control_start, control_end)
        control = None
        if hint is not None and control_strength != 0:
            control = self._control_model(hint, shape, N, ctx, np.float32(control_strength))

        def unet_out(x, t):
            xx = np.concatenate([x] * k)
            tt = np.full(N, t, np.float32)
            res = zeros if control is None or not window[0] <= t <= window[1] else control(xx, tt)
            return unet.run(sample=xx, timestep=tt, context=ctx, **extra, **res)["output"]

        if k == 2:
            def model(x, t):
                out = unet_out(x, t)
                u, c = out[: len(x)], out[len(x):]
                return u + np.float32(g) * (c - u)
        else:
            model = unet_out
        return sample(model, shape, sampler or self.manifest["sampler"], noise or numpy_noise(seed), callback,
                      known=known)

    def _control_window(self, strength, start: float, end: float) -> tuple[float, float]:
        """The timesteps [lo, hi] where the control acts (conditioning.control_window on this model's schedule);
        BundleError for a strength or start/end out of range."""
        problem = control_problem(strength, start, end)
        if problem:
            raise BundleError(problem)
        return control_window(start, end, self.manifest["model"]["config"]["schedule"]["num_train_timesteps"])

    def _control_model(self, hint: np.ndarray, shape, N: int, ctx, strength):
        """(x, t) -> {res_*: array} at `strength`: the adapter's residuals (run here, once) or the ControlNet's
        (run at every call)."""
        name = self.control["component"]
        comp = self.components[name]
        k = N // shape[0]
        if name == "adapter":
            hint = _batch(hint, shape[0])
            res = {n: v * strength for n, v in comp.run(hint=hint).items()}
            res = {n: np.concatenate([v] * k) for n, v in res.items()}
            return lambda x, t: res
        hint = _batch(_batch(hint, shape[0]), N)
        return lambda x, t: {n: v * strength for n, v in comp.run(sample=x, timestep=t, context=ctx,
                                                                      hint=hint).items()}

    def control_hint(self, image, height: int | None = None, width: int | None = None) -> np.ndarray:
        """A control image (path, PIL image or array) -> the hint (1, c, H, W) for a size the bundle holds."""
        if self.control is None:
            raise BundleError("this bundle has no control model; export it with one (export --control FILE) to use "
                              "a control image")
        B, C, h, w = self.latent_shape(height, width)
        c, f = self.control["hint"]["channels"], self.control["hint"]["factor"]
        return prepare_hint(image, f * h, f * w, c)

    def _encoder(self):
        if "encoder" not in self.components:
            raise BundleError("this bundle has no image encoder; export it with one (export --inpaint, or a "
                              "9-channel inpainting model) to start from an image")
        return self.components["encoder"]

    def encode_image(self, images: np.ndarray) -> np.ndarray:
        """Images (B, H, W, 3) in [0, 1] -> sampler-space latents (B, C, h, w), through the bundle's encoder."""
        return self._encoder().run(image=_batch(images, self.batch_size))["latents"]

    def inpaint_inputs(self, image, mask, height: int | None = None, width: int | None = None) -> dict:
        """sample()'s `known` or `concat` for repainting the white part of `mask` in `image`."""
        B, C, h, w = self.latent_shape(height, width)
        f = self.upscale
        inpainting_unet = "concat" in self.components["unet"].inputs
        self._encoder()  # before the images are read: a bundle without one says so
        k = prepare_known(image, mask, f * h, f * w, (h, w), inpainting_unet=inpainting_unet)
        if inpainting_unet:
            masked = self.encode_image(k.masked_image)
            return {"concat": np.concatenate([_batch(k.hard_mask, B), masked], axis=1)}
        return {"known": (self.encode_image(k.image), k.mask)}

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Sampler-space latents (B, C, h, w) -> images (B, H, W, 3) float32 in [0, 1]."""
        return self.components["decoder"].run(latents=latents)["image"]

    def __call__(self, prompt, negative_prompt: str = "", *, seed: int = 0, noise=None, callback=None,
                 height: int | None = None, width: int | None = None, control_image=None,
                 control_strength: float = 1.0, control_start: float = 0.0, control_end: float = 1.0, image=None,
                 mask=None) -> np.ndarray:
        """Prompt (or batch_size prompts) -> images (B, H, W, 3) float32 in [0, 1] at one of `self.sizes`; see the
        class docstring for the control image and inpainting."""
        self.latent_shape(height, width)  # a size or control setting the bundle refuses fails before any work
        self._control_window(control_strength, control_start, control_end)
        hint = None if control_image is None else self.control_hint(control_image, height, width)
        source = {}
        if image is not None or mask is not None:
            source = self.inpaint_inputs(image, mask, height, width)
        elif "concat" in self.components["unet"].inputs:
            raise BundleError("this bundle's UNet is an inpainting UNet: give image= and mask= (--image/--mask)")
        context = self.encode(prompt)
        uncond = self.encode(negative_prompt) if self.guidance > 1.0 else None
        return self.decode(self.sample(context, uncond, seed=seed, noise=noise, callback=callback, height=height,
                                       width=width, hint=hint, control_strength=control_strength,
                                       control_start=control_start, control_end=control_end, **source))


def batch_contexts(contexts: list[np.ndarray]) -> np.ndarray:
    """Contexts (b_i, T_i, D) -> (sum b_i, T, D), each repeated along T to their least common multiple
    (guidance.batch_contexts, in numpy)."""
    T = math.lcm(*(c.shape[1] for c in contexts))
    return np.concatenate([np.tile(c, (1, T // c.shape[1], 1)) for c in contexts])


def _batch(a: np.ndarray, B: int) -> np.ndarray:
    """(1 or B, ...) -> (B, ...): one image for every sample (control.apply.to_batch)."""
    if a.shape[0] == B:
        return a
    if a.shape[0] == 1:
        return np.repeat(a, B, axis=0)
    if B % a.shape[0] == 0:
        return np.concatenate([a] * (B // a.shape[0]))
    raise BundleError(f"{a.shape[0]} images cannot drive a batch of {B}: give one, or one per image")


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
