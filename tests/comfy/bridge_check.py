"""Bridge parity inside real ComfyUI (run with ComfyUI's Python by tests/test_comfyui_integration.py).

    python tests/comfy/bridge_check.py --comfyui DIR --work TMP   -> one JSON object on the last line

For an SD1.5-layout and an SD2-layout checkpoint (v-prediction via ModelSamplingDiscrete) with a kohya
LoRA at 0.7 applied by ComfyUI's own LoraLoader: our bridged UNet vs ComfyUI's UNet on the same input, our
denoised x0 vs ComfyUI's apply_model, the text encoder vs CLIPTextEncode (CLIPSetLastLayer -1 and -2), the
decoder vs VAEDecode, the encoder vs VAEEncode; then ComfyUI's model again (nothing mutated), and how long bridging took next to our
own loader on the same file.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


# about 155 CLIP tokens with every kind of emphasis: (x:w), nested (( )), an escaped \( \), a short weighted word that
# falls on a chunk boundary
LONG_PROMPT = ("a (majestic:1.3) lighthouse on a rocky cliff at dusk, waves crashing below, " * 9
               + "((dramatic stormy sky)), (seagulls:0.8) circling, \\(oil painting\\), (highly detailed:1.15), "
               + "warm light from the (lantern room:1.4), cold blue shadows on the rocks, film grain")


def rel(a, b) -> float:
    a, b = a.detach().float().flatten(), b.detach().float().flatten()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def make_files(work: Path) -> dict:
    """Tiny SD1/SD2-layout single files ComfyUI accepts (320 base channels, full-size text encoders) + LoRAs."""
    import torch
    from safetensors.torch import save_file

    from mobilediffusion.config import ModelConfig, UNetConfig
    from mobilediffusion.encoder import build_encoder
    from mobilediffusion.presets import OPENCLIP_H_TEXT, SD_KL_ENCODER, SD_TEXT, get_preset
    from mobilediffusion.weights.encoder_keys import LDM_KL_ENC
    from mobilediffusion.pipeline import build_pipeline
    from mobilediffusion.weights.single_file import single_file_tensors

    files = {}
    for name, text, ctx, linear, heads in (("sd1", SD_TEXT, 768, False, (8, 8)),
                                           ("sd2", OPENCLIP_H_TEXT, 1024, True, (5, 10))):
        sd = get_preset("sd15")
        cfg = ModelConfig(family=name, text=text, decoder=sd.decoder, schedule=sd.schedule, unet=UNetConfig(
            block_out_channels=(320, 640), layers_per_block=(1, 1), attention=("full", "none"), transformer_depth=(1, 1),
            num_attention_heads=heads, separable=(False, False), cross_attention_dim=ctx, use_linear_projection=linear))
        tensors = single_file_tensors(build_pipeline(cfg, seed=3))
        torch.manual_seed(4)  # and an SD VAE encoder (single_file_tensors writes the decoder half only)
        for k, v in LDM_KL_ENC.reverse(build_encoder(SD_KL_ENCODER).state_dict()).items():
            tensors[k] = v[:, :, None, None] if ".attn_1." in k and v.ndim == 2 else v  # 1x1 convs in LDM
        g = torch.Generator().manual_seed(5)
        for k in list(tensors):  # SD2: a real (not identity) last text layer, so CLIPSetLastLayer -1 differs
            if ".resblocks.23." in k and tensors[k].ndim == 2:
                tensors[k] = torch.randn(tensors[k].shape, generator=g) * 0.02
        path = work / "checkpoints" / f"tiny-{name}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        files[name] = path
        files[name + "_lora"] = write_lora(work / "loras" / f"lora-{name}.safetensors", ctx, text.hidden_size, g,
                                           linear)
    return files


def write_lora(path: Path, ctx: int, width: int, g, linear: bool) -> Path:
    """A kohya LoRA (diffusers module names) on attention, feed-forward, a projection, a resnet conv (LoCon)
    and two text-encoder layers, with alphas."""
    import torch
    from safetensors.torch import save_file

    r, t = 4, {}
    site = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_"
    mods = {site + "attn1_to_q": (320, 320), site + "attn2_to_k": (320, ctx), site + "ff_net_0_proj": (2560, 320),
            "lora_unet_down_blocks_0_attentions_0_proj_in": (320, 320),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (width, width),
            "lora_te_text_model_encoder_layers_1_mlp_fc1": (4 * width, width)}
    for name, (out, inp) in mods.items():
        conv = name.endswith("proj_in") and not linear
        t[f"{name}.lora_down.weight"] = torch.randn((r, inp, 1, 1) if conv else (r, inp), generator=g) * 0.1
        t[f"{name}.lora_up.weight"] = torch.randn((out, r, 1, 1) if conv else (out, r), generator=g) * 0.1
        t[f"{name}.alpha"] = torch.tensor(2.0)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"  # LoCon: 3x3 down, 1x1 up
    t[f"{conv}.lora_down.weight"] = torch.randn((r, 320, 3, 3), generator=g) * 0.05
    t[f"{conv}.lora_up.weight"] = torch.randn((320, r, 1, 1), generator=g) * 0.05
    t[f"{conv}.alpha"] = torch.tensor(4.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path))
    return path


def timing_sd15(work: Path, args: list, runs: int = 3) -> dict:
    """An SD1.5-size single file (random weights, fp16) + a rank-16 kohya LoRA on every attention projection:
    seconds to load it with our loader, and to bridge it (ComfyUI's loader + LoraLoader, then the bridge).
    Each timing runs in a fresh process (median of `runs`): in one process a later load reuses the memory an
    earlier one freed, which on a VM is several times faster than memory touched for the first time. Our
    loader is timed alone and beside ComfyUI's loaded model (the bridge always runs beside it: the same memory
    pressure). Every process imports transformers' CLIP model before the clock (a running server has it
    after the first use)."""
    import statistics
    import subprocess

    path, lora = sd15_files(work)
    rows = {"ours": [], "ours-lora": [], "ours-beside": [], "bridge": []}
    for _ in range(runs):
        for kind in rows:
            out = subprocess.run([sys.executable, __file__, *args, "--time-one", kind], capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"timing {kind} failed:\n{out.stderr[-3000:]}")
            rows[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = lambda kind, key: round(statistics.median(r[key] for r in rows[kind]), 2)  # noqa: E731
    return {"our_loader_s": med("ours", "s"), "our_loader_with_lora_s": med("ours-lora", "s"),
            "our_loader_beside_comfy_s": med("ours-beside", "s"),
            "comfy_loader_and_lora_s": med("bridge", "comfy_s"),
            "bridge_s": med("bridge", "s"), "runs": runs, "lora_modules": lora,
            "each": {k: [r["s"] for r in v] for k, v in rows.items()}}


def sd15_files(work: Path) -> tuple[Path, int]:
    """(the SD1.5-size file, LoRA module count), written once into work/checkpoints and work/loras."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mobilediffusion.pipeline import build_pipeline
    from mobilediffusion.presets import get_preset
    from mobilediffusion.weights.single_file import save_single_file
    from mobilediffusion.weights.unet_keys import DIFFUSERS_UNET

    path, lora_path = work / "checkpoints" / "sd15-random.safetensors", work / "loras" / "sd15-lora.safetensors"
    if not (path.is_file() and lora_path.is_file()):
        path.parent.mkdir(parents=True, exist_ok=True)
        pipe = build_pipeline(get_preset("sd15"))
        save_single_file(pipe, path, dtype=torch.float16)
        g, lora = torch.Generator().manual_seed(0), {}
        for name, p in DIFFUSERS_UNET.reverse(dict(pipe.unet.named_parameters())).items():
            if any(f".{w}.weight" in name for w in ("to_q", "to_k", "to_v", "to_out.0")):
                mod = "lora_unet_" + name.removesuffix(".weight").replace(".", "_")
                lora[f"{mod}.lora_down.weight"] = torch.randn(16, p.shape[1], generator=g) * 0.01
                lora[f"{mod}.lora_up.weight"] = torch.randn(p.shape[0], 16, generator=g) * 0.01
                lora[f"{mod}.alpha"] = torch.tensor(8.0)
        lora_path.parent.mkdir(exist_ok=True)
        save_file(lora, str(lora_path))
    with safe_open(str(lora_path), framework="pt") as f:
        return path, sum(k.endswith(".alpha") for k in f.keys())


