"""Loading builds on the meta device and takes the checkpoint's tensors: strict as before, no random init,
half files into half models without an fp32 copy, tied tensors in pickles copied apart."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

from mobilediffusion import load_decoder, load_pipeline, load_text_encoder, load_unet
from mobilediffusion.config import DecoderConfig, ModelConfig, TextEncoderConfig, UNetConfig
from mobilediffusion.errors import CheckpointError
from mobilediffusion.pipeline import build_pipeline
from mobilediffusion.weights.materialize import build_on_meta, materialize_buffers
from mobilediffusion.weights.single_file import save_single_file

SD = ModelConfig(
    family="sd1",
    unet=UNetConfig(block_out_channels=(32, 64), layers_per_block=(1, 1), attention=("full", "none"),
                    transformer_depth=(1, 1), num_attention_heads=(8, 8), cross_attention_dim=32, norm_num_groups=8),
    text=TextEncoderConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1),
    decoder=DecoderConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1),
)


@pytest.fixture(scope="module")
def source():
    return build_pipeline(SD, seed=3)


@pytest.fixture(scope="module")
def fp16_file(source, tmp_path_factory):
    return save_single_file(source, tmp_path_factory.mktemp("meta") / "sd.safetensors", dtype=torch.float16)


def same_weights(module, ref):
    """module holds ref's weights as the fp16 file stores them, cast to the module's dtype."""
    want = ref.state_dict()
    got = module.state_dict()
    assert list(got) == list(want)
    for k, v in got.items():
        assert v.device.type == "cpu", k
        assert torch.equal(v, want[k].to(torch.float16).to(v.dtype).reshape(v.shape)), k


class FloatAllocations(TorchDispatchMode):
    """Records the sizes of the float32 CPU tensors every op makes."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dtype == torch.float32:
                self.sizes.append((str(func), t.numel()))
        return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_file_into_half_model_never_makes_fp32_weights(fp16_file, source, dtype):
    with FloatAllocations() as seen:
        pipe = load_pipeline(fp16_file, dtype=dtype)
    smallest = min(p.numel() for p in pipe.unet.parameters())
    assert not [s for s in seen.sizes if s[1] >= smallest], seen.sizes[:5]
    for module, ref in ((pipe.unet, source.unet), (pipe.text_encoder.model, source.text_encoder.model),
                        (pipe.decoder, source.decoder)):
        assert all(p.dtype == dtype for p in module.parameters())
        same_weights(module, ref)
    # the fp32 load does make fp32 weights (so the check above can fail)
    with FloatAllocations() as seen:
        load_unet(fp16_file)
    assert [s for s in seen.sizes if s[1] >= smallest]


@pytest.mark.parametrize("compile", [False, True])
def test_fp32_load_of_a_half_file_copies_each_weight_once(fp16_file, compile):
    """fp16 -> fp32 in one cast, into the layout the CPU fast path keeps (as loaded for packed convolutions,
    channels_last for compile's unpacked ones): the fp32 tensors made while loading add up to the parameters."""
    from mobilediffusion import fast

    with FloatAllocations() as seen:
        unet = load_unet(fp16_file, compile=compile)
    params = list(unet.parameters())
    assert sum(n for _, n in seen.sizes) == sum(p.numel() for p in params), seen.sizes[:8]
    convs = [p for p in params if p.dim() == 4]
    channels_last = compile or not fast.packed_weights_available()
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last if channels_last else
                                         torch.contiguous_format) for p in convs)


