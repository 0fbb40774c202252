"""Pipeline: loading round trips, diffusers folders, guidance and request checks."""
import pytest
import torch

from mobilediffusion import load_decoder, load_pipeline, load_text_encoder, load_unet
from mobilediffusion.errors import ConfigError
from mobilediffusion.pipeline import default_pipeline
from mobilediffusion.weights.native import save_native


@pytest.fixture(scope="module")
def tiny():
    return default_pipeline()


def test_default_is_deterministic_and_leaves_global_rng_alone(tiny):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    again = default_pipeline()
    assert torch.rand(1) == before  # building the default did not consume the caller's RNG
    for (k, a), (_, b) in zip(tiny.unet.state_dict().items(), again.unet.state_dict().items()):
        assert torch.equal(a, b), k
    assert tiny.trained  # the shipped, trained default


def test_native_round_trip(tiny, tmp_path):
    path = save_native(tmp_path / "m.safetensors", tiny.config, tiny.unet, tiny.text_encoder, tiny.decoder)
    pipe = load_pipeline(path)
    assert pipe.config == tiny.config
    size = tiny.size_multiple
    a = tiny("a red circle", steps=2, seed=3, height=size, width=size, sampler="ddim")[0]
    b = pipe("a red circle", steps=2, seed=3, height=size, width=size, sampler="ddim")[0]
    assert a.tobytes() == b.tobytes()
    # components load alone from the same file
    assert isinstance(load_unet(path).config, type(tiny.unet.config))
    assert load_text_encoder(path).config == tiny.config.text
    assert load_decoder(path).config == tiny.config.decoder


def test_guidance_uses_negative_prompt(tiny):
    size = tiny.size_multiple
    kw = dict(steps=2, seed=0, height=size, width=size, sampler="euler")
    plain = tiny("a cat", guidance=1.0, **kw)[0].tobytes()
    cfg_a = tiny("a cat", guidance=5.0, negative_prompt="", **kw)[0].tobytes()
    cfg_b = tiny("a cat", guidance=5.0, negative_prompt="a dog", **kw)[0].tobytes()
    assert plain != cfg_a and cfg_a != cfg_b


def test_batch_and_prompt_list(tiny):
    size = tiny.size_multiple
    images = tiny(["a", "b"], steps=1, seed=0, height=size, width=size, batch_size=2)
    assert len(images) == 4 and images[0].size == (size, size)


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(width=60), "multiple of"),
        (dict(steps=0), "steps must be"),
        (dict(sampler="plms"), "unknown sampler"),
    ],
)
def test_request_checks(tiny, kw, message):
    args = dict(steps=1, height=tiny.size_multiple, width=tiny.size_multiple, sampler="auto") | kw
    with pytest.raises(ConfigError, match=message):
        tiny.check_request(**args)


def test_latent_space_mismatch_is_refused(tiny):
    from mobilediffusion.decoder import build_decoder
    from mobilediffusion.presets import SD_KL_DECODER

    with pytest.raises(ConfigError, match="4-channel latents but the UNet makes 8"):
        type(tiny)(tiny.config, tiny.unet, tiny.text_encoder, build_decoder(SD_KL_DECODER))


def test_call_defaults_to_the_models_own_size_steps_and_guidance(tiny):
    """pipe("prompt") draws at the model's native resolution with its default steps and guidance (the shipped
    default: 128 px, one step, no guidance), the same image as spelling those out."""
    cfg = tiny.config
    image = tiny("a red circle in the top left on a white background", seed=2)[0]
    assert image.size == (cfg.resolution, cfg.resolution)
    explicit = tiny("a red circle in the top left on a white background", seed=2, steps=cfg.default_steps,
                    guidance=cfg.default_guidance, height=cfg.resolution, width=cfg.resolution)[0]
    assert image.tobytes() == explicit.tobytes()
