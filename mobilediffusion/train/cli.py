"""`mobilediffusion train ...`: the three training stages, the benchmark and packing the default model.

    mobilediffusion train autoencoder --out runs/ae
    mobilediffusion train diffusion --init runs/ae/autoencoder.safetensors --out runs/diffusion
    mobilediffusion train gan --init runs/diffusion/model.safetensors --out runs/gan
    mobilediffusion train control --init runs/gan/model.safetensors --out runs/control   (a control plugin)
    mobilediffusion train evaluate runs/gan/model.safetensors --pretrained runs/diffusion/model.safetensors
    mobilediffusion train pack runs/gan/model.safetensors default.safetensors
    mobilediffusion train evaluate-control runs/control/control.safetensors
    mobilediffusion train cache --data my_images/ --init model.safetensors --out runs/cache   (latents + captions)

Your own data, from any checkpoint the loaders read (train/finetune.py):
    mobilediffusion train diffusion --data my_images/ --init sd15.safetensors --out runs/ft     (full UNet)
    mobilediffusion train lora --data my_images/ --init sd15.safetensors --out runs/lora        (kohya LoRA)
    mobilediffusion train gan --data my_images/ --init sd15.safetensors --lora-rank 16 --out runs/one-step

Each stage reads its packaged config (train/configs/<stage>.json) unless --config is given,
writes resumable checkpoints to --out (continue with --resume) and its result file there. On
several GPUs or machines run the same command under `accelerate launch -m mobilediffusion.cli train ...`.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError

STAGE_HELP = {
    "autoencoder": "stage (a): the lite autoencoder (encoder + lite decoder)",
    "diffusion": "stage (b): the diffusion UNet and text encoder (needs --init autoencoder.safetensors); with --data: "
                 "fine-tune a checkpoint's UNet on your images",
    "lora": "a LoRA (kohya keys) for a checkpoint, trained on your images (--data, --init)",
    "gan": "stage (c): DiffusionGAN fine-tune to one step (needs --init model.safetensors of stage b); with --data: "
           "of any checkpoint on your images (--lora-rank R: a one-step LoRA)",
    "control": "stage (d): a control plugin (edges / scribbles) for a one-step model (--init: default model)",
    "distill": "distil an SD-family --teacher into the MobileDiffusion layout of --model PRESET, on --data or a "
               "--prompts list (data-free)",
}
DATA_STAGES = ("autoencoder", "diffusion", "lora", "gan")  # take --data
SCENE_STAGES = ("autoencoder", "diffusion", "gan")  # the default's recipe; with --data they train on those images
DATA_CONFIG = {"diffusion": "finetune", "lora": "lora", "gan": "gan-data", "distill": "distill"}  # with --data


def add_parser(subparsers) -> None:
    """Register `train` and its subcommands on the main CLI's subparsers."""
    p = subparsers.add_parser("train", help="train the default model's stages on synthetic scenes")
    sub = p.add_subparsers(dest="train_command", required=True)
    for stage, text in STAGE_HELP.items():
        s = sub.add_parser(stage, help=text)
        s.add_argument("--config", help=f"stage config JSON (default: the packaged configs/{stage}.json)")
        s.add_argument("--out", required=True, help="output folder: checkpoints, log.jsonl and the result file")
        if stage == "control":
            s.add_argument("--init", help="the one-step model file the plugin is for (default: the shipped default)")
        elif stage == "distill":
            s.add_argument("--teacher", required=True, help="the teacher: any checkpoint the loaders read")
            s.add_argument("--model", help="the student's preset (MobileDiffusion layout; config default md-shapes)")
            s.add_argument("--prompts", help="data-free: a text file with one prompt per line; the teacher samples "
                           "the training latents")
            s.add_argument("--fsdp", action="store_true", default=None, help="under `accelerate launch` with several "
                           "processes: shard the student, teacher and optimizer over them (FSDP) instead of "
                           "replicating them (DDP)")
        elif stage != "autoencoder":
            s.add_argument("--init", required=True, help="the previous stage's result file; with --data: any "
                           "checkpoint the loaders read (SD 1.x/2.x single file or folder, BK-SDM, SDXS, native)")
        if stage in DATA_STAGES or stage == "distill":
            s.add_argument("--data", required=stage == "lora", help="your images: a folder (.txt / .caption beside "
                           "each image, kohya N_name repeat folders), a metadata.jsonl / .csv, tar shards "
                           "(shards/{0000..0099}.tar) or a cache `train cache` wrote")
        if stage in ("diffusion", "lora", "gan", "distill"):  # fine-tuning a checkpoint on your images
            if stage != "distill":
                s.add_argument("--lora-rank", type=int, help="train a LoRA of this rank (written to "
                               "OUT/lora.safetensors in kohya keys) instead of the whole UNet")
            s.add_argument("--resolution", type=int, help="bucket area for --data: up to RESOLUTION^2 pixels, 64 px "
                           "steps, never upscaled (config default 512)")
            s.add_argument("--heldout", help="held-out images (any --data form): their denoising loss and one-step "
                           "error are logged to log.jsonl at every checkpoint")
        s.add_argument("--steps", type=int, help="override the config's steps")
        s.add_argument("--batch-size", type=int, help="override the config's batch_size (summed over processes)")
        s.add_argument("--lr", type=float, help="override the config's learning rate")
        s.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
        s.add_argument("--stop-after", type=int, help="stop after this many steps (resume later)")
        s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
        s.set_defaults(func=cmd_stage, stage=stage)
    e = sub.add_parser("evaluate", help="prompt-following accuracy and FSD on held-out captions")
    e.add_argument("model", help="a trained model file (the GAN stage's)")
    e.add_argument("--pretrained", help="also score this model (stage b) with 1, 4 and 20 DDIM steps")
    e.add_argument("--lora", help="merge this LoRA into MODEL first (e.g. a one-step LoRA of `train gan --lora-rank`)")
    e.add_argument("--sampling", default="onestep:1", help="how MODEL samples: SAMPLER:STEPS[,SAMPLER:STEPS...] "
                   "(default onestep:1), e.g. onestep:1,ddim:20")
    e.add_argument("-n", type=int, default=128, help="held-out captions (default 128)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--config", help="a stage config whose \"data\" describes the scenes the model was trained on "
                   "(default: the packaged diffusion stage's)")
    e.set_defaults(func=cmd_evaluate)
    c = sub.add_parser("evaluate-control", help="a control plugin's object-mask IoU on held-out scenes, with and "
                       "without it")
    c.add_argument("plugin", help="a control plugin file (train control's, or a shipped one: md-shapes-scribble)")
    c.add_argument("--model", help="the one-step model it is for (default: the shipped default)")
    c.add_argument("-n", type=int, default=128, help="held-out scenes (default 128)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--config", help="the control stage config the plugin was trained with (its \"data\": the scenes; "
                   "default: the packaged control config)")
    c.set_defaults(func=cmd_evaluate_control)
    c = sub.add_parser("cache", help="encode training data (an image folder, metadata.jsonl / .csv or tar shards) into "
                       "cached latents and text-encoder outputs, reused by later runs")
    c.add_argument("--data", required=True, help="an image folder, a metadata.jsonl / .csv, or shards/{0000..0009}.tar")
    c.add_argument("--init", help="the model whose encoder and text encoder encode (default: the shipped default)")
    c.add_argument("--out", required=True, help="cache folder (an existing cache there is reused where unchanged)")
    c.add_argument("--resolution", type=int, default=512, help="bucket area: up to RESOLUTION x RESOLUTION pixels, "
                   "sides in 64 px steps, never upscaled (default 512)")
    c.add_argument("--crop", choices=("center", "random"), default="center")
    c.add_argument("--flip", action="store_true", help="mirror half of the images")
    c.add_argument("--seed", type=int, default=0, help="random crops and flips")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_cache)
    w = sub.add_parser("scenes", help="write synthetic scenes as an image folder with .txt captions (training data "
                       "for --data, the same as any folder of yours)")
    w.add_argument("--out", required=True, help="folder to write scene_00000.png + scene_00000.txt ... into")
    w.add_argument("-n", type=int, default=4096, help="how many (items 0..n-1 of the split; default 4096)")
    w.add_argument("--split", choices=("train", "heldout"), default="train")
    w.add_argument("--config", help="a stage config whose \"data\" describes the scenes (default: the diffusion "
                   "stage's)")
    w.set_defaults(func=cmd_scenes)
    k = sub.add_parser("pack", help="write a model file in float16 (the shipped default's form)")
    k.add_argument("model")
    k.add_argument("output", help=".safetensors file to write")
    k.set_defaults(func=cmd_pack)


