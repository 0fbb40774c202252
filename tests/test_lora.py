"""LoRA parity with diffusers (kohya and PEFT/diffusers files, two strengths), the scale rule on LoCon
convolutions, every supported key spelling, and bad input. Tiny SD 1.5-layout model, float32."""
import json

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from lora_cases import kohya_factors, kohya_state, rel_err, rule, save
from safetensors.torch import load_file
from test_pipeline_diffusers import make_sd_folder

from mobilediffusion import load_pipeline
from mobilediffusion.errors import CheckpointError, ConfigError
from mobilediffusion.lora import apply_lora, check_strength, read_lora, with_lora
from mobilediffusion.weights.unet_keys import DIFFUSERS_UNET, LDM_PREFIX, ldm_unet_keymap

STRENGTHS = [1.0, -0.6]
TOL = 1e-5


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """(diffusers folder, diffusers reference pipeline, our pipeline loaded from the folder)."""
    folder = tmp_path_factory.mktemp("sd")
    ref = make_sd_folder(folder, DDIMScheduler)
    return folder, ref, load_pipeline(folder)


@pytest.fixture
def state_file(tmp_path):
    """Write a state dict to a fresh .safetensors file in the test's folder."""
    count = iter(range(1000))
    return lambda state, metadata=None: save(state, tmp_path / f"lora{next(count)}.safetensors", metadata)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500, 20]), torch.randn(2, 77, 32, generator=g)


def _ids(pipe):
    return pipe.text_encoder.tokenize(["a red circle in the top left", "two blue squares"])


def _diffusers(folder, path, strength):
    """diffusers' own loader: load_lora_weights + fuse_lora(lora_scale=strength) -> (UNet, text encoder)."""
    dp = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    dp.load_lora_weights(str(path))
    dp.fuse_lora(lora_scale=strength)
    return dp.unet, dp.text_encoder


# --------------------------------------------------------------------------- parity
@pytest.fixture(scope="module")
def kohya(sd, tmp_path_factory):
    _, ref, _ = sd
    factors = kohya_factors(ref.unet, ref.text_encoder, seed=1)  # every Linear/Conv2d; 3x3 convs as LoCon
    return save(kohya_state(factors, alpha=2.0), tmp_path_factory.mktemp("lora") / "kohya.safetensors"), factors


@pytest.fixture(scope="module")
def peft_file(sd, tmp_path_factory):
    """diffusers' own save_lora_weights of a PEFT adapter (rank/alpha patterns) on the UNet, and PEFT-named
    text-encoder layers with an rsLoRA config, both with lora_adapter_metadata."""
    import copy

    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    _, ref, _ = sd
    unet = copy.deepcopy(ref.unet)
    config = LoraConfig(r=4, lora_alpha=8, rank_pattern={"to_k": 2}, alpha_pattern={"to_v": 3},
                        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                                        "ff.net.2", "conv1", "conv2", "time_emb_proj"], init_lora_weights=False)
    torch.manual_seed(5)
    unet.add_adapter(config)
    text = kohya_factors(None, ref.text_encoder, seed=2, keep=lambda c, n: "layers" in n)
    text_layers = {f"{n}.lora_{ab}.weight": t
                   for (_, n), (up, down) in text.items() for ab, t in (("B", up), ("A", down))}
    text_config = LoraConfig(r=4, lora_alpha=6, use_rslora=True, alpha_pattern={"fc1": 2},
                             target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]).to_dict()
    folder = tmp_path_factory.mktemp("peft")
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(unet), text_encoder_lora_layers=text_layers,
        unet_lora_adapter_metadata=config.to_dict(), text_encoder_lora_adapter_metadata=text_config)
    return folder / "pytorch_lora_weights.safetensors", text


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_parity_with_diffusers(sd, inputs, kohya, peft_file, fmt, strength):
    folder, ref, pipe = sd
    path, text_factors = kohya if fmt == "kohya" else peft_file
    ours = with_lora(pipe, path, strength)
    assert ours.unet.applied_loras[-1].naming == (("kohya",) if fmt == "kohya" else ("diffusers",))
    ids = _ids(pipe)
    with torch.no_grad():
        unet, text = _diffusers(folder, path, strength)
        want, want_text = unet(*inputs).sample, text(ids).last_hidden_state
        unet_err = rel_err(ours.unet(*inputs), want)
        text_err = rel_err(ours.text_encoder.encode(ids), want_text)
        # the text encoder also against the rule itself (W + m * alpha / r * up @ down, rsLoRA: alpha / sqrt(r))
        alpha = (lambda n: 2.0) if fmt == "kohya" else (lambda n: 2.0 if n.endswith("fc1") else 6.0)
        text_ref = rule(ref.text_encoder, text_factors, "text_encoder", strength, alpha, rslora=fmt == "peft")
        rule_err = rel_err(ours.text_encoder.encode(ids), text_ref(ids).last_hidden_state)
        unchanged = min(rel_err(pipe.unet(*inputs), want), rel_err(pipe.text_encoder.encode(ids), want_text))
    print(f"parity {fmt} strength {strength}: UNet {unet_err:.2e}, text {text_err:.2e} (rule {rule_err:.2e})")
    assert unet_err <= TOL and text_err <= TOL and rule_err <= TOL
    assert unchanged > 1e-2  # the LoRA matters, and `pipe` itself was left as it was


