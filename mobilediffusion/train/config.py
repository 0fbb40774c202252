"""Training configs, one frozen dataclass per stage, read from JSON and checked before training starts.

    cfg = load_stage_config("configs/diffusion.json")   # or a dict; the "stage" key picks the class

A file names its `stage` ("autoencoder", "diffusion", "gan"); unknown keys and impossible values
are a ConfigError naming the key and the fix. `data` holds SceneConfig fields (the synthetic set).
Pure Python: no torch import.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..presets import PRESETS
from .data import SceneConfig

CONFIG_DIR = Path(__file__).parent / "configs"  # the packaged config of each stage: <stage>.json


@dataclass(frozen=True)
class StageConfig:
    """Fields every stage shares."""

    stage: str = ""  # set by each subclass
    model: str = "md-shapes"  # preset giving the architecture (presets.PRESETS)
    seed: int = 0  # drives initialisation, every batch and every noise draw (same seed -> same weights)
    steps: int = 1000  # optimisation steps
    batch_size: int = 32  # images per step, summed over processes
    lr: float = 1e-3  # peak learning rate (Adam)
    warmup: int = 50  # steps of linear learning-rate warm-up
    min_lr_ratio: float = 1.0  # cosine decay to lr * this by the last step; 1.0 keeps the lr constant
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    pool_size: int = 4096  # training images rendered once at start (items 0..pool_size-1 of the train split)
    checkpoint_every: int = 250  # steps between resumable checkpoints (and one at the end)
    log_every: int = 10  # steps between lines in log.jsonl
    threads: int = 1  # torch intra-op threads; 1 is fastest on a shared small CPU
    data: SceneConfig = field(default_factory=SceneConfig)  # the synthetic scenes (mobilediffusion.train.data)

    def __post_init__(self):
        if self.model not in PRESETS:
            raise ConfigError(f"unknown model preset {self.model!r}; choose one of: {', '.join(PRESETS)}")
        if PRESETS[self.model].decoder.kind != "kl":
            raise ConfigError(f"preset {self.model!r} has a {PRESETS[self.model].decoder.kind!r} decoder; training "
                              "needs a 'kl' (lite) decoder, whose encoder mirrors it")
        for name in ("steps", "batch_size", "pool_size", "checkpoint_every", "log_every", "threads"):
            _positive_int(self, name)
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"warmup must be an integer >= 0, got {self.warmup!r}")
        if not 0 < self.lr < 1:
            raise ConfigError(f"lr must be in (0, 1), got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.grad_clip < 0:
            raise ConfigError(f"grad_clip must be >= 0 (0 disables it), got {self.grad_clip!r}")
        res, f = self.data.resolution, PRESETS[self.model].decoder.upscale * PRESETS[self.model].unet.size_multiple
        if res % f:
            raise ConfigError(f"data.resolution {res} must be a multiple of {f} for model {self.model!r}")


@dataclass(frozen=True)
class AutoencoderConfig(StageConfig):
    """Stage (a): the lite autoencoder (encoder + lite decoder), L1 + MSE reconstruction + a small KL term."""

    stage: str = "autoencoder"
    kl_weight: float = 1e-4  # weight of KL(q(z|x) || N(0, I)); keeps the latent space smooth and bounded
    mse_weight: float = 1.0  # MSE next to L1 (both on images in [-1, 1])
    # extra weight of object pixels (those away from the image's median colour, i.e. its background): the
    # objects cover ~5% of a scene, and an unweighted loss learns the background long before their colours
    foreground_weight: float = 20.0

    def __post_init__(self):
        super().__post_init__()
        _non_negative(self, "kl_weight", "mse_weight", "foreground_weight")


@dataclass(frozen=True)
class DiffusionConfig(StageConfig):
    """Stage (b): the UNet and text encoder, v-prediction MSE on latents of the trained autoencoder."""

    stage: str = "diffusion"
    caption_dropout: float = 0.1  # share of captions replaced by "" (enables classifier-free guidance)
    ema_decay: float = 0.999  # exponential moving average of the weights; the EMA is what is saved
    text_lr_ratio: float = 1.0  # text encoder lr / lr

    def __post_init__(self):
        super().__post_init__()
        _unit(self, "caption_dropout", closed=False)
        _unit(self, "ema_decay", closed=False)
        _non_negative(self, "text_lr_ratio")


@dataclass(frozen=True)
class GanConfig(StageConfig):
    """Stage (c): DiffusionGAN (UFOGen-style) fine-tune of the UNet to one step; text encoder frozen.

    Generator G and discriminator D start from the pre-trained UNet. G denoises x_t in one step to
    x0_hat (reconstruction loss against x0); x0_hat and x0 are noised to a discriminator level s
    with the same noise and D(x_s, s, text) judges them (non-saturating GAN loss).
    """

    stage: str = "gan"
    lr: float = 1e-4
    d_lr: float = 1e-4  # discriminator learning rate
    adv_weight: float = 0.1  # weight of G's adversarial loss next to the reconstruction loss (weight 1)
    last_step_prob: float = 0.5  # share of samples at t = T - 1, where one-step sampling starts; others ~ U[0, T)
    d_max_timestep: int = 250  # D's noise level s ~ U{0..d_max_timestep} (md-shapes: alpha_bar(250) ~ 0.5)
    ema_decay: float = 0.99

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.d_lr < 1:
            raise ConfigError(f"d_lr must be in (0, 1), got {self.d_lr!r}")
        _non_negative(self, "adv_weight")
        _unit(self, "last_step_prob", closed=True)
        _unit(self, "ema_decay", closed=False)
        T = PRESETS[self.model].schedule.num_train_timesteps
        if not isinstance(self.d_max_timestep, int) or not 0 <= self.d_max_timestep < T:
            raise ConfigError(f"d_max_timestep must be an integer in [0, {T - 1}], got {self.d_max_timestep!r}")


@dataclass(frozen=True)
class ControlConfig(StageConfig):
    """Stage (d): a control plugin (T2I-style adapter on edge maps / scribbles) for a trained one-step model, which
    stays frozen (train/control.py)."""

    stage: str = "control"
    last_step_prob: float = 0.75  # share of samples at t = T - 1 (one-step sampling); others ~ U[0, T)
    unplaced_prob: float = 0.5  # share of captions without their position words: the hint alone places the object
    thick_prob: float = 0.5  # share of hints whose strokes are widened by a pixel (drawn scribbles)
    ema_decay: float = 0.99

    def __post_init__(self):
        super().__post_init__()
        for name in ("last_step_prob", "unplaced_prob", "thick_prob"):
            _unit(self, name, closed=True)
        _unit(self, "ema_decay", closed=False)


@dataclass(frozen=True)
class DataFields:
    """Training on your own data from a checkpoint (`--data`, `--init`): the image buckets, and a LoRA or not.
    (`model`, `pool_size` and `data` of StageConfig describe the synthetic scenes and do not apply.)"""

    resolution: int = 512  # bucket area: up to resolution x resolution pixels, sides in 64 px steps, never upscaled
    crop: str = "center"  # "center" or "random"
    flip: bool = False  # mirror half of the images (set per item and repeat by the seed)
    lora_rank: int = 0  # 0: full fine-tune of the UNet; R: a rank-R LoRA written in kohya keys (lora.safetensors)
    lora_alpha: float = 0.0  # LoRA scale alpha / rank; 0 means alpha = rank (scale 1)
    lora_targets: str = "transformer"  # "transformer" (kohya's default) or "all" (also ResNets, LoCon convs)
    grad_accum: int = 1  # each process's rows of a batch in this many passes (same update, less memory)
    mixed_precision: str = "no"  # "bf16": forward passes under bf16 autocast (weights and updates stay float32)
    gradient_checkpointing: bool = False  # recompute the UNet blocks' activations in backward (less memory)

    def _check_data_fields(self):
        from .lora import TARGETS

        _positive_int(self, "resolution")
        if self.resolution % 64:
            raise ConfigError(f"resolution must be a multiple of 64, got {self.resolution!r}")
        if self.crop not in ("center", "random"):
            raise ConfigError(f"crop must be 'center' or 'random', got {self.crop!r}")
        if not isinstance(self.flip, bool):
            raise ConfigError(f"flip must be true or false, got {self.flip!r}")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ConfigError(f"lora_rank must be an integer >= 0 (0: full fine-tune), got {self.lora_rank!r}")
        _non_negative(self, "lora_alpha")
        if self.lora_targets not in TARGETS:
            raise ConfigError(f"lora_targets must be one of {', '.join(TARGETS)}, got {self.lora_targets!r}")
        _positive_int(self, "grad_accum")
        if self.mixed_precision not in ("no", "bf16"):
            raise ConfigError(f"mixed_precision must be 'no' or 'bf16', got {self.mixed_precision!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ConfigError(f"gradient_checkpointing must be true or false, got {self.gradient_checkpointing!r}")


@dataclass(frozen=True)
class FinetuneConfig(DataFields, StageConfig):
    """Fine-tuning a checkpoint's UNet on your images (`train diffusion|lora --data --init`): the denoising loss of
    the checkpoint's own schedule and prediction type on cached latents; the text encoder stays frozen."""

    stage: str = "finetune"
    steps: int = 500
    batch_size: int = 4
    lr: float = 1e-4
    warmup: int = 0
    caption_dropout: float = 0.05  # share of captions replaced by "" (keeps classifier-free guidance working)
    ema_decay: float = 0.0  # 0: no EMA (the trained weights are written); else their moving average

    def __post_init__(self):
        super().__post_init__()
        self._check_data_fields()
        _unit(self, "caption_dropout", closed=False)
        _unit(self, "ema_decay", closed=False)