def cmd_stage(a) -> int:
    data = getattr(a, "data", None)
    cfg = _stage_config(a, data)  # 1. checked before any work
    if a.stop_after is not None and a.stop_after < 1:
        raise ConfigError(f"--stop-after must be >= 1, got {a.stop_after}")
    init = getattr(a, "init", None)
    if a.stage == "control" and init is None:
        from ..pipeline import DEFAULT_WEIGHTS

        init = str(DEFAULT_WEIGHTS)
    if init is not None and not (Path(init).exists() if data else Path(init).is_file()):
        raise ConfigError(f"--init {init} does not exist; pass " + ("a checkpoint the loaders read" if data else
                                                                     "the previous stage's result file"))
    acc = _accelerator()
    if acc is not None and str(acc.distributed_type).endswith("FSDP") and a.stage != "distill":
        raise ConfigError(f"FSDP shards the distillation stage only; launch `train {a.stage}` without --use_fsdp "
                          "(accelerate then runs DDP)")
    kw = dict(resume=a.resume, stop_after=a.stop_after, progress=not a.quiet, acc=acc)
    if a.stage == "distill":  # 2. train
        from .distill import train_distill

        if not Path(a.teacher).exists():
            raise ConfigError(f"--teacher {a.teacher} does not exist; give a checkpoint the loaders read")
        path = train_distill(cfg, a.teacher, a.out, data=data, prompts=a.prompts, heldout=a.heldout, **kw)
    elif cfg.stage not in SCENE_STAGES + ("control",):
        from .finetune import train_on_data

        path = train_on_data(cfg, data, init, a.out, heldout=a.heldout, **kw)
    elif a.stage == "autoencoder":
        from .autoencoder import train_autoencoder

        path = train_autoencoder(cfg, a.out, data=data, **kw)
    elif a.stage == "diffusion":
        from .diffusion import train_diffusion

        path = train_diffusion(cfg, init, a.out, data=data, **kw)
    elif a.stage == "gan":
        from .gan import train_gan

        path = train_gan(cfg, init, a.out, data=data, **kw)
    else:
        from .control import train_control

        path = train_control(cfg, init, a.out, **kw)
    if acc is not None and not acc.is_main_process:
        return 0  # (the main process reports)
    if path is None:
        print(f"stopped; continue with: mobilediffusion train {a.stage} ... --out {a.out} --resume")
    else:
        print(f"wrote {path}")
    return 0