def test_locon_changes_convolutions_by_the_rule(sd, state_file):
    """3x3 down + 1x1 up on every resnet/sampler conv, a different alpha per module: W + m * alpha / r * up @ down."""
    _, ref, pipe = sd
    factors = kohya_factors(ref.unet, None, rank=3, seed=4, keep=lambda c, n: "conv" in n)
    state = kohya_state(factors)
    alphas = {}
    for i, (_, name) in enumerate(factors):
        alphas[name] = float(i % 5 + 1)
        state[f"lora_unet_{name.replace('.', '_')}.alpha"] = torch.tensor(alphas[name])
    ours = with_lora(pipe.unet, state_file(state), 0.7)
    own = DIFFUSERS_UNET.rename([f"{n}.weight" for _, n in factors])[0]
    assert ours.applied_loras[-1].modules == len(factors) > 10
    for (_, name), (up, down) in factors.items():
        w = pipe.unet.get_parameter(own[f"{name}.weight"])
        assert w.shape[-1] in (1, 3)
        expected = w + (0.7 * (alphas[name] / down.shape[0])) * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
        assert torch.equal(ours.get_parameter(own[f"{name}.weight"]), expected), name


# --------------------------------------------------------------------------- spellings
def _spellings(pipe, factors):
    """The same LoRA (alpha 2 of rank 4 = factor 0.5) in every layout, as {layout: (state, files beside it)}."""
    ldm = ldm_unet_keymap(pipe.unet.config)
    own = DIFFUSERS_UNET.rename([f"{n}.weight" for c, n in factors if c == "unet"])[0]
    L = {n[: -len(".weight")]: k[len(LDM_PREFIX): -len(".weight")]
         for k, o in ldm.reverse({o: o for o in own.values()}).items() for n in own if own[n] == o}
    out = {}

    def put(layout, key, up, down, alpha):
        state = out.setdefault(layout, {})
        state[key[0]], state[key[1]] = (up, down) if alpha else (up * 0.5, down)  # exact: 0.5 is a power of two
        if alpha and key[2] is not None:  # PEFT's alpha comes from adapter_config.json instead
            state[key[2]] = torch.tensor(2.0)

    for (c, n), (up, down) in factors.items():
        u = n.replace(".", "_")
        kohya = lambda b: (f"{b}.lora_up.weight", f"{b}.lora_down.weight", f"{b}.alpha")  # noqa: E731
        peft_keys = lambda b: (f"{b}.lora_B.weight", f"{b}.lora_A.weight", None)  # noqa: E731
        if c == "unet":
            put("kohya", kohya(f"lora_unet_{u}"), up, down, True)
            put("kohya-ldm", kohya(f"lora_unet_{L[n].replace('.', '_')}"), up, down, True)
            put("lycoris", kohya(f"lycoris_{u}"), up, down, True)
            put("comfyui", kohya(f"diffusion_model.{L[n]}"), up, down, True)
            put("peft", peft_keys(f"base_model.model.{n}"), up, down, True)
            attn = ".attn1.to_" in n or ".attn2.to_" in n
            old = n.replace(".to_", ".processor.to_").removesuffix(".0") if attn else None
            put("diffusers", (f"unet.{n}.lora.up.weight", f"unet.{n}.lora.down.weight"), up, down, False)
            put("diffusers-old", (f"unet.{old}_lora.up.weight", f"unet.{old}_lora.down.weight") if attn else
                (f"{n}.lora.up.weight", f"{n}.lora.down.weight"), up, down, False)
        else:
            put("kohya", kohya(f"lora_te_{u}"), up, down, True)
            put("kohya-ldm", kohya(f"lora_te1_{u}"), up, down, True)
            put("lycoris", kohya(f"lora_te_{u}"), up, down, True)
            put("comfyui", kohya(f"text_encoders.clip_l.transformer.{n}"), up, down, True)
            put("peft", peft_keys(f"base_model.model.{n}"), up, down, True)
            put("diffusers", (f"text_encoder.{n}.lora_linear_layer.up.weight",
                              f"text_encoder.{n}.lora_linear_layer.down.weight"), up, down, False)
            proj = n.endswith(("q_proj", "k_proj", "v_proj", "out_proj")) and "self_attn" in n
            old = n.replace("self_attn.", "self_attn.to_").removesuffix("_proj") if proj else None
            keys = (f"text_encoder.{old}_lora.up.weight", f"text_encoder.{old}_lora.down.weight") if proj else \
                (f"text_encoder.{n}.lora.up.weight", f"text_encoder.{n}.lora.down.weight")
            put("diffusers-old", keys, up, down, False)
    return out


