"""`train cache`: latents and text-encoder outputs of your images, equal to a fresh encode, reused when nothing
changed and encoded again for what did (a file, the model, the buckets)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mobilediffusion.train.cache import CacheSpec, build_cache, read_cache
from mobilediffusion.train.images import BucketConfig, bucket_for, fit_to_bucket
from mobilediffusion.train.sources import open_source


@pytest.fixture(scope="module")
def pipe():
    from mobilediffusion.pipeline import load_pipeline

    return load_pipeline(encoder=True)


def _folder(root, n=5):
    root.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    for i in range(n):
        w, h = (64, 64) if i % 2 else (160, 96)
        Image.fromarray((g.random((h, w, 3)) * 255).astype(np.uint8)).save(root / f"p{i}.png")
        (root / f"p{i}.txt").write_text(f"a red circle number {i}")
    return root


def test_cache_equals_a_fresh_encode_and_is_reused(tmp_path, pipe):
    data = _folder(tmp_path / "data")
    spec = CacheSpec(model="default", buckets=BucketConfig(resolution=128, step=64))
    first = build_cache(open_source(data), pipe, tmp_path / "cache", spec)
    assert first["encoded"] == 5 and first["reused"] == 0
    assert first["buckets"] == {"128x64": 3, "64x64": 2}  # 160x96 pictures: the nearest aspect inside them
    parts = {p.size: p for p in read_cache(tmp_path / "cache")}
    for item in open_source(data):
        size = bucket_for(item.image.shape[1], item.image.shape[0], spec.buckets)
        part = parts[size]
        row = part.keys.index(item.key)
        x = torch.from_numpy(fit_to_bucket(item.image, size, spec.buckets)).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            # a batch of a bucket vs this image alone: oneDNN picks its kernels by batch size, so the two agree to
            # fp32 rounding (bit for bit on AVX-512 CPUs, 1.7e-6 apart on an AVX2 one); another row is O(1) away
            torch.testing.assert_close(part.latents[row], pipe.encode(x)[0], rtol=1e-4, atol=1e-5)
            want = pipe.text_encoder.encode(pipe.text_encoder.tokenize([item.caption]))[0]
        torch.testing.assert_close(part.contexts[row], want, rtol=0, atol=0)
        assert part.captions[row] == item.caption
    again = build_cache(open_source(data), pipe, tmp_path / "cache", spec)
    assert again["encoded"] == 0 and again["reused"] == 5
    # one changed file is encoded again, the others are reused; another model or bucket setting re-encodes all
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(data / "p1.png")
    changed = build_cache(open_source(data), pipe, tmp_path / "cache", spec)
    assert changed["encoded"] == 1 and changed["reused"] == 4
    other = build_cache(open_source(data), pipe, tmp_path / "cache", CacheSpec(model="another", buckets=spec.buckets))
    assert other["encoded"] == 5


def test_caches_of_shares_merge_into_the_whole_cache(tmp_path, pipe):
    """Each process's share encoded on its own and merged: the cache one process writes (the same rows in the
    same order, the same values up to fp32 rounding)."""
    from safetensors.torch import load_file

    from mobilediffusion.train.cache import merge_caches

    data = _folder(tmp_path / "data", n=7)
    spec = CacheSpec(model="default", buckets=BucketConfig(resolution=128, step=64))
    build_cache(open_source(data), pipe, tmp_path / "whole", spec)
    for rank in range(3):
        build_cache(open_source(data).part(rank, 3), pipe, tmp_path / f"share{rank}", spec, allow_empty=True)
    merged = merge_caches([tmp_path / f"share{r}" for r in range(3)], tmp_path / "merged")
    assert merged["entries"] == 7
    whole, got = (json.loads((tmp_path / d / "index.json").read_text()) for d in ("whole", "merged"))
    assert got["parts"] == whole["parts"]
    for part in whole["parts"]:
        a, b = load_file(str(tmp_path / "whole" / part["file"])), load_file(str(tmp_path / "merged" / part["file"]))
        assert a.keys() == b.keys()  # the shares batch their buckets otherwise: equal to fp32 rounding (see above)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_cache_streams_data_larger_than_memory(tmp_path, pipe):
    """Encoding starts after one batch of a bucket, long before the source ends, and rows go to disk as they come:
    the images in memory are at most a batch per bucket; read_cache maps the files instead of loading them."""
    from mobilediffusion.train.sources import SyntheticSource

    source, seen, calls = SyntheticSource(length=40), [0], []

    class Counting:
        def __iter__(self):
            for item in source:
                seen[0] += 1
                yield item

    class Recording:  # the pipeline, noting how many items the source had given at each encode
        def __init__(self, pipe):
            self.encoder, self.text_encoder = pipe.encoder, pipe.text_encoder
            self._pipe = pipe

        def encode(self, x):
            calls.append((seen[0], len(x)))
            return self._pipe.encode(x)

    summary = build_cache(Counting(), Recording(pipe), tmp_path / "cache",
                          CacheSpec(model="default", buckets=BucketConfig(64, 64)), batch=8)
    assert summary["encoded"] == 40 and calls == [(8 * (k + 1), 8) for k in range(5)]
    (part,) = read_cache(tmp_path / "cache")
    maps = open("/proc/self/maps").read()  # (Linux) the file is mapped into this process, not read into memory
    assert str((tmp_path / "cache" / "bucket_64x64.safetensors").resolve()) in maps
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "cache" / "bucket_64x64.safetensors"))  # an ordinary safetensors file
    assert torch.equal(stored["latents"], part.latents) and torch.equal(stored["contexts"], part.contexts)


def test_cache_of_the_synthetic_scenes_is_what_training_encodes(tmp_path, pipe):
    """One 64x64 bucket: the cache holds what the stages' encode_pool / text_contexts give for the same images."""
    from mobilediffusion.train.diffusion import encode_pool
    from mobilediffusion.train.gan import text_contexts
    from mobilediffusion.train.sources import SyntheticSource

    source = SyntheticSource(length=12)
    build_cache(source, pipe, tmp_path / "cache", CacheSpec(model="default", buckets=BucketConfig(64, 64)))
    (part,) = read_cache(tmp_path / "cache")
    items = list(source)
    images = torch.from_numpy(np.stack([i.image for i in items])).permute(0, 3, 1, 2).float() / 255
    assert part.keys == [i.key for i in items]
    torch.testing.assert_close(part.latents, encode_pool(pipe.encoder, images), rtol=0, atol=1e-6)
    text = pipe.text_encoder
    torch.testing.assert_close(part.contexts, text_contexts(text, text.tokenize([i.caption for i in items])),
                               rtol=0, atol=1e-6)


def test_train_cache_cli(tmp_path):
    """As typed: train cache --data FOLDER --out DIR writes the cache; a folder without images is one line."""
    data = _folder(tmp_path / "data", n=3)
    run = lambda *a: subprocess.run([sys.executable, "-m", "mobilediffusion.cli", "train", "cache", *a],  # noqa
                                    capture_output=True, text=True)
    r = run("--data", str(data), "--out", str(tmp_path / "cache"), "--resolution", "128", "-q")
    assert r.returncode == 0 and "3 entries (3 encoded, 0 reused)" in r.stdout, r.stderr
    assert [p.size for p in read_cache(tmp_path / "cache")] == [(64, 64), (128, 64)]
    (tmp_path / "empty").mkdir()
    r = run("--data", str(tmp_path / "empty"), "--out", str(tmp_path / "c2"), "-q")
    assert r.returncode != 0 and "holds no images" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "c2").exists()