def _stage_config(a, data):
    """The stage's config (--config or the packaged one) with the command line's overrides."""
    import json

    from .config import default_config_path, load_stage_config, stage_config, to_json

    packaged = DATA_CONFIG[a.stage] if data is not None and a.stage != "autoencoder" else a.stage
    if a.stage == "diffusion" and data is not None and _is_autoencoder(getattr(a, "init", None)):
        packaged = "diffusion"  # stage (b) of the default's recipe on these images: UNet + text encoder from scratch
    if a.stage == "distill" and (data is None) == (getattr(a, "prompts", None) is None):
        raise ConfigError("train distill needs --data IMAGES or --prompts FILE (data-free), one of them")
    cfg = load_stage_config(a.config or default_config_path(packaged))
    wanted = {load_stage_config(default_config_path(packaged)).stage}
    if data is not None and a.stage in SCENE_STAGES:
        wanted.add(a.stage)  # the recipe's own stage config trains it on --data
    if cfg.stage not in wanted:
        raise ConfigError(f"this config is for stage {cfg.stage!r}; `train {a.stage}`{' --data' * bool(data)} needs "
                          f"a {' or '.join(map(repr, sorted(wanted)))} config (see {default_config_path(packaged)})")
    if data is not None and cfg.stage in SCENE_STAGES and (getattr(a, "heldout", None) or getattr(a, "lora_rank", None)
                                                           or getattr(a, "resolution", None)):
        raise ConfigError(f"--heldout, --lora-rank and --resolution are for fine-tuning a checkpoint; stage "
                          f"{cfg.stage!r} trains at its config's data.resolution ({cfg.data.resolution} px)")
    over = {k: v for k, v in (("steps", a.steps), ("batch_size", a.batch_size), ("lr", a.lr),
                              ("lora_rank", getattr(a, "lora_rank", None)),
                              ("resolution", getattr(a, "resolution", None)),
                              ("model", getattr(a, "model", None)), ("fsdp", getattr(a, "fsdp", None)))
            if v is not None}
    if data is None and a.stage != "distill" and getattr(a, "heldout", None):
        raise ConfigError("--heldout is for training on your images: add --data PATH")
    if data is None and ({"lora_rank", "resolution"} & set(over)):
        raise ConfigError("--lora-rank and --resolution are for training on your images: add --data PATH")
    if a.stage == "lora" and over.get("lora_rank", cfg.lora_rank) < 1:
        raise ConfigError("`train lora` needs --lora-rank >= 1 (for a full fine-tune use `train diffusion --data`)")
    if not over:
        return cfg
    d = json.loads(to_json(cfg))
    d.update(over)
    return stage_config(d)