@dataclass(frozen=True)
class GanDataConfig(DataFields, GanConfig):
    """DiffusionGAN to one step on your images from a checkpoint (`train gan --data --init`): the generator is the
    UNet (or the UNet + a LoRA), the discriminator starts from the same UNet."""

    stage: str = "gan-data"
    steps: int = 1000
    batch_size: int = 4
    lr: float = 1e-5
    d_lr: float = 1e-5
    warmup: int = 0
    ema_decay: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        self._check_data_fields()


@dataclass(frozen=True)
class DistillConfig(DataFields, StageConfig):
    """Distillation of a teacher checkpoint into the MobileDiffusion layout of preset `model` (train/distill.py):
    output and feature distillation, plus the denoising task loss when training on images."""

    stage: str = "distill"
    steps: int = 2000
    batch_size: int = 16
    lr: float = 5e-4
    warmup: int = 100
    task_weight: float = 1.0  # the denoising loss on real images (off in the data-free mode)
    output_weight: float = 1.0  # ||student output - teacher output||^2
    feature_weight: float = 1.0  # ||projected student features - teacher features||^2, per matched resolution
    samples_per_prompt: int = 4  # data-free mode: teacher samples per prompt (seeds seed + i)
    ema_decay: float = 0.999
    # under `accelerate launch` with several processes: shard the student, the projections, the EMA copy and the
    # teacher over them (torch FSDP2, train/fsdp.py) instead of replicating them (DDP); the same updates either way
    fsdp: bool = False

    def __post_init__(self):
        super().__post_init__()
        self._check_data_fields()
        if self.lora_rank:
            raise ConfigError("distillation trains a whole student UNet: lora_rank must be 0")
        _non_negative(self, "task_weight", "output_weight", "feature_weight")
        _positive_int(self, "samples_per_prompt")
        _unit(self, "ema_decay", closed=False)
        if not isinstance(self.fsdp, bool):
            raise ConfigError(f"fsdp must be true or false, got {self.fsdp!r}")


