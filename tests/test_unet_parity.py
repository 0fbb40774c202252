"""UNet parity with diffusers' UNet2DConditionModel on the same random weights.

Each case builds a tiny diffusers UNet, perturbs every weight (nothing zero-initialised),
saves it with save_pretrained, loads it back through `load_unet` (config.json ->
unet_config_from_diffusers -> UNet -> key map -> strict load) and compares outputs.
"""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from mobilediffusion.errors import CheckpointError, ConfigError  # noqa: E402
from mobilediffusion.loading import load_unet  # noqa: E402
from mobilediffusion.weights.unet_keys import unet_config_from_diffusers  # noqa: E402

SMALL = dict(block_out_channels=(16, 32, 32), norm_num_groups=4, sample_size=16)
CA, DN, UP = "CrossAttnDownBlock2D", "DownBlock2D", "UpBlock2D"
CU = "CrossAttnUpBlock2D"

CASES = {
    # SD1.5 layout: conv projections, one head count everywhere, mid block
    "sd15": dict(SMALL, down_block_types=(CA, CA, DN), up_block_types=(UP, CU, CU), layers_per_block=2,
                 attention_head_dim=2, cross_attention_dim=24),
    # SD2: linear projections, per-level head counts, upcast attention, wider context than the width
    "sd2": dict(SMALL, down_block_types=(CA, CA, DN), up_block_types=(UP, CU, CU), layers_per_block=2,
                attention_head_dim=(1, 2, 4), cross_attention_dim=48, use_linear_projection=True,
                upcast_attention=True),
    # BK-SDM small: one block per level, no mid block
    "bk-sdm-small": dict(SMALL, down_block_types=(CA, CA, DN), up_block_types=(UP, CU, CU), layers_per_block=1,
                         mid_block_type=None, attention_head_dim=2, cross_attention_dim=24),
    # BK-SDM tiny: innermost level removed, attention at every level
    "bk-sdm-tiny": dict(block_out_channels=(16, 32), norm_num_groups=4, down_block_types=(CA, CA),
                        up_block_types=(CU, CU), layers_per_block=1, mid_block_type=None, attention_head_dim=2,
                        cross_attention_dim=24),
    # SDXS: no attention at the outer level, attention further in, no mid block, linear projections
    "sdxs": dict(SMALL, down_block_types=(DN, CA, CA), up_block_types=(CU, CU, UP), layers_per_block=1,
                 mid_block_type=None, attention_head_dim=(1, 2, 4), cross_attention_dim=40,
                 use_linear_projection=True),
    # two transformer blocks per attention site (and in the mid block), per-level layer counts
    "depth2": dict(SMALL, down_block_types=(CA, CA, DN), up_block_types=(UP, CU, CU), layers_per_block=(1, 2, 1),
                   transformer_layers_per_block=2, attention_head_dim=2, cross_attention_dim=24),
    # per-level transformer depths, up path given separately
    "depth-per-level": dict(SMALL, down_block_types=(CA, CA, CA), up_block_types=(CU, CU, CU), layers_per_block=1,
                            transformer_layers_per_block=(1, 2, 3), reverse_transformer_layers_per_block=(2, 1, 3),
                            attention_head_dim=2, cross_attention_dim=24),
}
SIZES = [(16, 16), (8, 24)]


def _reference(cfg: dict, seed: int = 0):
    torch.manual_seed(seed)
    ref = diffusers.UNet2DConditionModel(**cfg).eval()
    with torch.no_grad():  # random, non-zero everywhere (diffusers zero-inits proj_out / conv_out)
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return ref


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """case -> (diffusers reference, our UNet loaded from its save_pretrained folder)."""
    out = {}
    for name, cfg in CASES.items():
        ref = _reference(cfg)
        folder = tmp_path_factory.mktemp(name)
        ref.save_pretrained(folder)
        out[name] = ref, load_unet(folder)
    return out


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("case", list(CASES))
def test_parity(loaded, case, size):
    ref, ours = loaded[case]
    torch.manual_seed(1)
    x = torch.randn(2, 4, *size)
    t = torch.tensor([3, 917])
    ctx = torch.randn(2, 7, ref.config.cross_attention_dim)
    with torch.no_grad():
        want = ref(x, t, ctx).sample
        got = ours(x, t, ctx)
    assert got.shape == want.shape == (2, 4, *size)
    assert _rel(got, want) <= 1e-5


def test_scalar_and_batched_timesteps_agree(loaded):
    ref, ours = loaded["sd15"]
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 24)
    with torch.no_grad():
        batched = ours(x, torch.tensor([500, 500]), ctx)
        for t in (500, 500.0, torch.tensor(500), torch.tensor([500])):
            assert torch.equal(ours(x, t, ctx), batched)
        assert _rel(batched, ref(x, 500, ctx).sample) <= 1e-5
        # different timesteps per sample really are used per sample
        mixed = ours(x, torch.tensor([500, 10]), ctx)
        assert torch.equal(mixed[0], batched[0]) and not torch.allclose(mixed[1], batched[1])