def cmd_evaluate(a) -> int:
    from ..pipeline import load_pipeline
    from .benchmark import evaluate_pipeline, quality_table
    from .config import default_config_path, load_stage_config

    scenes = load_stage_config(a.config or default_config_path("diffusion")).data
    reports = {}
    if a.pretrained:
        pre = load_pipeline(a.pretrained)
        for steps, sampler in ((1, "onestep"), (4, "ddim"), (20, "ddim")):
            reports[f"pre-trained, {steps} step{'s' * (steps > 1)} ({sampler})"] = evaluate_pipeline(
                pre, scenes, n=a.n, sampler=sampler, steps=steps, seed=a.seed)
    pipe = load_pipeline(a.model)
    name = Path(a.model).name
    if a.lora:
        from ..lora import apply_lora

        apply_lora(pipe, a.lora)
        name += f" + {Path(a.lora).name}"
    for sampler, steps in _sampling(a.sampling):
        label = "DiffusionGAN, 1 step" if (a.sampling, a.lora) == ("onestep:1", None) else \
            f"{name}, {steps} step{'s' * (steps > 1)} ({sampler})"
        reports[label] = evaluate_pipeline(pipe, scenes, n=a.n, sampler=sampler, steps=steps, seed=a.seed)
    print(quality_table(reports))
    return 0


def _sampling(text: str) -> list[tuple[str, int]]:
    from ..sampling import SAMPLERS

    out = []
    for part in text.split(","):
        sampler, _, steps = part.strip().partition(":")
        if sampler not in SAMPLERS or not steps.isdigit() or int(steps) < 1:
            raise ConfigError(f"--sampling takes SAMPLER:STEPS items ({', '.join(SAMPLERS)}; steps >= 1), got {part!r}")
        out.append((sampler, int(steps)))
    return out