def test_loaded_modules_hold_the_file_not_a_random_init(fp16_file, source):
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    pipe = load_pipeline(fp16_file)  # fp32 target
    assert torch.equal(torch.rand(1), before)  # nothing drew random numbers (no init ran)
    for module, ref in ((pipe.unet, source.unet), (pipe.text_encoder.model, source.text_encoder.model),
                        (pipe.decoder, source.decoder)):
        same_weights(module, ref)
    buffers = {k: v for k, v in pipe.text_encoder.model.named_buffers() if k.endswith("position_ids")}
    assert len(buffers) == 1 and torch.equal(buffers.popitem()[1], torch.arange(77)[None])
    ids = pipe.text_encoder.tokenize(["a red circle"])
    ref = source.text_encoder.encode(ids)
    assert ((pipe.text_encoder.encode(ids) - ref).norm() / ref.norm()) < 1e-2  # fp16-rounded weights


@pytest.mark.skipif(not hasattr(torch.Tensor, "untyped_storage"), reason="old torch")
def test_half_target_from_half_file_shares_the_file_pages(fp16_file):
    """Linear weights of an fp16 model from an fp16 file are the file's (mmap) tensors: nothing was copied."""
    maps = "/proc/self/maps"
    enc = load_text_encoder(fp16_file, dtype=torch.float16)
    try:
        ranges = [tuple(int(x, 16) for x in line.split()[0].split("-"))
                  for line in open(maps) if line.rstrip().endswith(str(fp16_file))]
    except OSError:
        pytest.skip("no /proc/self/maps here")
    assert ranges
    w = enc.model.state_dict()[f"{enc.key_prefix}encoder.layers.0.mlp.fc1.weight"]
    assert any(lo <= w.data_ptr() < hi for lo, hi in ranges)


def test_strict_loading_on_meta(fp16_file, tmp_path):
    state = load_file(str(fp16_file))
    cases = {
        "missing": ({k: v for k, v in state.items() if not k.endswith("decoder.conv_out.bias")}, "conv_out.bias"),
        "unexpected": ({**state, "first_stage_model.decoder.extra.weight": torch.zeros(2)}, "extra.weight"),
        "mis-shaped": ({**state, "first_stage_model.decoder.conv_out.bias": torch.zeros(5, dtype=torch.float16)},
                       r"conv_out.bias \(5,\) vs \(3,\)"),
    }
    for name, (bad, match) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(bad, str(path))
        with pytest.raises(CheckpointError, match=match):
            load_decoder(path)


def test_tied_tensors_of_a_pickle_are_copied_apart(source, tmp_path):
    """torch.save keeps two names of one tensor as one storage; the loaded parameters must not share it."""
    from mobilediffusion.weights.vae_keys import DIFFUSERS_KL, decoder_config_to_diffusers

    state = DIFFUSERS_KL.reverse(source.decoder.state_dict())
    a, b = "decoder.up_blocks.0.resnets.0.conv1.weight", "decoder.up_blocks.0.resnets.0.conv2.weight"
    state[b] = state[a]  # tied: the same tensor under two names
    cls_name, kwargs = decoder_config_to_diffusers(SD.decoder)
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"_class_name": cls_name, **kwargs}))
    torch.save(state, vae / "diffusion_pytorch_model.bin")
    dec = load_decoder(vae)
    p, q = dict(dec.named_parameters())["layers.up0.res0.conv1.weight"], \
        dict(dec.named_parameters())["layers.up0.res0.conv2.weight"]
    assert torch.equal(p, q)
    assert p.untyped_storage().data_ptr() != q.untyped_storage().data_ptr()
    with torch.no_grad():
        p.add_(1)
    assert not torch.equal(p, q)


def test_materialize_names_what_it_cannot_derive():
    from torch import nn

    class WithBuffer(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("table", torch.zeros(3), persistent=False)

    m = build_on_meta(WithBuffer)
    m.load_state_dict({"lin.weight": torch.ones(2, 2), "lin.bias": torch.ones(2)}, assign=True)
    with pytest.raises(CheckpointError, match="table"):
        materialize_buffers(m)


def test_unet_from_a_config_override_still_strict(fp16_file):
    wrong = dataclasses.replace(SD.unet, cross_attention_dim=48)
    with pytest.raises(CheckpointError, match="do not fit the config"):
        load_unet(fp16_file, config=wrong)
