"""LyCORIS adapters (LoHa, LoKr, DoRA, Tucker LoCon) and full diffs: the weights they give, computed here
from the formulas, and (opt-in, with COMFYUI_DIR) by ComfyUI's own comfy.lora.calculate_weight."""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from lora_cases import rel_err, save
from safetensors.torch import load_file

from mobilediffusion.lora import with_lora
from mobilediffusion.presets import PRESETS
from mobilediffusion.unet import UNet
from mobilediffusion.weights.unet_keys import DIFFUSERS_UNET

CFG = dataclasses.replace(PRESETS["sd15"].unet, block_out_channels=(32, 64), layers_per_block=(1, 1),
                          attention=("full", "none"), transformer_depth=(1, 1), num_attention_heads=(2, 2),
                          norm_num_groups=8, cross_attention_dim=48)
T = "down_blocks.0.attentions.0.transformer_blocks.0."
MODULES = {  # diffusers name -> what the test file puts on it
    T + "attn1.to_q": "loha", "down_blocks.0.resnets.0.conv1": "loha-tucker", T + "attn2.to_k": "lokr",
    "down_blocks.0.resnets.0.conv2": "lokr-full", T + "attn1.to_v": "dora-in",
    "down_blocks.1.resnets.0.conv1": "dora-out", "down_blocks.1.resnets.0.conv2": "locon-tucker",
    T + "attn1.to_out.0": "diff", "down_blocks.0.attentions.0.norm": "norm",
}
STRENGTH = 0.7
R = 2


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """(our UNet, LoRA file path, {diffusers name: (kind, own parameter name, factors)})."""
    torch.manual_seed(0)
    unet = UNet(CFG).eval()
    g = torch.Generator().manual_seed(1)
    own = DIFFUSERS_UNET.rename([f"{n}.weight" for n in MODULES])[0]
    state, info = {}, {}
    for name, kind in MODULES.items():
        w = unet.get_parameter(own[f"{name}.weight"])
        out_f, in_f, kernel = w.shape[0], (w.shape[1:2] or (None,))[0], tuple(w.shape[2:])
        rnd = lambda *shape: torch.randn(shape, generator=g) * 0.2  # noqa: E731
        f = {
            "loha": lambda: dict(hada_w1_a=rnd(out_f, R), hada_w1_b=rnd(R, in_f), hada_w2_a=rnd(out_f, R),
                                 hada_w2_b=rnd(R, in_f), alpha=torch.tensor(3.0)),
            "loha-tucker": lambda: dict(hada_t1=rnd(R, R, *kernel), hada_w1_a=rnd(R, out_f), hada_w1_b=rnd(R, in_f),
                                        hada_t2=rnd(R, R, *kernel), hada_w2_a=rnd(R, out_f), hada_w2_b=rnd(R, in_f),
                                        alpha=torch.tensor(1.0)),
            "lokr": lambda: dict(lokr_w1=rnd(2, 2), lokr_w2_a=rnd(out_f // 2, R), lokr_w2_b=rnd(R, in_f // 2),
                                 alpha=torch.tensor(4.0)),
            "lokr-full": lambda: dict(lokr_w1=rnd(2, 2), lokr_w2=rnd(out_f // 2, in_f // 2, *kernel),
                                      alpha=torch.tensor(4.0)),  # nothing decomposed: factor 1
            "dora-in": lambda: {"lora_up.weight": rnd(out_f, R), "lora_down.weight": rnd(R, in_f),
                                "alpha": torch.tensor(1.0), "dora_scale": rnd(1, in_f).abs() + 0.5},
            "dora-out": lambda: {"lora_up.weight": rnd(out_f, R, 1, 1), "lora_down.weight": rnd(R, in_f, *kernel),
                                 "alpha": torch.tensor(3.0), "dora_scale": rnd(out_f, 1, 1, 1).abs() + 0.5},
            "locon-tucker": lambda: {"lora_up.weight": rnd(out_f, R, 1, 1), "lora_down.weight": rnd(R, in_f, 1, 1),
                                     "lora_mid.weight": rnd(R, R, *kernel), "alpha": torch.tensor(1.0)},
            "diff": lambda: dict(diff=rnd(out_f, in_f), diff_b=rnd(out_f)),
            "norm": lambda: dict(w_norm=rnd(out_f), b_norm=rnd(out_f)),
        }[kind]()
        prefix = "lora_unet_" + name.replace(".", "_")
        state.update({f"{prefix}.{k}": v for k, v in f.items()})
        info[name] = kind, own[f"{name}.weight"], f
    path = save(state, tmp_path_factory.mktemp("lycoris") / "lycoris.safetensors")
    return unet, path, info


def _expected(kind, w, f, s):
    """The weight ComfyUI's formulas give, written out independently of mobilediffusion.lora."""
    if kind == "loha":
        return w + s * (3.0 / R) * (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
    if kind == "loha-tucker":  # m[p, q, k, l] = sum_ij t[i, j, k, l] wa[i, p] wb[j, q]
        m = [torch.einsum("irkl,ip->prkl", torch.einsum("ijkl,jr->irkl", f[f"hada_t{n}"], f[f"hada_w{n}_b"]),
                          f[f"hada_w{n}_a"]) for n in (1, 2)]
        return w + s * (1.0 / R) * m[0] * m[1]
    if kind == "lokr":
        return w + s * (4.0 / R) * torch.kron(f["lokr_w1"], f["lokr_w2_a"] @ f["lokr_w2_b"])
    if kind == "lokr-full":
        return w + s * torch.kron(f["lokr_w1"][:, :, None, None], f["lokr_w2"])
    if kind.startswith("dora"):
        dw = (f["lora_up.weight"].flatten(1) @ f["lora_down.weight"].flatten(1)).reshape(w.shape)
        calc = w + (f["alpha"] / R) * dw
        if kind == "dora-out":  # per output channel, norms of the original weight
            norm = w.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
        else:  # per input channel, norms of the merged weight
            norm = calc.norm(dim=0, keepdim=True)
        calc = calc * f["dora_scale"].reshape(norm.shape) / (norm + torch.finfo(torch.float32).eps)
        return w + s * (calc - w)
    if kind == "locon-tucker":
        return w + s * (1.0 / R) * _conv_chain(f, w.shape)
    if kind == "diff":
        return w + s * f["diff"]
    return w + s * f["w_norm"]


def _conv_chain(f, shape):
    """The Tucker LoCon as the kernel of down (1x1) -> mid (3x3) -> up (1x1) convolutions, read off by
    running the chain on unit impulses: an independent check of folding mid into down."""
    cin = shape[1]
    x = torch.zeros(cin, cin, 5, 5)
    x[torch.arange(cin), torch.arange(cin), 2, 2] = 1.0  # impulse per input channel
    y = F.conv2d(F.conv2d(F.conv2d(x, f["lora_down.weight"]), f["lora_mid.weight"], padding=1), f["lora_up.weight"])
    return y[:, :, 1:4, 1:4].permute(1, 0, 2, 3).flip(2, 3)  # conv2d is correlation: the kernel, flipped back


def test_lycoris_adapters_follow_the_formulas(case):
    unet, path, info = case
    ours = with_lora(unet, path, STRENGTH)
    assert ours.applied_loras[-1].modules == len(MODULES) + 2  # + the biases of diff_b and b_norm
    with torch.no_grad():
        for name, (kind, param, f) in info.items():
            w = unet.get_parameter(param)
            err = rel_err(ours.get_parameter(param) - w, _expected(kind, w, f, STRENGTH) - w)
            assert err <= 1e-5, (kind, err)
        for name, (kind, param, f) in info.items():
            if kind in ("diff", "norm"):
                bias = param[: -len("weight")] + "bias"
                got = ours.get_parameter(bias) - unet.get_parameter(bias)
                assert rel_err(got, STRENGTH * f["diff_b" if kind == "diff" else "b_norm"]) <= 1e-6


COMFY_SCRIPT = r"""
import os, sys
lora_path, weights_path, strength, out = sys.argv[1:5]
sys.argv = [sys.argv[0], "--cpu"]
sys.path.insert(0, os.getcwd())  # the ComfyUI checkout
import comfy.options; comfy.options.enable_args_parsing()
import torch, comfy.lora
from safetensors.torch import load_file, save_file
lora, weights, strength = load_file(lora_path), load_file(weights_path), float(strength)
to_load = {k[: -len(".weight")]: k for k in weights if k.endswith(".weight")}
patches = comfy.lora.load_lora(lora, to_load)
result = {k: comfy.lora.calculate_weight([(strength, v, 1.0, None, None)], weights[k].float().clone(), k)
          for k, v in patches.items()}
save_file({k: v.contiguous() for k, v in result.items()}, out)
"""


@pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="opt-in: set COMFYUI_DIR (and COMFYUI_PYTHON)")
def test_lycoris_adapters_match_comfyui(case, tmp_path):
    unet, path, info = case
    weights, params = {}, dict(unet.named_parameters())
    for name, (kind, param, _) in info.items():
        alias = "lora_unet_" + name.replace(".", "_")
        weights[f"{alias}.weight"] = params[param].detach()
        bias = param[: -len("weight")] + "bias"
        if bias in params:
            weights[f"{alias}.bias"] = params[bias].detach()
    save(weights, tmp_path / "weights.safetensors")
    (tmp_path / "run.py").write_text(COMFY_SCRIPT)
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    r = subprocess.run([python, str(tmp_path / "run.py"), str(path), str(tmp_path / "weights.safetensors"),
                        str(STRENGTH), str(tmp_path / "out.safetensors")], cwd=os.environ["COMFYUI_DIR"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = load_file(str(tmp_path / "out.safetensors"))
    ours = with_lora(unet, path, STRENGTH)
    assert len(theirs) == len(MODULES) + 2
    for name, (kind, param, _) in info.items():
        alias = "lora_unet_" + name.replace(".", "_")
        for leaf in ("weight", "bias"):
            if f"{alias}.{leaf}" in theirs:
                mine = ours.get_parameter(param[: -len("weight")] + leaf)
                print(f"{kind} {leaf}: {rel_err(mine, theirs[f'{alias}.{leaf}']):.2e}")
                assert rel_err(mine, theirs[f"{alias}.{leaf}"]) <= 1e-6, (kind, leaf)
