"""The trainer node inside real ComfyUI (run with ComfyUI's Python by tests/test_comfyui_integration.py).

    python tests/comfy/train_check.py --comfyui DIR --work TMP   -> one JSON object on the last line

An SD1.5-layout checkpoint (bridge_check's tiny file, with an SD VAE encoder) loaded by ComfyUI; the shipped
training images through ComfyUI's own Load Image and Text Dataset from Folder and VAE Encode; Train MobileDiffusion
LoRA (one step, DiffusionGAN) on the MODEL, saving into models/loras; then ComfyUI's LoraLoader: every key of the
file maps to a weight of ComfyUI's model, and ComfyUI's patched UNet gives our pipeline's output (our loader + the
same LoRA) on the same input.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bridge_check():
    spec = importlib.util.spec_from_file_location("bridge_check", Path(__file__).with_name("bridge_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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

    import comfy.lora
    import comfy.model_management
    import comfy.sd
    import comfy.utils
    import folder_paths
    import nodes
    from comfy_extras.nodes_train import LoadImageTextSetFromFolderNode

    bc = _bridge_check()
    work = Path(a.work)
    files = bc.make_files(work)
    folder_paths.add_model_folder_path("loras", str(work / "loras"), is_default=True)
    folder_paths.set_input_directory(str(work / "input"))
    shutil.copytree(ROOT / "workflows" / "input" / "md_shapes_train", work / "input" / "md_shapes_train")
    plugin = bc.load_plugin()
    import importlib as il

    trainer = il.import_module(f"{plugin.__name__}.nodes.train").TrainMobileDiffusionLoRA()
    md = il.import_module(f"{plugin.__name__}.mobilediffusion.pipeline")
    md_lora = il.import_module(f"{plugin.__name__}.mobilediffusion.lora")

    # 1. ComfyUI's model, images and captions, as the workflow wires them
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(files["sd1"]), output_vae=True, output_clip=True)
    images, positive = LoadImageTextSetFromFolderNode().load_images("md_shapes_train", clip, "None")
    latents = nodes.VAEEncode().encode(vae, images)[0]
    # 2. our node on ComfyUI's MODEL
    t0 = time.perf_counter()
    out = trainer.train(latents, positive, "one-step (DiffusionGAN)", steps=6, batch_size=2, rank=4,
                        learning_rate=1e-3, seed=0, lora_name="trained-onestep", model=model)
    seconds = time.perf_counter() - t0
    loss, name = out["result"]
    path = Path(folder_paths.get_full_path("loras", name))
    # 3. ComfyUI's LoraLoader: every key used
    lora_sd = comfy.utils.load_torch_file(str(path))
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(lora_sd, key_map, log_missing=False)
    stems = {k.split(".", 1)[0] for k in lora_sd}  # lora_unet_<module>
    unused = sorted(s for s in stems if s not in key_map)
    patched, _ = nodes.LoraLoader().load_lora(model, clip, name, 1.0, 0.0)
    # 4. the same input through ComfyUI's patched UNet and our pipeline + the LoRA
    g = torch.Generator().manual_seed(0)
    x, ctx, t = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 768, generator=g), torch.tensor([999.0])
    comfy.model_management.load_models_gpu([patched])
    with torch.no_grad():
        theirs = patched.model.diffusion_model(x, t, context=ctx).float()
        pipe = md.load_pipeline(str(files["sd1"]))
        ours = md_lora.with_lora(pipe.unet, str(path))(x, t.long(), ctx).float()
        base = pipe.unet(x, t.long(), ctx).float()
    print(json.dumps({
        "lora_file": name, "lora_keys": len(lora_sd), "lora_modules": len(stems), "unused_keys": unused,
        "comfy_patched_weights": len(patches), "rel_err": bc.rel(ours, theirs), "lora_effect": bc.rel(ours, base),
        "loss_first": loss["loss"][0], "loss_last": loss["loss"][-1], "steps": len(loss["loss"]),
        "images": int(images.shape[0]), "train_s": round(seconds, 1),
    }))


if __name__ == "__main__":
    main()