STAGES: dict[str, type[StageConfig]] = {"autoencoder": AutoencoderConfig, "diffusion": DiffusionConfig,
                                        "gan": GanConfig, "control": ControlConfig, "finetune": FinetuneConfig,
                                        "gan-data": GanDataConfig, "distill": DistillConfig}


def stage_config(d: dict, stage: str | None = None) -> StageConfig:
    """The stage config a dict describes; `stage` (if given) must agree with its "stage" key."""
    d = dict(d)
    name = d.pop("stage", stage)
    if name not in STAGES:
        raise ConfigError(f"a training config needs \"stage\": one of {', '.join(STAGES)}; got {name!r}")
    if stage is not None and name != stage:
        raise ConfigError(f"this config is for stage {name!r}, but stage {stage!r} was asked for; "
                          f"use configs/{stage}.json or fix its \"stage\" key")
    cls = STAGES[name]
    names = {f.name for f in dataclasses.fields(cls)} - {"stage"}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown {name} config keys {unknown}; known keys: {sorted(names)}")
    if "data" in d:
        d["data"] = _scene_config(d["data"])
    flags = {f.name for f in dataclasses.fields(cls) if f.type in ("bool", bool)}
    for k, v in d.items():
        if isinstance(v, bool) != (k in flags) or (k != "data" and not isinstance(v, (int, float, str))):
            raise ConfigError(f"config key {k!r} must be {'true or false' if k in flags else 'a number or string'}, "
                              f"got {v!r}")
    return cls(**d)


def load_stage_config(path, stage: str | None = None) -> StageConfig:
    """Read a stage config from a JSON file (see stage_config)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"training config {path} does not exist; the packaged ones are in {CONFIG_DIR}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"training config {path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"training config {path} must hold a JSON object, got {type(d).__name__}")
    return stage_config(d, stage)


def default_config_path(stage: str) -> Path:
    return CONFIG_DIR / f"{stage}.json"


def to_json(cfg: StageConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), sort_keys=True)


def _scene_config(d) -> SceneConfig:
    if not isinstance(d, dict):
        raise ConfigError(f"config key 'data' must be an object of SceneConfig fields, got {d!r}")
    names = {f.name for f in dataclasses.fields(SceneConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown data config keys {unknown}; known keys: {sorted(names)}")
    return SceneConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _positive_int(cfg, name):
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")


def _non_negative(cfg, *names):
    for name in names:
        v = getattr(cfg, name)
        if not isinstance(v, (int, float)) or v < 0:
            raise ConfigError(f"{name} must be a number >= 0, got {v!r}")


def _unit(cfg, name, *, closed: bool):
    v = getattr(cfg, name)
    ok = 0 <= v <= 1 if closed else 0 <= v < 1
    if not ok:
        raise ConfigError(f"{name} must be in [0, 1{']' if closed else ')'}, got {v!r}")