def test_every_spelling_gives_the_same_weights(sd, tmp_path, state_file):
    _, ref, pipe = sd
    factors = kohya_factors(ref.unet, ref.text_encoder, seed=7)
    expected = with_lora(pipe, state_file(kohya_state(factors, alpha=2.0)), 0.8)
    for layout, state in _spellings(pipe, factors).items():
        folder = tmp_path / layout
        folder.mkdir()
        if layout == "peft":  # alpha from PEFT's adapter_config.json beside the weights
            (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 2.0}))
        got = with_lora(pipe, save(state, folder / "lora.safetensors"), 0.8)
        record = got.unet.applied_loras[-1]
        assert record.modules == len(factors) and record.components == ("unet", "text_encoder")
        for name, p in expected.unet.named_parameters():
            assert torch.equal(got.unet.get_parameter(name), p), (layout, name)
        for name, p in expected.text_encoder.named_parameters():
            assert torch.equal(got.text_encoder.get_parameter(name), p), (layout, name)


# --------------------------------------------------------------------------- bad input
def _pair(prefix, out_f, in_f, r=2):
    return {f"{prefix}.lora_up.weight": torch.randn(out_f, r), f"{prefix}.lora_down.weight": torch.randn(r, in_f)}


Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # a [32, 32] weight in the tiny UNet


def test_lora_for_a_wider_model_names_both_shapes(sd, state_file):
    _, _, pipe = sd
    with pytest.raises(CheckpointError, match=r"shape \(320, 320\) but down\.0\..*attn1\.to_q\.weight is \(32, 32\)"):
        apply_lora(pipe.unet, state_file(_pair(Q, 320, 320)))


def test_keys_matching_nothing_are_named_and_nothing_changes(sd, state_file):
    _, _, pipe = sd
    before = dict(pipe.unet.named_parameters())
    state = {**_pair(Q, 32, 32), **_pair("lora_unet_down_blocks_7_foo", 32, 32)}
    with pytest.raises(CheckpointError, match=r"2 of its keys match no weight of this model: lora_unet_down_blocks_7"):
        apply_lora(pipe, state_file(state))
    state = {**_pair(Q, 32, 32), **_pair("lora_unet_conv_in", 32, 4 * 9)}  # one good module, one too wide
    state["lora_unet_conv_in.lora_up.weight"] = torch.randn(48, 2)
    with pytest.raises(CheckpointError, match="conv_in"):
        apply_lora(pipe, state_file(state))
    assert all(p is before[n] for n, p in pipe.unet.named_parameters())  # validated before anything changed
    assert not getattr(pipe.unet, "applied_loras", [])
    record = apply_lora(pipe.unet, state_file({**_pair(Q, 32, 32), **_pair("lora_unet_x_y", 3, 3)}), strict=False)
    assert record.modules == 1 and record.unused_keys == 2
    from mobilediffusion.lora import remove_lora

    remove_lora(pipe.unet, record)
    assert all(p is before[n] for n, p in pipe.unet.named_parameters())


