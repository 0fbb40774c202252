"""Training on your own images from a checkpoint (issue 19, part 3): bucket epochs, LoRAs in kohya keys read back by
the loader, images vs cache, resume, bad input, and several processes (opt-in)."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mobilediffusion.errors import ConfigError
from mobilediffusion.presets import PRESETS
from mobilediffusion.train.batches import BucketBatches
from mobilediffusion.unet import UNet

SD_TINY = dataclasses.replace(PRESETS["sd15"].unet, block_out_channels=(32, 64), layers_per_block=(1, 1),
                              attention=("full", "none"), transformer_depth=(1, 1), num_attention_heads=(2, 2),
                              norm_num_groups=8, cross_attention_dim=64, sample_size=8)


def cli(*args, typed: bool = False) -> subprocess.CompletedProcess:
    """`mobilediffusion ARGS`: as typed (a new process) or, faster, through the same main() in this process."""
    if typed:
        return subprocess.run([sys.executable, "-m", "mobilediffusion.cli", *args], capture_output=True, text=True)
    import contextlib
    import io

    from mobilediffusion.cli import main

    out, err, threads = io.StringIO(), io.StringIO(), torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny SD 1.5-layout model (random UNet; the shipped default's CLIP, lite decoder and encoder) as a native
    file, and a folder of 10 captioned scenes in two sizes."""
    from mobilediffusion.loading import load_model_config
    from mobilediffusion.pipeline import DEFAULT_WEIGHTS, load_pipeline
    from mobilediffusion.train.data import SceneConfig, SyntheticScenes
    from mobilediffusion.weights.native import save_native

    root = tmp_path_factory.mktemp("world")
    cfg = load_model_config(DEFAULT_WEIGHTS)
    unet_cfg = dataclasses.replace(SD_TINY, in_channels=cfg.unet.in_channels, out_channels=cfg.unet.out_channels,
                                   cross_attention_dim=cfg.unet.cross_attention_dim,
                                   prediction_type=cfg.unet.prediction_type)
    pipe = load_pipeline(DEFAULT_WEIGHTS, encoder=True)
    torch.manual_seed(0)
    model = save_native(root / "sd-tiny.safetensors", dataclasses.replace(cfg, unet=unet_cfg), UNet(unet_cfg),
                        pipe.text_encoder, pipe.decoder, pipe.encoder)
    images = root / "images"
    images.mkdir()
    scenes = SyntheticScenes(SceneConfig(resolution=64), "train", length=10)
    for i in range(10):
        image, caption, _ = scenes[i]
        if i % 3 == 0:  # a wide one: another bucket
            image = np.concatenate([image, image[:, ::-1]], axis=1)
        Image.fromarray(image).save(images / f"s{i}.png")
        (images / f"s{i}.txt").write_text(caption)
    return model, images


def test_bucket_epochs_see_every_item_once_in_batches_of_one_size():
    order = BucketBatches([7, 1, 12], batch_size=4, seed=3)
    assert order.steps_per_epoch == 2 + 1 + 3
    for epoch in range(3):
        seen = []
        for i in range(order.steps_per_epoch):
            rows = order.batch(epoch * order.steps_per_epoch + i)
            assert 1 <= len(rows) <= 4 and len({order.bucket_of(int(r)) for r in rows}) == 1
            seen += rows.tolist()
        assert sorted(seen) == list(range(20))  # no item twice, none missed
    assert torch.equal(BucketBatches([7, 1, 12], 4, 3).batch(9), order.batch(9))  # a function of the step alone
    assert not torch.equal(order.batch(0), order.batch(order.steps_per_epoch))  # epochs are reshuffled


