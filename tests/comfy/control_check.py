"""Controls and masks inside real ComfyUI (run with ComfyUI's Python by tests/test_comfyui_integration.py).

    python tests/comfy/control_check.py --comfyui DIR --work TMP   -> one JSON object on the last line

An SD1.5-layout checkpoint (random weights) loaded by ComfyUI; a ControlNet (LDM file, every weight random, zero
convolutions too) and a T2I-Adapter (TencentARC full layout) loaded by ComfyUI's ControlNetLoader code and applied
with ControlNetApplyAdvanced (strength 0.8, start/end 0.1/0.9). At noise levels inside and outside that window,
ComfyUI's x0 (its control's get_control, then BaseModel.apply_model) is compared with the MobileDiffusion
Sampler's path on the bridged UNet (nodes/control.py reads the same CONDITIONING). Then a masked img2img through
VAEEncode -> SetLatentNoiseMask -> MobileDiffusion Sampler -> VAEDecode: the known region against VAEDecode of
the input latent (on the tiny SD1 checkpoint of bridge_check, whose VAE is finite).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bridge_check import load_plugin, make_files, rel, sd15_files  # noqa: E402


def control_files(work: Path, plugin, unet) -> dict:
    """A ControlNet (LDM names, control_model.*) and a full T2I-Adapter (TencentARC names) for `unet`'s layout."""
    import torch
    from safetensors.torch import save_file

    md = f"{plugin.__name__}.mobilediffusion"
    apply = importlib.import_module(f"{md}.control.controlnet")
    adapter_mod = importlib.import_module(f"{md}.control.adapter")
    keys = importlib.import_module(f"{md}.control.keys")
    torch.manual_seed(7)
    cn = apply.ControlNet(apply.ControlNetConfig(unet.config))
    ad = adapter_mod.Adapter(adapter_mod.AdapterConfig("full", 3, unet.config.block_out_channels, 2, 1, False, 8))
    with torch.no_grad():
        for module in (cn, ad):
            for p in module.parameters():  # every weight random: zero convs included
                p.copy_(torch.randn_like(p) * (0.02 if p.dim() > 1 else 0.01))
    out = {"controlnet": work / "controlnet" / "cn-sd15.safetensors", "t2i": work / "controlnet" / "t2i-sd15.safetensors"}
    out["controlnet"].parent.mkdir(parents=True, exist_ok=True)
    save_file(keys.ldm_controlnet_tensors(cn), str(out["controlnet"]))
    save_file({k: v.contiguous() for k, v in keys.full_adapter_keymap(ad.config).reverse(ad.state_dict()).items()},
              str(out["t2i"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfyui", required=True)
    ap.add_argument("--work", required=True)
    a = ap.parse_args()
    sys.argv = [sys.argv[0], "--cpu", "--fp32-text-enc"]
    sys.path.insert(0, a.comfyui)
    sys.path.insert(1, str(ROOT))
    import comfy.options

    comfy.options.enable_args_parsing()
    import torch

    import comfy.controlnet
    import comfy.model_management
    import comfy.sd
    import nodes

    work = Path(a.work)
    plugin = load_plugin()
    control_nodes = importlib.import_module(f"{plugin.__name__}.nodes.control")
    apply_mod = importlib.import_module(f"{plugin.__name__}.mobilediffusion.control.apply")
    path, _ = sd15_files(work)
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    unet, *_ = plugin.nodes.bridge.MobileDiffusionFromComfy().bridge("auto", "fp32", "cpu", model=model, clip=clip,
                                                                       vae=vae)
    files = control_files(work, plugin, unet.unet)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    ctx, neg = torch.randn(1, 77, 768, generator=g) * 0.5, torch.randn(1, 77, 768, generator=g) * 0.5
    hint = torch.rand(1, 128, 96, 3, generator=g)  # IMAGE (B, H, W, C), another aspect: centre-cropped
    comfy.model_management.load_models_gpu([model])
    base, ms = model.model, model.get_model_object("model_sampling")
    results = {}
    for kind, file in files.items():
        control_net = comfy.controlnet.load_controlnet(str(file))
        row = {"comfy_class": type(control_net).__name__}
        zero, _ = nodes.ControlNetApplyAdvanced().apply_controlnet([[ctx, {}]], [[neg, {}]], control_net, hint, 0.0,
                                                                    0.1, 0.9)
        row["strength0_leaves_no_control"] = "control" not in zero[0][1]  # (so the sampler runs the plain UNet)
        for strength in (0.8,):
            pos, negc = nodes.ControlNetApplyAdvanced().apply_controlnet([[ctx, {}]], [[neg, {}]], control_net, hint,
                                                                          strength, 0.1, 0.9)
            c = pos[0][1]["control"]
            c.pre_run(base, lambda p: ms.percent_to_sigma(p))
            facts, _, shared = control_nodes.controls_for_sides(pos, negc)
            stack = apply_mod.ControlStack(control_nodes.to_controls(facts, unet.unet), unet.unet)
            for sigma in (2.5, 0.5, 13.0, 0.03):
                s = torch.tensor([sigma])
                with torch.no_grad():
                    ctl = c.get_control(x, s, {"c_crossattn": ctx}, 1, {})
                    want = base.apply_model(x, s, c_crossattn=ctx, control=ctl)
                    plain = base.apply_model(x, s, c_crossattn=ctx)
                    t = ms.timestep(s).float()
                    xc = ms.calculate_input(s, x)
                    res = stack(xc, t, ctx)
                    got = x - sigma * unet.unet(xc, t, ctx, control=res)
                key = f"s{strength}_sigma{sigma}"
                row[key + "_rel_err"] = rel(got, want)
                row[key + "_active"] = ctl is not None and strength != 0.0
                row[key + "_control_effect"] = rel(want, plain)
            c.cleanup()
            row["shared_chain"] = shared
        results[kind] = row
    small, sclip, svae, _ = comfy.sd.load_checkpoint_guess_config(str(make_files(work)["sd1"]), output_vae=True,
                                                                  output_clip=True)
    sunet, *_ = plugin.nodes.bridge.MobileDiffusionFromComfy().bridge("auto", "fp32", "cpu", model=small, clip=sclip,
                                                                        vae=svae)
    results["mask"] = masked_img2img(plugin, nodes, sunet, svae, ctx, small)
    print(json.dumps(results))


def masked_img2img(plugin, nodes, unet, vae, ctx, unet_model) -> dict:
    """VAEEncode -> SetLatentNoiseMask -> MobileDiffusion Sampler (3 euler steps, denoise 1) -> VAEDecode: mean abs
    difference from VAEDecode(input latent) over the known region (8 px away from the mask)."""
    import torch

    g = torch.Generator().manual_seed(3)
    image = torch.rand(1, 128, 128, 3, generator=g)
    mask = torch.zeros(1, 128, 128)
    mask[:, 32:96, 40:104] = 1.0
    (latent,) = nodes.VAEEncode().encode(vae, image)
    (masked,) = nodes.SetLatentNoiseMask().set_mask(latent, mask)
    sampler = importlib.import_module(f"{plugin.__name__}.nodes.sampler").MobileDiffusionSampler()
    (out,) = sampler.sample(unet, [[ctx, {}]], [[ctx, {}]], 1, 3, 1.0, "euler", 128, 128, 1, masked, 1.0)
    (decoded,) = nodes.VAEDecode().decode(vae, out)
    (reference,) = nodes.VAEDecode().decode(vae, latent)
    decoded, reference = decoded.detach(), reference.detach()
    (theirs,) = nodes.KSampler().sample(unet_model, 1, 3, 1.0, "euler", "normal", [[ctx, {}]], [[ctx, {}]], masked,
                                        1.0)
    (comfy_decoded,) = nodes.VAEDecode().decode(vae, theirs)
    known = torch.ones(128, 128, dtype=torch.bool)
    known[32 - 8:96 + 8, 40 - 8:104 + 8] = False
    small = torch.nn.functional.interpolate(mask[:, None], size=(16, 16), mode="bilinear")[0, 0] == 0
    return {"known_mean_abs": float((decoded - reference).abs()[0][known].mean()),
            "repainted_mean_abs": float((decoded - reference).abs()[0, 40:88, 48:96].mean()),
            "comfy_ksampler_known_mean_abs": float((comfy_decoded.detach() - reference).abs()[0][known].mean()),
            "latent_known_max_abs": float((out["samples"] - latent["samples"])[0][:, small].abs().max()),
            "comfy_latent_known_max_abs": float((theirs["samples"] - latent["samples"])[0][:, small].abs().max())}


if __name__ == "__main__":
    main()
