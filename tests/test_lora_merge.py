"""Merging and removing LoRAs: exact removal, copies that leave the input alone (also under
torch.inference_mode, as ComfyUI runs nodes), the packed CPU fast path, compiled UNets, load_pipeline(loras=...),
the CLI's --lora and the MobileDiffusion LoRA node."""
import copy
import dataclasses
import importlib

import pytest
import torch
from lora_cases import kohya_state, own_factors, rel_err, save

from mobilediffusion import fast
from mobilediffusion.errors import CheckpointError, ConfigError
from mobilediffusion.lora import apply_lora, remove_lora, with_lora
from mobilediffusion.pipeline import build_pipeline, load_pipeline
from mobilediffusion.presets import PRESETS

UNET = dataclasses.replace(PRESETS["sd15"].unet, in_channels=8, out_channels=8, block_out_channels=(32, 64),
                           layers_per_block=(1, 1), attention=("full", "none"), transformer_depth=(1, 1),
                           num_attention_heads=(2, 2), norm_num_groups=8, cross_attention_dim=64, sample_size=8)
CFG = dataclasses.replace(PRESETS["tiny"], unet=UNET)  # SD 1.5 layout at test size, the tiny text encoder/decoder


def tiny():
    return build_pipeline(CFG, seed=1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two kohya LoRAs for the tiny model: A on everything, B on the attention projections only."""
    folder, pipe = tmp_path_factory.mktemp("loras"), tiny()
    a = save(kohya_state(own_factors(pipe, seed=1), alpha=1.0), folder / "a.safetensors")
    b = save(kohya_state(own_factors(pipe, seed=2, keep=lambda c, n: "attn" in n or "self_attn" in n), alpha=3.0),
             folder / "b.safetensors")
    return a, b


def unet_inputs(batch=2):
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 8, 8, 8, generator=g), torch.tensor([900, 40])[:batch], torch.randn(batch, 77, 64,
                                                                                                  generator=g)


def outputs(pipe):
    with torch.no_grad():
        return pipe.unet(*unet_inputs()), pipe.text_encoder.encode_prompts(["a red circle", "a blue square"])


def params(pipe):
    return {**{f"unet.{n}": p for n, p in pipe.unet.named_parameters()},
            **{f"text.{n}": p for n, p in pipe.text_encoder.named_parameters()}}


def test_removal_is_exact_in_any_order(files):
    a, b = files
    pipe, only_b = tiny(), tiny()
    original, base = params(pipe), outputs(pipe)
    ra, rb = apply_lora(pipe, a, 0.8), apply_lora(pipe, b, -0.5)
    assert pipe.unet.applied_loras == [ra, rb] and pipe.text_encoder.applied_loras == [ra, rb]
    assert ra.components == ("unet", "text_encoder") and ra.name == "a.safetensors" and ra.strength == 0.8
    remove_lora(pipe, ra)  # the first one: B stays, merged again from the originals
    apply_lora(only_b, b, -0.5)
    assert pipe.unet.applied_loras == [rb]
    for name, p in params(only_b).items():
        assert torch.equal(params(pipe)[name], p), name
    remove_lora(pipe, b)  # by path: its latest application
    assert all(p is original[n] for n, p in params(pipe).items())  # the very same tensors
    assert all(torch.equal(x, y) for x, y in zip(outputs(pipe), base))
    assert pipe.unet.applied_loras == []
    with pytest.raises(ConfigError, match="is not applied"):
        remove_lora(pipe, rb)


def test_with_lora_leaves_the_input_alone_under_inference_mode(files):
    a, b = files
    with torch.inference_mode():  # as ComfyUI runs nodes: the weights are inference tensors
        pipe = tiny()
        before = {n: (p, p.clone()) for n, p in params(pipe).items()}
        base = outputs(pipe)
        new = with_lora(pipe, a, 1.0)
        changed = outputs(new)
    assert not hasattr(pipe.unet, "applied_loras") and new.unet.applied_loras[-1].name == "a.safetensors"
    for n, p in params(pipe).items():
        assert p is before[n][0] and torch.equal(p, before[n][1]), n
    shared = [n for n, p in params(new).items() if p is before[n][0]]
    assert 0 < len(shared) < len(before)  # untouched weights are shared, patched ones are new
    assert new.decoder is pipe.decoder
    assert all(rel_err(x, y) > 1e-2 for x, y in zip(changed, base))
    assert all(torch.equal(x, y) for x, y in zip(outputs(pipe), base))
    # outside inference mode too, stacking on the copy, and in place on inference tensors
    newer = with_lora(new, b, 0.5)
    assert [r.name for r in newer.unet.applied_loras] == ["a.safetensors", "b.safetensors"]
    assert [r.name for r in new.unet.applied_loras] == ["a.safetensors"]
    record = apply_lora(pipe, b, 0.5)
    remove_lora(pipe, record)
    assert all(p is before[n][0] for n, p in params(pipe).items())


@pytest.mark.skipif(not fast.packed_weights_available(), reason="this torch build has no oneDNN")
def test_packed_weights_follow_every_change(files):
    a, _ = files
    pipe = tiny()
    unet = pipe.unet
    assert any(isinstance(m, (fast.PackedLinear, fast.PackedConv2d)) for m in unet.modules())
    eager = copy.deepcopy(unet)
    fast.unpack_weights(eager)
    x = unet_inputs()
    with torch.no_grad():
        base = unet(*x)  # packs every weight
        first = apply_lora(unet, a, 1.0)
        at_one = unet(*x)
        remove_lora(unet, first)  # no call in between: a new tensor may take the freed one's address
        second = apply_lora(unet, a, 0.3)
        at_third = unet(*x)
        assert rel_err(at_one, with_lora(eager, a, 1.0)(*x)) <= 1e-5
        assert rel_err(at_third, with_lora(eager, a, 0.3)(*x)) <= 1e-5 and rel_err(at_third, at_one) > 1e-2
        remove_lora(unet, second)
        assert torch.equal(unet(*x), base)
        convs = {n: p for n, p in unet.named_parameters() if p.dim() == 4}
        with_conv = apply_lora(unet, a)  # new weights keep the layout the fast path gave them
        changed = [n for n, p in convs.items() if unet.get_parameter(n) is not p]
        assert changed and all(unet.get_parameter(n).stride() == p.stride() for n, p in convs.items())
        remove_lora(unet, with_conv)


def test_half_precision_weights_are_merged_in_float32_and_cast_once(files):
    a, _ = files
    pipe = build_pipeline(CFG, seed=1, dtype=torch.bfloat16)
    name = "down.0.blocks.0.attn.blocks.0.attn1.to_q.weight"
    w = pipe.unet.get_parameter(name)
    apply_lora(pipe, a, 0.3)
    got = pipe.unet.get_parameter(name)
    from safetensors.torch import load_file

    state = load_file(str(a))
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    up, down, alpha = state[f"{k}.lora_up.weight"], state[f"{k}.lora_down.weight"], state[f"{k}.alpha"]
    expected = (w.float() + (0.3 * (alpha.item() / down.shape[0])) * (up @ down)).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)


@pytest.mark.slow
def test_compiled_unet_is_copied_not_patched(tmp_path):
    """One compilation of a small UNet: the copy runs its own forward with the LoRA'd weights."""
    from mobilediffusion.unet import UNet

    cfg = dataclasses.replace(UNET, block_out_channels=(16, 32), num_attention_heads=(1, 1), mid_block=False,
                              norm_num_groups=4)
    torch.manual_seed(0)
    unet = UNet(cfg).eval()
    lora = save(kohya_state(own_factors(unet=unet, seed=3)), tmp_path / "c.safetensors")
    eager = copy.deepcopy(unet)
    fast.compile_module(unet)
    with pytest.raises(ConfigError, match="was compiled .* apply LoRAs before compiling"):
        apply_lora(unet, lora)
    with pytest.raises(ConfigError, match="was compiled"):
        remove_lora(unet, lora)
    x, before = unet_inputs(1), dict(unet.named_parameters())
    with torch.no_grad():
        new = with_lora(unet, lora, 0.7)  # its own compiled wrapper, bound to the copy
        assert fast.is_compiled(new) and new._compiled_call_impl is not unet._compiled_call_impl
        assert rel_err(new(*x), with_lora(eager, lora, 0.7)(*x)) <= 1e-5
    assert all(p is before[n] for n, p in unet.named_parameters()) and not hasattr(unet, "applied_loras")


def test_load_pipeline_with_loras(tmp_path, files):
    a, b = files
    path = tmp_path / "tiny.safetensors"
    from mobilediffusion.weights.native import save_native

    source = tiny()
    save_native(path, source.config, source.unet, source.text_encoder, source.decoder)
    expected = tiny()
    apply_lora(expected, a, 0.5)
    apply_lora(expected, b)
    pipe = load_pipeline(path, loras=[(a, 0.5), str(b)])
    assert [(r.name, r.strength) for r in pipe.unet.applied_loras] == [("a.safetensors", 0.5), ("b.safetensors", 1.0)]
    for name, p in params(expected).items():
        assert torch.equal(params(pipe)[name], p), name
    with pytest.raises(ConfigError, match="strength"):
        load_pipeline(path, loras=[(a, 200)])
    with pytest.raises(CheckpointError, match="no such file"):
        load_pipeline(path, loras=[(tmp_path / "nope.safetensors", 1.0)])
    with pytest.raises(ConfigError, match="pair or a path"):
        load_pipeline(path, loras=[(a, 1.0, 2.0)])


# --------------------------------------------------------------------------- CLI and node, on the embedded model
@pytest.fixture(scope="module")
def default_lora(tmp_path_factory):
    pipe = load_pipeline(None)
    factors = own_factors(pipe, seed=4, scale=0.5, keep=lambda c, n: "attn" in n)
    return save(kohya_state(factors, alpha=1.0), tmp_path_factory.mktemp("default") / "shapes-style.safetensors")


def test_cli_lora(tmp_path, default_lora, capsys):
    from PIL import Image

    from mobilediffusion.cli import main, parse_lora

    assert parse_lora(f"{default_lora}:0.5") == (str(default_lora), 0.5)
    assert parse_lora(str(default_lora)) == (str(default_lora), 1.0)
    run = lambda out, *extra: main(["generate", "a red circle in the top left", "-o", str(tmp_path / out), "-q",  # noqa
                                    *extra])
    assert run("plain.png") == 0
    assert run("lora.png", "--lora", f"{default_lora}:0.9") == 0
    assert run("twice.png", "--lora", f"{default_lora}:0.45", "--lora", str(default_lora) + ":0.45") == 0
    images = {n: Image.open(tmp_path / f"{n}.png").tobytes() for n in ("plain", "lora", "twice")}
    assert images["plain"] != images["lora"]  # a changed strength gives a changed image
    for spec, message in ((f"{default_lora}:abc", "takes FILE or FILE:STRENGTH"),
                          (f"{default_lora}:500", "out of range"), ("missing.safetensors", "no such file")):
        capsys.readouterr()
        assert run("bad.png", "--lora", spec) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --lora") and message in err and "\n" not in err, err
    assert not (tmp_path / "bad.png").exists()


def test_lora_node(plugin, default_lora):
    nodes = plugin.NODE_CLASS_MAPPINGS
    errors = importlib.import_module(f"{plugin.__name__}.mobilediffusion.errors")  # the plugin's own classes
    lora_node = nodes["MobileDiffusionLoRA"]()
    assert nodes["MobileDiffusionLoRA"].INPUT_TYPES()["required"]["lora_name"][0] == []  # no ComfyUI: no folder
    with torch.inference_mode():  # as ComfyUI runs every node
        unet, clip, *_ = nodes["LoadMobileDiffusionModel"]().load("(embedded default)", "auto", "auto", "cpu")
        before = {n: (p, p.clone()) for n, p in unet.unet.named_parameters()}

        def sample(u, c):
            (cond,) = nodes["MobileDiffusionTextEncode"]().encode(c, "a red circle in the top left")
            return nodes["MobileDiffusionSampler"]().sample(u, cond, cond, 7, 1, 1.0, "auto", 64, 64, 1)[0]["samples"]

        base = sample(unet, clip)
        lora_unet, lora_clip = lora_node.apply(unet, clip, str(default_lora), 1.0, 1.0)
        with_lora_ = sample(lora_unet, lora_clip)
        again = sample(unet, clip)  # the graph's branch without the LoRA
    assert lora_unet.unet is not unet.unet and lora_clip is not clip and lora_unet.config is unet.config
    assert rel_err(with_lora_, base) > 1e-3 and torch.equal(again, base)
    assert all(p is before[n][0] and torch.equal(p, before[n][1]) for n, p in unet.unet.named_parameters())
    assert lora_node.apply(unet, clip, str(default_lora), 1.0, 1.0) == (lora_unet, lora_clip)  # cached
    assert lora_node.apply(unet, clip, str(default_lora), 0.0, 0.0) == (unet, clip)  # strength 0: passed through
    only_model = lora_node.apply(unet, clip, str(default_lora), 0.5, 0.0)
    assert only_model[1] is clip and only_model[0].unet is not lora_unet.unet
    assert only_model[0].unet.applied_loras[-1].strength == 0.5
    with pytest.raises(errors.ConfigError, match="out of range"):
        lora_node.apply(unet, clip, str(default_lora), 101.0, 1.0)
    with pytest.raises(errors.CheckpointError, match="models/loras"):
        lora_node.apply(unet, clip, "nope.safetensors", 1.0, 1.0)


def test_provenance_of_loras_and_graph(default_lora):
    """What the export manifest's "source" says: ComfyUI graph LoRAs (upstream first), then this package's."""
    from mobilediffusion.export.provenance import check_source
    from mobilediffusion.export.provenance import pipeline_source

    pipe = load_pipeline(None, loras=[(str(default_lora), 0.5)])
    assert pipeline_source(load_pipeline(None), "(embedded default)") == {"checkpoint": "(embedded default)"}
    pipe.unet.source = {"model": [  # as From ComfyUI Model reads it from the queued graph: downstream first
        {"node": "ModelSamplingDiscrete"},
        {"node": "LoraLoader", "lora": "style.safetensors", "strength": 0.7, "sha256": "b" * 64},
        {"node": "LoraLoader", "lora": "lcm.safetensors", "strength": 1.0, "sha256": "a" * 64},
        {"node": "LoraLoader", "lora": "off.safetensors", "strength": 0.0, "sha256": "c" * 64},
        {"node": "CheckpointLoaderSimple", "checkpoint": "sd15/dream.safetensors"}],
        "clip": [{"node": "LoraLoader", "lora": "gone.safetensors", "strength": 1.0, "sha256": None},
                 {"node": "CheckpointLoaderSimple", "checkpoint": "sd15/dream.safetensors"}]}
    source = check_source(pipeline_source(pipe, "ignored.safetensors"))
    digest = pipe.unet.applied_loras[0].sha256
    assert source["checkpoint"] == "sd15/dream.safetensors"  # the graph's file wins over the caller's name
    assert source["loras"] == [
        {"file": "lcm.safetensors", "sha256": "a" * 64, "strength": 1.0, "component": "unet"},
        {"file": "style.safetensors", "sha256": "b" * 64, "strength": 0.7, "component": "unet"},
        {"file": default_lora.name, "sha256": digest, "strength": 0.5, "component": "unet"},
        {"file": default_lora.name, "sha256": digest, "strength": 0.5, "component": "text_encoder"}]
    assert source["unhashed_loras"] == [{"file": "gone.safetensors", "strength": 1.0, "component": "text_encoder"}]
    assert source["comfyui_graph"]["model"][0] == "CheckpointLoaderSimple"


@pytest.mark.slow
def test_cli_export_records_lora(tmp_path, default_lora):
    import json

    from mobilediffusion.cli import main

    out = tmp_path / "styled"
    assert main(["export", "-o", str(out), "--precision", "fp32", "--components", "text_encoder", "--no-end-to-end",
                 "--lora", f"{default_lora}:0.8", "-q"]) == 0
    source = json.loads((out / "manifest.json").read_text())["source"]
    assert source["checkpoint"] == "(embedded default)"
    assert [(x["file"], x["strength"], x["component"]) for x in source["loras"]] == [
        (default_lora.name, 0.8, "unet"), (default_lora.name, 0.8, "text_encoder")]


def test_loras_at_precision_int8(default_lora):
    """dtype="int8" with loras merges them into the bf16 weights, then quantizes (the same UNet as quantizing the
    LoRA'd bf16 model); a LoRA on an already int8 UNet is refused with the way to do it."""
    from mobilediffusion.ops.int8 import Int8Linear, int8_unavailable, quantize_int8

    if int8_unavailable():
        pytest.skip(int8_unavailable())
    pipe = load_pipeline(None, dtype="int8", loras=[(default_lora, 0.8)])
    assert [r.strength for r in pipe.unet.applied_loras] == [0.8]
    want = load_pipeline(None, dtype=torch.bfloat16, loras=[(default_lora, 0.8)])
    quantize_int8(want.unet)
    x = unet_inputs(1)
    with torch.no_grad():
        assert torch.equal(pipe.unet(*[t.bfloat16() if t.is_floating_point() else t for t in x]),
                           want.unet(*[t.bfloat16() if t.is_floating_point() else t for t in x]))
    assert any(isinstance(m, Int8Linear) for m in pipe.unet.modules())
    with pytest.raises(ConfigError, match="precision int8.*give the LoRAs when loading"):
        apply_lora(load_pipeline(None, dtype="int8"), default_lora)
