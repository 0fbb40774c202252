"""End to end: a diffusers pipeline folder loads and generates what diffusers generates from it."""
import pytest
import torch
from diffusers import (
    AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from mobilediffusion import load_pipeline
from mobilediffusion.loading import load_model_config
from mobilediffusion.text_encoder import PACKAGED_TOKENIZER

SCHEDULERS = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def _perturb(module, scale=0.05):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)
    return module.eval()


def make_sd_folder(path, scheduler_cls, prediction_type="epsilon"):
    torch.manual_seed(0)
    unet = _perturb(UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
        attention_head_dim=4, sample_size=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ))
    vae = _perturb(AutoencoderKL(
        block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    ), 0.02)
    text = _perturb(CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
    )), 0.02)
    tok = CLIPTokenizer.from_pretrained(str(PACKAGED_TOKENIZER), model_max_length=77)
    sched = scheduler_cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                          prediction_type=prediction_type, **({"clip_sample": False, "set_alpha_to_one": False}
                                                              if scheduler_cls is DDIMScheduler else {}))
    ref = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                  safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.save_pretrained(path)
    return ref


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
@pytest.mark.parametrize("guidance", [1.0, 6.0])
def test_generates_what_diffusers_generates(tmp_path, sampler, guidance):
    ref = make_sd_folder(tmp_path, SCHEDULERS[sampler])
    pipe = load_pipeline(tmp_path)
    assert load_model_config(tmp_path).default_sampler == sampler  # from the folder's scheduler
    prompt, negative, steps, size = "a red circle, top left", "blurry", 3, 64
    expected = ref(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                   height=size, width=size, generator=torch.Generator().manual_seed(7), output_type="pt").images
    context = pipe.encode_prompt([prompt])
    uncond = pipe.encode_prompt([negative])
    latents = pipe.sample_latents(context, uncond, steps=steps, guidance=guidance, seed=7, height=size, width=size,
                                  sampler=sampler)
    ours = pipe.decode(latents)
    assert ours.shape == expected.shape == (1, 3, size, size)
    assert rel_err(ours, expected) <= 1e-5


def test_v_prediction_from_scheduler_config(tmp_path):
    make_sd_folder(tmp_path, DDIMScheduler, prediction_type="v_prediction")
    assert load_pipeline(tmp_path).unet.config.prediction_type == "v_prediction"