@pytest.mark.parametrize("layout", ["sd15", "md-shapes"])
@pytest.mark.parametrize("targets", ["transformer", "all"])
def test_trained_lora_in_kohya_keys_is_what_the_loader_applies(tmp_path, layout, targets):
    """The network's UNet output equals the loader applying the written kohya file to the plain UNet, every key
    used (MobileDiffusion's shared to_kv, which diffusers cannot name, spelled by its own path)."""
    from mobilediffusion.lora import with_lora
    from mobilediffusion.train.lora import LoraNetwork, save_kohya

    cfg = SD_TINY if layout == "sd15" else PRESETS["md-shapes"].unet
    torch.manual_seed(0)
    base = UNet(cfg).eval()
    unet = copy.deepcopy(base)
    net = LoraNetwork(unet, rank=2, alpha=1.0, targets=targets)
    assert [p for p in unet.parameters() if p.requires_grad] and all(
        any(p is q for q in net.parameters()) for p in unet.parameters() if p.requires_grad)  # only LoRA trains
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    path = save_kohya(net, tmp_path / "lora.safetensors")
    keys = load_file(str(path)).keys()
    assert all(k.startswith("lora_unet_") for k in keys) and len(keys) == 3 * sum(len(d.parts) for d in
                                                                                 net.deltas.values())
    assert not net.skipped
    if layout == "md-shapes":  # the shared key/value projections train too, in their own names
        kv = [m for m in net.modules_of.values() if m.endswith("to_kv")]
        assert kv and all(f"lora_unet_{m.replace('.', '_')}.lora_up.weight" in keys for m in kv)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, cfg.in_channels, 16, 16, generator=g), torch.tensor([10, 700])
    c = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    with torch.no_grad():
        ours, loaded, plain = unet(x, t, c), with_lora(copy.deepcopy(base), path)(x, t, c), base(x, t, c)
    assert ((ours - loaded).norm() / loaded.norm()).item() <= 1e-6
    assert ((ours - plain).norm() / plain.norm()).item() > 0.1  # the LoRA matters
    net.detach_from(unet)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, c), plain, rtol=0, atol=0)


def test_lora_rank_larger_than_a_layer_is_refused():
    from mobilediffusion.train.lora import LoraNetwork

    with pytest.raises(ConfigError, match=r"--lora-rank <= 32"):
        LoraNetwork(UNet(SD_TINY), rank=40)


def test_lora_from_images_equals_lora_from_their_cache_and_resumes(world, tmp_path):
    """`train lora --data IMAGES` and `--data CACHE` (written by `train cache`) give the same file bit for bit; a run
    stopped and resumed gives it too; the LoRA loads through --lora in generate."""
    model, images = world
    common = ["--init", str(model), "--steps", "4", "--batch-size", "3", "--resolution", "128", "-q"]
    r = cli("train", "cache", "--data", str(images), "--init", str(model), "--out", str(tmp_path / "cache"),
            "--resolution", "128", "-q", typed=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "10 entries" in r.stdout and "64x64: 6" in r.stdout and "128x64: 4" in r.stdout, r.stdout
    runs = {"images": ["--data", str(images)], "cache": ["--data", str(tmp_path / "cache"), "--heldout", str(images)]}
    for name, data in runs.items():
        r = cli("train", "lora", *data, "--out", str(tmp_path / name), *common)
        assert r.returncode == 0, r.stderr[-2000:]
    for args in (["--stop-after", "3"], ["--resume"]):
        r = cli("train", "lora", *runs["images"], "--out", str(tmp_path / "part"), *common, *args)
        assert r.returncode == 0, r.stderr[-2000:]
    a, b, c = (load_file(str(tmp_path / d / "lora.safetensors")) for d in ("images", "cache", "part"))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    assert any(a[k].abs().max() > 0 for k in a if "lora_up" in k)  # trained (up starts at zero)
    assert [json.loads(x)["step"] for x in (tmp_path / "images" / "log.jsonl").read_text().splitlines()] == [4]
    held = [json.loads(x) for x in (tmp_path / "cache" / "log.jsonl").read_text().splitlines()][-1]
    assert held["step"] == 4 and held["heldout_loss"] > 0 and held["heldout_x0_last"] > 0  # (and training unchanged)
    r = cli("generate", "a red circle", "--checkpoint", str(model), "--lora", str(tmp_path / "images" /
                                                                                  "lora.safetensors"),
            "-o", str(tmp_path / "x.png"), "-q")
    assert r.returncode == 0, r.stderr[-2000:]


def test_full_fine_tune_and_one_step_gan_write_loadable_models(world, tmp_path):
    from mobilediffusion.loading import load_model_config
    from mobilediffusion.pipeline import load_pipeline
    from mobilediffusion.train.config import default_config_path, load_stage_config, stage_config
    from mobilediffusion.train.finetune import train_on_data

    model, images = world
    before = load_pipeline(model).unet.state_dict()
    for name in ("finetune", "gan-data"):
        d = json.loads(default_config_path(name).read_text())
        d.update(steps=3, batch_size=2, resolution=64, log_every=1)
        path = train_on_data(stage_config(d), images, model, tmp_path / name, progress=False)
        pipe = load_pipeline(path, encoder=True)
        after = pipe.unet.state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before)  # the UNet trained
        assert pipe.encoder is not None
        if name == "gan-data":  # the GAN result samples in one step
            assert (pipe.config.default_steps, pipe.config.default_sampler) == (1, "onestep")
        else:
            assert pipe.config == load_model_config(model)
        (image,) = pipe("a red circle", seed=0)
        assert image.size == (pipe.config.resolution,) * 2
    assert load_stage_config(default_config_path("lora")).lora_rank == 16