def test_config_from_diffusers_matches_loaded_model(loaded):
    ref, ours = loaded["sd2"]
    assert ours.config == unet_config_from_diffusers(dict(ref.config))
    assert ours.config.num_attention_heads == (1, 2, 4)  # attention_head_dim holds the head count
    assert ours.config.use_linear_projection and ours.config.upcast_attention


def test_size_not_a_multiple_is_a_config_error(loaded):
    _, ours = loaded["sd15"]  # two downsamples: latent sides must be multiples of 4
    with pytest.raises(ConfigError, match="multiple of 4"):
        ours(torch.randn(1, 4, 16, 18), 1, torch.randn(1, 7, 24))


def test_wrong_timestep_count_is_a_config_error(loaded):
    _, ours = loaded["sd15"]
    with pytest.raises(ConfigError, match="timestep"):
        ours(torch.randn(2, 4, 16, 16), torch.tensor([1, 2, 3]), torch.randn(2, 7, 24))


def test_wrong_shaped_tensor_is_a_checkpoint_error_naming_it(tmp_path):
    from safetensors.torch import load_file, save_file

    ref = _reference(CASES["sd15"])
    ref.save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["down_blocks.1.resnets.0.conv1.weight"] = torch.zeros(32, 16, 5, 5)
    save_file(state, weights)
    with pytest.raises(CheckpointError, match=r"down\.1\.blocks\.0\.res\.conv1\.weight"):
        load_unet(tmp_path)


def test_missing_and_unknown_keys_are_checkpoint_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    ref = _reference(CASES["bk-sdm-small"])
    ref.save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["conv_out.bias"]
    state["down_blocks.0.surprise.weight"] = torch.zeros(3)
    save_file(state, weights)
    with pytest.raises(CheckpointError, match="surprise"):
        load_unet(tmp_path)
    del state["down_blocks.0.surprise.weight"]
    save_file(state, weights)
    with pytest.raises(CheckpointError, match=r"missing 1 keys: conv_out\.bias"):
        load_unet(tmp_path)


# --------------------------------------------------------------------------- single-file (LDM) checkpoints
_LDM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _to_ldm(state: dict, cfg: dict) -> dict:
    """A diffusers SD UNet state dict renamed to the original SD single-file layout (the test's own
    table; test_ldm_layout_matches_diffusers_converter checks it against diffusers' converter)."""
    import re

    n = cfg["layers_per_block"] + 1  # input/output blocks per level
    attn_up = [t == CU for t in cfg["up_block_types"]]

    def rename(k):
        for src, dst in (("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
                         ("conv_in", "input_blocks.0.0"), ("conv_norm_out", "out.0"), ("conv_out", "out.2")):
            if k.startswith(src + "."):
                return dst + k[len(src):]
        m = re.fullmatch(r"(down|up|mid)_blocks?\.(?:(\d+)\.)?(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", k)
        where, i, kind, j, rest = m.groups()
        i, j = int(i or 0), int(j)
        if kind == "resnets":
            part, tail = rest.split(".", 1)
            rest = f"{_LDM_RESNET[part]}.{tail}"
        if where == "mid":
            return f"middle_block.{2 * j if kind == 'resnets' else 1}.{rest}"
        if where == "down":
            idx = 1 + i * n + (n - 1 if kind == "downsamplers" else j)
            sub = {"resnets": "0", "attentions": "1", "downsamplers": "0.op"}[kind]
            return f"input_blocks.{idx}.{sub}.{rest.removeprefix('conv.') if kind == 'downsamplers' else rest}"
        idx = i * n + (n - 1 if kind == "upsamplers" else j)
        sub = {"resnets": "0", "attentions": "1", "upsamplers": "2" if attn_up[i] else "1"}[kind]
        return f"output_blocks.{idx}.{sub}.{rest}"

    return {"model.diffusion_model." + rename(k): v for k, v in state.items()}


LDM_CASES = ["sd15", "sd2", "bk-sdm-small"]


@pytest.mark.parametrize("case", LDM_CASES)
def test_ldm_layout_matches_diffusers_converter(case):
    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    state = _reference(CASES[case]).state_dict()
    back = single_file_utils.convert_ldm_unet_checkpoint(_to_ldm(state, CASES[case]), dict(CASES[case]))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("case", LDM_CASES)
def test_ldm_single_file_parity(case):
    from mobilediffusion.unet import UNet
    from mobilediffusion.weights.keymap import load_state
    from mobilediffusion.weights.unet_keys import ldm_unet_keymap

    ref = _reference(CASES[case])
    cfg = unet_config_from_diffusers(dict(ref.config))
    ours = UNet(cfg).eval()
    load_state(ours, _to_ldm(ref.state_dict(), CASES[case]), ldm_unet_keymap(cfg), what="UNet")
    x, t, ctx = torch.randn(2, 4, 8, 16), torch.tensor([20, 700]), torch.randn(2, 7, ref.config.cross_attention_dim)
    with torch.no_grad():
        assert _rel(ours(x, t, ctx), ref(x, t, ctx).sample) <= 1e-5