def test_lora_for_another_family(sd, state_file):
    _, _, pipe = sd
    flux = {**_pair("lora_transformer_single_blocks_0_attn_to_q", 32, 32), **_pair("lora_te2_text_model_x", 3, 3)}
    with pytest.raises(CheckpointError, match=r"another base model \(found e\.g\. [^)]*lora_transformer_single_"):
        apply_lora(pipe, state_file(flux))


def test_component_not_given(sd, kohya, state_file):
    _, _, pipe = sd
    text_only = {k: v for k, v in load_file(str(kohya[0])).items() if k.startswith("lora_te_")}
    with pytest.raises(ConfigError, match="has no weights for the UNet: all its keys are for the text encoder"):
        with_lora(pipe.unet, state_file(text_only))
    record = with_lora(pipe.unet, kohya[0]).applied_loras[-1]  # text-encoder keys counted, not applied
    assert record.components == ("unet",) and record.unused_keys == len(text_only)


def test_not_a_lora(sd, tmp_path):
    folder, _, pipe = sd
    with pytest.raises(CheckpointError, match="holds no LoRA tensors .* model checkpoint, not a LoRA"):
        apply_lora(pipe, folder / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="is a folder"):
        apply_lora(pipe, folder)
    with pytest.raises(CheckpointError, match="no such file"):
        apply_lora(pipe, tmp_path / "missing.safetensors")


def test_corrupt_and_empty_files(sd, tmp_path, kohya, state_file):
    _, _, pipe = sd
    data = kohya[0].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "noise.safetensors").write_bytes(b"\x13" * 4096)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "x.txt").write_text("hi")
    for name, message in (("cut", "not a complete safetensors file"), ("noise", "not a complete safetensors file"),
                          ("empty", "is empty")):
        with pytest.raises(CheckpointError, match=message):
            apply_lora(pipe, tmp_path / f"{name}.safetensors")
    with pytest.raises(CheckpointError, match="not a LoRA file type"):
        apply_lora(pipe, tmp_path / "x.txt")
    bad = {**_pair(Q, 32, 32)}
    bad[f"{Q}.lora_up.weight"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN or infinite values"):
        apply_lora(pipe, state_file(bad))
    with pytest.raises(CheckpointError, match="incomplete or inconsistent lora adapter"):
        apply_lora(pipe, state_file({f"{Q}.lora_up.weight": torch.randn(32, 2)}))


class _Payload:
    def __reduce__(self):
        import os

        return os.system, ("touch /tmp/md-lora-pickle-ran",)


def test_pickles_are_read_as_plain_tensors_only(sd, tmp_path):
    import os

    _, _, pipe = sd
    torch.save(_pair(Q, 32, 32), tmp_path / "plain.pt")
    assert with_lora(pipe.unet, tmp_path / "plain.pt").applied_loras[-1].modules == 1
    torch.save({"state_dict": _Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match=r"weights_only=True"):
        apply_lora(pipe, tmp_path / "evil.ckpt")
    assert not os.path.exists("/tmp/md-lora-pickle-ran")


@pytest.mark.parametrize("suffix,what", [(".on_input", "IA3"), (".lora_magnitude_vector", "PEFT DoRA"),
                                         (".oft_blocks", "OFT")])
def test_unsupported_adapters_are_refused_by_name(sd, suffix, what, state_file):
    _, _, pipe = sd
    with pytest.raises(CheckpointError, match=f"is a {what}.*does not apply"):
        apply_lora(pipe, state_file({**_pair(Q, 32, 32), Q + suffix: torch.ones(32)}))


@pytest.mark.parametrize("strength", [float("nan"), float("inf"), 100.5, -101, "1", True, None])
def test_strength_out_of_range(sd, kohya, strength):
    with pytest.raises(ConfigError, match="strength"):
        apply_lora(sd[2], kohya[0], strength)


def test_strength_limits_and_file_record(kohya):
    import hashlib

    assert check_strength(100) == 100.0 and check_strength(-100.0) == -100.0 and check_strength(0) == 0.0
    lora = read_lora(kohya[0])
    assert lora.sha256 == hashlib.sha256(kohya[0].read_bytes()).hexdigest() and lora.name == "kohya.safetensors"