def cmd_evaluate_control(a) -> int:
    from ..control.load import load_control, resolve_control
    from ..pipeline import load_pipeline
    from .config import default_config_path, load_stage_config
    from .control import control_iou, iou_table

    if a.n < 1:
        raise ConfigError(f"-n must be >= 1, got {a.n}")
    scenes = load_stage_config(a.config or default_config_path("control")).data
    pipe = load_pipeline(a.model)
    plugin = load_control(resolve_control(a.plugin), base=pipe.unet)
    results = {f"edges{' +' + str(t) + ' px' if t else ''}": control_iou(pipe, plugin, scenes, n=a.n, seed=a.seed,
                                                                         thickness=t) for t in (0, 1)}
    print(iou_table(results))
    print(f"\n{a.n} held-out scenes, one step; IoU of the generated object's mask with the scene's")
    return 0


def cmd_cache(a) -> int:
    from tqdm import tqdm

    from ..pipeline import DEFAULT_WEIGHTS, load_pipeline
    from .cache import CacheSpec, build_cache, model_key
    from .images import BucketConfig
    from .sources import open_source

    buckets = BucketConfig(resolution=a.resolution, crop=a.crop, flip=a.flip)  # 1. checked before any work
    source = open_source(a.data)
    init = a.init or str(DEFAULT_WEIGHTS)
    pipe = load_pipeline(init, encoder=True)
    spec = CacheSpec(model=model_key(init, pipe.config.to_json()), buckets=buckets, seed=a.seed)
    with tqdm(desc="encoding", unit="image", disable=a.quiet) as bar:
        summary = build_cache(source, pipe, a.out, spec, progress=bar.update)
    skipped = ", ".join(f"{n} {why}" for why, n in summary["skipped"].items()) or "none"
    buckets_text = ", ".join(f"{k}: {n}" for k, n in summary["buckets"].items())
    print(f"wrote {a.out}: {summary['entries']} entries ({summary['encoded']} encoded, {summary['reused']} reused) in "
          f"{summary['seconds']} s; buckets {buckets_text}; skipped: {skipped}")
    return 0


def cmd_scenes(a) -> int:
    from PIL import Image

    from .config import default_config_path, load_stage_config
    from .data import SyntheticScenes

    if a.n < 1:
        raise ConfigError(f"-n must be >= 1, got {a.n}")
    scenes = SyntheticScenes(load_stage_config(a.config or default_config_path("diffusion")).data, a.split,
                             length=a.n)
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty; choose a new folder (nothing was written)")
    out.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(a.n - 1)))
    for i in range(a.n):
        image, caption, _ = scenes[i]
        Image.fromarray(image).save(out / f"scene_{i:0{width}d}.png")
        (out / f"scene_{i:0{width}d}.txt").write_text(caption + "\n")
    print(f"wrote {a.n} {a.split} scenes ({scenes.cfg.resolution} px) with captions to {out}")
    return 0


def cmd_pack(a) -> int:
    import torch

    from ..loading import load_encoder
    from ..loading import load_decoder, load_model_config, load_text_encoder, load_unet
    from ..weights.native import save_native

    m = a.model
    encoder = load_encoder(m)
    path = save_native(a.output, load_model_config(m), load_unet(m), load_text_encoder(m), load_decoder(m), encoder,
                       dtype=torch.float16)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def _is_autoencoder(path) -> bool:
    """Whether `path` is a file `train autoencoder` wrote (stage (b) starts from one)."""
    if path is None or not Path(path).is_file() or not str(path).endswith(".safetensors"):
        return False
    from ..weights.io import read_metadata
    from .autoencoder import AUTOENCODER_CONFIG_KEY

    try:
        return AUTOENCODER_CONFIG_KEY in read_metadata(path)
    except Exception:  # not a readable safetensors file: the loaders' own error comes later
        return False


def _accelerator():
    """An Accelerator when there is more than one process or a GPU; None for a plain CPU run."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or torch.cuda.is_available():
        from .loop import accelerator

        return accelerator()
    return None
