"""`mobilediffusion bench --bundle DIR [--bundle DIR2 ...]`: the desktop proxy for device latency.

For each bundle (one precision each): every .tflite timed in the LiteRT interpreter with XNNPACK on this
CPU, next to the torch pipeline's same component on the same inputs, and one whole image through the
numpy runtime (BundlePipeline: tokenizer, text encoder, the baked sampler's UNet steps, decoder).

The torch side is the bundle's own architecture (the manifest's model config) with random weights, or
the weights of --checkpoint: speed does not depend on weight values. It runs in fp32 with the load-time
fast path, the way `mobilediffusion generate` runs. Both sides use --threads threads and are timed in
this process, alternating, as the median of --runs after --warmup (bench.time_alternating). The image
time is one run after the component timings, so the interpreters have packed their weights already.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

PROMPT = "a photo of an astronaut riding a horse on the moon"


@dataclasses.dataclass
class BundleRow:
    """One component of one bundle: the interpreter against torch on the same inputs."""

    bundle: str  # folder name
    precision: str  # the component's precision in the bundle
    component: str  # text_encoder | unet | decoder | image (one whole image through the runtime)
    shape: str  # the first input's shape (fixed in the bundle)
    tflite_ms: float  # interpreter (XNNPACK), median
    torch_ms: float | None = None  # torch, fp32 fast path, median
    ratio: float | None = None  # torch_ms / tflite_ms: > 1 means the interpreter is faster
    note: str = ""


def torch_pipeline(manifest: dict, checkpoint=None):
    """The torch pipeline the bundle came from: --checkpoint's weights, else its config with random weights."""
    from ..config import ModelConfig
    from ..pipeline import build_pipeline, load_pipeline

    if checkpoint is not None:
        return load_pipeline(checkpoint)
    return build_pipeline(ModelConfig.from_json(json.dumps(manifest["model"]["config"])))


def inputs_for(bundle, name: str, seed: int = 0) -> dict:
    """Fixed inputs {name: float32/int32 array} for one component, in the shapes the bundle fixes."""
    spec = {i["name"]: i for i in bundle.manifest["components"][name]["inputs"]}
    rng = np.random.default_rng(seed)
    if name == "text_encoder":
        ids, _ = bundle.tokenizer.chunks(PROMPT)  # (1, T): the prompt fits one chunk
        return {"ids": np.repeat(ids[:1], spec["ids"]["shape"][0], axis=0)}
    out = {k: rng.standard_normal(s["shape"], dtype=np.float32) for k, s in spec.items()}
    if "timestep" in out:
        out["timestep"] = np.full(spec["timestep"]["shape"], bundle.manifest["sampler"]["timesteps"][0], np.float32)
    return out


def torch_call(pipe, name: str, feed: dict, decoder_space=(1.0, 0.0)):
    """A callable running the torch pipeline's component on `feed` (the bundle's inputs as torch tensors)."""
    import torch

    from ..export.components import DecoderExport, TextEncoderExport, UNetExport

    module = {"text_encoder": lambda: TextEncoderExport(pipe.text_encoder), "unet": lambda: UNetExport(pipe.unet),
              "decoder": lambda: DecoderExport(pipe.decoder, *decoder_space)}[name]()
    args = {k: torch.from_numpy(v).long() if v.dtype == np.int32 else torch.from_numpy(v) for k, v in feed.items()}

    def call():
        with torch.no_grad():
            return module(**args)

    return call


def bench_bundle(path, *, threads: int, runs: int, warmup: int, checkpoint=None, with_torch: bool = True,
                 image: bool = True) -> list[BundleRow]:
    """Rows for one bundle: each component, then one image (see the module docstring)."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _bench_bundle(path, threads=threads, runs=runs, warmup=warmup, checkpoint=checkpoint,
                             with_torch=with_torch, image=image)
    finally:
        torch.set_num_threads(before)  # the caller's thread count back (a test or a bench run goes on)


def _bench_bundle(path, *, threads, runs, warmup, checkpoint, with_torch, image) -> list[BundleRow]:
    from ..runtime import BundlePipeline
    from .measure import time_alternating

    t0 = time.perf_counter()
    bundle = BundlePipeline(path, num_threads=threads or None)
    load_s = time.perf_counter() - t0
    pipe = torch_pipeline(bundle.manifest, checkpoint) if with_torch else None
    rows = []
    for name, component in bundle.components.items():
        feed = inputs_for(bundle, name)
        fns = {"tflite": lambda c=component, f=feed: c.run(**f)}
        if pipe is not None:
            fns["torch"] = torch_call(pipe, name, feed)
        ms = time_alternating(fns, runs=runs, warmup=warmup)
        first = next(iter(feed.values()))
        row = BundleRow(Path(path).name, component.entry["precision"], name, "x".join(map(str, first.shape)),
                        ms["tflite"], ms.get("torch"))
        if row.torch_ms is not None:
            row.ratio = row.torch_ms / row.tflite_ms
        rows.append(row)
    if image:
        t0 = time.perf_counter()
        bundle(PROMPT, seed=0)
        s = bundle.manifest["sampler"]
        rows.append(BundleRow(Path(path).name, "/".join(sorted({r.precision for r in rows})), "image",
                              f"{bundle.manifest['image']['width']}x{bundle.manifest['image']['height']}",
                              (time.perf_counter() - t0) * 1e3,
                              note=f"numpy runtime, {s['name']} {s['steps']} steps{' + CFG' if s['guidance'] else ''}; "
                                   f"loading the bundle took {load_s:.1f} s"))
    return rows


def format_rows(rows: list[BundleRow], threads: int) -> str:
    lines = [f"bundle timings on {threads or 'default'} threads (XNNPACK interpreter vs torch fp32, median ms; "
             "ratio = torch / tflite)",
             f"{'bundle':24s} {'precision':16s} {'component':12s} {'input':16s} {'tflite ms':>10s} {'torch ms':>10s} "
             f"{'ratio':>6s}"]
    for r in rows:
        torch_ms = f"{r.torch_ms:10.1f}" if r.torch_ms is not None else f"{'-':>10s}"
        ratio = f"{r.ratio:6.2f}" if r.ratio is not None else f"{'-':>6s}"
        lines.append(f"{r.bundle:24s} {r.precision:16s} {r.component:12s} {r.shape:16s} {r.tflite_ms:10.1f} "
                     f"{torch_ms} {ratio}" + (f"  ({r.note})" if r.note else ""))
    return "\n".join(lines)


def cmd_bundle_bench(args) -> int:
    """The `bench --bundle` command (bench.py hands over when --bundle is given)."""
    rows = []
    for path in args.bundle:
        rows += bench_bundle(path, threads=args.threads, runs=args.runs, warmup=args.warmup,
                             checkpoint=getattr(args, "checkpoint", None), with_torch=not args.no_reference)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    else:
        print(format_rows(rows, args.threads))
    return 0
