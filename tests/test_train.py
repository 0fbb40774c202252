"""Training stages on tiny configs: losses go down, runs reproduce bitwise, resume equals an
uninterrupted run, bad configs are refused before training, and the shipped default loads."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mobilediffusion.config import DecoderConfig, ModelConfig, TextEncoderConfig, UNetConfig
from mobilediffusion.errors import CheckpointError, ConfigError
from mobilediffusion.presets import get_preset
from mobilediffusion.train.config import (
    AutoencoderConfig, DiffusionConfig, GanConfig, default_config_path, load_stage_config, stage_config,
)
from mobilediffusion.train.data import SceneConfig

# 32 px scenes, 2-level lite autoencoder (16x16x4 latents), a 2-level UNet and a 1-layer 16-wide CLIP
TINY_MODEL = ModelConfig(
    family="mobilediffusion",
    unet=UNetConfig(in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=(1, 1),
                    downsample=(True, False), attention=("none", "full"), transformer_depth=(1, 1),
                    num_attention_heads=(1, 2), mid_transformer_depth=1, cross_attention_dim=16,
                    separable=(False, True),
                    ff_mult=2, ff_activation="swish", shared_kv=True, norm_num_groups=8, prediction_type="v_prediction",
                    sample_size=16),
    text=TextEncoderConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1),
    decoder=DecoderConfig(latent_channels=4, scaling_factor=1.0, block_out_channels=(8, 16), layers_per_block=0,
                          mid_attention=False, norm_num_groups=8),
    resolution=32, latent_scale=1.0, default_steps=1, default_guidance=0.0, default_sampler="onestep",
)
DATA = SceneConfig(resolution=32, size=0.25, size_jitter=0.05, jitter=0.02, supersample=2)
COMMON = dict(data=DATA, pool_size=32, batch_size=4, checkpoint_every=1000, log_every=1, warmup=0)


def tiny(cls, **kw):
    return cls(**{**COMMON, **kw})


def falls(rows, key="loss", k=3) -> bool:
    values = [r[key] for r in rows]
    return np.mean(values[-k:]) < np.mean(values[:k])


@pytest.fixture(scope="module")
def trained_ae(tmp_path_factory):
    from mobilediffusion.train.autoencoder import train_autoencoder

    out = tmp_path_factory.mktemp("ae")
    return train_autoencoder(tiny(AutoencoderConfig, steps=3, lr=3e-3), out, model_cfg=TINY_MODEL, progress=False)


@pytest.fixture(scope="module")
def trained_diffusion(trained_ae, tmp_path_factory):
    from mobilediffusion.train.diffusion import train_diffusion

    out = tmp_path_factory.mktemp("diffusion")
    return train_diffusion(tiny(DiffusionConfig, steps=2), trained_ae, out, model_cfg=TINY_MODEL, progress=False)


def log_rows(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- configs
def test_packaged_configs_are_valid():
    """The packaged stage configs are the shipped default's recipe (md-shapes-128); configs/md-shapes/ keeps the
    64 px one-object recipe of the earlier default."""
    for stage, cls in (("autoencoder", AutoencoderConfig), ("diffusion", DiffusionConfig), ("gan", GanConfig)):
        cfg = load_stage_config(default_config_path(stage), stage)
        assert type(cfg) is cls and cfg.model == "md-shapes-128" and cfg.data.resolution == 128
        assert cfg.data.pair_fraction == 0.5 and len(cfg.data.relations) == 4
        old = load_stage_config(default_config_path(stage).parent / "md-shapes" / f"{stage}.json", stage)
        assert old.model == "md-shapes" and old.data == SceneConfig()
    control = load_stage_config(default_config_path("control"), "control")
    assert control.model == "md-shapes-128" and control.data.resolution == 128 and control.data.pair_fraction == 0


@pytest.mark.parametrize("bad, words", [
    ({"stage": "autoencoder", "learning_rate": 1e-3}, ["unknown", "learning_rate"]),
    ({"stage": "diffusion", "steps": 0}, ["steps", ">= 1"]),
    ({"stage": "gan", "lr": -1.0}, ["lr"]),
    ({"stage": "gan", "d_max_timestep": 1000}, ["d_max_timestep"]),
    ({"stage": "diffusion", "caption_dropout": 1.5}, ["caption_dropout"]),
    ({"stage": "autoencoder", "model": "nope"}, ["unknown model preset"]),
    ({"stage": "autoencoder", "data": {"colours": ["red"], "zoom": 2}}, ["unknown data config keys", "zoom"]),
    ({"stage": "autoencoder", "data": {"resolution": 72}}, ["resolution", "multiple"]),
    ({"stage": "autoencoder", "steps": "10"}, ["steps"]),
    ({"stage": "painting"}, ["stage"]),
])
def test_bad_configs_are_refused(bad, words):
    with pytest.raises(ConfigError) as e:
        stage_config(bad)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_cli_refuses_a_bad_config_before_training(tmp_path):
    import argparse

    from mobilediffusion.train.cli import add_parser

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stage": "autoencoder", "steps": 10, "batchsize": 4}))
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    a = parser.parse_args(["train", "autoencoder", "--config", str(bad), "--out", str(tmp_path / "run")])
    with pytest.raises(ConfigError, match="batchsize"):
        a.func(a)
    assert not (tmp_path / "run").exists()  # nothing started
    a = parser.parse_args(["train", "gan", "--out", str(tmp_path / "run"), "--init", str(tmp_path / "missing.st")])
    with pytest.raises(ConfigError, match="--init"):
        a.func(a)


# --------------------------------------------------------------------------- stages
def test_autoencoder_loss_goes_down(tmp_path):
    from mobilediffusion.train.autoencoder import load_autoencoder, train_autoencoder

    path = train_autoencoder(tiny(AutoencoderConfig, steps=12, lr=1e-2), tmp_path, model_cfg=TINY_MODEL,
                             progress=False)
    assert falls(log_rows(tmp_path))
    encoder, decoder = load_autoencoder(path)
    assert decoder.config.scaling_factor != 1.0  # set from the latents' statistics
    x = torch.rand(2, 3, 32, 32)
    assert encoder(x).shape == (2, 4, 16, 16) and decoder(encoder(x)).shape == (2, 3, 32, 32)


@pytest.mark.slow
def test_diffusion_loss_goes_down(trained_ae, tmp_path):
    from mobilediffusion.pipeline import load_pipeline
    from mobilediffusion.train.diffusion import train_diffusion

    path = train_diffusion(tiny(DiffusionConfig, steps=12, lr=3e-3, batch_size=8), trained_ae, tmp_path,
                           model_cfg=TINY_MODEL, progress=False)
    assert falls(log_rows(tmp_path))
    pipe = load_pipeline(path)  # a native file the public loader reads
    assert pipe.trained and pipe.config.unet == TINY_MODEL.unet
    assert pipe("a red circle", height=32, width=32)[0].size == (32, 32)


def test_gan_losses_go_down(trained_diffusion, tmp_path):
    from mobilediffusion.pipeline import load_pipeline
    from mobilediffusion.train.gan import train_gan

    path = train_gan(tiny(GanConfig, steps=10, lr=3e-3, d_lr=1e-3, batch_size=8), trained_diffusion, tmp_path,
                     progress=False)
    rows = log_rows(tmp_path)
    assert falls(rows, "recon") and falls(rows, "g_loss")
    assert load_pipeline(path)("a blue square", height=32, width=32)[0].size == (32, 32)


def test_discriminator_is_the_unet_cut_at_its_bottleneck():
    from mobilediffusion.train.gan import Discriminator
    from mobilediffusion.unet import UNet

    unet = UNet(TINY_MODEL.unet)
    d = Discriminator(unet)
    logits = d(torch.randn(3, 4, 16, 16), torch.tensor([0, 10, 500]), torch.randn(3, 77, 16))
    assert logits.shape == (3,)
    assert not any(k.startswith("unet.up.") for k in d.state_dict())
    torch.testing.assert_close(d.unet.conv_in.weight, unet.conv_in.weight)  # starts from the UNet
    logits.sum().backward()
    assert d.unet.conv_in.weight.grad is not None


# --------------------------------------------------------------------------- reproducibility and resume
def _weights(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_same_seed_same_weights(tmp_path):
    from mobilediffusion.train.autoencoder import train_autoencoder

    cfg = tiny(AutoencoderConfig, steps=3)
    a = _weights(train_autoencoder(cfg, tmp_path / "a", model_cfg=TINY_MODEL, progress=False))
    b = _weights(train_autoencoder(cfg, tmp_path / "b", model_cfg=TINY_MODEL, progress=False))
    c = _weights(train_autoencoder(dataclasses.replace(cfg, seed=1), tmp_path / "c", model_cfg=TINY_MODEL,
                                   progress=False))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.slow
def test_interrupted_diffusion_run_resumes_to_the_same_weights(trained_ae, tmp_path):
    from mobilediffusion.train.diffusion import train_diffusion

    cfg = tiny(DiffusionConfig, steps=4, checkpoint_every=2)
    whole = train_diffusion(cfg, trained_ae, tmp_path / "whole", model_cfg=TINY_MODEL, progress=False)
    part = tmp_path / "part"
    assert train_diffusion(cfg, trained_ae, part, model_cfg=TINY_MODEL, progress=False, stop_after=3) is None
    with pytest.raises(ConfigError, match="--resume"):  # never overwrites a run by accident
        train_diffusion(cfg, trained_ae, part, model_cfg=TINY_MODEL, progress=False)
    with pytest.raises(ConfigError, match="lr"):  # only `steps` may change on resume
        train_diffusion(dataclasses.replace(cfg, lr=0.5), trained_ae, part, model_cfg=TINY_MODEL, progress=False,
                        resume=True)
    resumed = train_diffusion(cfg, trained_ae, part, model_cfg=TINY_MODEL, progress=False, resume=True)
    a, b = _weights(whole), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_a_checkpoint_is_an_error(trained_ae, tmp_path):
    from mobilediffusion.train.autoencoder import train_autoencoder

    with pytest.raises(CheckpointError, match="no checkpoint"):
        train_autoencoder(tiny(AutoencoderConfig, steps=2), tmp_path, model_cfg=TINY_MODEL, progress=False,
                          resume=True)


# --------------------------------------------------------------------------- the recipe on an image folder
def _scenes_folder(tmp_path, n: int, cfg=DATA):
    """`train scenes` as typed into the CLI: n rendered training scenes as PNG + .txt files."""
    from mobilediffusion.cli import main

    conf = tmp_path / "scenes.json"
    conf.write_text(json.dumps({"stage": "diffusion", "data": dataclasses.asdict(cfg)}))
    assert main(["train", "scenes", "--config", str(conf), "--out", str(tmp_path / "scenes"), "-n", str(n)]) == 0
    return tmp_path / "scenes"


def test_recipe_stages_on_an_image_folder_equal_them_on_the_rendered_scenes(trained_ae, trained_diffusion, tmp_path):
    """The default's data through the same path as a user's: stages (a), (b) and (c) trained from the folder
    `train scenes` wrote give the weights they give on the scenes rendered in memory, bit for bit."""
    from mobilediffusion.train.autoencoder import train_autoencoder
    from mobilediffusion.train.diffusion import train_diffusion
    from mobilediffusion.train.gan import train_gan

    folder = _scenes_folder(tmp_path, 32)  # = pool_size: items 0..31 of the train split
    kw = dict(model_cfg=TINY_MODEL, progress=False)
    runs = {
        "autoencoder": lambda out, data: train_autoencoder(tiny(AutoencoderConfig, steps=2), out, data=data, **kw),
        "diffusion": lambda out, data: train_diffusion(tiny(DiffusionConfig, steps=2), trained_ae, out,
                                                       data=data, **kw),
        "gan": lambda out, data: train_gan(tiny(GanConfig, steps=2), trained_diffusion, out, data=data,
                                           progress=False),
    }
    for name, run in runs.items():
        a, b = _weights(run(tmp_path / f"{name}-rendered", None)), _weights(run(tmp_path / f"{name}-folder", folder))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_recipe_resume_on_changed_images_is_refused(tmp_path):
    from mobilediffusion.train.autoencoder import train_autoencoder

    folder = _scenes_folder(tmp_path, 8)
    cfg = tiny(AutoencoderConfig, steps=3)
    assert train_autoencoder(cfg, tmp_path / "run", model_cfg=TINY_MODEL, progress=False, data=folder,
                             stop_after=1) is None
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "scene_00003.png")
    with pytest.raises(ConfigError, match="other data"):
        train_autoencoder(cfg, tmp_path / "run", model_cfg=TINY_MODEL, progress=False, data=folder, resume=True)
    small = tmp_path / "small"  # images smaller than the stage's 32 px scenes: nothing to train on
    small.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(small / "a.png")
    (small / "a.txt").write_text("a red circle")
    with pytest.raises(ConfigError, match="no usable images"):
        train_autoencoder(cfg, tmp_path / "none", model_cfg=TINY_MODEL, progress=False, data=small)
    assert not (tmp_path / "none").exists()


# --------------------------------------------------------------------------- encoder in native files
def test_native_file_carries_the_encoder(trained_diffusion, tmp_path):
    from mobilediffusion.loading import load_encoder
    from mobilediffusion.loading import load_decoder, load_model_config, load_text_encoder, load_unet
    from mobilediffusion.weights.native import save_native

    enc = load_encoder(trained_diffusion)
    x = torch.rand(1, 3, 32, 32)
    assert enc(x).shape == (1, 4, 16, 16)
    m = trained_diffusion
    half = save_native(tmp_path / "half.safetensors", load_model_config(m), load_unet(m), load_text_encoder(m),
                       load_decoder(m), enc, dtype=torch.float16)
    assert _weights(half)["unet.conv_in.weight"].dtype == torch.float16
    torch.testing.assert_close(load_encoder(half)(x), enc(x), rtol=0, atol=2e-2)  # fp16 storage, fp32 compute


# --------------------------------------------------------------------------- the shipped default
def test_shipped_default_loads_through_the_public_loaders():
    from mobilediffusion.loading import load_encoder
    from mobilediffusion.loading import load_decoder, load_model_config, load_text_encoder, load_unet
    from mobilediffusion.pipeline import DEFAULT_WEIGHTS, load_pipeline

    assert DEFAULT_WEIGHTS.stat().st_size < 20_000_000
    cfg = load_model_config(DEFAULT_WEIGHTS)
    assert cfg.unet == get_preset("md-shapes-128").unet and cfg.default_sampler == "onestep" and cfg.resolution == 128
    assert _weights(DEFAULT_WEIGHTS)["unet.conv_in.weight"].dtype == torch.float16  # stored half, computed fp32
    for load in (load_unet, load_text_encoder, load_decoder, load_encoder):
        module = load(DEFAULT_WEIGHTS)
        assert all(p.dtype == torch.float32 for p in module.parameters())
    pipe = load_pipeline(None)
    assert pipe.trained and pipe.config == cfg


def test_shipped_default_follows_prompts_in_one_step():
    from mobilediffusion.pipeline import load_pipeline
    from mobilediffusion.train.data import parse_caption
    from mobilediffusion.train.evaluate import SceneReader, scene_hits

    vocab = load_stage_config(default_config_path("diffusion")).data  # the scenes the default learnt
    pipe, reader = load_pipeline(None), SceneReader(vocab)
    prompts = ["a red circle in the top left on a white background",
               "a blue triangle in the bottom right on a white background",
               "green square, center, white background",
               "a red circle left of a blue square on a white background",
               "a yellow triangle above a purple circle on a white background"]
    images = pipe(prompts, steps=1, seed=0)
    assert images[0].size == (128, 128)
    for prompt, image in zip(prompts, images):
        scene = parse_caption(prompt, vocab)
        hits = scene_hits(reader.read(np.asarray(image), 2 if scene.is_pair else 1), scene)
        assert all(v for v in hits.values() if v is not None), (prompt, hits)


def test_prompt_outside_the_vocabulary_still_gives_an_image_and_a_note(tmp_path, capsys):
    from PIL import Image

    from mobilediffusion.cli import main

    out = tmp_path / "astronaut.png"
    assert main(["generate", "an astronaut riding a horse on the moon", "-o", str(out), "-q"]) == 0
    assert "only knows simple shapes" in capsys.readouterr().err
    with Image.open(out) as im:
        assert im.size == (128, 128) and np.asarray(im).std() > 0  # an image, not a blank
    for prompt in ("a red circle in the top left", "a red circle left of a blue square"):
        assert main(["generate", prompt, "-o", str(out), "-q"]) == 0
        assert "only knows" not in capsys.readouterr().err, prompt


def test_accelerate_single_process_matches_the_plain_loop(tmp_path):
    from mobilediffusion.train.autoencoder import train_autoencoder
    from mobilediffusion.train.loop import accelerator

    cfg = tiny(AutoencoderConfig, steps=2)
    a = _weights(train_autoencoder(cfg, tmp_path / "acc", model_cfg=TINY_MODEL, progress=False, acc=accelerator()))
    b = _weights(train_autoencoder(cfg, tmp_path / "plain", model_cfg=TINY_MODEL, progress=False))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(__import__("os").environ.get("MD_HEAVY_TESTS") != "1",
                    reason="opt-in: accelerate launches of 2 processes (gloo); set MD_HEAVY_TESTS=1")
@pytest.mark.parametrize("source", ["rendered", "folder"])
def test_synthetic_stages_on_two_processes_equal_one(tmp_path, source):
    """autoencoder -> diffusion -> gan, each on 1 process and under `accelerate launch` with 2: the same weights
    (<= 1e-5; every draw is made for the whole batch and shared out by rank), batches of 6 (3 per process); on the
    scenes rendered in memory, and on the folder `train scenes` wrote (--data)."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    results = {}
    init = None
    data = []
    if source == "folder":
        r = subprocess.run([sys.executable, "-m", "mobilediffusion.cli", "train", "scenes", "--out",
                            str(tmp_path / "scenes"), "-n", "16"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        data = ["--data", str(tmp_path / "scenes")]
    for stage, out in (("autoencoder", "autoencoder.safetensors"), ("diffusion", "model.safetensors"),
                       ("gan", "model.safetensors")):
        cfg = json.loads(default_config_path(stage).read_text())
        cfg.update(steps=4, pool_size=16, batch_size=6, warmup=0, checkpoint_every=100, log_every=1)
        (tmp_path / f"{stage}.json").write_text(json.dumps(cfg))
        args = ["train", stage, "--config", str(tmp_path / f"{stage}.json"), "-q", *data] + (
            ["--init", init] if init else [])
        ddp = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mobilediffusion.cli"]
        for name, prefix in (("one", [sys.executable, "-m", "mobilediffusion.cli"]), ("two", ddp)):
            r = subprocess.run(prefix + args + ["--out", str(tmp_path / f"{stage}-{name}")], capture_output=True,
                               text=True)
            assert r.returncode == 0, r.stderr[-2000:]
        one, two = (load_file(str(tmp_path / f"{stage}-{n}" / out)) for n in ("one", "two"))
        flat = lambda d: torch.cat([d[k].float().flatten() for k in sorted(d)])  # noqa: E731
        results[stage] = ((flat(two) - flat(one)).norm() / flat(one).norm()).item()
        init = str(tmp_path / f"{stage}-one" / out)
    print(f"2 processes vs 1 ({source}):", {k: f"{v:.1e}" for k, v in results.items()})
    assert all(v <= 1e-5 for v in results.values()), results