def time_one(kind: str, work: Path, comfy, nodes, bridge) -> dict:
    """One timing in this (fresh) process: "ours" (load_pipeline on the file), "ours-lora" (with the LoRA at
    0.7, as the bridge gets it), "ours-beside" (load_pipeline after ComfyUI loaded the file and the LoRA) or
    "bridge" (after ComfyUI loaded them)."""
    from transformers import CLIPTextModel  # noqa: F401  imported before the clock in both

    from mobilediffusion.pipeline import load_pipeline

    path = work / "checkpoints" / "sd15-random.safetensors"
    if kind in ("ours", "ours-lora"):
        loras = [(work / "loras" / "sd15-lora.safetensors", 0.7)] if kind == "ours-lora" else None
        t0 = time.perf_counter()
        load_pipeline(path, loras=loras)
        return {"s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    model, clip = nodes.LoraLoader().load_lora(model, clip, "sd15-lora.safetensors", 0.7, 0.7)
    comfy_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if kind == "ours-beside":
        load_pipeline(path)
    else:
        bridge.bridge("auto", "fp32", "cpu", model=model, clip=clip, vae=vae)
    return {"s": time.perf_counter() - t0, "comfy_s": comfy_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfyui", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--sd15-timing", action="store_true", help="only the SD1.5-size loading vs bridging times")
    ap.add_argument("--time-one", choices=("ours", "ours-lora", "ours-beside", "bridge"), help=argparse.SUPPRESS)  # one --sd15-timing run
    ap.add_argument("--comfy-args", default="--cpu --fp32-text-enc",
                    help="ComfyUI's own flags (fp32 text weights: ComfyUI keeps them fp16 on CPU otherwise)")
    a = ap.parse_args()
    sys.argv = [sys.argv[0], *a.comfy_args.split()]
    sys.path.insert(0, a.comfyui)
    sys.path.insert(1, str(ROOT))
    import comfy.options

    comfy.options.enable_args_parsing()
    import torch

    import comfy.sd
    import folder_paths
    import nodes
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    work = Path(a.work)
    folder_paths.add_model_folder_path("loras", str(work / "loras"))
    plugin = load_plugin()
    bridge = plugin.nodes.bridge.MobileDiffusionFromComfy()
    if a.time_one:
        print(json.dumps(time_one(a.time_one, work, comfy, nodes, bridge)))
        return
    if a.sd15_timing:
        print(json.dumps(timing_sd15(work, ["--comfyui", a.comfyui, "--work", a.work, f"--comfy-args={a.comfy_args}"])))
        return
    files = make_files(work)
    results = {}
    for name in ("sd1", "sd2"):
        t0 = time.perf_counter()
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(files[name]), output_vae=True, output_clip=True)
        comfy_load_s = time.perf_counter() - t0
        if name == "sd2":
            model = ModelSamplingDiscrete().patch(model, "v_prediction", False)[0]
        model, clip = nodes.LoraLoader().load_lora(model, clip, files[name + "_lora"].name, 0.7, 0.7)
        g = torch.Generator().manual_seed(0)
        ctx_dim = 768 if name == "sd1" else 1024
        x = torch.randn(1, 4, 16, 16, generator=g)
        ctx = torch.randn(1, 77, ctx_dim, generator=g)
        sigma = torch.tensor([2.5])

        def comfy_outputs():
            comfy.model_management.load_models_gpu([model])
            base = model.model
            t = base.model_sampling.timestep(sigma).float()
            xc = base.model_sampling.calculate_input(sigma, x)
            with torch.no_grad():
                raw = base.diffusion_model(xc, t, context=ctx)
                denoised = base.apply_model(x, sigma, c_crossattn=ctx)
            return xc, t, raw, denoised

        xc, t, raw, denoised = comfy_outputs()
        row = {"comfy_load_s": round(comfy_load_s, 2)}
        # 1. bridge: UNet, x0, VAE
        prompt = {"9": {"class_type": "MobileDiffusionFromComfy", "inputs": {"model": ["2", 0], "clip": ["2", 1],
                                                                           "vae": ["1", 2]}},
                  "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                               "lora_name": files[name + "_lora"].name,
                                                               "strength_model": 0.7, "strength_clip": 0.7}},
                  "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": files[name].name}}}
        t0 = time.perf_counter()
        unet, text, decoder, encoder = bridge.bridge("auto", "fp32", "cpu", model=model, clip=clip, vae=vae,
                                                     prompt=prompt, unique_id="9")
        row["bridge_s"] = round(time.perf_counter() - t0, 2)
        with torch.no_grad():
            ours = unet.unet(xc, t, ctx)
        row["unet_rel_err"] = rel(ours, raw)
        row["prediction_type"] = unet.unet.config.prediction_type
        row["x0_rel_err"] = rel(our_x0(unet, x, xc, t, sigma, ours), denoised)
        latent = torch.randn(1, 4, 8, 8, generator=g)
        comfy_img = nodes.VAEDecode().decode(vae, {"samples": latent})[0]
        ours_img = plugin.nodes.decode.MobileDiffusionLiteDecode().decode(decoder, {"samples": latent})[0]
        row["decoder_rel_err"] = rel(ours_img, comfy_img)
        pixels = torch.rand(1, 64, 64, 3, generator=g)
        comfy_latent = nodes.VAEEncode().encode(vae, pixels)[0]["samples"]
        ours_latent = plugin.nodes.encode.MobileDiffusionLiteEncode().encode(encoder, pixels)[0]["samples"]
        row["encoder_rel_err"] = rel(ours_latent, comfy_latent)
        row["unet_name"] = unet.name
        # 2. text: CLIPTextEncode at the CLIP's default layer and at -1 / -2, a short prompt and a long one with
        # emphasis (about 150 tokens: 3 chunks)
        for layer in (None, -1, -2):
            c = clip if layer is None else nodes.CLIPSetLastLayer().set_last_layer(clip, layer)[0]
            _, te, _, _ = bridge.bridge("auto", "fp32", "cpu", clip=c)
            for what, text in (("", "a photo of a cat"), ("_long", LONG_PROMPT)):
                ref = nodes.CLIPTextEncode().encode(c, text)[0][0][0]
                got = plugin.nodes.text_encode.MobileDiffusionTextEncode().encode(te, text)[0][0][0]
                row[f"text{what}_rel_err_layer_{layer or 'default'}"] = rel(got, ref) if got.shape == ref.shape \
                    else f"shapes differ: ours {list(got.shape)}, ComfyUI {list(ref.shape)}"
                if what:
                    row["text_long_tokens"] = list(ref.shape)[1]
        # 3. ComfyUI's own model is unchanged
        _, _, raw2, denoised2 = comfy_outputs()
        row["comfy_unchanged_rel_err"] = max(rel(raw2, raw), rel(denoised2, denoised))
        # 4. our own loader on the same file, for the bridging time
        from mobilediffusion.pipeline import load_pipeline

        t0 = time.perf_counter()
        load_pipeline(files[name])
        row["our_loader_s"] = round(time.perf_counter() - t0, 2)
        results[name] = row
    print(json.dumps(results))


def our_x0(unet, x, xc, t, sigma, out):
    """x0 from our model output by its prediction type, in ComfyUI's sigma parametrisation (sigma_data 1)."""
    kind = unet.unet.config.prediction_type
    s = sigma.view(-1, 1, 1, 1)
    if kind == "epsilon":
        return x - out * s
    if kind == "v_prediction":
        return x / (s ** 2 + 1) - out * s / (s ** 2 + 1) ** 0.5
    return out


def load_plugin():
    name = "comfyui_mobilediffusion_bridge_check"
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    import importlib as il

    module.nodes = il.import_module(f"{name}.nodes")
    for sub in ("bridge", "decode", "encode", "text_encode"):
        il.import_module(f"{name}.nodes.{sub}")
    return module


if __name__ == "__main__":
    main()