def test_bad_input_is_refused_with_the_fix(world, tmp_path):
    model, images = world
    empty = tmp_path / "empty"
    empty.mkdir()
    common = ["--out", str(tmp_path / "run"), "--steps", "2", "--resolution", "64", "-q"]
    r = cli("train", "lora", "--data", str(empty), "--init", str(model), *common)
    assert r.returncode != 0 and "no image" in r.stderr.lower(), r.stderr[-1500:]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    r = cli("train", "lora", "--data", str(images), "--init", str(bad), *common)
    assert r.returncode != 0 and "error" in r.stderr.lower() and "Traceback" not in r.stderr, r.stderr[-1500:]
    r = cli("train", "lora", "--data", str(images), "--init", str(model), "--lora-rank", "999", *common)
    assert r.returncode != 0 and "--lora-rank <=" in r.stderr, r.stderr[-1500:]
    r = cli("train", "gan", "--init", str(model), "--lora-rank", "4", "--out", str(tmp_path / "x"))
    assert r.returncode != 0 and "add --data" in r.stderr
    # a run, then a resume with other data or another rank: refused, the run stays resumable
    r = cli("train", "lora", "--data", str(images), "--init", str(model), *common, "--stop-after", "1")
    assert r.returncode == 0, r.stderr[-1500:]
    other = tmp_path / "other"
    other.mkdir()
    for f in sorted(images.iterdir())[:4]:
        (other / f.name).write_bytes(f.read_bytes())
    r = cli("train", "lora", "--data", str(other), "--init", str(model), *common, "--resume")
    assert r.returncode != 0 and "other data" in r.stderr, r.stderr[-1500:]
    r = cli("train", "lora", "--data", str(images), "--init", str(model), *common, "--resume", "--lora-rank", "8")
    assert r.returncode != 0 and "lora_rank" in r.stderr, r.stderr[-1500:]
    r = cli("train", "lora", "--data", str(images), "--init", str(model), *common, "--resume")
    assert r.returncode == 0, r.stderr[-1500:]
    # a batch that does not fit the memory available: refused with the estimate, before any step
    import mobilediffusion.train.memory as memory

    real = memory.available_bytes
    memory.available_bytes = lambda: 64 << 20
    try:
        r = cli("train", "gan", "--data", str(images), "--init", str(model), "--out", str(tmp_path / "big"),
                "--resolution", "128", "-q")
    finally:
        memory.available_bytes = real
    assert r.returncode != 0 and "GiB are available; lower --batch-size" in r.stderr, r.stderr[-1500:]
    assert not (tmp_path / "big" / "checkpoint.safetensors").exists()
    # a cache of another model is refused
    from mobilediffusion.pipeline import DEFAULT_WEIGHTS

    r = cli("train", "lora", "--data", str(tmp_path / "run" / "cache"), "--init", str(DEFAULT_WEIGHTS),
            "--out", str(tmp_path / "y"), "--resolution", "64", "-q")
    assert r.returncode != 0 and "encoded by another model" in r.stderr, r.stderr[-1500:]


@pytest.mark.skipif(os.environ.get("MD_HEAVY_TESTS") != "1",
                    reason="opt-in: accelerate launches of 2 processes (gloo); set MD_HEAVY_TESTS=1")
@pytest.mark.parametrize("stage", ["lora", "gan"])
def test_two_processes_equal_one_on_your_data(world, tmp_path, stage):
    """`accelerate launch` with 2 processes: the same result as 1 process (<= 5e-4) with batches of 3 over buckets
    of 6 and 4 images (uneven shares, a process with no rows in a last batch of 1); stop + resume on 2 processes:
    the uninterrupted run."""
    model, images = world
    args = ["train", stage, "--data", str(images), "--init", str(model), "--steps", "8", "--batch-size", "3",
            "--resolution", "128", "-q"] + (["--lora-rank", "4", "--lr", "0.001"] if stage == "gan" else [])
    ddp = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mobilediffusion.cli", *args]
    for run in ([sys.executable, "-m", "mobilediffusion.cli", *args, "--out", str(tmp_path / "one")],
                ddp + ["--out", str(tmp_path / "two")], ddp + ["--out", str(tmp_path / "part"), "--stop-after", "5"],
                ddp + ["--out", str(tmp_path / "part"), "--resume"]):
        r = subprocess.run(run, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    one, two, part = (load_file(str(tmp_path / d / "lora.safetensors")) for d in ("one", "two", "part"))
    flat = lambda d: torch.cat([d[k].flatten() for k in sorted(d) if "lora_up" in k])  # noqa: E731 (trained)
    err = ((flat(two) - flat(one)).norm() / flat(one).norm()).item()
    print(f"{stage}: 2 processes vs 1: {err:.1e}")
    # 6.3e-6 (lora) / 3.6e-6 (gan) on AVX-512 CPUs; 1.2e-4 / 3.4e-5 on an AVX2 one, before this package had AVX2
    # kernels too: oneDNN's convolutions round by batch size there, and each process runs smaller batches
    assert err <= 5e-4
    assert all(torch.equal(part[k], two[k]) for k in one)


@pytest.mark.skipif(os.environ.get("MD_HEAVY_TESTS") != "1",
                    reason="opt-in: accelerate launches of 2 processes (gloo); set MD_HEAVY_TESTS=1")
def test_distill_with_fsdp_on_two_processes_equals_one(world, tmp_path):
    """`train distill --fsdp` under `accelerate launch` with 2 processes (student, projections, EMA and teacher
    sharded with FSDP2 over gloo): the same student as 1 process (<= 1e-5), 2 passes per step (gradient accumulation
    with the reduce-scatter held back), stop + resume under FSDP = the uninterrupted run, and the FSDP checkpoint
    resumes without FSDP on 1 process (it holds unsharded state). On 1 process --fsdp says it has nothing to
    shard."""
    model, images = world
    args = ["train", "distill", "--teacher", str(model), "--model", "md-shapes", "--data", str(images),
            "--resolution", "128", "--steps", "6", "--batch-size", "3", "-q"]
    cfg = tmp_path / "distill.json"
    d = json.loads(__import__("mobilediffusion.train.config", fromlist=["x"]).default_config_path("distill").read_text())
    cfg.write_text(json.dumps({**d, "grad_accum": 2, "checkpoint_every": 2, "threads": 1}))
    args += ["--config", str(cfg)]
    ddp = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mobilediffusion.cli", *args, "--fsdp"]
    one = [sys.executable, "-m", "mobilediffusion.cli", *args]
    for run in (one + ["--out", str(tmp_path / "one"), "--fsdp"], ddp + ["--out", str(tmp_path / "two")],
                ddp + ["--out", str(tmp_path / "part"), "--stop-after", "3"], ddp + ["--out", str(tmp_path / "part"),
                                                                                     "--resume"],
                ddp + ["--out", str(tmp_path / "mixed"), "--stop-after", "4"], one + ["--out", str(tmp_path / "mixed"),
                                                                                      "--resume"]):
        r = subprocess.run(run, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        if run[:3] == one[:3] and "--fsdp" in run:  # one process: said, and trained unsharded
            assert "fsdp: one process, nothing to shard" in r.stderr
        if run[:3] == ddp[:3]:  # each process holds half of the weights
            held, total = map(float, re.search(r"holds ([\d.]+) of ([\d.]+) MiB", r.stdout).groups())
            assert abs(held / total - 0.5) < 0.01, r.stdout
    unet = lambda d: {k: v for k, v in load_file(str(tmp_path / d / "model.safetensors")).items()  # noqa: E731
                      if k.startswith("unet.")}
    one, two, part, mixed = (unet(d) for d in ("one", "two", "part", "mixed"))
    assert one and set(one) == set(two)
    flat = lambda d: torch.cat([d[k].float().flatten() for k in sorted(d)])  # noqa: E731
    err = ((flat(two) - flat(one)).norm() / flat(one).norm()).item()
    err_mixed = ((flat(mixed) - flat(one)).norm() / flat(one).norm()).item()
    print(f"distill, FSDP on 2 processes vs 1: {err:.1e}; FSDP stop + resume on 1 process vs 1: {err_mixed:.1e}")
    assert err <= 1e-5 and err_mixed <= 1e-5
    assert all(torch.equal(part[k], two[k]) for k in one)


def test_trainer_node_saves_a_one_step_lora_the_loader_reads(plugin, world, tmp_path, monkeypatch):
    """Train MobileDiffusion LoRA (outside ComfyUI: models/loras is ./loras): LATENT + one CONDITIONING per image as
    ComfyUI's dataset node gives them, an MD_UNET; the file is never replaced (a number is appended), the LOSS_MAP
    has a value per step, and the LoRA changes the UNet as the loader applies it. Bad wiring: one clear error."""
    import importlib

    monkeypatch.chdir(tmp_path)
    common = importlib.import_module(f"{plugin.__name__}.nodes._common")
    monkeypatch.setattr(common, "_comfy", lambda module: None)  # as outside ComfyUI
    pipeline = importlib.import_module(f"{plugin.__name__}.mobilediffusion.pipeline")
    model, _ = world
    pipe = pipeline.load_pipeline(model)
    handle = common.UNetHandle(pipe.unet, pipe.config, "sd-tiny")
    g = torch.Generator().manual_seed(0)
    latents = {"samples": torch.randn(3, pipe.unet.config.in_channels, 8, 8, generator=g)}
    captions = ["a red circle", "a blue square", "a green triangle"]
    positive = [[pipe.text_encoder.encode(pipe.text_encoder.tokenize([c])), {"pooled_output": None}] for c in captions]
    node = plugin.NODE_CLASS_MAPPINGS["TrainMobileDiffusionLoRA"]()
    args = dict(latents=latents, positive=positive, objective="one-step (DiffusionGAN)", steps=3, batch_size=2,
                rank=4, learning_rate=1e-3, seed=0, lora_name="mine", unet=handle)
    with torch.inference_mode():  # as ComfyUI runs nodes, on inputs made in inference mode
        out = node.train(**{**args, "latents": {"samples": latents["samples"].clone()},
                            "positive": [[c.clone(), d] for c, d in positive]})
    loss, name = out["result"]
    assert name == "mine.safetensors" and len(loss["loss"]) == 3 and all(np.isfinite(loss["loss"]))
    assert node.train(**{**args, "steps": 1})["result"][1] == "mine_00001.safetensors"  # never replaced
    lora = tmp_path / "loras" / "mine.safetensors"
    keys = load_file(str(lora))
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    lora_mod = importlib.import_module(f"{plugin.__name__}.mobilediffusion.lora")
    x, t, c = latents["samples"][:1], torch.tensor([999]), positive[0][0]
    with torch.no_grad():
        changed = lora_mod.with_lora(pipe.unet, str(lora))(x, t, c)
        plain = pipe.unet(x, t, c)
    assert (changed - plain).abs().max() > 0
    errors = importlib.import_module(f"{plugin.__name__}.mobilediffusion.errors")
    for bad, words in ((dict(positive=positive[:2]), "2 captions for 3 images"), (dict(unet=None), "exactly one"),
                       (dict(lora_name="../x"), "plain file name"),
                       (dict(positive=[[torch.zeros(1, 77, 5), {}]]), "width 5")):
        with pytest.raises(errors.ConfigError, match=words):
            node.train(**{**args, **bad})


def test_distillation_matches_features_by_resolution():
    from mobilediffusion.train.distill import feature_pairs, student_config, up_factors

    teacher = PRESETS["sd15"]
    student = student_config("md-shapes", teacher)
    assert up_factors(teacher.unet) == [8, 4, 2, 1] and up_factors(PRESETS["md-shapes"].unet) == [4, 2, 1]
    assert feature_pairs(student, teacher.unet) == [(0, 1), (1, 2), (2, 3)]
    assert (student.in_channels, student.cross_attention_dim, student.prediction_type) == (4, 768, "epsilon")


def test_distill_on_images_and_data_free(world, tmp_path):
    """`train distill` on the images and from a prompt list (the teacher samples the latents, cached and reused): a
    native MobileDiffusion-layout student with the teacher's text encoder and decoder."""
    from mobilediffusion.pipeline import load_pipeline

    model, images = world
    (tmp_path / "prompts.txt").write_text("a red circle\n\na blue square on the right\n")
    common = ["--teacher", str(model), "--model", "md-shapes", "--steps", "3", "--batch-size", "4", "-q"]
    runs = {"images": ["--data", str(images), "--resolution", "128"], "prompts": ["--prompts",
                                                                                  str(tmp_path / "prompts.txt")]}
    teacher = load_pipeline(model)
    for name, args in runs.items():
        r = cli("train", "distill", *args, "--out", str(tmp_path / name), *common)
        assert r.returncode == 0, r.stderr[-2000:]
        student = load_pipeline(tmp_path / name / "model.safetensors")
        assert student.config.unet.block_out_channels == PRESETS["md-shapes"].unet.block_out_channels
        assert torch.equal(student.text_encoder.encode(student.text_encoder.tokenize(["a"])),
                           teacher.text_encoder.encode(teacher.text_encoder.tokenize(["a"])))
        row = json.loads((tmp_path / name / "log.jsonl").read_text().splitlines()[-1])
        assert {"output", "feature"} <= set(row) and ("task" in row) == (name == "images")
    # held-out losses between steps (the student's forward there must not feed the feature taps)
    from mobilediffusion.train.config import default_config_path, stage_config
    from mobilediffusion.train.distill import train_distill

    d = json.loads(default_config_path("distill").read_text())
    d.update(steps=3, batch_size=4, resolution=128, checkpoint_every=1, log_every=1)
    train_distill(stage_config(d), model, tmp_path / "held", data=tmp_path / "images" / "cache", heldout=images,
                  progress=False)
    rows = [json.loads(x) for x in (tmp_path / "held" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "heldout_loss" in r] == [1, 2, 3]
    latents = load_file(str(tmp_path / "prompts" / "teacher_latents.safetensors"))["latents"]
    assert latents.shape[0] == 2 * 4  # 2 prompts x samples_per_prompt
    for args in (runs["images"] + runs["prompts"], []):
        r = cli("train", "distill", *args, "--out", str(tmp_path / "bad"), *common)
        assert r.returncode != 0 and "--data IMAGES or --prompts FILE" in r.stderr, r.stderr[-1000:]


@pytest.mark.parametrize("stage", ["lora", "gan-data", "distill"])
def test_accumulation_checkpointing_and_bf16_keep_the_update(world, tmp_path, stage):
    """grad_accum 2 (each batch in two passes: <= 1e-4, summation order) and gradient checkpointing (<= 1e-6) give the
    plain run's result; under bf16 autocast the first step's loss is the float32 one to 3% (and the weights differ: autocast is on)."""
    from mobilediffusion.train.config import default_config_path, stage_config
    from mobilediffusion.train.distill import train_distill
    from mobilediffusion.train.finetune import train_on_data

    model, images = world
    d = json.loads(default_config_path(stage).read_text())
    d.update(steps=2, batch_size=4, resolution=64, log_every=1, checkpoint_every=100, lr=1e-3)
    if stage == "gan-data":
        d.update(lora_rank=4, d_lr=1e-3)

    def result(name, **over):
        cfg = stage_config({**d, **over})
        if stage == "distill":
            path = train_distill(cfg, model, tmp_path / name, data=tmp_path / "plain" / "cache" if name != "plain"
                                 else images, progress=False)
        else:
            path = train_on_data(cfg, images if name == "plain" else tmp_path / "plain" / "cache", model,
                                 tmp_path / name, progress=False)
        t = load_file(str(path))
        return torch.cat([t[k].float().flatten() for k in sorted(t) if "lora_up" in k or k.startswith("unet.")])

    def first_loss(name):
        row = json.loads((tmp_path / name / "log.jsonl").read_text().splitlines()[0])
        return row["loss" if "loss" in row else "g_loss"]

    plain = result("plain")
    checks = (("accum", dict(grad_accum=2), 1e-4),  # 5.0e-5 seen on an AVX2 CPU ("ckpt", dict(gradient_checkpointing=True), 1e-6),
              ("bf16", dict(mixed_precision="bf16"), None))
    picked = {"lora": checks, "gan-data": checks[:1], "distill": checks[1:2]}[stage]  # (each stage's code once)
    for name, over, tol in picked:
        got = result(name, **over)
        err = ((got - plain).norm() / plain.norm()).item()
        print(f"{stage} {name}: weights {err:.1e}, first loss {first_loss(name):.5f} vs {first_loss('plain'):.5f}")
        if tol is not None:
            assert err <= tol, (name, err)
        else:
            assert err > 0 and abs(first_loss(name) / first_loss("plain") - 1) <= 0.03


def test_recipe_stages_from_a_folder_as_typed(tmp_path):
    """`train scenes` -> `train autoencoder --data` -> `train diffusion --data --init autoencoder.safetensors` (stage
    b: UNet + text encoder from scratch) -> `train gan --data --config gan.json` (stage c), through the CLI."""
    from mobilediffusion.loading import load_model_config
    from mobilediffusion.train.config import default_config_path

    assert cli("train", "scenes", "--out", str(tmp_path / "scenes"), "-n", "8").returncode == 0
    data, tiny = str(tmp_path / "scenes"), ("--steps", "2", "--batch-size", "2", "-q")
    r = cli("train", "autoencoder", "--data", data, "--out", str(tmp_path / "ae"), *tiny)
    assert r.returncode == 0, r.stderr
    ae = tmp_path / "ae" / "autoencoder.safetensors"
    part = ("--data", data, "--out", str(tmp_path / "ae-part"), *tiny)  # stop + resume: the uninterrupted run
    assert cli("train", "autoencoder", *part, "--stop-after", "1").returncode == 0
    assert cli("train", "autoencoder", *part, "--resume").returncode == 0
    whole, resumed = load_file(str(ae)), load_file(str(tmp_path / "ae-part" / "autoencoder.safetensors"))
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    r = cli("train", "diffusion", "--data", data, "--init", str(ae), "--out", str(tmp_path / "b"), *tiny)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "b" / "config.json").read_text())["stage"] == "diffusion"  # not a fine-tune
    model = tmp_path / "b" / "model.safetensors"
    assert load_model_config(model).unet == PRESETS["md-shapes-128"].unet  # the packaged recipe's preset
    # the recipe's stage (c) on the folder: its own config; without it `gan --data` is the checkpoint fine-tune
    r = cli("train", "gan", "--data", data, "--init", str(model), "--config", str(default_config_path("gan")),
            "--out", str(tmp_path / "c"), *tiny)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "c" / "config.json").read_text())["stage"] == "gan"
    # refusals, before any work
    r = cli("train", "gan", "--data", data, "--init", str(model), "--config", str(default_config_path("control")),
            "--out", str(tmp_path / "x"), *tiny)
    assert r.returncode != 0 and "'gan'" in r.stderr and not (tmp_path / "x").exists()
    r = cli("train", "diffusion", "--data", data, "--init", str(ae), "--lora-rank", "4", "--out", str(tmp_path / "y"),
            *tiny)
    assert r.returncode != 0 and "--lora-rank" in r.stderr and not (tmp_path / "y").exists()
